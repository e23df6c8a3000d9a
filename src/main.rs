//! `scconv-tch`: command-line access to the crate. `parity` runs the parity fixtures.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use scconv_tch::parity::{self, Manifest, Policy};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::Device;

#[derive(Parser)]
#[command(name = "scconv-tch", version, about = "SCConv on tch: PyTorch parity, models and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the Rust ScConv against fixtures made by the PyTorch reference and print a table.
    Parity {
        /// Fixture folder with a manifest.json (default: the committed weights/parity).
        dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Print the reports as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Parity { dir, device, json } => {
            run_parity(dir.unwrap_or_else(parity::committed_fixtures), device, json)
        }
    }
}

fn run_parity(dir: PathBuf, device: DeviceArg, json: bool) -> Result<ExitCode> {
    let device = match device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceArg::Cuda => {
            bail!("--device cuda: libtorch sees no CUDA device (tch::Cuda::is_available() is false)")
        }
    };
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
