//! The CRU's convolutions merged for the CPU (measured with `bench --profile` at Fashion-MNIST batch
//! 256, where the CRU took longer than all of the plain network's 3x3 convs):
//! - `squeeze1` and `squeeze2` as one two-group 1x1 conv over the whole input, when the two parts
//!   have equal sizes (alpha = 0.5): oneDNN otherwise reorders each channel slice of `x` first;
//! - `GWC + PWC1` as one dense `k x k` conv: GWC's groups placed block-diagonally, PWC1's 1x1 weights
//!   added at the centre tap, GWC's bias kept. One pass instead of a grouped conv, a 1x1 conv and an add,
//!   at the channel counts where that measured faster (`DENSE_UP_TO`).
//!
//! The same function with another summation order (the parity tolerance covers it); one difference
//! off the finite numbers: a non-finite value in one GWC group meets the other groups' zero weights,
//! so where the reference gives +-infinity this may give NaN. CPU, fp32, `Execution::Fast` only: on CUDA
//! the fast path stays bit for bit the reference.
use crate::cru::Cru;
use tch::{nn, Kind, Tensor};

/// The most output channels at which GWC + PWC1 run as one dense conv. Measured on the 2-core AVX-512
/// VM (oneDNN, PyTorch's same kernels, median of 30): the dense conv is faster at C = 32 and 64 at every
/// batch (32@28 batch 256: 50.3 to 25.7 ms; 64@56 batch 8: 4.36 to 3.20 ms) and slower from C = 128 at
/// batch 8 (128@28: 3.10 to 3.49 ms; 512@7: 2.10 to 2.63 ms), where it does 1.6x the multiply-adds.
const DENSE_UP_TO: i64 = 64;

/// Merged weights of one CRU, and copies of the originals to notice a later change.
#[derive(Debug)]
pub struct MergedCruWeights {
    squeeze: Option<Tensor>,
    dense: Option<Tensor>,
    bias: Option<Tensor>,
    padding: i64,
    originals: Vec<(Tensor, Tensor)>,
}

fn weights(conv: &nn::Conv2D) -> Vec<&Tensor> {
    std::iter::once(&conv.ws).chain(conv.bs.as_ref()).collect()
}

impl MergedCruWeights {
    /// The merged weights of `cru` (its parameters as they are now).
    pub fn of(cru: &Cru) -> MergedCruWeights {
        tch::no_grad(|| {
            let (w1, w2) = (&cru.squeeze1.ws, &cru.squeeze2.ws);
            let squeeze = (cru.up_channel == cru.low_channel && w1.size() == w2.size())
                .then(|| Tensor::cat(&[w1, w2], 0));
            let gwc = &cru.GWC.ws;
            let [out, per_group, k, _] = <[i64; 4]>::try_from(gwc.size()).expect("conv weights are 4-d");
            let inputs = cru.PWC1.ws.size()[1];
            let groups = inputs / per_group;
            let dense = Tensor::zeros([out, inputs, k, k], (Kind::Float, gwc.device()));
            for g in 0..groups {
                let rows = out / groups;
                let mut block = dense.narrow(0, g * rows, rows).narrow(1, g * per_group, per_group);
                block.copy_(&gwc.narrow(0, g * rows, rows));
            }
            let mut centre = dense.narrow(2, k / 2, 1).narrow(3, k / 2, 1);
            let _ = centre.g_add_(&cru.PWC1.ws);
            let all = [&cru.squeeze1, &cru.squeeze2, &cru.GWC, &cru.PWC1];
            let originals =
                all.iter().flat_map(|c| weights(c)).map(|w| (w.shallow_clone(), w.detach().copy())).collect();
            MergedCruWeights {
                squeeze,
                dense: (out <= DENSE_UP_TO).then_some(dense),
                bias: cru.GWC.bs.as_ref().map(|b| b.detach().copy()),
                padding: k / 2,
                originals,
            }
        })
    }

    /// Whether the parameters are still those the weights were merged from.
    pub fn still_match(&self) -> bool {
        self.originals.iter().all(|(live, copy)| live.equal(copy))
    }

    /// `(squeeze1(up), squeeze2(low))` of `x`, in one conv when the parts have equal sizes.
    pub fn squeeze(&self, x: &Tensor) -> Option<(Tensor, Tensor)> {
        let w = self.squeeze.as_ref()?;
        let out = x.conv2d(w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 2);
        let half = w.size()[0] / 2;
        Some((out.narrow(1, 0, half).contiguous(), out.narrow(1, half, half).contiguous()))
    }

    /// Whether GWC and PWC1 run as one conv (at most `DENSE_UP_TO` channels).
    pub fn merges_gwc(&self) -> bool {
        self.dense.is_some()
    }

    /// `GWC(up) + PWC1(up)` as one conv, where that was measured faster (see `DENSE_UP_TO`).
    pub fn gwc_plus_pwc1(&self, up: &Tensor) -> Option<Tensor> {
        let p = self.padding;
        let dense = self.dense.as_ref()?;
        Some(up.conv2d(dense, self.bias.as_ref(), [1, 1], [p, p], [1, 1], 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cru::cru, ScConvConfig};
    use tch::{nn::Module, nn::VarStore, Device, Kind};

    /// The merged convs compute the separate ones (fp32 rounding apart), with GWC's groups in place.
    #[test]
    fn merged_convolutions_compute_the_separate_ones() {
        for (config, dense) in [
            (ScConvConfig::new(32), true),
            (ScConvConfig { group_size: 4, ..ScConvConfig::new(64) }, true),
            (ScConvConfig::new(128), false),
        ] {
            let vs = VarStore::new(Device::Cpu);
            let mut cru = cru(vs.root(), &config);
            let merged = MergedCruWeights::of(&cru);
            assert_eq!(merged.merges_gwc(), dense, "{config:?}");
            let x = Tensor::randn([3, config.op_channel, 9, 7], (Kind::Float, Device::Cpu));
            let (up, low) = merged.squeeze(&x).expect("alpha 0.5 squeezes in one conv");
            let split = x.split_with_sizes([cru.up_channel, cru.low_channel], 1);
            let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-5, 1e-5, false);
            assert!(
                close(&up, &cru.squeeze1.forward(&split[0])) && close(&low, &cru.squeeze2.forward(&split[1]))
            );
            if let Some(y) = merged.gwc_plus_pwc1(&up) {
                assert!(close(&y, &(cru.GWC.forward(&up) + cru.PWC1.forward(&up))), "{config:?}");
            }
            tch::no_grad(|| cru.PWC1.ws.copy_(&Tensor::randn_like(&cru.PWC1.ws)));
            assert!(!merged.still_match(), "a changed weight is noticed");
        }
    }
}
