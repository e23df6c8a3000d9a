//! The published versions of the reference as configuration: a state dict saved by one version loads
//! into a config of that version (library and CLI), and into another gives an error naming the
//! version its keys belong to; the fast path says which configs it does not cover.
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

#[test]
fn the_fast_path_refuses_what_it_does_not_cover() {
    let vs = VarStore::new(Device::Cpu);
    let mut block = scconv(vs.root(), &config(Variant::V20231019, true)).unwrap();
    let err = block.set_execution(Execution::Fast).unwrap_err().to_string();
    assert!(err.contains("fast path does not cover variant 2023-10-19 with the Global fuse"), "{err}");
    let paper = ScConvConfig::new(64).with_fuse(scconv_tch::Fuse::Paper);
    let mut block = scconv(&vs.root() / "paper", &paper).unwrap();
    let err = block.set_execution(Execution::FastTensorOps).unwrap_err().to_string();
    assert!(err.contains("variant 2023-07-27 with the Paper fuse"), "{err}");
    block.set_execution(Execution::Reference).unwrap();
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
