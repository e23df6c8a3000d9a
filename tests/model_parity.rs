//! Whole networks against their PyTorch twins (`parity/models.py`): freshly generated random-weight
//! ResNet-18 / SC-ResNet-18 / SC-ResNet-50 / a small SC net, eval mode, CPU; and the parameter counts.
mod common;

use common::{crate_dir, python, scratch_dir};
use scconv_tch::harness::model_parity::ModelCaseSpec;
use scconv_tch::harness::model_parity::{self, ModelCaseReport};
use scconv_tch::harness::parity::{Manifest, Tolerance};
use scconv_tch::models::{resnet, ResNetConfig};
use std::path::Path;
use std::process::Command;
use tch::{nn::VarStore, Device};

fn generate(out: &Path, cases: &str) {
    generate_with(out, cases, &[]);
}

fn generate_with(out: &Path, cases: &str, extra: &[&str]) {
    let status = Command::new(python())
        .arg(crate_dir().join("parity/generate_model_fixtures.py"))
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--cases", cases])
        .args(extra)
        .status()
        .expect("cannot start the Python model fixture generator");
    assert!(status.success(), "parity/generate_model_fixtures.py --cases {cases} failed ({status})");
}

/// Every network of `dir` under its manifest's policy: on the kind of CPU that made the fixtures, logits
/// equal to PyTorch's (`==`) and no decision flipped. Fixtures made now (`fresh`) are made here, so they
/// must get that policy.
fn assert_models(dir: &Path, label: &str, fresh: bool) -> Vec<ModelCaseReport> {
    let policy = Manifest::<ModelCaseSpec>::read(dir).unwrap().policy(Device::Cpu, false);
    if fresh {
        assert!(policy.same_kernels && policy.tolerance == Tolerance::EXACT, "{label}: {policy:?}");
    }
    let reports = model_parity::run_all(dir, Device::Cpu, &policy).unwrap_or_else(|e| panic!("{label}: {e}"));
    let table = format!("{}\n{}", policy.describe(), model_parity::table(&reports, &policy));
    println!("{label}\n{table}");
    let record = crate_dir().join("target/parity-reports");
    std::fs::create_dir_all(&record).unwrap();
    std::fs::write(record.join(format!("{label}.txt")), &table).unwrap();
    for r in &reports {
        assert!(r.passed(&policy), "{label}: {} fails\n{table}", r.name);
    }
    reports
}

#[test]
fn random_weight_networks_match_pytorch_on_cpu() {
    let dir = scratch_dir("models-random");
    generate(&dir, "random");
    let reports = assert_models(&dir, "models-random-cpu", true);
    assert_eq!(reports.len(), 5);
    let gates: Vec<usize> = reports.iter().map(|r| r.layers.len()).collect();
    assert_eq!(gates, [0, 13, 16, 5, 13], "ScConv count per network");
}

/// Fast logits of `case` within the fp32 tolerance of PyTorch's and of the reference mode's, with the
/// same classes (the fast path's decisions are the reference mode's, block by block: tests/versions.rs).
fn assert_fast_network_matches(dir: &Path, case: &ModelCaseSpec) {
    use scconv_tch::harness::parity::{compare, read_tensors};
    use scconv_tch::{weights, Execution};
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = resnet(vs.root(), &case.config).unwrap();
    weights::load(&mut vs, dir.join(&case.state_dict)).unwrap();
    let expected = read_tensors(&dir.join(&case.tensors)).unwrap();
    let reference = tch::no_grad(|| model.try_forward(&expected["input"])).unwrap();
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        model.set_scconv_execution(execution).unwrap();
        let fast = tch::no_grad(|| model.try_forward(&expected["input"])).unwrap();
        for (against, what) in [(&expected["logits"], "PyTorch"), (&reference, "the reference mode")] {
            let c = compare(&fast, against, Tolerance::FP32).unwrap();
            assert!(c.passed(), "{} {execution:?} against {what}: {c:?}", case.name);
            assert!(fast.argmax(1, false).equal(&against.argmax(1, false)), "{}: classes differ", case.name);
        }
    }
}

/// The current head's SC-ResNet-18 (2023-10-19: `torch_gn`, group_num 4) built in PyTorch and saved
/// with `torch.save(model.state_dict())` now: loads into `models::resnet` from its JSON config and
/// agrees with PyTorch in the reference mode (logits and every gate decision) and on the fast path.
#[test]
fn a_torch_saved_2023_10_19_sc_resnet_matches_pytorch_in_both_modes() {
    let dir = scratch_dir("models-v2023-10-19-pt");
    generate_with(&dir, "random", &["--only", "sc_resnet18_v2023_10_19_64px", "--format", "pt"]);
    let manifest: Manifest<ModelCaseSpec> = Manifest::read(&dir).unwrap();
    let case = &manifest.cases[0];
    assert!(case.state_dict.ends_with(".pt"), "{}", case.state_dict);
    let block = case.config.scconv.config(64).unwrap();
    assert_eq!((block.variant, block.torch_gn, block.group_num), (scconv_tch::Variant::V20231019, true, 4));
    let reports = assert_models(&dir, "models-v2023-10-19-pt-cpu", true);
    assert_eq!(reports[0].layers.len(), 13);
    assert_fast_network_matches(&dir, case);
}

/// One small SC network per later version (weights/parity-models/versions), both modes.
#[test]
fn committed_networks_of_every_later_version_match_pytorch_in_both_modes() {
    let dir = crate_dir().join("weights/parity-models/versions");
    let reports = assert_models(&dir, "models-versions-cpu", false);
    assert_eq!(reports.len(), 4);
    let manifest: Manifest<ModelCaseSpec> = Manifest::read(&dir).unwrap();
    for case in &manifest.cases {
        assert_fast_network_matches(&dir, case);
    }
}

fn parameters(config: &ResNetConfig) -> i64 {
    let vs = VarStore::new(Device::Cpu);
    resnet(vs.root(), config).unwrap();
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[test]
fn sc_resnet50_has_the_papers_parameter_saving() {
    let plain = parameters(&ResNetConfig::named("resnet50", false).unwrap());
    let sc = parameters(&ResNetConfig::named("resnet50", true).unwrap());
    // torchvision's ResNet-50 has 25,557,032 parameters; PyTorch's SC twin 16,530,280 (parity/models.py).
    assert_eq!((plain, sc), (25_557_032, 16_530_280));
    let saving = 1.0 - sc as f64 / plain as f64;
    assert!((0.34..0.36).contains(&saving), "saving {saving}");
}

#[test]
fn resnet18_34_101_parameter_counts_match_pytorch() {
    let count = |arch: &str, sc: bool| parameters(&ResNetConfig::named(arch, sc).unwrap());
    assert_eq!((count("resnet18", false), count("resnet18", true)), (11_689_512, 4_161_704));
    assert_eq!((count("resnet34", false), count("resnet34", true)), (21_797_672, 6_214_440));
    assert_eq!((count("resnet101", false), count("resnet101", true)), (44_549_160, 27_527_784));
}

#[test]
fn the_trained_fashion_mnist_networks_match_pytorch_on_real_images() {
    let dir = crate_dir().join("weights/parity-models");
    let reports = assert_models(&dir, "models-trained-cpu", false);
    let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["fmnist_plain", "fmnist_sc"]);
}
