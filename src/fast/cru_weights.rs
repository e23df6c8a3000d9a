//! The CRU's convolutions merged for the CPU (measured with `bench --profile` at Fashion-MNIST batch
//! 256, where the CRU took longer than all of the plain network's 3x3 convs): `GWC + PWC1` as one dense
//! `k x k` conv: GWC's groups placed block-diagonally, PWC1's 1x1 weights added at the centre tap,
//! GWC's bias kept. One pass instead of a grouped conv, a 1x1 conv and an add, at the channel counts
//! where that measured faster (`DENSE_UP_TO`).
//!
//! `squeeze1` and `squeeze2` were merged too, as one two-group 1x1 conv (alpha = 0.5), until inputs
//! with a large common offset showed its other summation order: up to 4.7e-5 of the largest output
//! from the reference at C = 64, offset 1000, beside the dense merge (outside the fp32 tolerance; 2.4e-6 without the squeeze merge). The fast CRU now gives each
//! squeeze a contiguous copy of its channel slice instead, which is the reference's convolution bit for
//! bit (oneDNN reorders a slice slowly: 21.8 ms with the slice, 9.6 ms with the copy, 6.9 ms merged,
//! at Fashion-MNIST's 32@28, batch 256, on the 2-core VM).
//!
//! The dense merge is the same function with another summation order (within 2.4e-6 of the largest
//! output on such offset inputs, where the tolerance allows 1e-6 of it plus 1e-5 of each value); one difference
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
            let all = [&cru.GWC, &cru.PWC1];
            let originals =
                all.iter().flat_map(|c| weights(c)).map(|w| (w.shallow_clone(), w.detach().copy())).collect();
            MergedCruWeights {
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
            let up = Tensor::randn([3, config.squeezed_up(), 9, 7], (Kind::Float, Device::Cpu));
            let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-5, 1e-5, false);
            if let Some(y) = merged.gwc_plus_pwc1(&up) {
                assert!(close(&y, &(cru.GWC.forward(&up) + cru.PWC1.forward(&up))), "{config:?}");
            }
            tch::no_grad(|| cru.PWC1.ws.copy_(&Tensor::randn_like(&cru.PWC1.ws)));
            assert!(!merged.still_match(), "a changed weight is noticed");
        }
    }
}
