//! `SRU`, the Spatial Reconstruction Unit: a GroupNorm-gamma gate splits `x` into informative and
//! non-informative parts, which are cross-added half by half.
use crate::config::{ScConvConfig, GN_EPS};
use crate::group_batchnorm::{group_batchnorm2d, GroupBatchnorm2d};
use std::borrow::Borrow;
use tch::{nn, nn::Module, Tensor};

/// The reference's `SRU`: `GroupBatchnorm2d` statistics, the gate and the cross-reconstruction.
#[derive(Debug)]
pub struct Sru {
    /// Its normalisation (state-dict keys `SRU.gn.gamma`, `SRU.gn.beta`).
    pub gn: GroupBatchnorm2d,
    pub(crate) gate_treshold: f64,
}

/// The gate's two hard masks (bool, `x`'s shape). They come from comparisons, so nothing upstream of
/// them (gamma, beta) gets a gradient.
#[derive(Debug)]
pub struct GateDecisions {
    /// `sigmoid(z) >= gate_treshold`: the positions kept in `x_1`.
    pub info_mask: Tensor,
    /// `sigmoid(z) < gate_treshold`: the positions kept in `x_2`.
    pub noninfo_mask: Tensor,
}

impl GateDecisions {
    /// Decisions made elsewhere (e.g. the reference's, for parity checks); `noninfo_mask` is the
    /// complement, which is what `<` gives for any non-NaN gate value.
    pub fn from_info_mask(info_mask: &Tensor) -> GateDecisions {
        let info_mask = info_mask.to_kind(tch::Kind::Bool);
        GateDecisions { noninfo_mask: info_mask.logical_not(), info_mask }
    }

    /// Both masks moved to `device`.
    pub fn to_device(&self, device: tch::Device) -> GateDecisions {
        GateDecisions {
            info_mask: self.info_mask.to_device(device),
            noninfo_mask: self.noninfo_mask.to_device(device),
        }
    }
}

/// The gate of one forward pass: the sigmoid's input `z = gn_x * w_gamma` and its decisions.
#[derive(Debug)]
pub struct Gate {
    /// `gn_x * w_gamma`, the sigmoid's input.
    pub z: Tensor,
    /// The masks decided from `z`.
    pub decisions: GateDecisions,
}

/// The SRU of `config` under `p` (its `gn` under `p / "gn"`); the caller has validated `config`.
pub fn sru<'a>(p: impl Borrow<nn::Path<'a>>, config: &ScConvConfig) -> Sru {
    Sru {
        gn: group_batchnorm2d(p.borrow() / "gn", config.op_channel, config.group_num, GN_EPS),
        gate_treshold: config.gate_treshold,
    }
}

impl Sru {
    /// `w_gamma = self.gn.gamma / sum(self.gn.gamma)`.
    pub fn w_gamma(&self) -> Tensor {
        &self.gn.gamma / builtin_sum(&self.gn.gamma)
    }

    /// The gate on `x`: `z = gn_x * w_gamma` and its decisions.
    pub fn gate(&self, x: &Tensor) -> Gate {
        let gn_x = self.gn.forward(x);
        let z = gn_x * self.w_gamma();
        let (info_mask, noninfo_mask) = decide(&z, self.gate_treshold);
        let decisions = GateDecisions { info_mask, noninfo_mask };
        Gate { z, decisions }
    }

    /// Everything after the gate's decisions: mask, then cross-reconstruct.
    pub fn forward_with_decisions(&self, x: &Tensor, decisions: &GateDecisions) -> Tensor {
        let x_1 = &decisions.info_mask * x;
        let x_2 = &decisions.noninfo_mask * x;
        reconstruct(&x_1, &x_2)
    }
}

impl nn::Module for Sru {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with_decisions(x, &self.gate(x).decisions)
    }
}

/// `reweigts = sigmoid(z)`, then `>=` / `<` the threshold. The sigmoid is computed, never replaced by
/// `z >= 0`: in fp32 it rounds to exactly 0.5 for |z| below about 1.2e-7, so small negative z count as
/// informative in the reference.
fn decide(z: &Tensor, gate_treshold: f64) -> (Tensor, Tensor) {
    let reweigts = z.sigmoid();
    (reweigts.ge(gate_treshold), reweigts.lt(gate_treshold))
}

/// Python's builtin `sum(gamma)` as the reference calls it: the C slices `gamma[i]` added one at a
/// time, left to right (`0 + gamma[0]` is exact). A tensor sum would round differently, and the gate
/// compares `gn_x * w_gamma` at the edge of fp32 precision.
fn builtin_sum(t: &Tensor) -> Tensor {
    (1..t.size()[0]).fold(t.get(0), |acc, i| acc + t.get(i))
}

/// `reconstruct`: split both parts into channel halves and cross-add them.
fn reconstruct(x_1: &Tensor, x_2: &Tensor) -> Tensor {
    let half = x_1.size()[1] / 2;
    let (x_1, x_2) = (x_1.split(half, 1), x_2.split(half, 1));
    let (x_11, x_12, x_21, x_22) = (&x_1[0], &x_1[1], &x_2[0], &x_2[1]);
    Tensor::cat(&[x_11 + x_22, x_12 + x_21], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn builtin_sum_adds_left_to_right() {
        // In fp32, (1e8 + 1) - 1e8 + ... depends on order; left to right: ((1e8 + 1) + -1e8) + 1 = 1.
        let t = Tensor::from_slice(&[1e8f32, 1.0, -1e8, 1.0]).view([4, 1, 1]);
        let expected = ((1e8f32 + 1.0) + -1e8) + 1.0;
        assert_eq!(builtin_sum(&t).double_value(&[0, 0]) as f32, expected);
    }

    #[test]
    fn reconstruct_cross_adds_halves() {
        let x_1 = Tensor::arange(4, (Kind::Float, Device::Cpu)).view([1, 4, 1, 1]);
        let x_2 = &x_1 * 10.0;
        let y = reconstruct(&x_1, &x_2);
        // [x11 + x22, x12 + x21] with x1 = [0, 1 | 2, 3], x2 = [0, 10 | 20, 30]
        assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), vec![20.0, 31.0, 2.0, 13.0]);
    }

    #[test]
    fn sigmoid_gate_keeps_tiny_negative_z_informative() {
        // sigmoid(-1e-8) rounds to exactly 0.5 in fp32, so the reference calls it informative;
        // the sign shortcut `z >= 0` would not.
        let z = Tensor::from_slice(&[-1e-8f32, -1e-3, 0.0, 1e-8]);
        let (info, noninfo) = decide(&z, 0.5);
        assert_eq!(Vec::<bool>::try_from(&info).unwrap(), vec![true, false, true, true]);
        assert_eq!(Vec::<bool>::try_from(&noninfo).unwrap(), vec![false, true, false, false]);
    }
}
