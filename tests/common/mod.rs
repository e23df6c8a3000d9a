//! Helpers shared by the integration tests.
#![allow(dead_code)]
use scconv_tch::parity::{self, CaseReport, Policy};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Device;

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
    let status = Command::new(python())
        .arg(crate_dir().join("parity/generate_fixtures.py"))
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--seed", &seed.to_string(), "--device", device])
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
    let table = format!(
        "{label}: {} on {device:?}, policy {policy:?}\n{}",
        dir.display(),
        parity::table(&reports, policy)
    );
    println!("{table}");
    let record_dir = crate_dir().join("target/parity-reports");
    std::fs::create_dir_all(&record_dir).expect("cannot create target/parity-reports");
    std::fs::write(record_dir.join(format!("{label}.txt")), &table).expect("cannot record the parity table");
    assert!(!reports.is_empty(), "{label}: no cases in {}", dir.display());
    let failed: Vec<&str> = reports.iter().filter(|r| !r.passed(policy)).map(|r| r.name.as_str()).collect();
    assert!(failed.is_empty(), "{label}: cases failing parity: {failed:?}\n{table}");
    reports
}

/// A scratch folder under target/ that is emptied first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = crate_dir().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a scratch folder");
    dir
}
