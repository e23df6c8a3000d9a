//! `ResNet`: torchvision's forward (`conv1, bn1, relu, maxpool, layer1..4, avgpool, flatten, fc`).
use super::blocks::{basic_block, bottleneck, Block, BlockSpec, GateLog, BATCHNORM_EPS};
use super::config::{BlockKind, ResNetConfig};
use crate::cuda::CudaGraph;
use crate::error::ScConvError;
use crate::fast::Execution;
use crate::input::{self, Expected};
use crate::sru::{Gate, GateDecisions};
use std::borrow::Borrow;
use tch::{nn, nn::BatchNormConfig, nn::Module, nn::ModuleT, Tensor};

/// A torchvision-layout ResNet, plain or SC (see `ResNetConfig`). `forward_t` is torchvision's
/// forward; `nn::ModuleT` with `train = false` is inference.
#[derive(Debug)]
pub struct ResNet {
    pub(crate) conv1: nn::Conv2D,
    pub(crate) bn1: nn::BatchNorm,
    pub(crate) stages: Vec<Vec<Block>>,
    pub(crate) fc: nn::Linear,
    config: ResNetConfig,
}

/// Builds the network of `config` under `p` (keys as torchvision's: `conv1.weight`, `layer1.0.bn1.bias`,
/// `fc.weight`, ...), after validating it.
pub fn resnet<'a>(p: impl Borrow<nn::Path<'a>>, config: &ResNetConfig) -> Result<ResNet, ScConvError> {
    let p = p.borrow();
    config.validate()?;
    // Creating the variables allocates: a failure (memory) is an error, not a panic.
    input::guard(|| build(p, config))?
}

fn build(p: &nn::Path, config: &ResNetConfig) -> Result<ResNet, ScConvError> {
    let (kernel, stride, padding) = if config.small_input { (3, 1, 1) } else { (7, 2, 3) };
    let stem = nn::ConvConfig { stride, padding, bias: false, ..Default::default() };
    let mut in_planes = config.widths[0];
    let conv1 = nn::conv2d(p / "conv1", config.in_channels, in_planes, kernel, stem);
    let bn1 =
        nn::batch_norm2d(p / "bn1", in_planes, BatchNormConfig { eps: BATCHNORM_EPS, ..Default::default() });
    let expansion = config.block.expansion();
    let mut stages = Vec::new();
    for (index, (&planes, &blocks)) in config.widths.iter().zip(&config.layers).enumerate() {
        let layer = p / format!("layer{}", index + 1);
        let mut stage = Vec::new();
        for b in 0..blocks {
            let stride = if index > 0 && b == 0 { 2 } else { 1 };
            let downsample = b == 0 && (stride != 1 || in_planes != planes * expansion);
            let sc = config.sc.then_some(config.scconv);
            let spec = BlockSpec { in_planes, planes, stride, downsample, sc };
            stage.push(match config.block {
                BlockKind::Basic => Block::Basic(Box::new(basic_block(&layer / b, &spec)?)),
                BlockKind::Bottleneck => Block::Bottleneck(Box::new(bottleneck(&layer / b, &spec)?)),
            });
            in_planes = planes * expansion;
        }
        stages.push(stage);
    }
    let fc = nn::linear(p / "fc", in_planes, config.num_classes, Default::default());
    Ok(ResNet { conv1, bn1, stages, fc, config: config.clone() })
}

impl ResNet {
    /// The config it was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Sets the execution mode of every ScConv (see `ScConv::set_execution`): enable a fast path after
    /// loading weights. Training (`forward_t(.., true)`) always runs the reference mode.
    pub fn set_scconv_execution(&mut self, execution: Execution) -> Result<(), ScConvError> {
        for block in self.stages.iter_mut().flatten() {
            for scconv in block.scconvs_mut() {
                scconv.set_execution(execution)?;
            }
        }
        Ok(())
    }

    /// The eval-mode forward captured into a CUDA graph for inputs shaped like `example` (a CUDA
    /// tensor): `run` on the returned graph replays the whole network as one launch. Enable the fast
    /// path first if wanted; see [`CudaGraph::capture`] for what is fixed at capture.
    pub fn cuda_graph(&self, example: &Tensor) -> Result<CudaGraph<'_>, ScConvError> {
        self.check_input(example)?;
        CudaGraph::capture(self, example, |x| self.run(x, false, &mut GateLog::Off))
    }

    fn run(&self, x: &Tensor, train: bool, gates: &mut GateLog) -> Tensor {
        let x = self.conv1.forward(x).apply_t(&self.bn1, train).relu();
        let mut x =
            if self.config.small_input { x } else { x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false) };
        for block in self.stages.iter().flatten() {
            x = block.forward(&x, train, gates);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }

    /// Eval-mode logits after checking the input (rank, channels, dtype, device, sizes).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor, ScConvError> {
        self.check_input(x)?;
        input::guard(|| self.run(x, false, &mut GateLog::Off))
    }

    /// Eval-mode logits and the gate of every ScConv, keyed by its path (`layer1.0.conv2`, ...).
    pub fn forward_recording_gates(&self, x: &Tensor) -> Result<(Tensor, Vec<(String, Gate)>), ScConvError> {
        self.check_input(x)?;
        let mut log = Vec::new();
        let logits = self.run(x, false, &mut GateLog::Record(&mut log));
        Ok((logits, log))
    }

    /// Eval-mode logits and, by path, the informative mask each ScConv decided in its execution mode
    /// (with `Execution::Fast`, the fast path's own decisions, as the network's forward takes them):
    /// what `infer --execution fast --decisions` compares with the reference mode's.
    pub fn forward_recording_decisions(
        &self,
        x: &Tensor,
    ) -> Result<(Tensor, Vec<(String, Tensor)>), ScConvError> {
        self.check_input(x)?;
        let mut log = Vec::new();
        let logits = input::guard(|| self.run(x, false, &mut GateLog::RecordDecided(&mut log)))?;
        Ok((logits, log))
    }

    /// Eval-mode logits with every ScConv taking the decisions given for its path (from
    /// `forward_recording_gates`, of this network or another): the layered checks of a compiled form.
    pub fn forward_with_decisions(
        &self,
        x: &Tensor,
        decisions: &[(String, GateDecisions)],
    ) -> Result<Tensor, ScConvError> {
        self.check_input(x)?;
        input::guard(|| self.run(x, false, &mut GateLog::Inject(decisions)))
    }

    pub(crate) fn check_input(&self, x: &Tensor) -> Result<(), ScConvError> {
        let [_, _, h, w] = input::check(x, &Expected::of(self.config.in_channels, &self.fc.ws))?;
        self.check_spatial(h, w)
    }

    /// Where a stride-2 ScConv is followed by a 2x2 average pool, the size must be even there, or the
    /// pooled path (floor) and the strided shortcut (ceil) disagree, as they do in the PyTorch twin.
    fn check_spatial(&self, h: i64, w: i64) -> Result<(), ScConvError> {
        let (mut h, mut w) = (h, w);
        if !self.config.small_input {
            let stem = |s: i64| ((s + 6 - 7) / 2 + 1 + 2 - 3) / 2 + 1; // conv 7/2/3, then max pool 3/2/1
            (h, w) = (stem(h), stem(w));
        }
        let expansion = self.config.block.expansion();
        for index in 1..self.config.widths.len() {
            let (previous, planes) = (self.config.widths[index - 1] * expansion, self.config.widths[index]);
            let pooled = self.config.sc && (self.config.block == BlockKind::Bottleneck || previous == planes);
            if pooled && (h % 2 != 0 || w % 2 != 0) {
                return Err(ScConvError::InvalidInput(format!(
                    "layer{} halves a {h}x{w} map with ScConv and a 2x2 average pool, which needs even sizes; \
                     choose an input size that stays even there",
                    index + 1
                )));
            }
            (h, w) = ((h + 1) / 2, (w + 1) / 2);
        }
        Ok(())
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.run(x, train, &mut GateLog::Off)
    }
}
