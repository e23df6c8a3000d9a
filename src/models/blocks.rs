//! The residual blocks of `parity/models.py`, under torchvision's names (`conv1`, `bn1`, `downsample.0`,
//! ...). A 3x3 conv that keeps its channel count is an ScConv in the SC variant, followed by a 2x2
//! average pool where the plain conv would have stride 2.
use crate::config::ScConvSettings;
use crate::profile;
use crate::sru::{Gate, GateDecisions};
use crate::{scconv, ScConv, ScConvError};
use tch::{nn, nn::Module, nn::ModuleT, Tensor};

/// What the ScConvs of a forward pass do with their gates: compute them (`Off`), also record them by
/// path (`Record`), or take the decisions given for their path (`Inject`, for the layered checks).
pub enum GateLog<'a> {
    /// Gates computed and not kept.
    Off,
    /// Each ScConv's path and gate appended.
    Record(&'a mut Vec<(String, Gate)>),
    /// Each ScConv uses the decisions listed under its path (computes its own where none is).
    Inject(&'a [(String, GateDecisions)]),
    /// Each ScConv runs as its execution mode says and appends its path and the informative mask it
    /// decided (the fast path's own where it runs one, else the reference's gate).
    RecordDecided(&'a mut Vec<(String, Tensor)>),
}

/// Every BatchNorm of the networks is built with this `eps` (torchvision's default, PyTorch's
/// `nn.BatchNorm2d`); `tch` keeps a layer's config private, so the inference form reads it here.
pub(crate) const BATCHNORM_EPS: f64 = 1e-5;

fn batch_norm2d(p: nn::Path, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, channels, nn::BatchNormConfig { eps: BATCHNORM_EPS, ..Default::default() })
}

/// A residual 3x3 conv: plain, or ScConv (+ pool at stride 2).
#[derive(Debug)]
pub enum Conv3x3 {
    /// The conv and its stride (`tch` keeps a layer's config private; padding is 1).
    Plain(nn::Conv2D, i64),
    Sc {
        scconv: Box<ScConv>,
        pool: bool,
        path: String,
    },
}

pub fn conv3x3(
    p: nn::Path,
    in_planes: i64,
    out_planes: i64,
    stride: i64,
    sc: Option<&ScConvSettings>,
) -> Result<Conv3x3, ScConvError> {
    if let Some(settings) = sc.filter(|_| in_planes == out_planes) {
        let path = p.components().collect::<Vec<_>>().join(".");
        let scconv = Box::new(scconv(p, &settings.config(out_planes)?)?);
        return Ok(Conv3x3::Sc { scconv, pool: stride == 2, path });
    }
    let config = nn::ConvConfig { stride, padding: 1, bias: false, ..Default::default() };
    Ok(Conv3x3::Plain(nn::conv2d(p, in_planes, out_planes, 3, config), stride))
}

impl Conv3x3 {
    /// In training the ScConv runs its reference mode, the one with gradients, whatever its execution.
    fn forward(&self, x: &Tensor, train: bool, gates: &mut GateLog) -> Tensor {
        match self {
            Conv3x3::Plain(conv, _) => profile::scope("conv3x3 (plain)", || conv.forward(x)),
            Conv3x3::Sc { scconv, pool, path } => {
                let y = match gates {
                    GateLog::Record(log) => {
                        let (y, gate) = scconv.forward_recording_gate(x);
                        log.push((path.clone(), gate));
                        y
                    }
                    GateLog::Inject(given) => match given.iter().find(|(p, _)| p == path) {
                        Some((_, decisions)) => scconv.forward_given_decisions(x, decisions),
                        None => scconv.forward(x),
                    },
                    GateLog::RecordDecided(log) => {
                        let decided = match scconv.try_fast_info_mask(x) {
                            Ok(Some(mask)) => mask,
                            _ => scconv.SRU.gate(x).decisions.info_mask,
                        };
                        log.push((path.clone(), decided));
                        scconv.forward(x)
                    }
                    GateLog::Off if train => scconv.forward_reference(x),
                    GateLog::Off => scconv.forward(x),
                };
                if *pool {
                    profile::scope("ScConv's 2x2 pool", || {
                        y.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)
                    })
                } else {
                    y
                }
            }
        }
    }
}

impl Conv3x3 {
    fn scconv_mut(&mut self) -> Option<&mut ScConv> {
        match self {
            Conv3x3::Plain(..) => None,
            Conv3x3::Sc { scconv, .. } => Some(scconv),
        }
    }
}

fn conv1x1(p: nn::Path, in_planes: i64, out_planes: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(p, in_planes, out_planes, 1, nn::ConvConfig { stride, bias: false, ..Default::default() })
}

/// `downsample`: a strided 1x1 conv and a BatchNorm, as `nn.Sequential` (keys `downsample.0/1`).
#[derive(Debug)]
pub struct Downsample {
    pub(crate) conv: nn::Conv2D,
    pub(crate) bn: nn::BatchNorm,
    pub(crate) stride: i64,
}

pub(crate) fn downsample(p: nn::Path, in_planes: i64, out_planes: i64, stride: i64) -> Downsample {
    Downsample {
        conv: conv1x1(&p / "0", in_planes, out_planes, stride),
        bn: batch_norm2d(&p / "1", out_planes),
        stride,
    }
}

impl ModuleT for Downsample {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.conv.forward(x).apply_t(&self.bn, train)
    }
}

/// The residual branch: `downsample(x)` where the block has one, else `x`.
fn shortcut(downsample: &Option<Downsample>, x: &Tensor, train: bool) -> Tensor {
    match downsample {
        Some(d) => d.forward_t(x, train),
        None => x.shallow_clone(),
    }
}

/// The arguments every block takes.
pub struct BlockSpec {
    pub in_planes: i64,
    pub planes: i64,
    pub stride: i64,
    pub downsample: bool,
    /// The ScConv settings where the network is SC (`ResNetConfig::sc`).
    pub sc: Option<ScConvSettings>,
}

#[derive(Debug)]
pub struct BasicBlock {
    pub(crate) conv1: Conv3x3,
    pub(crate) bn1: nn::BatchNorm,
    pub(crate) conv2: Conv3x3,
    pub(crate) bn2: nn::BatchNorm,
    pub(crate) downsample: Option<Downsample>,
}

pub fn basic_block(p: nn::Path, s: &BlockSpec) -> Result<BasicBlock, ScConvError> {
    Ok(BasicBlock {
        conv1: conv3x3(&p / "conv1", s.in_planes, s.planes, s.stride, s.sc.as_ref())?,
        bn1: batch_norm2d(&p / "bn1", s.planes),
        conv2: conv3x3(&p / "conv2", s.planes, s.planes, 1, s.sc.as_ref())?,
        bn2: batch_norm2d(&p / "bn2", s.planes),
        downsample: s.downsample.then(|| downsample(&p / "downsample", s.in_planes, s.planes, s.stride)),
    })
}

impl BasicBlock {
    pub fn forward(&self, x: &Tensor, train: bool, gates: &mut GateLog) -> Tensor {
        let out = self.conv1.forward(x, train, gates).apply_t(&self.bn1, train).relu();
        let out = self.conv2.forward(&out, train, gates).apply_t(&self.bn2, train);
        let identity = shortcut(&self.downsample, x, train);
        (out + identity).relu()
    }
}

#[derive(Debug)]
pub struct Bottleneck {
    pub(crate) conv1: nn::Conv2D,
    pub(crate) bn1: nn::BatchNorm,
    pub(crate) conv2: Conv3x3,
    pub(crate) bn2: nn::BatchNorm,
    pub(crate) conv3: nn::Conv2D,
    pub(crate) bn3: nn::BatchNorm,
    pub(crate) downsample: Option<Downsample>,
}

pub fn bottleneck(p: nn::Path, s: &BlockSpec) -> Result<Bottleneck, ScConvError> {
    let (width, out) = (s.planes, s.planes * 4);
    Ok(Bottleneck {
        conv1: conv1x1(&p / "conv1", s.in_planes, width, 1),
        bn1: batch_norm2d(&p / "bn1", width),
        conv2: conv3x3(&p / "conv2", width, width, s.stride, s.sc.as_ref())?,
        bn2: batch_norm2d(&p / "bn2", width),
        conv3: conv1x1(&p / "conv3", width, out, 1),
        bn3: batch_norm2d(&p / "bn3", out),
        downsample: s.downsample.then(|| downsample(&p / "downsample", s.in_planes, out, s.stride)),
    })
}

impl Bottleneck {
    pub fn forward(&self, x: &Tensor, train: bool, gates: &mut GateLog) -> Tensor {
        let out = self.conv1.forward(x).apply_t(&self.bn1, train).relu();
        let out = self.conv2.forward(&out, train, gates).apply_t(&self.bn2, train).relu();
        let out = self.conv3.forward(&out).apply_t(&self.bn3, train);
        let identity = shortcut(&self.downsample, x, train);
        (out + identity).relu()
    }
}

/// Either block, so a stage can hold a list of them.
#[derive(Debug)]
pub enum Block {
    Basic(Box<BasicBlock>),
    Bottleneck(Box<Bottleneck>),
}

impl Block {
    pub fn forward(&self, x: &Tensor, train: bool, gates: &mut GateLog) -> Tensor {
        match self {
            Block::Basic(b) => b.forward(x, train, gates),
            Block::Bottleneck(b) => b.forward(x, train, gates),
        }
    }

    /// The block's ScConvs (none in a plain network).
    pub fn scconvs_mut(&mut self) -> Vec<&mut ScConv> {
        match self {
            Block::Basic(b) => {
                [&mut b.conv1, &mut b.conv2].into_iter().filter_map(Conv3x3::scconv_mut).collect()
            }
            Block::Bottleneck(b) => b.conv2.scconv_mut().into_iter().collect(),
        }
    }
}
