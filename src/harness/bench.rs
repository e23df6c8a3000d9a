//! Timing of the Rust ScConv against a plain 3x3 conv, and of whole networks (images/s): warm-up, then
//! several timed runs; median and spread. CUDA runs are synchronised before each clock read.
//! Timings are measurements, never test assertions.
use crate::error::ScConvError;
use crate::inference::{Arithmetic, BatchNormParams, ConvGeometry, InferenceConv, Precision, ScConvStep};
use crate::{scconv, Execution};
use serde::Serialize;
use std::time::Instant;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// The four ResNet-50 shapes a 3x3 residual conv sees: (channels, height = width).
pub const RESNET50_SHAPES: [(i64, i64); 4] = [(64, 56), (128, 28), (256, 14), (512, 7)];

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub runs: usize,
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Times `f` `runs` times after `warmup` untimed calls.
pub fn time(device: Device, warmup: usize, runs: usize, mut f: impl FnMut() -> Tensor) -> Timing {
    for _ in 0..warmup {
        let _ = f();
    }
    sync(device);
    let mut ms: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            let _ = f();
            sync(device);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    Timing { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], runs: ms.len() }
}

/// `f`'s instrumented sections (`crate::profile`) in milliseconds per call over `runs` calls, and
/// "rest": what `timing` (its median) leaves outside them.
pub fn profile(
    device: Device,
    runs: usize,
    timing: &Timing,
    mut f: impl FnMut() -> Tensor,
) -> Vec<(String, f64)> {
    crate::profile::enable(device);
    (0..runs.max(1)).for_each(|_| drop(f()));
    let per_run = |ms: f64| ms / runs.max(1) as f64;
    let mut rows: Vec<(String, f64)> =
        crate::profile::finish().iter().map(|(name, ms, _)| (name.to_string(), per_run(*ms))).collect();
    let listed: f64 = rows.iter().map(|(_, ms)| ms).sum();
    rows.push(("rest".into(), timing.median_ms - listed));
    rows
}

/// What a bench run varies besides the shape: the dtype of weights and input, and whether the
/// forward runs eagerly or replays a CUDA graph (`--cuda-graph`, CUDA only).
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub kind: Kind,
    pub cuda_graph: bool,
    /// Time the sections of the networks and of the form's ScConv step too (`crate::profile`).
    pub profile: bool,
    pub warmup: usize,
    pub runs: usize,
    /// The version and settings of every ScConv timed (`--scconv`; default: the seed's).
    pub scconv: crate::ScConvSettings,
    /// The bf16 form's precision (`--bf16`; default: `Precision::Bf16`).
    pub bf16: Precision,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockBench {
    /// The ScConv's version (`variant`).
    pub variant: String,
    pub channels: i64,
    pub size: i64,
    pub batch: i64,
    pub dtype: String,
    /// The reference mode (line for line).
    pub scconv: Timing,
    /// `Execution::Fast`.
    pub scconv_fast: Timing,
    pub conv3x3: Timing,
    /// Replaying a CUDA graph of the fast block and of the conv (with `--cuda-graph`).
    pub scconv_fast_graph: Option<Timing>,
    pub conv3x3_graph: Option<Timing>,
    /// Whether the fast block ran the fused CUDA kernels (else libtorch operations).
    pub fused_cuda_kernels: bool,
    /// On the CPU in fp32: the inference form's ScConv step against the form's own 3x3 convolution,
    /// in each precision of the form.
    pub form: Vec<FormBlockBench>,
}

/// The inference form's ScConv step (its BatchNorm folded into the fuse, shift and ReLU in place, the
/// CRU's convolutions prepacked) against the form's own 3x3 convolution with the same BatchNorm and
/// ReLU (folded, fused, prepacked): a residual 3x3 step each way, in one precision.
#[derive(Debug, Clone, Serialize)]
pub struct FormBlockBench {
    /// The form's arithmetic on this machine: `fp32`, `bf16` (oneDNN's bf16 kernels), `bf16 emulated`.
    pub arithmetic: String,
    /// Whether the step ran its channels-last SRU (`Pass::ChannelsLast`; else it converted to NCHW).
    pub channels_last: bool,
    pub scconv_step: Timing,
    pub conv3x3: Timing,
    /// With `BenchOptions::profile`: the step's sections, milliseconds per forward.
    pub scconv_step_profile: Option<Vec<(String, f64)>>,
}

/// Times a captured graph's replay.
pub fn time_graph(
    device: Device,
    options: &BenchOptions,
    graph: &mut crate::cuda::CudaGraph,
) -> Result<Timing, ScConvError> {
    let mut failure = None;
    let timing = time(device, options.warmup, options.runs, || match graph.replay() {
        Ok(out) => out.shallow_clone(),
        Err(err) => {
            failure = Some(err);
            Tensor::new()
        }
    });
    failure.map_or(Ok(timing), Err)
}

/// Rust ScConv (`options.scconv`'s version and settings, fresh weights) in reference and fast mode, and a bias-free 3x3 conv
/// on one shape, forward only.
pub fn bench_block(
    channels: i64,
    size: i64,
    batch: i64,
    device: Device,
    options: &BenchOptions,
) -> Result<BlockBench, ScConvError> {
    let mut vs = nn::VarStore::new(device);
    let mut block = scconv(vs.root() / "scconv", &options.scconv.config(channels)?)?;
    let conv_config = nn::ConvConfig { padding: 1, bias: false, ..Default::default() };
    let conv = nn::conv2d(vs.root() / "conv3x3", channels, channels, 3, conv_config);
    let batchnorm = nn::batch_norm2d(vs.root() / "bn", channels, Default::default());
    vs.set_kind(options.kind);
    let x = Tensor::randn([batch, channels, size, size], (options.kind, device));
    let (warmup, runs) = (options.warmup, options.runs);
    tch::no_grad(|| {
        let scconv = time(device, warmup, runs, || block.forward(&x));
        let conv3x3 = time(device, warmup, runs, || conv.forward(&x));
        block.set_execution(Execution::Fast)?;
        let scconv_fast = time(device, warmup, runs, || block.forward(&x));
        let fused_cuda_kernels = block.fast_path().is_some_and(|f| f.uses_cuda_kernels());
        let (mut scconv_fast_graph, mut conv3x3_graph) = (None, None);
        if options.cuda_graph {
            scconv_fast_graph = Some(time_graph(device, options, &mut block.cuda_graph(&x)?)?);
            let mut graph = crate::cuda::CudaGraph::capture(&conv, &x, |x| conv.forward(x))?;
            conv3x3_graph = Some(time_graph(device, options, &mut graph)?);
        }
        let form = match device == Device::Cpu && options.kind == Kind::Float {
            true => [Precision::Fp32, options.bf16]
                .into_iter()
                .map(|p| bench_form_block(&block, &conv, &batchnorm, &x, p, options))
                .collect::<Result<_, _>>()?,
            false => Vec::new(),
        };
        let dtype = format!("{:?}", options.kind);
        Ok(BlockBench {
            variant: options.scconv.variant.name().to_string(),
            channels,
            size,
            batch,
            dtype,
            scconv,
            scconv_fast,
            conv3x3,
            scconv_fast_graph,
            conv3x3_graph,
            fused_cuda_kernels,
            form,
        })
    })
}

/// One [`FormBlockBench`]: both steps built from `scconv`, `conv` and `batchnorm` with every pass of
/// the form (`Pass::Bf16` too in bf16), prepacked for `x`'s size, on primitives of our own where they
/// pay.
fn bench_form_block(
    scconv: &crate::ScConv,
    conv: &nn::Conv2D,
    batchnorm: &nn::BatchNorm,
    x: &Tensor,
    precision: Precision,
    options: &BenchOptions,
) -> Result<FormBlockBench, ScConvError> {
    let (warmup, runs) = (options.warmup, options.runs);
    let size = <[i64; 4]>::try_from(x.size()).map_err(|_| ScConvError::InvalidInput("a 4-d input".into()))?;
    let arithmetic = Arithmetic::for_precision(precision);
    let bn = || BatchNormParams::of(batchnorm, crate::models::blocks::BATCHNORM_EPS);
    let mut step = ScConvStep::new(scconv, "block", false, bn(), true)?;
    let mut plain = InferenceConv::new(conv, ConvGeometry::square(1, 1, 1)).then_batchnorm(bn()).then_relu();
    step.fold();
    plain.fold();
    step.fuse()?;
    plain.fuse()?;
    if arithmetic.is_bf16() {
        step.cast(&arithmetic)?;
        plain.cast(&arithmetic)?;
    }
    step.prepack(size)?;
    plain.prepack(size)?;
    step.own_primitives()?;
    plain.own_primitives()?;
    let channels_last = step.channels_last()?;
    step.fuse_squeezes()?;
    step.fuse_gwc_pwc1()?;
    // Each step reads its input as the form hands it over: bf16 where the form stores bf16, channels-last
    // where the step's version has the channels-last kernel (the form's plain convolutions always).
    let x = arithmetic.store(&crate::inference::to_channels_last(x));
    let step_forward = || step.forward(&step.input(&x), None, None);
    let scconv_step = time(Device::Cpu, warmup, runs, step_forward);
    let scconv_step_profile = options.profile.then(|| profile(Device::Cpu, runs, &scconv_step, step_forward));
    let conv3x3 = time(Device::Cpu, warmup, runs, || plain.forward(&x));
    Ok(FormBlockBench {
        arithmetic: arithmetic.name().to_string(),
        channels_last,
        scconv_step,
        conv3x3,
        scconv_step_profile,
    })
}
