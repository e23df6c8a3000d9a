//! The 2x2 average pool after a stride-2 ScConv moved before the CRU's convolutions
//! ([`Pass::PoolFirst`](super::Pass::PoolFirst), fp32 and bf16 forms). The CRU after its squeezes is linear
//! per position but for the fuse's softmax weights, which are per channel:
//! `pool(w1 * Y1 + w2 * Y2) = w1 * pool(Y1) + w2 * pool(Y2)`. So with `up` and `low` the squeezed
//! halves,
//! - `pool(PWC1(up)) = PWC1(pool(up))` and `pool(PWC2(low)) = PWC2(pool(low))` (1x1 convolutions);
//! - `pool(GWC(up))` is one convolution of `up` with stride 2: GWC's `k x k` kernel convolved with the
//!   2x2 box (each tap a quarter), `(k + 1) x (k + 1)`, the same padding; at `k = 3` 16 taps at a
//!   quarter of the positions, 0.44x GWC's multiply-adds;
//! - the softmax's channel means: the pooled branches' means are the full-size ones where the height
//!   and width are even (every 2x2 window whole, none dropped), so the step takes this path only there.
//!
//! The same numbers as pooling afterwards, rounded differently (the pooled kernel's weights, sums of
//! fewer terms): the gate decisions of this step do not move (they are made before the CRU); later
//! steps' may, and are counted.
use super::conv::InferenceConv;
use super::ffi::ConvGeometry;
use super::precision::Arithmetic;
use tch::{nn, Kind, Tensor};

/// GWC followed by the 2x2 average pool, as one stride-2 convolution of `gwc`'s input (`groups`
/// groups, a square odd kernel padded to keep the size), its weights made in f64 and rounded once to
/// how `arithmetic` stores them (fp32, or bf16).
pub(crate) fn pooled_gwc(gwc: &nn::Conv2D, groups: i64, arithmetic: &Arithmetic) -> InferenceConv {
    let size = gwc.ws.size();
    let (outputs, per_group, k) = (size[0], size[1], size[2]);
    let box_filter = Tensor::full([1, 1, 2, 2], 0.25, (Kind::Double, gwc.ws.device()));
    // Each (output, input) kernel convolved with the box: a transposed convolution of stride 1.
    let taps = gwc.ws.detach().to_kind(Kind::Double).reshape([outputs * per_group, 1, k, k]);
    let pooled = taps.conv_transpose2d(&box_filter, None::<Tensor>, 1, 0, 0, 1, 1);
    let weight = arithmetic.store(&pooled.reshape([outputs, per_group, k + 1, k + 1]));
    // Natively bf16 already; else fp32 (emulated: bf16 values, exact in fp32).
    let weight = if weight.kind() == Kind::BFloat16 { weight } else { weight.to_kind(gwc.ws.kind()) };
    let bias = gwc.bs.as_ref().map(Tensor::detach);
    InferenceConv::from_weights(weight, bias, ConvGeometry::square(2, k / 2, groups))
}

/// `t` (N, C, H, W) pooled 2x2 with stride 2, its layout kept.
pub(crate) fn pool(t: &Tensor) -> Tensor {
    t.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)
}

/// Whether a step's input `x` takes the pooled path: an even height and width.
pub(crate) fn fits(x: &Tensor) -> bool {
    let size = x.size();
    size.len() == 4 && fits_size(size[2], size[3])
}

/// Whether inputs of height `h` and width `w` take the pooled path (see [`fits`]).
pub(crate) fn fits_size(h: i64, w: i64) -> bool {
    h % 2 == 0 && w % 2 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, VarStore};
    use tch::Device;

    /// The pooled kernel's convolution is GWC then the pool, to fp32 rounding, at 3x3 and 5x5 kernels,
    /// even sizes and an odd one (where the pool drops the last row and column, as the kernel does).
    #[test]
    fn the_pooled_kernel_is_gwc_then_the_pool() {
        let vs = VarStore::new(Device::Cpu);
        for (k, groups, [h, w]) in [(3, 2, [8, 12]), (5, 2, [6, 10]), (3, 1, [7, 9])] {
            let config = nn::ConvConfig { padding: k / 2, groups, ..Default::default() };
            let gwc = nn::conv2d(vs.root(), 16, 32, k, config);
            let x = Tensor::randn([2, 16, h, w], (Kind::Float, Device::Cpu));
            let expected = tch::no_grad(|| pool(&gwc.forward(&x)));
            let ours = tch::no_grad(|| pooled_gwc(&gwc, groups, &Arithmetic::Fp32).forward(&x));
            assert_eq!(ours.size(), expected.size(), "k {k}, {h}x{w}");
            let scale = expected.abs().max().double_value(&[]);
            let diff = (&ours - &expected).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * scale, "k {k}, {h}x{w}: off by {diff} of {scale}");
        }
    }
}
