//! The CRU's fuse without its 2C-channel concatenations: each branch is pooled on its own, the softmax
//! (the code's over all 2C pooled values, or the paper's per channel over the two branches) is taken on
//! those small vectors as the reference takes it, and the weighted branches are added into one output. The same function; rounding differs only in the order
//! of additions, which the parity tolerance covers. On CUDA with the fused kernels, the weighted sum is
//! one kernel (`crate::cuda::cru_weighted_sum`), which rounds as the reference does.
use crate::config::Fuse;
use crate::cru::Cru;
use crate::profile::scope;
use tch::{nn::Module, Kind, Tensor};

/// The CRU's convolutions, as the fused forward calls them.
pub(crate) trait CruConvs {
    /// `(squeeze1(up), squeeze2(low))`.
    fn squeezes(&self, up: &Tensor, low: &Tensor) -> (Tensor, Tensor);
    /// `GWC(up) + PWC1(up)`.
    fn gwc_plus_pwc1(&self, up: &Tensor) -> Tensor;
    /// `PWC2(low)`.
    fn pwc2(&self, low: &Tensor) -> Tensor;
    /// Whether the fuse computes in fp32 on these convolutions' outputs (the bf16 inference form's,
    /// stored in bf16); otherwise it computes in their own kind, as the reference does.
    fn fuse_in_fp32(&self) -> bool {
        false
    }
    /// The fuse's pooling of `[Y1, PWC2(low), low]` side by side as `(N, 2C, 1, 1)`, where these
    /// convolutions' owner has a kernel for it (`up`: the squeezed upper part `Y1` comes from);
    /// `None`: libtorch's poolings.
    fn channel_means(&self, _up: &Tensor, _parts: [&Tensor; 3]) -> Option<Tensor> {
        None
    }
}

/// The CRU's own layers (libtorch's convolutions), the sum in place where the reference allocates:
/// every large allocation is a fresh run of page faults.
impl CruConvs for Cru {
    fn squeezes(&self, up: &Tensor, low: &Tensor) -> (Tensor, Tensor) {
        (self.squeeze1.forward(up), self.squeeze2.forward(low))
    }

    fn gwc_plus_pwc1(&self, up: &Tensor) -> Tensor {
        let mut y1 = self.GWC.forward(up);
        y1 += self.PWC1.forward(up);
        y1
    }

    fn pwc2(&self, low: &Tensor) -> Tensor {
        self.PWC2.forward(low)
    }
}

/// The CRU's output before its weighted sum: `out = w0 * Y1` with `w1 * PWC2(low)` added to its
/// first channels and `w2 * low` to the rest, `weights` `(N, C + C2 + C_low, 1, 1)` being
/// `[w0, w1, w2]` side by side.
pub(crate) struct FuseParts {
    pub(crate) y1: Tensor,
    pub(crate) y2_head: Tensor,
    pub(crate) low: Tensor,
    pub(crate) weights: Tensor,
}

impl FuseParts {
    /// `[w0, w1, w2]`, views of `weights`.
    pub(crate) fn split_weights(&self) -> Vec<Tensor> {
        let sizes = [self.y1.size()[1], self.y2_head.size()[1], self.low.size()[1]];
        self.weights.split_with_sizes(sizes, 1)
    }

    /// The weighted sum by libtorch's operations, into `y1` in place (into an fp32 copy where the
    /// weights are fp32 and `y1` is not: the bf16 forms sum in fp32).
    pub(crate) fn weighted_sum(self) -> Tensor {
        let weights = self.split_weights();
        let FuseParts { y1, y2_head, low, .. } = self;
        let mut y1 = match (y1.kind(), weights[0].kind()) {
            (Kind::BFloat16, Kind::Float) => y1.to_kind(Kind::Float),
            _ => y1,
        };
        let head = y2_head.size()[1];
        y1 *= &weights[0];
        let _ = y1.narrow(1, 0, head).addcmul_(&y2_head, &weights[1]);
        let _ = y1.narrow(1, head, low.size()[1]).addcmul_(&low, &weights[2]);
        y1
    }
}

impl Cru {
    /// The CRU for inference: `cuda_kernels` runs the fuse's weighted sum as one CUDA kernel;
    /// `copy_squeeze_inputs` gives each squeeze conv a contiguous copy of its channel slice (the CPU:
    /// oneDNN reorders a strided slice slowly; the copy is the same convolution, bit for bit).
    ///
    /// Two CPU merges were measured faster and removed because they sum in another order, which inputs
    /// with a large common offset expose (docs/speed.md, "The fast path for every version"): the two
    /// squeezes as one two-group conv (up to 4.7e-5 of the largest output from the reference at
    /// C = 64, offset 1000), and GWC + PWC1 as one dense conv (6.3e-6 at C = 56, group_size 1,
    /// kernel 5, offset 1000: outside the fp32 tolerance).
    ///
    /// `fuse_scale` (optional, `(1, 2C, 1, 1)`) multiplies the fuse's weights: a per-channel scale of
    /// the output, given twice (`w[c]` and `w[C + c]` both weigh output channel c).
    /// The CRU's convolutions are run by `convs`: its own layers, or an inference form's prepacked ones.
    pub(crate) fn forward_fused(
        &self,
        convs: &dyn CruConvs,
        x: &Tensor,
        cuda_kernels: bool,
        copy_squeeze_inputs: bool,
        fuse_scale: Option<&Tensor>,
    ) -> Tensor {
        let squeeze = || {
            let split = x.split_with_sizes([self.up_channel, self.low_channel], 1);
            let (up, low) = match copy_squeeze_inputs {
                true => (split[0].contiguous(), split[1].contiguous()),
                false => (split[0].shallow_clone(), split[1].shallow_clone()),
            };
            convs.squeezes(&up, &low)
        };
        let (up, low) = scope("CRU squeeze1, squeeze2", squeeze);
        self.after_squeezes(convs, up, low, cuda_kernels, fuse_scale)
    }

    /// The CRU from its two squeeze inputs, the SRU's output split at `up_channel` (`up`, `low`: any
    /// layout the convolutions take; the inference form's channels-last step writes them so), up to
    /// its weighted sum: the caller sums (`FuseParts::weighted_sum`, or a pass that fuses more).
    pub(crate) fn forward_halves(
        &self,
        convs: &dyn CruConvs,
        up: &Tensor,
        low: &Tensor,
        fuse_scale: Option<&Tensor>,
    ) -> FuseParts {
        let (up, low) = scope("CRU squeeze1, squeeze2", || convs.squeezes(up, low));
        self.forward_squeezed(convs, up, low, fuse_scale)
    }

    /// As `forward_halves`, from the squeeze convolutions' outputs (`up`, `low`: squeezed where the
    /// SRU wrote them, `Pass::FuseSqueezes`).
    pub(crate) fn forward_squeezed(
        &self,
        convs: &dyn CruConvs,
        up: Tensor,
        low: Tensor,
        fuse_scale: Option<&Tensor>,
    ) -> FuseParts {
        let (y1, y2_head) = self.branches(convs, &up, &low);
        scope("CRU fuse: pooling, softmax", || self.fuse_parts(convs, &up, [y1, y2_head, low], fuse_scale))
    }

    /// GWC + PWC1, PWC2 and the fuse on the squeezed `up` and `low`.
    fn after_squeezes(
        &self,
        convs: &dyn CruConvs,
        up: Tensor,
        low: Tensor,
        cuda_kernels: bool,
        fuse_scale: Option<&Tensor>,
    ) -> Tensor {
        let (y1, y2_head) = self.branches(convs, &up, &low);
        scope("CRU fuse", || {
            let parts = self.fuse_parts(convs, &up, [y1, y2_head, low], fuse_scale);
            if cuda_kernels {
                let y1 = parts.y1.shallow_clone();
                if let Ok(out) = crate::cuda::cru_weighted_sum(y1, &parts.y2_head, &parts.low, &parts.weights)
                {
                    return out;
                }
            }
            parts.weighted_sum()
        })
    }

    /// `(Y1, PWC2(low))`, as the convolutions store them.
    fn branches(&self, convs: &dyn CruConvs, up: &Tensor, low: &Tensor) -> (Tensor, Tensor) {
        let y1 = scope("CRU GWC + PWC1", || convs.gwc_plus_pwc1(up));
        // Y2 = cat(PWC2(low), low) is never built: its two parts are weighted separately.
        let y2_head = scope("CRU PWC2", || convs.pwc2(low));
        (y1, y2_head)
    }

    /// The fuse's weights from the pooled branches `[Y1, PWC2(low), low]` (times `fuse_scale` where
    /// given), with the branches.
    fn fuse_parts(
        &self,
        convs: &dyn CruConvs,
        up: &Tensor,
        [y1, y2_head, low]: [Tensor; 3],
        fuse_scale: Option<&Tensor>,
    ) -> FuseParts {
        let pool = |t: &Tensor| match (t.kind(), convs.fuse_in_fp32()) {
            // The bf16 form's tensors pooled in fp32 (bf16 pooling would round the means).
            (Kind::BFloat16, true) => t.mean_dim(&[2i64, 3][..], true, Kind::Float),
            _ => t.adaptive_avg_pool2d([1, 1]),
        };
        let pooled = convs
            .channel_means(up, [&y1, &y2_head, &low])
            .unwrap_or_else(|| Tensor::cat(&[pool(&y1), pool(&y2_head), pool(&low)], 1));
        let weights = self.fuse_weights(&pooled);
        let weights = match fuse_scale {
            Some(fuse_scale) => weights * fuse_scale,
            None => weights,
        };
        FuseParts { y1, y2_head, low, weights }
    }

    /// The weights of `Y1` and `Y2` as one `(N, 2C, 1, 1)` tensor, from the pooled `[Y1, PWC2(low), low]`
    /// side by side (per channel, the pooling of a concatenation is the concatenation of the poolings).
    /// Global fuse: the reference's softmax over the same `(N, 2C, 1, 1)` shape (libtorch reduces an
    /// `(N, 2C)` softmax differently, which shows at C >= 2048 on near-constant inputs). Paper fuse: the
    /// reference's `softmax(stack([S1, S2]), 0)`, its two halves side by side; either way the output is
    /// `w[:, :C] * Y1 + w[:, C:] * Y2`.
    fn fuse_weights(&self, pooled: &Tensor) -> Tensor {
        match self.fuse {
            Fuse::Global => pooled.softmax(1, None),
            Fuse::Paper => {
                let s = pooled.split(pooled.size()[1] / 2, 1); // [S1, S2], S2 = [pooled PWC2(low), pooled low]
                let beta = Tensor::stack(&[&s[0], &s[1]], 0).softmax(0, None);
                Tensor::cat(&[beta.get(0), beta.get(1)], 1)
            }
        }
    }
}
