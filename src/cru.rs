//! `CRU`, the Channel Reconstruction Unit: split channels (alpha), squeeze both parts (1x1), transform
//! the upper part with a group-wise (`GWC`) plus a point-wise (`PWC1`) conv, reuse the lower part
//! (`cat(PWC2(low), low)`), and fuse with one softmax over all 2C pooled channels (the code's fuse), or
//! per channel over the two branches (the paper's, `Fuse::Paper`).
use crate::config::{Fuse, ScConvConfig};
use std::borrow::Borrow;
use tch::{nn, nn::Module, Tensor};

/// Field names are the reference's, since they are its state-dict keys (`CRU.GWC.weight`, ...).
#[derive(Debug)]
#[allow(non_snake_case)]
pub struct Cru {
    pub(crate) up_channel: i64,
    pub(crate) low_channel: i64,
    pub(crate) fuse: Fuse,
    /// 1x1 conv squeezing the upper part: `up_channel -> up_channel / squeeze_radio`.
    pub squeeze1: nn::Conv2D,
    /// 1x1 conv squeezing the lower part: `low_channel -> low_channel / squeeze_radio`.
    pub squeeze2: nn::Conv2D,
    /// Group-wise `group_kernel_size` conv on the squeezed upper part, to `op_channel` (with bias).
    pub GWC: nn::Conv2D,
    /// Point-wise conv on the squeezed upper part, to `op_channel`; added to `GWC`'s output.
    pub PWC1: nn::Conv2D,
    /// Point-wise conv on the squeezed lower part, to `op_channel - low_channel / squeeze_radio`.
    pub PWC2: nn::Conv2D,
}

/// The layers of `config` under `p`; the caller has validated `config` (as `scconv` does).
pub fn cru<'a>(p: impl Borrow<nn::Path<'a>>, config: &ScConvConfig) -> Cru {
    let p = p.borrow();
    let c = config.op_channel;
    let (up, low) = (config.squeezed_up(), config.squeezed_low());
    let k = config.group_kernel_size;
    let gwc = ConvSpec { kernel: k, padding: k / 2, groups: config.group_size, bias: true };
    Cru {
        up_channel: config.up_channel(),
        low_channel: config.low_channel(),
        fuse: config.fuse,
        squeeze1: conv(p / "squeeze1", config.up_channel(), up, ConvSpec::pointwise()),
        squeeze2: conv(p / "squeeze2", config.low_channel(), low, ConvSpec::pointwise()),
        GWC: conv(p / "GWC", up, c, gwc),
        PWC1: conv(p / "PWC1", up, c, ConvSpec::pointwise()),
        PWC2: conv(p / "PWC2", low, c - low, ConvSpec::pointwise()),
    }
}

impl Module for Cru {
    fn forward(&self, x: &Tensor) -> Tensor {
        let split = x.split_with_sizes([self.up_channel, self.low_channel], 1);
        let (up, low) = (self.squeeze1.forward(&split[0]), self.squeeze2.forward(&split[1]));
        let y1 = self.GWC.forward(&up) + self.PWC1.forward(&up);
        let y2 = Tensor::cat(&[self.PWC2.forward(&low), low], 1);
        match self.fuse {
            Fuse::Global => {
                let out = Tensor::cat(&[y1, y2], 1);
                let out = out.adaptive_avg_pool2d([1, 1]).softmax(1, None) * &out;
                let halves = out.split(out.size()[1] / 2, 1);
                &halves[0] + &halves[1]
            }
            Fuse::Paper => paper_fuse(&y1, &y2),
        }
    }
}

/// The paper's fuse, as `parity/paper_fuse.py` writes it: `S1, S2 = GAP(Y1), GAP(Y2)`, a softmax over
/// the two branches per channel (`beta = softmax(stack([S1, S2]), 0)`), `Y = beta1 * Y1 + beta2 * Y2`.
fn paper_fuse(y1: &Tensor, y2: &Tensor) -> Tensor {
    let (s1, s2) = (y1.adaptive_avg_pool2d([1, 1]), y2.adaptive_avg_pool2d([1, 1]));
    let beta = Tensor::stack(&[s1, s2], 0).softmax(0, None);
    beta.get(0) * y1 + beta.get(1) * y2
}

/// The `nn.Conv2d` arguments the CRU uses (stride 1, dilation 1 throughout).
#[derive(Clone, Copy)]
struct ConvSpec {
    kernel: i64,
    padding: i64,
    groups: i64,
    bias: bool,
}

impl ConvSpec {
    fn pointwise() -> Self {
        Self { kernel: 1, padding: 0, groups: 1, bias: false }
    }
}

/// An `nn.Conv2d` with PyTorch's default initialisation (weight and bias uniform in
/// +-1/sqrt(fan_in)), so a model trained from scratch in Rust starts like one in PyTorch.
fn conv(p: nn::Path, in_channels: i64, out_channels: i64, spec: ConvSpec) -> nn::Conv2D {
    let fan_in = (in_channels / spec.groups) * spec.kernel * spec.kernel;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = nn::Init::Uniform { lo: -bound, up: bound };
    let config = nn::ConvConfig {
        padding: spec.padding,
        groups: spec.groups,
        bias: spec.bias,
        ws_init: init,
        bs_init: init,
        ..Default::default()
    };
    nn::conv2d(p, in_channels, out_channels, spec.kernel, config)
}
