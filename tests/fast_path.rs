//! The fast path against the reference: every committed fixture through both fast executions on the
//! CPU, decisions identical to the reference's, outputs within the fp32 parity tolerance.
mod common;

use common::assert_fast_parity;
use scconv_tch::harness::parity::{
    committed_fixtures, committed_offset_fixtures, committed_version_fixtures, CaseSpec, Manifest,
};
use scconv_tch::Execution;
use tch::Device;

#[test]
fn committed_fixtures_match_on_both_fast_paths() {
    let policy = Manifest::<CaseSpec>::read(&committed_fixtures()).unwrap().policy(Device::Cpu, false);
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        let reports =
            assert_fast_parity(&committed_fixtures(), Device::Cpu, execution, &policy, "cpu-committed");
        assert!(reports.len() >= 10);
    }
}

/// The later versions, `torch_gn` and the paper fuse (weights/parity-versions): every case through
/// both fast executions, decisions identical to the reference mode's.
#[test]
fn committed_version_fixtures_match_on_both_fast_paths() {
    let dir = committed_version_fixtures();
    let policy = Manifest::<CaseSpec>::read(&dir).unwrap().policy(Device::Cpu, false);
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        let reports = assert_fast_parity(&dir, Device::Cpu, execution, &policy, "cpu-versions");
        assert_eq!(reports.len(), 11, "every committed version case");
    }
}

/// Inputs with large channel offsets at up to 768 channels (weights/parity-offset), where a merge
/// that summed in another order left the fp32 tolerance: both fast executions within it, decisions
/// identical to the reference mode's; and fresh cases of the same set, generated now.
#[test]
fn offset_inputs_stay_within_the_tolerance_on_both_fast_paths() {
    let committed = committed_offset_fixtures();
    let fresh = common::scratch_dir("fresh-cpu-offset");
    let seed = common::fresh_seed();
    common::generate_fixture_set(&fresh, seed, "cpu", "offset");
    println!("fresh offset fixtures with seed {seed} (SCCONV_FRESH_SEED={seed} reproduces them)");
    for (dir, label) in [(committed, "cpu-offset"), (fresh, "cpu-fresh-offset")] {
        let policy = Manifest::<CaseSpec>::read(&dir).unwrap().policy(Device::Cpu, false);
        common::assert_parity(&dir, Device::Cpu, &policy, label);
        for execution in [Execution::Fast, Execution::FastTensorOps] {
            let reports = assert_fast_parity(&dir, Device::Cpu, execution, &policy, label);
            assert_eq!(reports.len(), 5, "every offset case");
        }
    }
}

/// The trained SC network on the 1,000 sample images: fast logits within the fp32 parity tolerance of
/// the reference mode's, every prediction the same.
#[test]
fn the_trained_network_predicts_the_same_classes_on_the_fast_path() {
    use scconv_tch::harness::data::normalize;
    use scconv_tch::harness::infer::Classifier;
    use scconv_tch::harness::parity::{compare, Tolerance};
    let mut classifier =
        Classifier::load(&common::crate_dir().join("weights/fmnist_sc.json"), Device::Cpu).unwrap();
    let images = scconv_tch::harness::data::read_idx_split(&scconv_tch::harness::data::sample_dir()).unwrap();
    let x = normalize(&images.pixels);
    let reference = tch::no_grad(|| classifier.model.try_forward(&x)).unwrap();
    classifier.model.set_scconv_execution(Execution::Fast).unwrap();
    let fast = tch::no_grad(|| classifier.model.try_forward(&x)).unwrap();
    let c = compare(&fast, &reference, Tolerance::FP32).unwrap();
    assert!(c.passed(), "{c:?}");
    assert!(fast.argmax(1, false).equal(&reference.argmax(1, false)));
    println!("1,000 images: max |Δlogit| {:.3e} of max {:.3}", c.max_abs_err, c.max_abs_ref);
}

#[test]
fn the_cli_checks_the_fast_path_against_the_committed_fixtures() {
    let out =
        std::process::Command::new(common::bin()).args(["parity", "--execution", "fast"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Rust Fast on Cpu") && text.contains("14 of 14 cases pass"), "{text}");
    let versions = std::process::Command::new(common::bin())
        .args(["parity", "weights/parity-versions", "--execution", "fast"])
        .current_dir(common::crate_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&versions.stdout);
    assert!(versions.status.success(), "{text}");
    assert!(text.contains("11 of 11 cases pass") && text.contains("v2023_10_19_own_gn"), "{text}");
}

/// A fixture folder with no case checks nothing: the CLI says so and fails.
#[test]
fn a_parity_run_that_checks_no_case_fails() {
    let dir = common::scratch_dir("no-cases");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(committed_fixtures().join("manifest.json")).unwrap())
            .unwrap();
    manifest["cases"] = serde_json::json!([]);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    for execution in ["reference", "fast"] {
        let out = std::process::Command::new(common::bin())
            .args(["parity".as_ref(), dir.as_os_str()])
            .args(["--execution", execution])
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{execution}: {text}");
        assert!(text.contains("no case was checked"), "{execution}: {text}");
    }
}

/// Wide blocks on all-zero and tiny inputs (where every pooled value is alike and the softmax's
/// reduction order shows): the fast output stays within the fp32 tolerance of the reference mode's.
#[test]
fn wide_blocks_on_near_constant_inputs_match_the_reference_mode() {
    use scconv_tch::harness::parity::{compare, Tolerance};
    use scconv_tch::{scconv, ScConvConfig};
    use tch::{nn::VarStore, Kind, Tensor};
    for channels in [2048, 4096] {
        let vs = VarStore::new(Device::Cpu);
        let mut block = scconv(vs.root(), &ScConvConfig::new(channels)).unwrap();
        for fill in [0.0, 1e-30] {
            let x = Tensor::full([1, channels, 4, 4], fill, (Kind::Float, Device::Cpu));
            let reference = tch::no_grad(|| block.try_forward(&x)).unwrap();
            for execution in [Execution::Fast, Execution::FastTensorOps] {
                block.set_execution(execution).unwrap();
                let fast = tch::no_grad(|| block.try_forward(&x)).unwrap();
                let c = compare(&fast, &reference, Tolerance::FP32).unwrap();
                assert!(c.passed(), "C {channels}, input {fill}, {execution:?}: {c:?}");
            }
            block.set_execution(Execution::Reference).unwrap();
        }
    }
}
