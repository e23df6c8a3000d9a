//! `scconv-tch parity`: the block parity table.
use anyhow::{Context, Result};
use scconv_tch::parity::{self, Manifest, Policy};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

pub fn run_parity(dir: PathBuf, device: Device, json: bool) -> Result<ExitCode> {
    let manifest: Manifest =
        Manifest::read(&dir).with_context(|| format!("reading fixtures in {}", dir.display()))?;
    let policy = Policy::for_run(&manifest.device, device, parity::tf32_enabled());
    let reports = parity::run_all(&dir, device, &policy)?;
    let passed = reports.iter().all(|r| r.passed(&policy));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "policy": policy, "cases": reports, "passed": passed })
            )?
        );
    } else {
        println!(
            "fixtures {} (PyTorch {} on {}, seed {}), Rust on {device:?}, rtol {} atol {} x max|ref|, {}",
            dir.display(),
            manifest.torch_version,
            manifest.device,
            manifest.seed,
            policy.tolerance.rtol,
            policy.tolerance.atol,
            if policy.same_kernels {
                "same kernels: no gate flips allowed"
            } else {
                "across devices: flips allowed in the gate band only"
            }
        );
        print!("{}", parity::table(&reports, &policy));
        println!("{} of {} cases pass", reports.iter().filter(|r| r.passed(&policy)).count(), reports.len());
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
