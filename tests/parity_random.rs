//! Randomized parity: 200 valid random configurations and shapes, fixtures made now by the Python
//! reference with a fresh seed (printed; SCCONV_FRESH_SEED replays it), checked with the CPU policy; and
//! random invalid configurations, which the Rust side must reject whatever the reference does with them.
//! The fast paths are checked on the same fixtures.
mod common;

use common::{assert_fast_parity, assert_parity, crate_dir, fresh_seed, python, scratch_dir};
use scconv_tch::harness::parity::{Manifest, Policy};
use scconv_tch::{Execution, Fuse, ScConvConfig, Variant};
use std::process::Command;
use tch::Device;

#[derive(serde::Deserialize)]
struct InvalidCase {
    config: ScConvConfig,
    reference: String,
}

#[test]
fn random_configs_match_the_reference_and_invalid_ones_are_rejected() {
    let seed = fresh_seed();
    let dir = scratch_dir("random");
    let status = Command::new(python())
        .arg(crate_dir().join("parity/generate_random_fixtures.py"))
        .args(["--out".as_ref(), dir.as_os_str()])
        .args(["--seed", &seed.to_string()])
        .status()
        .expect("cannot start parity/generate_random_fixtures.py");
    assert!(status.success(), "the random fixture generator failed for seed {seed}");
    println!("random fixtures with seed {seed} (SCCONV_FRESH_SEED={seed} replays them)");

    let policy = Policy::for_run("cpu", Device::Cpu, false);
    let reports = assert_parity(&dir, Device::Cpu, &policy, "cpu-random");
    assert_eq!(reports.len(), 200);
    // The draws spread over the versions (a quarter each), the fuses (a quarter paper) and, in the later
    // versions, both GroupNorms: each share far above the bound (at least 20 of an expected 50; 20 is
    // five standard deviations below).
    let manifest: Manifest = Manifest::read(&dir).unwrap();
    let count =
        |keep: &dyn Fn(&ScConvConfig) -> bool| manifest.cases.iter().filter(|c| keep(&c.config)).count();
    for variant in Variant::ALL {
        let n = count(&|c| c.variant == variant);
        assert!(n >= 20, "seed {seed}: only {n} of 200 cases of {variant:?}");
    }
    let paper = count(&|c| c.fuse == Fuse::Paper);
    assert!((20..=100).contains(&paper), "seed {seed}: {paper} of 200 cases with the paper's fuse");
    for torch_gn in [false, true] {
        let n = count(&|c| c.variant != Variant::V20230727 && c.torch_gn == torch_gn);
        assert!(n >= 20, "seed {seed}: only {n} later-version cases with torch_gn = {torch_gn}");
    }
    for execution in [Execution::Fast, Execution::FastTensorOps] {
        let fast = assert_fast_parity(&dir, Device::Cpu, execution, &policy, "cpu-random");
        assert_eq!(fast.len(), 200, "every case, of every version and fuse, through the fast path");
    }

    let text = std::fs::read_to_string(dir.join("invalid.json")).unwrap();
    let invalid: Vec<InvalidCase> = serde_json::from_str(&text).unwrap();
    assert!(invalid.len() >= 50);
    let mut silently_run = 0;
    for case in &invalid {
        let err =
            case.config.validate().expect_err(&format!("seed {seed}: {:?} must be rejected", case.config));
        silently_run += usize::from(case.reference == "runs");
        println!("{:?}\n    reference: {}\n    Rust: {err}", case.config, case.reference);
    }
    println!(
        "{} invalid configs: all rejected by Rust; the reference ran {silently_run} of them without error",
        invalid.len()
    );
}
