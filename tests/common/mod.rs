//! Helpers shared by the integration tests.
#![allow(dead_code)]
use scconv_tch::harness::fast_parity::{self, FastCaseReport};
use scconv_tch::harness::parity::{self, CaseReport, Policy};
use scconv_tch::Execution;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

pub mod trained;

/// Limits the child `command` starts to `bytes` of address space (`RLIMIT_AS`), so an input that makes
/// the process ask for gigabytes fails there alone instead of taking the machine.
pub fn limit_address_space(command: &mut Command, bytes: u64) -> &mut Command {
    limit(command, libc::RLIMIT_AS, bytes, bytes)
}

/// Sets the resource limit `resource` (soft, hard) of the child `command` starts.
pub fn limit(
    command: &mut Command,
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The crate's folder: `$SCCONV_ROOT` when the test binary runs from a copy elsewhere (the GPU
/// machine), else where it was built.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("SCCONV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `scconv-tch` binary cargo built, or `$SCCONV_BIN` when the tests run from a copy (the GPU machine).
pub fn bin() -> String {
    std::env::var("SCCONV_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_scconv-tch").to_string())
}

/// The Python of the environment `scripts/setup_torch.sh` made (`$SCCONV_PYTHON` overrides it).
pub fn python() -> PathBuf {
    let python = std::env::var_os("SCCONV_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with torch at {}: run scripts/setup_torch.sh (or set SCCONV_PYTHON)",
        python.display()
    );
    python
}

/// Runs the reference's fixture generator into `out` with `seed` on `device` ("cpu" or "cuda").
pub fn generate_fixtures(out: &Path, seed: u64, device: &str) {
    generate_fixture_set(out, seed, device, "seed");
}

/// The same for a case set of the generator (`seed`, or `versions`: the later versions, the paper's fuse).
pub fn generate_fixture_set(out: &Path, seed: u64, device: &str, set: &str) {
    let status = Command::new(python())
        .arg(crate_dir().join("parity/generate_fixtures.py"))
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--seed", &seed.to_string(), "--device", device, "--set", set])
        .status()
        .expect("cannot start the Python fixture generator");
    assert!(status.success(), "parity/generate_fixtures.py failed ({status}) for seed {seed}");
}

/// A seed that changes from run to run; `SCCONV_FRESH_SEED` pins it to reproduce a failure.
pub fn fresh_seed() -> u64 {
    match std::env::var("SCCONV_FRESH_SEED") {
        Ok(seed) => seed.parse().expect("SCCONV_FRESH_SEED must be an integer"),
        Err(_) => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                % 1_000_000_007
        }
    }
}

/// Runs every case in `dir` on `device` and asserts that each passes under `policy`. The table is
/// printed and recorded in `target/parity-reports/<label>.txt`.
pub fn assert_parity(dir: &Path, device: Device, policy: &Policy, label: &str) -> Vec<CaseReport> {
    let reports = parity::run_all(dir, device, policy).unwrap_or_else(|e| panic!("{label}: {e}"));
    let table = record_table(label, dir, device, policy, &parity::table(&reports, policy));
    let failed: Vec<&str> = reports.iter().filter(|r| !r.passed(policy)).map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "{label}: cases failing parity: {failed:?}\n{table}");
    reports
}

/// As `assert_parity`, for the fast path `execution` (forward only); its decisions must be the
/// reference mode's on the same device at every position.
pub fn assert_fast_parity(
    dir: &Path,
    device: Device,
    execution: Execution,
    policy: &Policy,
    label: &str,
) -> Vec<FastCaseReport> {
    let label = format!("{label}-{execution:?}");
    let reports =
        fast_parity::run_all(dir, device, execution, policy).unwrap_or_else(|e| panic!("{label}: {e}"));
    let table = record_table(&label, dir, device, &policy.fast(), &fast_parity::table(&reports, policy));
    let failed: Vec<&str> = reports.iter().filter(|r| !r.passed(policy)).map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "{label}: cases failing fast-path parity: {failed:?}\n{table}");
    reports
}

/// Prints a parity table and records it in `target/parity-reports/<label>.txt`; it must have rows.
fn record_table(label: &str, dir: &Path, device: Device, policy: &Policy, rows: &str) -> String {
    let table = format!("{label}: {} on {device:?}, {}\n{rows}", dir.display(), policy.describe());
    println!("{table}");
    let record_dir = crate_dir().join("target/parity-reports");
    std::fs::create_dir_all(&record_dir).expect("cannot create target/parity-reports");
    std::fs::write(record_dir.join(format!("{label}.txt")), &table).expect("cannot record the parity table");
    assert!(rows.lines().count() > 1, "{label}: no cases in {}", dir.display());
    table
}

/// Every published version with each `torch_gn` value it has, under both fuses, at `channels` (the
/// version's other defaults): 14 configs.
pub fn every_version_config(channels: i64) -> Vec<scconv_tch::ScConvConfig> {
    use scconv_tch::{Fuse, ScConvConfig, Variant};
    let mut configs = Vec::new();
    for variant in Variant::ALL {
        let gn_options: &[bool] = if variant == Variant::V20230727 { &[false] } else { &[false, true] };
        for &torch_gn in gn_options {
            for fuse in [Fuse::Global, Fuse::Paper] {
                configs.push(ScConvConfig { torch_gn, fuse, ..ScConvConfig::for_variant(channels, variant) });
            }
        }
    }
    configs
}

/// A scratch folder under target/ that is emptied first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = crate_dir().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a scratch folder");
    dir
}

// The exhaustive check of the fast path's cheap gate (tests/gate_threshold.rs, and on CUDA in
// tests/parity_cuda.rs).

const SWEEP_CHUNK: i64 = 1 << 20;

/// Positions in `z` where the cheap gate and the sigmoid disagree, for either comparison.
pub fn disagreements(z: &Tensor, t: f64, z_t: f64) -> i64 {
    let s = z.sigmoid();
    let ge = s.ge(t).logical_xor(&z.ge(z_t));
    let lt = s.lt(t).logical_xor(&z.lt(z_t));
    ge.logical_or(&lt).sum(Kind::Int64).int64_value(&[])
}

pub fn sweep_every_fp32(device: Device, t: f64) {
    let z_t = scconv_tch::fast::threshold::calibrate(t, device).unwrap() as f64;
    let (mut checked, mut bad_vector, mut bad_scalar) = (0i64, 0i64, 0i64);
    let mut start = i64::from(i32::MIN);
    while start <= i64::from(i32::MAX) {
        let end = (start + SWEEP_CHUNK).min(i64::from(i32::MAX) + 1);
        let bits = Tensor::arange_start(start, end, (Kind::Int, device));
        let z = bits.view_dtype(Kind::Float);
        bad_vector += disagreements(&z, t, z_t);
        // Every other value through a stride-2 view: libtorch's scalar loop (the tail path of a
        // contiguous tensor); the interleaving covers all values across the two halves.
        let pairs = z.view([-1, 2]);
        bad_scalar += disagreements(&pairs.select(1, 0), t, z_t) + disagreements(&pairs.select(1, 1), t, z_t);
        checked += end - start;
        start = end;
    }
    assert_eq!(checked, 1i64 << 32);
    assert_eq!((bad_vector, bad_scalar), (0, 0), "t {t}, z_t {z_t:e}, {device:?}");
    println!("{device:?}: all 2^32 fp32 values agree for t = {t} (z_t = {z_t:e})");
}
