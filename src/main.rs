//! `scconv-tch`: command-line access to the crate. One module per subcommand in `commands/`.
mod commands;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use commands::{
    bench::run_bench,
    export::run_export,
    infer::{run_infer, InferMode},
    info,
    parity::run_parity,
};
use scconv_tch::harness::bench::BenchOptions;
use scconv_tch::inference::Precision;
use scconv_tch::models::ResNetConfig;
use scconv_tch::weights::LoadOptions;
use scconv_tch::Execution;
use std::io::Write;
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
        /// Where to run: cpu, or cuda (the first GPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Which forward pass to check: the line-for-line reference (forward and gradients) or a fast
        /// path (forward; its gate decisions must equal the reference mode's on the same device).
        #[arg(long, value_enum, default_value_t = ExecutionArg::Reference)]
        execution: ExecutionArg,
        /// Print the reports as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a block or a trained network as TorchScript (traced; any batch and size it accepts works).
    Export {
        /// A trained network's record (e.g. weights/fmnist_sc.json).
        #[arg(long, conflicts_with = "scconv", required_unless_present = "scconv")]
        model: Option<PathBuf>,
        /// A single ScConv block: a JSON file with its ScConvConfig (e.g. a file holding
        /// {"op_channel": 64}).
        #[arg(long)]
        scconv: Option<PathBuf>,
        /// The block's PyTorch weights: a state dict or a training checkpoint (.safetensors, .pt, .pth,
        /// .bin); without it, a fresh initialisation.
        #[arg(long, requires = "scconv", conflicts_with = "model")]
        weights: Option<PathBuf>,
        /// Use only the weights under this key prefix, removed: `module.` (DataParallel), `model.`
        /// (a checkpoint's {"model": ...}), or the block's path in a larger network.
        #[arg(long, requires = "weights")]
        select: Option<String>,
        /// Skip weights the block has no use for (listed) instead of refusing the file.
        #[arg(long, requires = "weights")]
        allow_unused: bool,
        /// The TorchScript file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Parameters and multiply-adds, layer by layer, against the plain 3x3-conv version: of an ScConv
    /// block (--scconv / --channels) or of a network (--arch / --model).
    Info {
        /// A block: a JSON file with its ScConvConfig.
        #[arg(long, group = "what")]
        scconv: Option<PathBuf>,
        /// A block with this many channels and the reference's defaults.
        #[arg(long, group = "what", value_parser = clap::value_parser!(i64).range(2..=65536))]
        channels: Option<i64>,
        /// A named network: resnet18, resnet34, resnet50, resnet101 (with --sc: its SC twin).
        #[arg(long, group = "what")]
        arch: Option<String>,
        /// With --arch: the SC twin (ScConv in place of the residual 3x3 convs).
        #[arg(long, requires = "arch")]
        sc: bool,
        /// A trained network's record (e.g. weights/fmnist_sc.json).
        #[arg(long, group = "what")]
        model: Option<PathBuf>,
        /// Input size (default: 56 for a block, 224 for a network, 28 for a small-image network).
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..=4096))]
        size: Option<i64>,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time Rust ScConv against a 3x3 conv at the ResNet-50 shapes, and networks in images/s.
    Bench {
        /// Where to run: cpu, or cuda (the first GPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Batch sizes of the blocks (default: 1 and 8 on the CPU, 1 and 64 on CUDA) and, when given,
        /// of the networks too (default: 8, 64 on CUDA, 256 for the Fashion-MNIST pair).
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(i64).range(1..=4096))]
        batches: Vec<i64>,
        /// Untimed runs before timing each case.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        warmup: u64,
        /// Timed runs per case; the median is reported.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        runs: u64,
        /// Skip the networks (ResNet-50 plain vs SC at 224x224, the Fashion-MNIST pair).
        #[arg(long)]
        no_models: bool,
        /// Let cuDNN time its convolution algorithms and keep the fastest (torch.backends.cudnn.benchmark).
        #[arg(long)]
        cudnn_benchmark: bool,
        /// The dtype of weights and inputs: float (fp32), half (fp16) or bf16.
        #[arg(long, value_enum, default_value_t = DtypeArg::Float)]
        dtype: DtypeArg,
        /// Also time each fast block, conv and network replaying a CUDA graph of its forward (CUDA only).
        #[arg(long)]
        cuda_graph: bool,
        /// Also time the networks' parts per forward: 3x3 convs, SRU, the CRU's convs and fuse, the rest.
        #[arg(long)]
        profile: bool,
        /// The version and settings of every ScConv timed (blocks and SC networks): a JSON file with
        /// a block config without op_channel, e.g. {"variant": "2023-10-19"} (default: the seed's).
        #[arg(long)]
        scconv: Option<PathBuf>,
        /// The bf16 form timed beside the fp32 one (and with `--dtype bf16`): bf16-onednn times the
        /// native form's code on AVX-512 CPUs without bf16 units (oneDNN emulates its bf16
        /// convolutions there, so only its other steps time as on a CPU with them).
        #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
        bf16: PrecisionArg,
        /// Print the timings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Classify Fashion-MNIST images with PyTorch-trained networks and compare with PyTorch's predictions.
    Infer {
        /// A network's training record (e.g. weights/fmnist_sc.json); several print side by side.
        #[arg(long = "model", required = true)]
        models: Vec<PathBuf>,
        /// `auto` (the full test set if Debian's dataset-fashion-mnist is installed, else the sample),
        /// `sample` (the shipped first 1,000 test images), `full` (all 10,000), or an IDX folder.
        #[arg(long, default_value = "auto")]
        data: String,
        /// Classify the PNG images of this folder instead (converted to 28x28 grayscale).
        #[arg(long, conflicts_with = "data")]
        png: Option<PathBuf>,
        /// Images per forward pass.
        #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(i64).range(1..=65536))]
        batch: i64,
        /// Where to run: cpu, or cuda (the first GPU).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// How the network runs: the ScConvs' reference or fast path, or the whole network's
        /// inference form (BatchNorm folded, fused oneDNN convolutions; CPU only).
        #[arg(long, value_enum, default_value_t = InferExecutionArg::Reference)]
        execution: InferExecutionArg,
        /// With `--execution fast`, `fast-tensor-ops` or `inference`: count, by layer, the gate decisions
        /// that differ from the reference mode's on the same images (a second pass over them), and the
        /// largest logit difference.
        #[arg(long)]
        decisions: bool,
        /// With `--execution inference`: the form's precision. bf16 runs the convolutions on the CPU's
        /// bf16 units, emulated (same numbers, no speed-up, with a warning) on CPUs without them.
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
        /// Every mode side by side for each network: reference, fast, the fp32 and the bf16 inference
        /// forms (CPU), with their gate decisions and logits compared with the reference mode's.
        #[arg(long, conflicts_with_all = ["execution", "precision", "decisions"])]
        compare: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How `infer` runs a network, as a command-line value.
#[derive(Clone, Copy, ValueEnum)]
enum InferExecutionArg {
    /// The reference's operations, one for one.
    Reference,
    /// The fast path: the fused Rust kernel on the CPU, libtorch operations on CUDA.
    Fast,
    /// The fast path through libtorch operations only (what runs on CUDA), to test it on the CPU.
    FastTensorOps,
    /// The inference form of the whole network (scconv_tch::inference): folded, fused, prepacked.
    Inference,
}

/// The inference form's precision, as a command-line value.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum PrecisionArg {
    /// fp32 throughout.
    Fp32,
    /// bf16 convolutions (oneDNN's, or emulated where the CPU has no bf16 units), the rest fp32.
    Bf16,
    /// The bf16 form's numbers computed in fp32 tensors on any CPU.
    Bf16Emulated,
    /// The bf16 form on oneDNN's bf16 kernels wherever libtorch takes bf16, also on AVX-512 CPUs
    /// without bf16 units (oneDNN emulates them there, slower than fp32): the native form's numbers.
    Bf16Onednn,
}

impl From<PrecisionArg> for Precision {
    fn from(arg: PrecisionArg) -> Precision {
        match arg {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Bf16Emulated => Precision::Bf16Emulated,
            PrecisionArg::Bf16Onednn => Precision::Bf16OneDnn,
        }
    }
}

/// `Execution`, as a command-line value.
#[derive(Clone, Copy, ValueEnum)]
enum ExecutionArg {
    /// The reference's operations, one for one (forward and gradients).
    Reference,
    /// The fast path: the fused Rust kernel on the CPU, libtorch operations on CUDA.
    Fast,
    /// The fast path through libtorch operations only (what runs on CUDA), to test it on the CPU.
    FastTensorOps,
}

impl From<ExecutionArg> for Execution {
    fn from(arg: ExecutionArg) -> Execution {
        match arg {
            ExecutionArg::Reference => Execution::Reference,
            ExecutionArg::Fast => Execution::Fast,
            ExecutionArg::FastTensorOps => Execution::FastTensorOps,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
/// The dtype of a bench run, as a command-line value.
enum DtypeArg {
    /// fp32.
    Float,
    /// fp16.
    Half,
    /// bf16.
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The first CUDA device (an error when libtorch sees none).
    Cuda,
}

/// Every error prints on one line (`error: `, the cause chain joined by ": ", no backtrace) and exits
/// with 2: the CLI's own, clap's, and libtorch's (tch panics when libtorch throws, anywhere: the panic
/// is caught and reported the same way). A failed check (`parity`) exits with 1. `--help` and
/// `--version` print and exit 0. A closed pipe ends the program quietly (SIGPIPE, as for `head`);
/// SIGINT and SIGTERM remove the temporary file of a write in progress and exit with 130.
fn main() -> ExitCode {
    commands::allocator::keep_freed_memory();
    restore_sigpipe();
    remove_partial_files_on_interrupt();
    std::panic::set_hook(Box::new(|_| {})); // caught below and printed as an error
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&clap_error(&e)),
    };
    match std::panic::catch_unwind(|| run(cli.command)) {
        Ok(Ok(code)) => code,
        Ok(Err(error)) => fail(&format!("{error:#}")),
        Err(payload) => fail(&panic_text(payload.as_ref())),
    }
}

/// A caught panic's message; tch's panics on a libtorch exception say so.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let from_libtorch = payload.downcast_ref::<String>().is_some_and(|m| m.contains("Torch(\""));
    let message = scconv_tch::harness::panic_message(payload);
    if from_libtorch {
        format!("libtorch failed: {message}")
    } else {
        message
    }
}

fn fail(message: &str) -> ExitCode {
    let line = one_line(&printable(message));
    let _ = writeln!(std::io::stderr(), "error: {line}");
    ExitCode::from(2)
}

/// clap's message without its usage block: the first line, and where to look.
fn clap_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("bad arguments");
    let first = first.trim_start_matches("error: ");
    let missing = matches!(
        e.kind(),
        clap::error::ErrorKind::MissingSubcommand
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let first = if missing { "a subcommand is needed: parity, export, info, bench or infer" } else { first };
    format!("{first} (see scconv-tch --help)")
}

/// Control characters (ANSI escapes, carriage returns) in names taken from files are shown escaped;
/// line breaks stay for `one_line` to join.
fn printable(text: &str) -> String {
    let escape = |c: char| c.is_control() && c != '\n';
    text.chars().flat_map(|c| if escape(c) { c.escape_default().collect() } else { vec![c] }).collect()
}

/// Rust ignores SIGPIPE, which turns `scconv-tch ... | head -1` into a "failed printing to stdout"
/// panic; command-line tools end quietly instead.
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to its default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// On SIGINT, SIGTERM or SIGHUP, a thread of its own removes the temporary files of the writes in
/// progress and ends the process with 130.
fn remove_partial_files_on_interrupt() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.forever().next().is_some() {
            scconv_tch::output::remove_pending();
            let _ = writeln!(std::io::stderr(), "error: interrupted");
            // Not `process::exit`: its exit handlers would tear libtorch down under the main thread,
            // which may be inside it (a segfault, seen in a fresh-clone run).
            // SAFETY: `_exit` ends the process at once; nothing runs after it.
            unsafe { libc::_exit(130) }
        }
    });
}

/// Joins a multi-line message (e.g. a state-dict report) with "; " and drops the C++ stack frames that
/// libtorch appends to its errors.
fn one_line(message: &str) -> String {
    let noise = |l: &&str| l.starts_with("Exception raised from") || l.starts_with("frame #");
    let lines = message.lines().map(str::trim).filter(|l| !l.is_empty()).filter(|l| !noise(l));
    let mut out = String::new();
    for line in lines {
        if !out.is_empty() {
            out += if out.ends_with(':') { " " } else { "; " };
        }
        out += line;
    }
    out
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Parity { dir, device, execution, json } => {
            let dir = dir.unwrap_or_else(scconv_tch::harness::parity::committed_fixtures);
            run_parity(dir, device.resolve()?, execution.into(), json)
        }
        Command::Export { model, scconv, weights, select, allow_unused, out, force } => {
            let options = LoadOptions { select, strict: !allow_unused };
            let weights = weights.as_deref().map(|path| (path, &options));
            run_export(model.as_deref(), scconv.as_deref(), weights, &out, force)
        }
        Command::Info { scconv, channels, arch, sc, model, size, json } => match (arch, model) {
            (Some(arch), _) => info::run_network_info(&ResNetConfig::named(&arch, sc)?, size, json),
            (None, Some(record)) => info::run_record_info(&record, size, json),
            (None, None) => info::run_info(scconv.as_deref(), channels, size.unwrap_or(56).pow(2), json),
        },
        Command::Bench {
            device,
            batches,
            warmup,
            runs,
            no_models,
            cudnn_benchmark,
            dtype,
            cuda_graph,
            profile,
            scconv,
            bf16,
            json,
        } => {
            if matches!(bf16, PrecisionArg::Fp32) {
                bail!("--bf16 names the bf16 form: bf16, bf16-emulated or bf16-onednn");
            }
            tch::Cuda::cudnn_set_benchmark(cudnn_benchmark);
            let scconv = match scconv {
                Some(path) => scconv_tch::harness::json::read(&path)?,
                None => scconv_tch::ScConvSettings::default(),
            };
            let kind = match dtype {
                DtypeArg::Float => tch::Kind::Float,
                DtypeArg::Half => tch::Kind::Half,
                DtypeArg::Bf16 => tch::Kind::BFloat16,
            };
            let (warmup, runs) = (warmup as usize, runs as usize);
            let bf16 = bf16.into();
            let options = BenchOptions { kind, cuda_graph, profile, warmup, runs, scconv, bf16 };
            run_bench(device.resolve()?, batches, options, !no_models, json)
        }
        Command::Infer {
            models,
            data,
            png,
            batch,
            device,
            execution,
            decisions,
            precision,
            compare,
            json,
        } => {
            let model = |execution| InferMode::Model { execution, decisions };
            let mode = match execution {
                InferExecutionArg::Reference => model(Execution::Reference),
                InferExecutionArg::Fast => model(Execution::Fast),
                InferExecutionArg::FastTensorOps => model(Execution::FastTensorOps),
                InferExecutionArg::Inference => {
                    InferMode::Inference { decisions, precision: precision.into() }
                }
            };
            if precision != PrecisionArg::Fp32 && !matches!(execution, InferExecutionArg::Inference) {
                bail!("--precision chooses the inference form's precision: add --execution inference");
            }
            if decisions && matches!(execution, InferExecutionArg::Reference) {
                bail!(
                    "--decisions counts the decisions that differ from the reference mode's: add --execution \
                     fast, fast-tensor-ops or inference"
                );
            }
            let device = device.resolve()?;
            if (compare || matches!(mode, InferMode::Inference { .. })) && device != Device::Cpu {
                bail!(
                    "--execution inference and --compare run the inference forms, on the CPU (their passes are \
                     oneDNN's); use --execution fast on CUDA"
                );
            }
            let modes = if compare { InferMode::all() } else { vec![mode] };
            run_infer(&models, &data, png.as_deref(), batch, device, &modes, json)
        }
    }
}

impl DeviceArg {
    fn resolve(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda => {
                bail!("--device cuda: libtorch sees no CUDA device (tch::Cuda::is_available() is false)")
            }
        }
    }
}
