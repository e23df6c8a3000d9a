//! `GroupBatchnorm2d` of the reference: per-group statistics with the **unbiased** std, `eps` added to
//! the std (not under a square root), then a per-channel affine `x * gamma + beta`. From 2023-09-12 on
//! the reference may use PyTorch's `nn.GroupNorm` in its place (`torch_gn`): the same role and two
//! parameters, of shape `[C]`, with the biased variance and `eps` under the square root; that is
//! libtorch's own `group_norm` here, the kernel `nn.GroupNorm` calls.
use std::borrow::Borrow;
use tch::{nn, Tensor};

/// The reference's `GroupBatchnorm2d(c_num, group_num, eps)`; `forward` normalises `(N, C, H, W)`.
#[derive(Debug)]
pub struct GroupBatchnorm2d {
    /// `(C, 1, 1)`, initialised with `randn` as in the reference.
    pub gamma: Tensor,
    /// `(C, 1, 1)`, initialised with zeros.
    pub beta: Tensor,
    pub(crate) group_num: i64,
    pub(crate) eps: f64,
    pub(crate) torch_gn: bool,
}

/// Variables `gamma` and `beta` under `p`; the caller has checked `c_num % group_num == 0`.
pub fn group_batchnorm2d<'a>(
    p: impl Borrow<nn::Path<'a>>,
    c_num: i64,
    group_num: i64,
    eps: f64,
) -> GroupBatchnorm2d {
    GroupBatchnorm2d { eps, ..group_batchnorm2d_named(p.borrow(), c_num, group_num, ("gamma", "beta")) }
}

/// PyTorch's `nn.GroupNorm(num_groups, num_channels)` under `p`, as a variant's SRU uses it: `weight`
/// (ones) and `bias` (zeros) of shape `[C]`, eps 1e-5.
pub(crate) fn torch_group_norm(p: &nn::Path, c_num: i64, group_num: i64) -> GroupBatchnorm2d {
    GroupBatchnorm2d {
        gamma: p.ones("weight", &[c_num]),
        beta: p.zeros("bias", &[c_num]),
        group_num,
        eps: crate::config::TORCH_GN_EPS,
        torch_gn: true,
    }
}

/// The reference's `GroupBatchnorm2d` with its parameters under other names (`weight`, `bias` from
/// 2023-09-12 on).
pub(crate) fn group_batchnorm2d_named(
    p: &nn::Path,
    c_num: i64,
    group_num: i64,
    (scale, shift): (&str, &str),
) -> GroupBatchnorm2d {
    GroupBatchnorm2d {
        gamma: p.randn_standard(scale, &[c_num, 1, 1]),
        beta: p.zeros(shift, &[c_num, 1, 1]),
        group_num,
        eps: crate::config::GN_EPS,
        torch_gn: false,
    }
}

impl nn::Module for GroupBatchnorm2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        if self.torch_gn {
            // F.group_norm(x, G, weight, bias, eps) -> torch.group_norm(.., cudnn.enabled)
            return x.group_norm(self.group_num, Some(&self.gamma), Some(&self.beta), self.eps, true);
        }
        // The reference's `x.view(N, G, -1)`, written through the group dimension (C unflattened into
        // G groups, the rest flattened) so that a traced module keeps N, H and W free. Same shape, same
        // memory, same arithmetic.
        let grouped = x.unflatten(1, [self.group_num, -1]).flatten(2, -1);
        let mean = grouped.mean_dim(2, true, None);
        let std = grouped.std_dim(2, true, true);
        let grouped = (grouped - mean) / (std + self.eps);
        let x = grouped.view_as(x);
        x * &self.gamma + &self.beta
    }
}
