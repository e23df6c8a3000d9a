//! `scconv-tch parity`: the parity table of a fixture folder, of blocks or of whole networks.
use anyhow::{bail, Context, Result};
use scconv_tch::harness::fast_parity;
use scconv_tch::harness::model_parity;
use scconv_tch::harness::parity::{self, Manifest};
use scconv_tch::Execution;
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

pub fn run_parity(dir: PathBuf, device: Device, execution: Execution, json: bool) -> Result<ExitCode> {
    // The header first (the cases' shape depends on what the folder holds).
    let manifest: Manifest<serde_json::Value> =
        Manifest::read(&dir).with_context(|| format!("reading fixtures in {}", dir.display()))?;
    let networks = manifest.generator.as_deref().is_some_and(|g| g.contains("generate_model_fixtures"));
    let policy = manifest.policy(device, parity::tf32_enabled());
    let (table, verdicts, value) = if networks {
        if execution != Execution::Reference {
            bail!("{} holds network fixtures, checked in the reference mode only", dir.display());
        }
        let reports = model_parity::run_all(&dir, device, &policy)?;
        let verdicts: Vec<bool> = reports.iter().map(|r| r.passed(&policy)).collect();
        (model_parity::table(&reports, &policy), verdicts, serde_json::to_value(&reports)?)
    } else if execution == Execution::Reference {
        let reports = parity::run_all(&dir, device, &policy)?;
        let verdicts: Vec<bool> = reports.iter().map(|r| r.passed(&policy)).collect();
        (parity::table(&reports, &policy), verdicts, serde_json::to_value(&reports)?)
    } else {
        let reports = fast_parity::run_all(&dir, device, execution, &policy)?;
        let verdicts: Vec<bool> = reports.iter().map(|r| r.passed(&policy)).collect();
        (fast_parity::table(&reports, &policy), verdicts, serde_json::to_value(&reports)?)
    };
    let passed = !verdicts.is_empty() && verdicts.iter().all(|&v| v);
    if json {
        let execution = format!("{execution:?}");
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "policy": policy, "execution": execution, "cases": value, "passed": passed })
            )?
        );
    } else {
        println!(
            "fixtures {} (PyTorch {} on {}, seed {}), Rust {execution:?} on {device:?}, {}",
            dir.display(),
            manifest.torch_version,
            manifest.device,
            manifest.seed,
            if execution == Execution::Reference { policy } else { policy.fast() }.describe()
        );
        print!("{table}");
        println!("{} of {} cases pass", verdicts.iter().filter(|&&v| v).count(), verdicts.len());
    }
    if verdicts.is_empty() {
        eprintln!("parity: no case was checked in {} (its manifest lists none)", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
