//! `scconv-tch bench`: timings.
use anyhow::Result;
use scconv_tch::harness::bench::{self, BenchOptions};
use scconv_tch::harness::infer::ModelRecord;
use scconv_tch::inference::{Arithmetic, InferenceResNet, Precision};
use scconv_tch::models::ResNetConfig;
use scconv_tch::Execution;
use std::path::Path;
use std::process::ExitCode;
use tch::nn::{ModuleT, VarStore};
use tch::Tensor;
use tch::{Device, Kind};

pub fn run_bench(
    device: Device,
    batches: Vec<i64>,
    options: BenchOptions,
    models: bool,
    json: bool,
) -> Result<ExitCode> {
    let (warmup, runs) = (options.warmup, options.runs);
    if options.cuda_graph && !device.is_cuda() {
        anyhow::bail!("--cuda-graph needs --device cuda");
    }
    // Networks at the batches asked for; by default at a serving batch (8, or 64 on CUDA; the
    // Fashion-MNIST pair at 256).
    let network_batches = (!batches.is_empty()).then(|| batches.clone());
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
            blocks.push(bench::bench_block(channels, size, batch, device, &options)?);
        }
    }
    let networks =
        if models { bench_networks(device, &options, network_batches.as_deref())? } else { Vec::new() };
    if json {
        let value = serde_json::json!({ "device": format!("{device:?}"), "threads": tch::get_num_threads(),
            "allocator": super::allocator::describe(), "own_onednn": scconv_tch::inference::own_onednn_version(),
            "dtype": format!("{:?}", options.kind), "cuda_graph": options.cuda_graph,
            "blocks": blocks, "networks": networks });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{device:?}, {:?}, {} threads, {}, the forms' convolutions: {}, ScConv {} ({}), forward only, median of {runs} runs after {warmup} warm-up (min-max)",
        options.kind,
        tch::get_num_threads(),
        super::allocator::describe(),
        scconv_tch::inference::own_onednn_version()
            .map_or("libtorch's calls".to_string(), |v| format!("oneDNN {v} primitives of our own")),
        options.scconv.variant.name(),
        serde_json::to_string(&options.scconv)?
    );
    println!(
        "{:<10} {:>5} {:>24} {:>24} {:>24} {:>10} {:>10}",
        "shape", "batch", "ScConv reference ms", "ScConv fast ms", "conv3x3 ms", "ref/conv", "fast/conv"
    );
    for b in &blocks {
        let cell = |t: &bench::Timing| format!("{:.3} ({:.3}-{:.3})", t.median_ms, t.min_ms, t.max_ms);
        println!(
            "{:<10} {:>5} {:>24} {:>24} {:>24} {:>9.2}x {:>9.2}x",
            format!("{}@{}", b.channels, b.size),
            b.batch,
            cell(&b.scconv),
            cell(&b.scconv_fast),
            cell(&b.conv3x3),
            b.scconv.median_ms / b.conv3x3.median_ms,
            b.scconv_fast.median_ms / b.conv3x3.median_ms
        );
    }
    if blocks.iter().any(|b| !b.form.is_empty()) {
        println!("inference form: the ScConv step against the form's own 3x3 conv (each with BatchNorm folded, ReLU fused, prepacked)");
        println!(
            "{:<10} {:>5} {:<14} {:>14} {:>12} {:>10}",
            "shape", "batch", "arithmetic", "ScConv step ms", "conv3x3 ms", "step/conv"
        );
        for b in &blocks {
            for f in &b.form {
                println!(
                    "{:<10} {:>5} {:<14} {:>14.3} {:>12.3} {:>9.2}x",
                    format!("{}@{}", b.channels, b.size),
                    b.batch,
                    f.arithmetic,
                    f.scconv_step.median_ms,
                    f.conv3x3.median_ms,
                    f.scconv_step.median_ms / f.conv3x3.median_ms
                );
            }
        }
    }
    for b in &blocks {
        for f in b.form.iter().filter(|f| f.scconv_step_profile.is_some()) {
            let what = format!("{}@{} batch {} {}", b.channels, b.size, b.batch, f.arithmetic);
            println!("form ScConv step {what}: {:.3} ms per forward", f.scconv_step.median_ms);
            print_sections(f.scconv_step_profile.iter().flatten(), f.scconv_step.median_ms);
        }
    }
    if options.cuda_graph {
        println!("CUDA graphs (replay):");
        for b in &blocks {
            if let (Some(fast), Some(conv)) = (&b.scconv_fast_graph, &b.conv3x3_graph) {
                println!(
                    "{:<10} {:>5} fast {:>8.3} ms, conv3x3 {:>8.3} ms, fast/conv {:>6.2}x",
                    format!("{}@{}", b.channels, b.size),
                    b.batch,
                    fast.median_ms,
                    conv.median_ms,
                    fast.median_ms / conv.median_ms
                );
            }
        }
    }
    for n in networks.iter().filter(|n| n.profile.is_some()) {
        println!("{} batch {}: {:.2} ms per forward", n.name, n.batch, n.timing.median_ms);
        print_sections(n.profile.iter().flatten(), n.timing.median_ms);
    }
    for n in &networks {
        let graph = n.graph_images_per_second.map_or(String::new(), |v| format!(", CUDA graph {v:>9.1}"));
        let per_image = n.timing.median_ms / n.batch as f64;
        let tiles = n.batch_tile.map_or(String::new(), |t| format!(" (in tiles of {t})"));
        println!(
            "{:<40} batch {:>3}: {:>9.1} images/s, {per_image:>8.3} ms per image{graph}{tiles}",
            n.name, n.batch, n.images_per_second
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A profile's sections: milliseconds per forward and their share of `total_ms`.
fn print_sections<'a>(sections: impl Iterator<Item = &'a (String, f64)>, total_ms: f64) {
    for (section, ms) in sections {
        println!("    {section:<26} {ms:>9.3} ms {:>5.1}%", 100.0 * ms / total_ms);
    }
}

/// How a network runs in a bench row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The model itself, its ScConvs in this execution mode.
    Model(Execution),
    /// The inference form (`scconv_tch::inference`, every pass) in this precision, built from an fp32
    /// network.
    Inference(Precision),
}

impl Mode {
    /// Reference, fast (SC networks) in the bench's dtype; on the CPU (the forms' passes are oneDNN's)
    /// the inference forms that dtype names: fp32 and bf16 for `float`, bf16 for `bf16`, none for
    /// `half`; the bf16 one in `bf16`'s precision.
    fn for_network(sc: bool, device: Device, kind: Kind, bf16: Precision) -> Vec<Mode> {
        let mut modes = vec![Mode::Model(Execution::Reference)];
        if sc {
            modes.push(Mode::Model(Execution::Fast));
        }
        if device == Device::Cpu {
            match kind {
                Kind::Float => modes.extend([Mode::Inference(Precision::Fp32), Mode::Inference(bf16)]),
                Kind::BFloat16 => modes.push(Mode::Inference(bf16)),
                _ => {}
            }
        }
        modes
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Model(Execution::Fast) => "fast",
            Mode::Model(Execution::FastTensorOps) => "fast-tensor-ops",
            Mode::Model(Execution::Reference) => "reference",
            Mode::Inference(Precision::Fp32) => "inference",
            Mode::Inference(Precision::Bf16) => "inference bf16",
            Mode::Inference(Precision::Bf16Emulated) => "inference bf16 emulated",
            Mode::Inference(Precision::Bf16OneDnn) => "inference bf16 oneDNN",
        }
    }

    fn suffix(self) -> String {
        match self {
            Mode::Model(Execution::Reference) => String::new(),
            other => format!(" ({})", other.name()),
        }
    }
}

#[derive(serde::Serialize)]
struct NetworkBench {
    name: String,
    /// reference, fast, inference or inference bf16.
    mode: &'static str,
    /// The inference form's arithmetic on this machine (`bf16 emulated ...` where the CPU has no bf16
    /// units), for the form's rows.
    arithmetic: Option<String>,
    batch: i64,
    /// The inference form's batch tile where it runs the batch in tiles (`Pass::TileBatch`).
    batch_tile: Option<i64>,
    timing: bench::Timing,
    images_per_second: f64,
    graph_timing: Option<bench::Timing>,
    graph_images_per_second: Option<f64>,
    /// With `--profile`: milliseconds per forward in each instrumented section (the rest: stem, batch
    /// norms, ReLUs, shortcuts, head).
    profile: Option<Vec<(String, f64)>>,
}

/// ResNet-50 and its SC twin (random weights, 224x224), and the Fashion-MNIST pair's architectures
/// (28x28); each SC network with `options.scconv`'s ScConvs, in reference and fast mode; eagerly, and replaying a CUDA graph with `--cuda-graph`.
/// Each network at every batch of `batches` (default: 8 for ResNet-50, 64 on CUDA, 256 for the
/// Fashion-MNIST pair).
fn bench_networks(
    device: Device,
    options: &BenchOptions,
    batches: Option<&[i64]>,
) -> Result<Vec<NetworkBench>> {
    let big_batch = if device.is_cuda() { 64 } else { 8 };
    let mut named = vec![
        ("resnet50".to_string(), ResNetConfig::named("resnet50", false)?, big_batch, 224),
        ("sc_resnet50".to_string(), ResNetConfig::named("resnet50", true)?, big_batch, 224),
    ];
    for name in ["fmnist_plain", "fmnist_sc"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("weights/{name}.json"));
        if path.exists() {
            named.push((name.to_string(), ModelRecord::read(&path)?.config, 256, 28));
        }
    }
    let mut configs = Vec::new();
    for (name, config, default_batch, side) in named {
        for &batch in batches.unwrap_or(&[default_batch]) {
            configs.push((name.clone(), config.clone(), batch, side));
        }
    }
    let options = BenchOptions { warmup: options.warmup.min(2), runs: options.runs.clamp(1, 5), ..*options };
    let mut out = Vec::new();
    for (name, mut config, batch, side) in configs {
        if config.sc {
            // Random weights: an SC network of any version times as the trained one would.
            config.scconv = options.scconv;
            config.validate()?;
        }
        let mut vs = VarStore::new(device);
        let mut model = scconv_tch::models::resnet(vs.root(), &config)?;
        vs.set_kind(options.kind);
        let x = Tensor::randn([batch, config.in_channels, side, side], (options.kind, device));
        let modes = Mode::for_network(config.sc, device, options.kind, options.bf16);
        // The forms are built from fp32 networks (they cast themselves): a second one where the
        // bench's dtype is not fp32 and a form is timed (random weights time alike).
        let forms = modes.iter().any(|m| matches!(m, Mode::Inference(_)));
        let fp32_vs = VarStore::new(device);
        let fp32_model = match options.kind {
            Kind::Float => None,
            _ if !forms => None,
            _ => Some(scconv_tch::models::resnet(fp32_vs.root(), &config)?),
        };
        let fp32_x = x.to_kind(Kind::Float);
        let size = [batch, config.in_channels, side, side];
        for &mode in &modes {
            if let Mode::Model(execution) = mode {
                model.set_scconv_execution(execution)?;
            }
            let form = match mode {
                Mode::Inference(precision) => Some(InferenceResNet::compiled_with(
                    fp32_model.as_ref().unwrap_or(&model),
                    size,
                    precision,
                )?),
                Mode::Model(_) => None,
            };
            let arithmetic = form.as_ref().map(|f| f.arithmetic().clone());
            let batch_tile = form.as_ref().and_then(InferenceResNet::batch_tile);
            if let Some(Arithmetic::Bf16Emulated { why }) = &arithmetic {
                eprintln!("warning: {name}'s bf16 form runs emulated (bf16's numbers at fp32 speed or slower): {why}");
            }
            let input = if form.is_some() { &fp32_x } else { &x };
            let forward = || match &form {
                Some(form) => form.try_forward(input).expect("checked input"),
                None => model.forward_t(input, false),
            };
            let timing = tch::no_grad(|| bench::time(device, options.warmup, options.runs, forward));
            let profile = options
                .profile
                .then(|| tch::no_grad(|| bench::profile(device, options.runs, &timing, forward)));
            let graph_timing = match (options.cuda_graph, mode) {
                (true, Mode::Model(_)) => {
                    Some(bench::time_graph(device, &options, &mut model.cuda_graph(&x)?)?)
                }
                _ => None,
            };
            let per_second = |t: &bench::Timing| batch as f64 / (t.median_ms / 1e3);
            let version = match config.sc && !options.scconv.is_seed_default() {
                true => format!(" {}", options.scconv.variant.name()),
                false => String::new(),
            };
            // A bf16 form that had no bf16 units to run on says so in its name.
            let suffix = match (&arithmetic, mode) {
                (Some(Arithmetic::Bf16Emulated { .. }), Mode::Inference(p)) if p != Precision::Fp32 => {
                    " (inference bf16, emulated)".to_string()
                }
                _ => mode.suffix(),
            };
            let name = format!("{name}{version}{suffix}");
            out.push(NetworkBench {
                name,
                mode: mode.name(),
                arithmetic: arithmetic.as_ref().map(Arithmetic::describe),
                batch,
                batch_tile,
                images_per_second: per_second(&timing),
                graph_images_per_second: graph_timing.as_ref().map(per_second),
                timing,
                graph_timing,
                profile,
            });
        }
    }
    Ok(out)
}
