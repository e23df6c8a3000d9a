//! Parity with the PyTorch reference on the CPU: the committed fixtures and fresh ones generated now.
//! Same libtorch kernels on both sides, so no gate decision may flip.
mod common;

use common::{
    assert_fast_parity, assert_parity, fresh_seed, generate_fixture_set, generate_fixtures, scratch_dir,
};
use scconv_tch::harness::parity::{committed_fixtures, committed_version_fixtures, Manifest, Policy};
use scconv_tch::{scconv, weights, Execution, ScConvConfig};
use std::collections::BTreeMap;
use tch::{nn::VarStore, Device};

fn cpu_policy() -> Policy {
    Policy::for_run("cpu", Device::Cpu, false)
}

/// On a CPU like the one that made them (recorded in the manifest) bit for bit, with no flipped
/// decision; on another kind of CPU with the across-devices policy.
#[test]
fn committed_fixtures_match_the_reference_on_cpu() {
    let dir = committed_fixtures();
    let policy =
        Manifest::<scconv_tch::harness::parity::CaseSpec>::read(&dir).unwrap().policy(Device::Cpu, false);
    let reports = assert_parity(&dir, Device::Cpu, &policy, "cpu-committed");
    assert!(reports.len() >= 10, "at least 10 cases, found {}", reports.len());
    assert!(!policy.same_kernels || reports.iter().all(|r| r.gate.flips() == 0));
}

/// The later versions of the reference (2023-09-12, 2023-09-14, 2023-10-19, with and without
/// `torch_gn`) and the paper's fuse, against their PyTorch twins: the same three layers.
#[test]
fn committed_version_fixtures_match_their_twins_on_cpu() {
    let dir = committed_version_fixtures();
    let manifest = Manifest::<scconv_tch::harness::parity::CaseSpec>::read(&dir).unwrap();
    let policy = manifest.policy(Device::Cpu, false);
    let reports = assert_parity(&dir, Device::Cpu, &policy, "cpu-committed-versions");
    let variants: std::collections::BTreeSet<_> = manifest.cases.iter().map(|c| c.config.variant).collect();
    assert_eq!(variants.len(), 4, "every variant has cases");
    assert!(manifest.cases.iter().any(|c| c.config.fuse == scconv_tch::Fuse::Paper));
    assert!(
        manifest.cases.iter().any(|c| c.config.torch_gn) && manifest.cases.iter().any(|c| !c.config.torch_gn)
    );
    assert!(!policy.same_kernels || reports.iter().all(|r| r.gate.flips() == 0));
}

#[test]
fn fresh_version_fixtures_match_their_twins_on_cpu() {
    let seed = fresh_seed();
    let dir = scratch_dir("fresh-cpu-versions");
    generate_fixture_set(&dir, seed, "cpu", "versions");
    println!("fresh version fixtures with seed {seed} (SCCONV_FRESH_SEED={seed} reproduces them)");
    assert_parity(&dir, Device::Cpu, &cpu_policy(), "cpu-fresh-versions");
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        assert_fast_parity(&dir, Device::Cpu, execution, &cpu_policy(), "cpu-fresh-versions");
    }
}

#[test]
fn fresh_fixtures_from_the_python_reference_match_on_cpu() {
    let seed = fresh_seed();
    let dir = scratch_dir("fresh-cpu");
    generate_fixtures(&dir, seed, "cpu");
    println!("fresh fixtures with seed {seed} (SCCONV_FRESH_SEED={seed} reproduces them)");
    assert_parity(&dir, Device::Cpu, &cpu_policy(), "cpu-fresh");
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        assert_fast_parity(&dir, Device::Cpu, execution, &cpu_policy(), "cpu-fresh");
    }
}

#[test]
fn every_state_dict_loads_with_exactly_the_pytorch_keys() {
    let dir = committed_fixtures();
    let manifest: Manifest = Manifest::read(&dir).unwrap();
    for case in &manifest.cases {
        let mut vs = VarStore::new(Device::Cpu);
        scconv(vs.root(), &case.config).unwrap();
        let tensors: BTreeMap<_, _> =
            weights::read(dir.join(&case.state_dict)).unwrap().into_iter().collect();
        let report = weights::check(&vs, &tensors);
        assert!(report.is_clean(), "{}: {report}", case.name);
        let keys: Vec<&String> = tensors.keys().collect();
        let expected = [
            "CRU.GWC.bias",
            "CRU.GWC.weight",
            "CRU.PWC1.weight",
            "CRU.PWC2.weight",
            "CRU.squeeze1.weight",
            "CRU.squeeze2.weight",
            "SRU.gn.beta",
            "SRU.gn.gamma",
        ];
        assert_eq!(keys, expected, "{}", case.name);
        weights::load(&mut vs, dir.join(&case.state_dict)).unwrap();
    }
}

#[test]
fn a_torch_save_pickle_loads_the_same_weights_as_safetensors() {
    let dir = committed_fixtures();
    let config = ScConvConfig { group_num: 4, ..ScConvConfig::new(32) };
    let load = |file: &str| {
        let mut vs = VarStore::new(Device::Cpu);
        scconv(vs.root(), &config).unwrap();
        weights::load(&mut vs, dir.join(file)).unwrap();
        vs.variables().into_iter().collect::<BTreeMap<_, _>>()
    };
    let (from_pt, from_safetensors) = (load("group_num_4.pt"), load("group_num_4.safetensors"));
    assert_eq!(from_pt.len(), 8);
    for (key, tensor) in &from_pt {
        assert!(tensor.equal(&from_safetensors[key]), "{key} differs between .pt and .safetensors");
    }
}

#[test]
fn the_fixtures_exercise_the_fp32_gate_band() {
    // A port that decided `z >= 0` instead of `sigmoid(z) >= 0.5` would differ from the reference here.
    let dir = committed_fixtures();
    let tensors: BTreeMap<_, _> =
        weights::read(dir.join("c512_7x7_b4.tensors.safetensors")).unwrap().into_iter().collect();
    let sign_decision = tensors["gate.z"].ge(0.0);
    let differing =
        sign_decision.logical_xor(&tensors["gate.info_mask"]).sum(tch::Kind::Int64).int64_value(&[]);
    assert!(differing > 0, "the sign shortcut agrees everywhere: the fixture does not test the band");
}
