//! The published versions of the reference as configuration: a state dict saved by one version loads
//! into a config of that version (library and CLI), and into another gives an error naming the
//! version its keys belong to; the fast path runs every version and fuse.
mod common;

use common::{bin, scratch_dir};
use scconv_tch::harness::parity::{committed_fixtures, committed_version_fixtures};
use scconv_tch::{scconv, weights, Execution, ScConvConfig, ScConvError, Variant};
use std::path::PathBuf;
use std::process::Command;
use tch::{nn::VarStore, Device};

fn load(config: &ScConvConfig, file: &PathBuf) -> Result<(), ScConvError> {
    let mut vs = VarStore::new(Device::Cpu);
    scconv(vs.root(), config)?;
    weights::load(&mut vs, file)
}

fn config(variant: Variant, torch_gn: bool) -> ScConvConfig {
    ScConvConfig { torch_gn, ..ScConvConfig::for_variant(64, variant) }
}

#[test]
fn a_state_dict_of_another_version_is_refused_with_the_version_named() {
    let seed_file = committed_fixtures().join("c64_56x56_b1.safetensors");
    let own_gn_file = committed_version_fixtures().join("v2023_09_12.safetensors");
    let torch_gn_file = committed_version_fixtures().join("v2023_10_19.safetensors");
    let cases = [
        (
            config(Variant::V20231019, true),
            &seed_file,
            "look like ScConv 2023-07-27",
            "the model is 2023-09-12 or later with torch_gn",
        ),
        (
            ScConvConfig::new(64),
            &own_gn_file,
            "look like ScConv 2023-09-12 or later without torch_gn",
            "the model is 2023-07-27",
        ),
        (
            ScConvConfig::new(64),
            &torch_gn_file,
            "2023-09-12 or later with torch_gn",
            "the model is 2023-07-27",
        ),
        (
            config(Variant::V20230914, false),
            &torch_gn_file,
            "with torch_gn",
            "the model is 2023-09-12 or later without torch_gn",
        ),
    ];
    for (config, file, file_version, model_version) in cases {
        let err = load(&config, file).expect_err("another version's keys must be refused").to_string();
        assert!(err.contains(file_version) && err.contains(model_version), "{err}");
        assert!(err.contains("set \"variant\""), "{err}");
    }
    load(&config(Variant::V20230912, false), &own_gn_file).unwrap();
    load(&config(Variant::V20231019, true), &torch_gn_file).unwrap();
    load(&ScConvConfig::new(64), &seed_file).unwrap();
}

/// Every version, `torch_gn` value and fuse runs both fast executions: the same decisions as the
/// reference mode at every position, outputs within the fp32 tolerance, on plain and offset inputs.
#[test]
fn the_fast_path_runs_every_version_torch_gn_and_fuse() {
    use scconv_tch::harness::parity::{compare, Tolerance};
    use tch::{Kind, Tensor};
    let mut checked = 0;
    for config in common::every_version_config(64) {
        let vs = VarStore::new(Device::Cpu);
        let mut block = scconv(vs.root(), &config).unwrap();
        tch::no_grad(|| {
            block.SRU.gn.beta.copy_(&(Tensor::randn_like(&block.SRU.gn.beta) * 0.1));
            block.SRU.gn.gamma.copy_(&Tensor::randn_like(&block.SRU.gn.gamma));
        });
        for offset in [0.0, 100.0] {
            let x = Tensor::randn([2, 64, 9, 7], (Kind::Float, Device::Cpu)) + offset;
            let reference = tch::no_grad(|| block.try_forward(&x)).unwrap();
            let reference_info = block.try_gate(&x).unwrap().decisions.info_mask;
            for execution in [Execution::Fast, Execution::FastTensorOps] {
                block.set_execution(execution).unwrap();
                let fast = tch::no_grad(|| block.try_forward(&x)).unwrap();
                let info = block.try_fast_info_mask(&x).unwrap().unwrap();
                let label = format!("{config:?} offset {offset} {execution:?}");
                assert!(info.equal(&reference_info), "{label}: decisions differ");
                let c = compare(&fast, &reference, Tolerance::FP32).unwrap();
                assert!(c.passed(), "{label}: {c:?}");
                block.set_execution(Execution::Reference).unwrap();
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 56);
}

#[test]
fn the_cli_exports_a_later_version_from_its_config_and_state_dict() {
    let dir = scratch_dir("versions-cli");
    let config = dir.join("v2023_10_19.json");
    std::fs::write(&config, r#"{"op_channel": 64, "variant": "2023-10-19"}"#).unwrap();
    let weights = committed_version_fixtures().join("v2023_10_19.safetensors");
    let out = dir.join("block.pt");
    let run = |config: &PathBuf| {
        Command::new(bin())
            .args(["export", "--scconv"])
            .arg(config)
            .arg("--weights")
            .arg(&weights)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let ok = run(&config);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.is_file());
    let seed_config = dir.join("seed.json");
    std::fs::write(&seed_config, r#"{"op_channel": 64}"#).unwrap();
    std::fs::remove_file(&out).unwrap();
    let refused = run(&seed_config);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("2023-09-12 or later with torch_gn") && stderr.lines().count() == 1, "{stderr}");
}
