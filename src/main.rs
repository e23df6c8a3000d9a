//! `scconv-tch`: command-line access to the crate. `parity` runs the parity fixtures, `infer`
//! classifies images with PyTorch-trained networks.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use scconv_tch::data::{self, Images};
use scconv_tch::infer::{class_name, score, Classifier, ModelRecord, Scores};
use scconv_tch::models::ResNetConfig;
use scconv_tch::parity::{self, Manifest, Policy};
use scconv_tch::{bench, export, info, scconv, ScConvConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::nn::{Module, ModuleT, VarStore};
use tch::Device;
use tch::{Kind, Tensor};

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
    /// Write a block or a trained network as TorchScript (traced; any batch and size it accepts works).
    Export {
        /// A trained network's record (e.g. weights/fmnist_sc.json).
        #[arg(long, conflicts_with = "scconv", required_unless_present = "scconv")]
        model: Option<PathBuf>,
        /// A single ScConv block: its ScConvConfig as JSON (e.g. {"op_channel": 64}).
        #[arg(long)]
        scconv: Option<PathBuf>,
        /// The block's PyTorch state dict (.safetensors or .pt); without it, a fresh initialisation.
        #[arg(long, requires = "scconv")]
        weights: Option<PathBuf>,
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
        /// A block's ScConvConfig as JSON.
        #[arg(long, group = "what")]
        scconv: Option<PathBuf>,
        /// A block with this many channels and the reference's defaults.
        #[arg(long, group = "what")]
        channels: Option<i64>,
        /// A named network: resnet18, resnet34, resnet50, resnet101 (with --sc: its SC twin).
        #[arg(long, group = "what")]
        arch: Option<String>,
        #[arg(long, requires = "arch")]
        sc: bool,
        /// A trained network's record (e.g. weights/fmnist_sc.json).
        #[arg(long, group = "what")]
        model: Option<PathBuf>,
        /// Input size (default: 56 for a block, 224 for a network, 28 for a small-image network).
        #[arg(long)]
        size: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Time Rust ScConv against a 3x3 conv at the ResNet-50 shapes, and networks in images/s.
    Bench {
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Batch sizes (default: 1 and 8 on the CPU, 1 and 64 on CUDA).
        #[arg(long, value_delimiter = ',')]
        batches: Vec<i64>,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Skip the networks (ResNet-50 plain vs SC at 224x224, the Fashion-MNIST pair).
        #[arg(long)]
        no_models: bool,
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
        #[arg(long, default_value_t = 250)]
        batch: i64,
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Print the results as JSON.
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
            run_parity(dir.unwrap_or_else(parity::committed_fixtures), device.resolve()?, json)
        }
        Command::Export { model, scconv, weights, out, force } => {
            run_export(model.as_deref(), scconv.as_deref(), weights.as_deref(), &out, force)
        }
        Command::Info { scconv, channels, arch, sc, model, size, json } => match (arch, model) {
            (Some(arch), _) => run_network_info(&ResNetConfig::named(&arch, sc)?, size, json),
            (None, Some(record)) => {
                let text = std::fs::read_to_string(&record)
                    .with_context(|| format!("reading {}", record.display()))?;
                let record: ModelRecord =
                    serde_json::from_str(&text).with_context(|| format!("parsing {}", record.display()))?;
                run_network_info(&record.config, size, json)
            }
            (None, None) => run_info(scconv.as_deref(), channels, size.unwrap_or(56).pow(2), json),
        },
        Command::Bench { device, batches, warmup, runs, no_models, json } => {
            run_bench(device.resolve()?, batches, warmup, runs, !no_models, json)
        }
        Command::Infer { models, data, png, batch, device, json } => {
            run_infer(&models, &data, png.as_deref(), batch, device.resolve()?, json)
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

fn run_parity(dir: PathBuf, device: Device, json: bool) -> Result<ExitCode> {
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

fn run_export(
    model: Option<&Path>,
    block: Option<&Path>,
    weights: Option<&Path>,
    out: &Path,
    force: bool,
) -> Result<ExitCode> {
    let (module, example) = if let Some(record) = model {
        let mut classifier =
            Classifier::load(record, Device::Cpu).with_context(|| format!("loading {}", record.display()))?;
        let config = classifier.model.config();
        let side = if config.small_input { 28 } else { 224 };
        let example = Tensor::zeros([1, config.in_channels, side, side], (Kind::Float, Device::Cpu));
        let network = &classifier.model;
        (export::trace(&mut classifier.vs, &example, |x| network.forward_t(x, false))?, example)
    } else {
        let path = block.context("give --model or --scconv")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: ScConvConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut vs = VarStore::new(Device::Cpu);
        let block = scconv(vs.root(), &config)?;
        if let Some(weights) = weights {
            scconv_tch::weights::load(&mut vs, weights)?;
        }
        let example = Tensor::zeros([1, config.op_channel, 16, 16], (Kind::Float, Device::Cpu));
        (export::trace(&mut vs, &example, |x| block.forward(x))?, example)
    };
    export::save(&module, out, force)?;
    println!(
        "wrote {} (traced at {:?}; runs at any batch and size the module accepts)",
        out.display(),
        example.size()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_info(config: Option<&Path>, channels: Option<i64>, positions: i64, json: bool) -> Result<ExitCode> {
    let config = match (config, channels) {
        (Some(path), _) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        (None, Some(c)) => ScConvConfig::new(c),
        (None, None) => bail!("give --scconv CONFIG.json or --channels C"),
    };
    config.validate().map_err(scconv_tch::ScConvError::from)?;
    let layers = info::scconv_costs(&config);
    let (total, plain) = (info::total(&layers), info::conv3x3_cost(config.op_channel));
    if json {
        let value = serde_json::json!({ "config": config, "positions": positions, "layers": layers,
            "total": total, "conv3x3": plain, "convention": "MACs of convolutions per output position" });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("ScConv {config:?}, {positions} output positions");
    println!("{:<14} {:>12} {:>16}", "layer", "parameters", "multiply-adds");
    for l in layers.iter().chain([&total, &plain]) {
        println!("{:<14} {:>12} {:>16}", l.name, l.parameters, l.macs_per_position * positions);
    }
    println!(
        "ScConv / conv3x3: {:.3}x the parameters, {:.3}x the multiply-adds",
        total.parameters as f64 / plain.parameters as f64,
        total.macs_per_position as f64 / plain.macs_per_position as f64
    );
    println!("multiply-adds: convolutions only (FLOPs ~ 2x); GroupNorm, gate, softmax, pooling and element-wise work, O(C) per position, are not counted");
    Ok(ExitCode::SUCCESS)
}

fn run_network_info(config: &ResNetConfig, size: Option<i64>, json: bool) -> Result<ExitCode> {
    config.validate()?;
    let side = size.unwrap_or(if config.small_input { 28 } else { 224 });
    let rows = info::network_costs(config, side, side);
    let sum = |f: fn(&info::NetworkRow) -> i64| rows.iter().map(f).sum::<i64>();
    let totals = [sum(|r| r.parameters), sum(|r| r.macs), sum(|r| r.plain_parameters), sum(|r| r.plain_macs)];
    if json {
        let value = serde_json::json!({ "config": config, "input": [side, side], "rows": rows, "totals": totals,
            "convention": "MACs of convolutions and linear layers for one image" });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("network on one {side}x{side} image; SC columns: this config, plain: its twin with 3x3 convs");
    println!(
        "{:<22} {:>12} {:>15} {:>12} {:>15}",
        "layer", "parameters", "multiply-adds", "plain params", "plain MACs"
    );
    for r in &rows {
        println!(
            "{:<22} {:>12} {:>15} {:>12} {:>15}",
            r.name, r.parameters, r.macs, r.plain_parameters, r.plain_macs
        );
    }
    println!("{:<22} {:>12} {:>15} {:>12} {:>15}", "total", totals[0], totals[1], totals[2], totals[3]);
    println!(
        "against plain: {:.3}x the parameters, {:.3}x the multiply-adds",
        totals[0] as f64 / totals[2] as f64,
        totals[1] as f64 / totals[3] as f64
    );
    println!("multiply-adds: convolutions and linear layers (FLOPs ~ 2x); an ScConv replacing a stride-2 conv runs at the input resolution, then pools");
    Ok(ExitCode::SUCCESS)
}

fn run_bench(
    device: Device,
    batches: Vec<i64>,
    warmup: usize,
    runs: usize,
    models: bool,
    json: bool,
) -> Result<ExitCode> {
    let batches = if !batches.is_empty() {
        batches
    } else if device.is_cuda() {
        vec![1, 64]
    } else {
        vec![1, 8]
    };
    let mut blocks = Vec::new();
    for &batch in &batches {
        for (channels, size) in bench::RESNET50_SHAPES {
            blocks.push(bench::bench_block(channels, size, batch, device, warmup, runs)?);
        }
    }
    let networks = if models { bench_networks(device, warmup, runs)? } else { Vec::new() };
    if json {
        let value = serde_json::json!({ "device": format!("{device:?}"), "threads": tch::get_num_threads(),
            "blocks": blocks, "networks": networks });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{device:?}, {} threads, forward only, median of {runs} runs after {warmup} warm-up (min-max)",
        tch::get_num_threads()
    );
    println!(
        "{:<10} {:>5} {:>24} {:>24} {:>9}",
        "shape", "batch", "Rust ScConv ms", "Rust conv3x3 ms", "ratio"
    );
    for b in &blocks {
        let cell = |t: &bench::Timing| format!("{:.3} ({:.3}-{:.3})", t.median_ms, t.min_ms, t.max_ms);
        println!(
            "{:<10} {:>5} {:>24} {:>24} {:>8.2}x",
            format!("{}@{}", b.channels, b.size),
            b.batch,
            cell(&b.scconv),
            cell(&b.conv3x3),
            b.scconv.median_ms / b.conv3x3.median_ms
        );
    }
    for n in &networks {
        println!("{:<28} batch {:>3}: {:>9.1} images/s", n.name, n.batch, n.images_per_second);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct NetworkBench {
    name: String,
    batch: i64,
    timing: bench::Timing,
    images_per_second: f64,
}

/// ResNet-50 and its SC twin (random weights, 224x224), and the trained Fashion-MNIST pair (28x28).
fn bench_networks(device: Device, warmup: usize, runs: usize) -> Result<Vec<NetworkBench>> {
    let big_batch = if device.is_cuda() { 64 } else { 8 };
    let mut configs = vec![
        ("resnet50".to_string(), ResNetConfig::named("resnet50", false)?, big_batch, 224),
        ("sc_resnet50".to_string(), ResNetConfig::named("resnet50", true)?, big_batch, 224),
    ];
    for name in ["fmnist_plain", "fmnist_sc"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("weights/{name}.json"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let record: ModelRecord = serde_json::from_str(&text)?;
            configs.push((name.to_string(), record.config, 256, 28));
        }
    }
    let (warmup, runs) = (warmup.min(2), runs.clamp(1, 5));
    let mut out = Vec::new();
    for (name, config, batch, side) in configs {
        let vs = VarStore::new(device);
        let model = scconv_tch::models::resnet(vs.root(), &config)?;
        let x = Tensor::randn([batch, config.in_channels, side, side], (Kind::Float, device));
        let timing = tch::no_grad(|| bench::time(device, warmup, runs, || model.forward_t(&x, false)));
        let images_per_second = batch as f64 / (timing.median_ms / 1e3);
        out.push(NetworkBench { name, batch, timing, images_per_second });
    }
    Ok(out)
}

/// The images to classify and whether they are the test set in file order (then PyTorch's recorded
/// predictions apply).
fn load_images(data: &str, png: Option<&Path>) -> Result<(Images, String, bool)> {
    if let Some(dir) = png {
        return Ok((data::read_png_folder(dir, 28)?, format!("PNG images in {}", dir.display()), false));
    }
    let debian = Path::new(data::DEBIAN_DIR);
    let (dir, test_set) = match data {
        "auto" if debian.is_dir() => (debian.to_path_buf(), true),
        "auto" | "sample" => (data::sample_dir(), true),
        "full" if debian.is_dir() => (debian.to_path_buf(), true),
        "full" => bail!(
            "--data full needs Debian's dataset-fashion-mnist in {} (apt-get install dataset-fashion-mnist)",
            data::DEBIAN_DIR
        ),
        other => (PathBuf::from(other), false),
    };
    let images =
        data::read_idx_split(&dir).with_context(|| format!("reading images in {}", dir.display()))?;
    Ok((images, format!("Fashion-MNIST test images in {}", dir.display()), test_set))
}

struct Run {
    classifier: Classifier,
    predictions: Vec<i64>,
    scores: Scores,
    images_per_second: f64,
}

fn run_infer(
    models: &[PathBuf],
    data: &str,
    png: Option<&Path>,
    batch: i64,
    device: Device,
    json: bool,
) -> Result<ExitCode> {
    let (images, source, test_set) = load_images(data, png)?;
    let n = images.pixels.size()[0] as u64;
    let mut runs = Vec::new();
    for path in models {
        let classifier =
            Classifier::load(path, device).with_context(|| format!("loading {}", path.display()))?;
        let bar = if n >= 2000 && !json { ProgressBar::new(n) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(classifier.record.name.clone());
        let (predictions, elapsed) = classifier.classify(&images, batch, |k| bar.inc(k))?;
        bar.finish_and_clear();
        let pytorch = test_set.then(|| {
            &classifier.record.test_predictions
                [..predictions.len().min(classifier.record.test_predictions.len())]
        });
        let scores = score(&predictions, images.labels.as_deref(), pytorch);
        let images_per_second = predictions.len() as f64 / elapsed.as_secs_f64();
        runs.push(Run { classifier, predictions, scores, images_per_second });
    }
    if json {
        return print_json(&runs, &source, device);
    }
    println!("{} images: {source}, on {device:?}, batch {batch}", images.pixels.size()[0]);
    print!("{}", infer_table(&runs));
    if png.is_some() {
        for (i, name) in images.names.iter().enumerate() {
            let classes: Vec<&str> = runs.iter().map(|r| class_name(r.predictions[i])).collect();
            println!("{name}: {}", classes.join(" | "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(runs: &[Run], source: &str, device: Device) -> Result<ExitCode> {
    let rows: Vec<_> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.classifier.record.name, "parameters": r.classifier.parameters(),
                "pytorch_test_accuracy": r.classifier.record.test_accuracy, "scores": r.scores,
                "images_per_second": r.images_per_second, "predictions": r.predictions,
            })
        })
        .collect();
    let json = serde_json::json!({ "source": source, "device": format!("{device:?}"), "runs": rows });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(ExitCode::SUCCESS)
}

fn infer_table(runs: &[Run]) -> String {
    let mut out = format!(
        "{:<14} {:>11} {:>10} {:>20} {:>10}\n",
        "network", "parameters", "accuracy", "agrees with PyTorch", "images/s"
    );
    for r in runs {
        let s = &r.scores;
        let accuracy =
            s.correct.map_or("-".into(), |c| format!("{:.2}%", 100.0 * c as f64 / s.images as f64));
        let agreement = s
            .agreeing
            .map_or("-".into(), |a| format!("{a}/{} ({:.2}%)", s.images, 100.0 * a as f64 / s.images as f64));
        out += &format!(
            "{:<14} {:>11} {:>10} {:>20} {:>10.0}\n",
            r.classifier.record.name,
            r.classifier.parameters(),
            accuracy,
            agreement,
            r.images_per_second
        );
        for (index, rust, torch) in &s.disagreements {
            out += &format!(
                "    image {index}: Rust says {}, PyTorch said {}\n",
                class_name(*rust),
                class_name(*torch)
            );
        }
    }
    out
}
