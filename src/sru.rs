//! `SRU`, the Spatial Reconstruction Unit: a GroupNorm-gamma gate splits `x` into informative and
//! non-informative parts, which are cross-added half by half. What each published version changes
//! (`Variant`): the GroupNorm (names, `torch_gn`), the sum in `w_gamma`, what the masks multiply
//! (`x` or `gn_x`), and hard masks or the soft gate of 2023-10-19.
use crate::config::{ScConvConfig, Variant, GN_EPS};
use crate::group_batchnorm::{
    group_batchnorm2d, group_batchnorm2d_named, torch_group_norm, GroupBatchnorm2d,
};
use std::borrow::Borrow;
use tch::{nn, nn::Module, Tensor};

/// The reference's `SRU`: `GroupBatchnorm2d` statistics, the gate and the cross-reconstruction.
#[derive(Debug)]
pub struct Sru {
    /// Its normalisation (state-dict keys `SRU.gn.gamma`, `SRU.gn.beta`).
    pub gn: GroupBatchnorm2d,
    pub(crate) gate_treshold: f64,
    pub(crate) variant: Variant,
}

/// The gate's decisions (bool, `x`'s shape): `sigmoid(z) >= t` and `<` for the hard masks; for the
/// soft gate of 2023-10-19, `sigmoid(z) > t` (weight 1 in `x_1`, 0 in `x_2`) and its complement (the
/// sigmoid's value in both). Hard masks come from comparisons, so through them nothing upstream
/// (gamma, beta) gets a gradient.
#[derive(Debug)]
pub struct GateDecisions {
    /// `sigmoid(z) >= gate_treshold` (soft gate: `>`): the positions kept whole in `x_1`.
    pub info_mask: Tensor,
    /// The complement: the positions kept in `x_2` (soft gate: weighted by the sigmoid in both).
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
    let gn = p.borrow() / "gn";
    let (c, groups) = (config.op_channel, config.group_num);
    let gn = match config.variant {
        _ if config.torch_gn => torch_group_norm(&gn, c, groups),
        Variant::V20230727 => group_batchnorm2d(gn, c, groups, GN_EPS),
        later => group_batchnorm2d_named(&gn, c, groups, later.norm_names()),
    };
    Sru { gn, gate_treshold: config.gate_treshold, variant: config.variant }
}

impl Sru {
    /// `w_gamma = self.gn.gamma / sum(self.gn.gamma)` (2023-09-14: `torch.sum`), viewed as
    /// `(1, C, 1, 1)` where the parameter is `[C]` (`torch_gn`).
    pub fn w_gamma(&self) -> Tensor {
        let gamma = &self.gn.gamma;
        let sum = match self.variant {
            Variant::V20230914 => gamma.sum(gamma.kind()),
            _ => builtin_sum(gamma),
        };
        let w_gamma = gamma / sum;
        if w_gamma.dim() == 1 {
            w_gamma.view([1, -1, 1, 1])
        } else {
            w_gamma
        }
    }

    /// The gate on `x`: `z = gn_x * w_gamma` and its decisions.
    pub fn gate(&self, x: &Tensor) -> Gate {
        self.gate_of_gn_x(&self.gn.forward(x)).0
    }

    /// The gate, and the sigmoid's output `reweigts` (which the soft gate weighs with).
    fn gate_of_gn_x(&self, gn_x: &Tensor) -> (Gate, Tensor) {
        let z = gn_x * self.w_gamma();
        // The sigmoid is computed, never replaced by `z >= 0` (see `decide`).
        let reweigts = z.sigmoid();
        let (info_mask, noninfo_mask) = decide(&reweigts, self.gate_treshold, self.soft_gate());
        (Gate { z, decisions: GateDecisions { info_mask, noninfo_mask } }, reweigts)
    }

    /// Everything after the gate's decisions: mask (or weigh), then cross-reconstruct.
    pub fn forward_with_decisions(&self, x: &Tensor, decisions: &GateDecisions) -> Tensor {
        if self.variant == Variant::V20230727 {
            return self.apply(x, None, decisions);
        }
        let gn_x = self.gn.forward(x);
        let reweigts = (&gn_x * self.w_gamma()).sigmoid();
        self.apply(x, Some((&gn_x, &reweigts)), decisions)
    }

    /// `x_1`, `x_2` from the decisions, then `reconstruct`. From 2023-09-12 on the masks need `gn_x`
    /// and the soft gate `reweigts`: `normalised` holds both (the caller computed them once).
    fn apply(&self, x: &Tensor, normalised: Option<(&Tensor, &Tensor)>, decisions: &GateDecisions) -> Tensor {
        let (info, noninfo) = (&decisions.info_mask, &decisions.noninfo_mask);
        let normalised =
            || normalised.expect("gn_x and reweigts are passed for every variant after the seed");
        let (x_1, x_2) = match self.variant {
            Variant::V20230727 => (info * x, noninfo * x),
            Variant::V20230912 | Variant::V20230914 => {
                let (gn_x, _) = normalised();
                (info * gn_x, noninfo * gn_x)
            }
            Variant::V20231019 => {
                // w1 = where(r > t, 1, r), w2 = where(r > t, 0, r), with the decisions given.
                let (_, reweigts) = normalised();
                let w1 = reweigts.ones_like().where_self(info, reweigts);
                let w2 = reweigts.zeros_like().where_self(info, reweigts);
                (w1 * x, w2 * x)
            }
        };
        reconstruct(&x_1, &x_2)
    }

    /// The 2023-10-19 gate: `r > t` decides between the weight 1 (0) and `r` itself.
    fn soft_gate(&self) -> bool {
        self.variant == Variant::V20231019
    }
}

impl nn::Module for Sru {
    fn forward(&self, x: &Tensor) -> Tensor {
        let gn_x = self.gn.forward(x);
        let (gate, reweigts) = self.gate_of_gn_x(&gn_x);
        self.apply(x, Some((&gn_x, &reweigts)), &gate.decisions)
    }
}

/// `reweigts = sigmoid(z)` `>=` / `<` the threshold (the soft gate: `>` / `<=`). The sigmoid is
/// computed, never replaced by `z >= 0`: in fp32 it rounds to exactly 0.5 for |z| below about 1.2e-7,
/// so small negative z count as informative in the reference.
fn decide(reweigts: &Tensor, gate_treshold: f64, soft: bool) -> (Tensor, Tensor) {
    if soft {
        (reweigts.gt(gate_treshold), reweigts.le(gate_treshold))
    } else {
        (reweigts.ge(gate_treshold), reweigts.lt(gate_treshold))
    }
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
        let (info, noninfo) = decide(&z.sigmoid(), 0.5, false);
        assert_eq!(Vec::<bool>::try_from(&info).unwrap(), vec![true, false, true, true]);
        assert_eq!(Vec::<bool>::try_from(&noninfo).unwrap(), vec![false, true, false, false]);
    }
}
