//! The CRU's fuse without its 2C-channel concatenations: each branch is pooled on its own, the softmax
//! (the code's over all 2C pooled values, or the paper's per channel over the two branches) is taken on
//! those small vectors as the reference takes it, and the weighted branches are added into one output. The same function; rounding differs only in the order
//! of additions, which the parity tolerance covers. On CUDA with the fused kernels, the weighted sum is
//! one kernel (`crate::cuda::cru_weighted_sum`), which rounds as the reference does.
use super::cru_weights::MergedCruWeights;
use crate::config::Fuse;
use crate::cru::Cru;
use crate::profile::scope;
use tch::{nn::Module, Tensor};

impl Cru {
    pub(crate) fn forward_fused(
        &self,
        x: &Tensor,
        cuda_kernels: bool,
        merged: Option<&MergedCruWeights>,
    ) -> Tensor {
        let squeeze = || {
            let split = x.split_with_sizes([self.up_channel, self.low_channel], 1);
            match merged {
                // On the CPU oneDNN reorders a channel slice slowly; a contiguous copy of it gives the
                // same convolution, bit for bit, faster (see `cru_weights`).
                Some(_) => (
                    self.squeeze1.forward(&split[0].contiguous()),
                    self.squeeze2.forward(&split[1].contiguous()),
                ),
                None => (self.squeeze1.forward(&split[0]), self.squeeze2.forward(&split[1])),
            }
        };
        let (up, low) = scope("CRU squeeze1, squeeze2", squeeze);
        let dense = merged
            .filter(|m| m.merges_gwc())
            .and_then(|m| scope("CRU GWC + PWC1 (one conv)", || m.gwc_plus_pwc1(&up)));
        let y1 = dense.unwrap_or_else(|| {
            // In place where the reference allocates: every large allocation is a fresh run of page faults.
            let mut y1 = scope("CRU GWC", || self.GWC.forward(&up));
            scope("CRU PWC1 (+=)", || y1 += self.PWC1.forward(&up));
            y1
        });
        // Y2 = cat(PWC2(low), low) is never built: its two parts are weighted separately.
        let y2_head = scope("CRU PWC2", || self.PWC2.forward(&low));
        scope("CRU fuse", || self.fuse(y1, &y2_head, &low, cuda_kernels))
    }

    fn fuse(&self, mut y1: Tensor, y2_head: &Tensor, low: &Tensor, cuda_kernels: bool) -> Tensor {
        let channels = y1.size()[1];
        let sizes = [channels, y2_head.size()[1], low.size()[1]];
        let pooled: Vec<Tensor> = [&y1, y2_head, low].iter().map(|t| t.adaptive_avg_pool2d([1, 1])).collect();
        let weights = self.fuse_weights(&pooled);
        if cuda_kernels {
            if let Ok(out) = crate::cuda::cru_weighted_sum(y1.shallow_clone(), y2_head, low, &weights) {
                return out;
            }
        }
        let weights = weights.split_with_sizes(sizes, 1);
        y1 *= &weights[0];
        let _ = y1.narrow(1, 0, sizes[1]).addcmul_(y2_head, &weights[1]);
        let _ = y1.narrow(1, sizes[1], sizes[2]).addcmul_(low, &weights[2]);
        y1
    }

    /// The weights of `Y1` and `Y2` as one `(N, 2C, 1, 1)` tensor, from the pooled `Y1`, `PWC2(low)`
    /// and `low` (per channel, the pooling of a concatenation is the concatenation of the poolings).
    /// Global fuse: the reference's softmax over the same `(N, 2C, 1, 1)` shape (libtorch reduces an
    /// `(N, 2C)` softmax differently, which shows at C >= 2048 on near-constant inputs). Paper fuse: the
    /// reference's `softmax(stack([S1, S2]), 0)`, its two halves side by side; either way the output is
    /// `w[:, :C] * Y1 + w[:, C:] * Y2`.
    fn fuse_weights(&self, pooled: &[Tensor]) -> Tensor {
        match self.fuse {
            Fuse::Global => Tensor::cat(pooled, 1).softmax(1, None),
            Fuse::Paper => {
                let s2 = Tensor::cat(&pooled[1..], 1);
                let beta = Tensor::stack(&[&pooled[0], &s2], 0).softmax(0, None);
                Tensor::cat(&[beta.get(0), beta.get(1)], 1)
            }
        }
    }
}
