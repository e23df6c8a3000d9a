//! The CRU's convolutions merged for the CPU (measured with `bench --profile` at Fashion-MNIST batch
//! 256, where the CRU took longer than all of the plain network's 3x3 convs):
//! - `squeeze1` and `squeeze2` as one two-group 1x1 conv over the whole input, when the two parts
//!   have equal sizes (alpha = 0.5): oneDNN otherwise reorders each channel slice of `x` first;
//! - `GWC + PWC1` as one dense `k x k` conv: GWC's groups placed block-diagonally, PWC1's 1x1 weights
//!   added at the centre tap, GWC's bias kept. One pass instead of a grouped conv, a 1x1 conv and an add.
//!
//! The same function with another summation order (the parity tolerance covers it); one difference
//! off the finite numbers: a non-finite value in one GWC group meets the other groups' zero weights,
//! so where the reference gives +-infinity this may give NaN. CPU, fp32, `Execution::Fast` only: on CUDA
//! the fast path stays bit for bit the reference.
use crate::cru::Cru;
use tch::{nn, Kind, Tensor};

/// Merged weights of one CRU, and copies of the originals to notice a later change.
#[derive(Debug)]
pub struct MergedCruWeights {
    squeeze: Option<Tensor>,
    dense: Tensor,
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
                dense,
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

    /// `GWC(up) + PWC1(up)` as one conv.
    pub fn gwc_plus_pwc1(&self, up: &Tensor) -> Tensor {
        let p = self.padding;
        up.conv2d(&self.dense, self.bias.as_ref(), [1, 1], [p, p], [1, 1], 1)
    }
}
