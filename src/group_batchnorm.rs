//! `GroupBatchnorm2d` of the reference: per-group statistics with the **unbiased** std, `eps` added to
//! the std (not under a square root), then a per-channel affine `x * gamma + beta`.
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
}

/// Variables `gamma` and `beta` under `p`; the caller has checked `c_num % group_num == 0`.
pub fn group_batchnorm2d<'a>(
    p: impl Borrow<nn::Path<'a>>,
    c_num: i64,
    group_num: i64,
    eps: f64,
) -> GroupBatchnorm2d {
    let p = p.borrow();
    GroupBatchnorm2d {
        gamma: p.randn_standard("gamma", &[c_num, 1, 1]),
        beta: p.zeros("beta", &[c_num, 1, 1]),
        group_num,
        eps,
    }
}

impl nn::Module for GroupBatchnorm2d {
    fn forward(&self, x: &Tensor) -> Tensor {
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
