//! The CRU fuse's global pooling without reading the branches it pools. The means over height and
//! width of `Y1 = GWC(up) + PWC1(up)` and of `PWC2(low)` follow from sums over the squeezed `up` and
//! `low`, because a convolution is linear: a k x k convolution at stride 1 with padding k/2 reads,
//! for its tap at offset (dy, dx), the input shifted by (dy, dx) with zeros outside, and summed over
//! every output position that is the input's sum less the rows and columns the shift leaves out. So
//! `Y1`'s mean per channel is its biases plus its weights times k x k such window sums of `up`, over
//! H x W, and `PWC2(low)`'s is its weight times `low`'s sums. This reads `up` and `low` (C/2 channels
//! a position at the defaults) where pooling the branches reads `Y1`, `PWC2(low)` and `low` (2C).
//!
//! The means are those of the convolutions' exact outputs, summed and combined in f64 and rounded
//! once; libtorch (and `channel_means`) pool the convolutions' fp32-rounded outputs, each off by up to
//! an ulp of its own size, so the two agree to a few fp32 ulps of the largest mean (more, relative
//! to it, where a mean is small beside its values). A change of rounding, not of meaning:
//! the step's and the networks' tests hold it to the form's bounds. Runs on fp32 or bf16 dense
//! channels-last `up` and `low` (the channels-last step's); the caller pools the branches otherwise.
//!
//! The layers are the form's convolutions as they compute (`InferenceConv::computed_with`): in the
//! bf16 forms their weights are bf16, and GWC's bias (its call adds PWC1's output:
//! `InferenceConv::cast`), and the means are those of the bf16 convolutions' outputs before their
//! roundings to bf16 (`PWC1`'s output, which `GWC`'s epilogue adds, and the sum): each rounding moves
//! an output by up to 2^-9 of itself, and pooling averages those moves out, so the two differ far
//! below a bf16 rounding of the mean (tested; the forms' differences are in docs/speed.md).
use super::channel_means::sum_rows;
use super::channels_last_sru::is_channels_last;
use super::conv::InferenceConv;
use super::elements::{stored, Stored, Value};
use super::f64_conv::F64Conv;
use crate::fast::welford::SharedOut;
use crate::inference::parallel_for;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// The CRU's `GWC`, `PWC1` and `PWC2` as the fuse's pooling needs them.
#[derive(Debug)]
pub(crate) struct BranchMeans {
    gwc: F64Conv,
    pwc1: F64Conv,
    pwc2: F64Conv,
}

impl BranchMeans {
    /// From the form's CRU convolutions as they compute (GWC's call with PWC1's output added, PWC1's
    /// and PWC2's without an add); `None` where a layer is not a same-size convolution of the
    /// squeezed halves (then the branches are pooled).
    pub(crate) fn new(gwc: &InferenceConv, pwc1: &InferenceConv, pwc2: &InferenceConv) -> Option<Self> {
        let layer = |conv: &InferenceConv, with_add| {
            let (weight, bias, groups) = conv.computed_with(with_add);
            F64Conv::of(weight, bias, groups)
        };
        let (gwc, pwc1, pwc2) = (layer(gwc, true)?, layer(pwc1, false)?, layer(pwc2, false)?);
        let fits = pwc1.kernel() == 1
            && pwc2.kernel() == 1
            && gwc.inputs() == pwc1.inputs()
            && gwc.outputs() == pwc1.outputs();
        fits.then_some(BranchMeans { gwc, pwc1, pwc2 })
    }

    /// Whether the means from the inputs take less work than pooling the branches at `positions`
    /// a sample: the layers' multiply-adds and a read of `up` and `low`, against a read of `Y1`,
    /// `PWC2(low)` and `low`. At ResNet-50's 256@14 and 512@7 the weights are the larger.
    fn pays(&self, positions: usize) -> bool {
        let (up, low) = (self.gwc.inputs(), self.pwc2.inputs());
        let work = self.gwc.cost() + self.pwc1.cost() + self.pwc2.cost() + positions * (up + low);
        work < positions * (self.gwc.outputs() + self.pwc2.outputs() + low)
    }

    /// `means` where it is less work than pooling the branches (`pays`), else `None`.
    pub(crate) fn means_where_cheaper(&self, up: &Tensor, low: &Tensor) -> Option<Tensor> {
        let [_, _, h, w] = <[i64; 4]>::try_from(up.size()).ok()?;
        self.pays((h * w) as usize).then(|| self.means(up, low))?
    }

    /// The means of `[Y1, PWC2(low), low]` side by side, `(N, C + C2 + C_low, 1, 1)` fp32, from the
    /// squeezed `up` and `low`; `None` where they are not fp32 or bf16 (both one kind) dense
    /// channels-last CPU tensors of the layers' channels and one batch and size.
    pub(crate) fn means(&self, up: &Tensor, low: &Tensor) -> Option<Tensor> {
        let fits = |t: &Tensor, channels: usize| {
            matches!(t.kind(), Kind::Float | Kind::BFloat16)
                && t.kind() == up.kind()
                && t.device() == Device::Cpu
                && is_channels_last(t)
                && t.size()[1] == channels as i64
        };
        let [n, _, h, w] = <[i64; 4]>::try_from(up.size()).ok()?;
        if !fits(up, self.gwc.inputs())
            || !fits(low, self.pwc2.inputs())
            || low.size() != [n, low.size()[1], h, w]
        {
            return None;
        }
        let [n, h, w] = [n, h, w].map(|d| d as usize);
        if n == 0 || h * w == 0 {
            return None; // an empty batch, or libtorch's mean of nothing (NaN): as libtorch says it
        }
        let (c, c2, c_low) = (self.gwc.outputs(), self.pwc2.outputs(), self.pwc2.inputs());
        let width = c + c2 + c_low;
        let mut means = vec![0f32; n * width];
        let out = SharedOut(means.as_mut_ptr());
        // SAFETY: `up` and `low` are dense channels-last CPU tensors of one kind (fp32 or bf16) alive
        // for this function, read as (N, H, W, C); each task writes only its sample's means.
        unsafe {
            let (up_one, low_one) = (h * w * self.gwc.inputs(), h * w * c_low);
            let (up, low) = (stored(up), stored(low));
            let one = |sample: usize| match (up, low) {
                (Some(Stored::F32(up)), Some(Stored::F32(low))) => self.sample_means(
                    &up[sample * up_one..][..up_one],
                    &low[sample * low_one..][..low_one],
                    [h, w],
                ),
                (Some(Stored::Bf16(up)), Some(Stored::Bf16(low))) => self.sample_means(
                    &up[sample * up_one..][..up_one],
                    &low[sample * low_one..][..low_one],
                    [h, w],
                ),
                _ => unreachable!("`up` and `low` are fp32 or bf16, of one kind (checked)"),
            };
            parallel_for(n, 1, |samples| {
                for sample in samples {
                    for (slot, mean) in out.slice(sample * width, width).iter_mut().zip(one(sample)) {
                        *slot = mean as f32;
                    }
                }
            });
        }
        Some(Tensor::from_slice(&means).view([n as i64, width as i64, 1, 1]))
    }

    /// One sample's means in f64: `Y1`'s, `PWC2(low)`'s, `low`'s.
    fn sample_means<X: Value>(&self, up: &[X], low: &[X], size: [usize; 2]) -> Vec<f64> {
        let positions = size[0] * size[1];
        let (c, c2, c_low) = (self.gwc.outputs(), self.pwc2.outputs(), self.pwc2.inputs());
        let mut means = vec![0f64; c + c2 + c_low];
        let kernel = self.gwc.kernel();
        let up_windows = window_sums(up, self.gwc.inputs(), size, kernel);
        self.gwc.add_means(&up_windows, positions, &mut means[..c]);
        // The centre tap reads every value: its sums are `up`'s, which the 1x1 PWC1 reads.
        let centre = kernel / 2 * kernel + kernel / 2;
        let up_sums: Vec<f64> = up_windows.chunks_exact(kernel * kernel).map(|taps| taps[centre]).collect();
        self.pwc1.add_means(&up_sums, positions, &mut means[..c]);
        let low_sums = window_sums(low, c_low, size, 1);
        self.pwc2.add_means(&low_sums, positions, &mut means[c..c + c2]);
        for (mean, sum) in means[c + c2..].iter_mut().zip(&low_sums) {
            *mean = sum / positions as f64;
        }
        means
    }
}

/// For each channel and each tap `(ky, kx)` of a `kernel` x `kernel` convolution at stride 1 with
/// padding `kernel / 2`, the sum of the input values that tap reads over all output positions:
/// `(channels, kernel, kernel)` row-major, a weight's order. `x`: one sample, `(H, W, channels)`.
fn window_sums<X: Value>(x: &[X], channels: usize, [h, w]: [usize; 2], kernel: usize) -> Vec<f64> {
    let pad = kernel / 2;
    let block = |rows: Range<usize>, cols: Range<usize>| {
        let mut sums = vec![0f64; channels];
        if cols == (0..w) && !rows.is_empty() {
            sum_rows(&x[rows.start * w * channels..rows.end * w * channels], &mut sums);
        // whole rows
        } else if !cols.is_empty() {
            for row in rows {
                sum_rows(&x[(row * w + cols.start) * channels..(row * w + cols.end) * channels], &mut sums);
            }
        }
        sums
    };
    // The rows (or columns) of `n` that the tap at `offset` - pad does not read.
    let left_out = |tap: usize, n: usize| match tap.cmp(&pad) {
        std::cmp::Ordering::Less => n - (pad - tap).min(n)..n,
        std::cmp::Ordering::Equal => 0..0,
        std::cmp::Ordering::Greater => 0..(tap - pad).min(n),
    };
    let total = block(0..h, 0..w);
    let taps = kernel * kernel;
    let mut windows = vec![0f64; channels * taps];
    for ky in 0..kernel {
        let rows_out = left_out(ky, h);
        let without_rows = block(rows_out.clone(), 0..w);
        for kx in 0..kernel {
            let cols_out = left_out(kx, w);
            let without_cols = block(0..h, cols_out.clone());
            let corner = block(rows_out.clone(), cols_out);
            for i in 0..channels {
                windows[i * taps + ky * kernel + kx] =
                    total[i] - without_rows[i] - without_cols[i] + corner[i];
            }
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::ffi::ConvGeometry;
    use crate::inference::precision::{round_to_bf16, Arithmetic, Precision};
    use tch::nn::{self, VarStore};
    use tch::{Device, Kind};

    fn channels_last(shape: [i64; 4], offset: f64) -> Tensor {
        super::super::channels_last_sru::to_channels_last(
            &(Tensor::randn(shape, (Kind::Float, Device::Cpu)) + offset),
        )
    }

    fn conv(vs: &VarStore, name: &str, inputs: i64, out: i64, k: i64, groups: i64, bias: bool) -> nn::Conv2D {
        let config = nn::ConvConfig { padding: k / 2, groups, bias, ..Default::default() };
        nn::conv2d(vs.root() / name, inputs, out, k, config)
    }

    /// `[GWC(up) + PWC1(up), PWC2(low), low]` computed in f64 by libtorch, pooled in f64.
    fn f64_means(layers: [&nn::Conv2D; 3], groups: i64, up: &Tensor, low: &Tensor) -> Tensor {
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let run = |c: &nn::Conv2D, x: &Tensor, groups| {
            let k = c.ws.size()[2];
            d(x).conv2d(&d(&c.ws), c.bs.as_ref().map(d), [1, 1], [k / 2, k / 2], [1, 1], groups)
        };
        let y1 = run(layers[0], up, groups) + run(layers[1], up, 1);
        let parts = [y1, run(layers[2], low, 1), d(low)];
        Tensor::cat(&parts.map(|t| t.mean_dim(&[2i64, 3][..], true, Kind::Double)), 1)
    }

    /// The means of these layers as a form's convolutions (cast to bf16, emulated, where `bf16`).
    fn means_of(
        gwc: &nn::Conv2D,
        groups: i64,
        pwc1: &nn::Conv2D,
        pwc2: &nn::Conv2D,
        bf16: bool,
    ) -> Option<BranchMeans> {
        let form = |layer: &nn::Conv2D, groups| {
            let k = layer.ws.size()[2];
            let mut conv = InferenceConv::new(layer, ConvGeometry::square(1, k / 2, groups));
            if bf16 {
                conv.cast(&Arithmetic::for_precision(Precision::Bf16Emulated)).unwrap();
            }
            conv
        };
        BranchMeans::new(&form(gwc, groups), &form(pwc1, 1), &form(pwc2, 1))
    }

    #[test]
    fn the_means_are_those_of_the_convolutions_outputs_in_f64() {
        tch::manual_seed(0);
        // The defaults' shapes (k 3, 2 groups), a 5x5 kernel in 4 groups, biases on every layer; a
        // batch of 3; images smaller than the kernel, wide ones, an offset that makes sums large.
        let cases = [
            (3, 2, false, [1, 14, 14], 0.0),
            (3, 2, false, [3, 5, 9], 10.0),
            (5, 4, true, [2, 7, 3], 0.0),
            (3, 2, true, [2, 1, 1], 0.0),
            (5, 4, false, [1, 2, 6], -3.0),
            (3, 2, false, [2, 56, 56], 1.0),
        ];
        for (k, groups, bias, [n, h, w], offset) in cases {
            let vs = VarStore::new(Device::Cpu);
            let gwc = conv(&vs, "gwc", 16, 64, k, groups, true);
            let (pwc1, pwc2) = (conv(&vs, "pwc1", 16, 64, 1, 1, bias), conv(&vs, "pwc2", 8, 56, 1, 1, bias));
            let means = means_of(&gwc, groups, &pwc1, &pwc2, false).expect("same-size convolutions");
            let (up, low) = (channels_last([n, 16, h, w], offset), channels_last([n, 8, h, w], -offset));
            let ours = means.means(&up, &low).expect("fp32 channels-last halves");
            assert_eq!(ours.size(), [n, 128, 1, 1]);
            let expected = f64_means([&gwc, &pwc1, &pwc2], groups, &up, &low);
            // Both are f64 sums of the same products in other orders: apart by f64's error (1e-12
            // absolute is orders of magnitude above it and below any fp32 ulp of these means), so
            // the fp32 roundings agree but, rarely, at a tie.
            let ulp = expected.abs() * f64::from(f32::EPSILON) + 1e-12;
            let off = (ours.to_kind(Kind::Double) - &expected).abs() - ulp;
            assert!(off.max().double_value(&[]) <= 0.0, "k {k} groups {groups} {n}x{h}x{w}: over one ulp");
        }
    }

    #[test]
    fn fp32_pooling_of_the_fp32_outputs_is_a_few_ulps_away() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let gwc = conv(&vs, "gwc", 16, 64, 3, 2, true);
        let (pwc1, pwc2) = (conv(&vs, "pwc1", 16, 64, 1, 1, false), conv(&vs, "pwc2", 16, 48, 1, 1, false));
        let (up, low) = (channels_last([8, 16, 56, 56], 0.0), channels_last([8, 16, 56, 56], 0.0));
        let ours = means_of(&gwc, 2, &pwc1, &pwc2, false).unwrap().means(&up, &low).unwrap();
        let y1 = up.conv2d(&gwc.ws, gwc.bs.as_ref(), [1, 1], [1, 1], [1, 1], 2)
            + up.conv2d(&pwc1.ws, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let head = low.conv2d(&pwc2.ws, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let libtorch = Tensor::cat(&[&y1, &head, &low].map(|t| t.adaptive_avg_pool2d([1, 1])), 1);
        let largest = libtorch.abs().max().double_value(&[]);
        let diff = (&ours - &libtorch).abs().max().double_value(&[]);
        assert!(diff <= 8.0 * f64::from(f32::EPSILON) * largest, "{diff} from libtorch's pooling");
    }

    /// The bf16 forms' means: of the bf16 layers (weights and GWC's bias rounded to bf16) on bf16 `up`
    /// and `low`, in f64 as above; and within a small part of a bf16 rounding of the pooling of the
    /// bf16 outputs themselves (what libtorch's bf16 convolutions and an fp32 pooling give).
    #[test]
    fn bf16_means_are_those_of_the_bf16_convolutions() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let gwc = conv(&vs, "gwc", 16, 64, 3, 2, true);
        let (pwc1, pwc2) = (conv(&vs, "pwc1", 16, 64, 1, 1, true), conv(&vs, "pwc2", 8, 56, 1, 1, false));
        let bf16 = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (up, low) =
            (bf16(&channels_last([2, 16, 28, 28], 0.5)), bf16(&channels_last([2, 8, 28, 28], 0.0)));
        let ours = means_of(&gwc, 2, &pwc1, &pwc2, true).unwrap().means(&up, &low).unwrap();
        let f32s = |t: &Tensor| t.to_kind(Kind::Float);
        let rounded = VarStore::new(Device::Cpu);
        let layers = [("gwc", &gwc, 2), ("pwc1", &pwc1, 1), ("pwc2", &pwc2, 1)].map(|(name, c, groups)| {
            let bias_rounded = name == "gwc";
            let [out, inputs, k, _] = <[i64; 4]>::try_from(c.ws.size()).unwrap();
            let mut copy = conv(&rounded, name, inputs * groups, out, k, groups, c.bs.is_some());
            tch::no_grad(|| {
                copy.ws.copy_(&round_to_bf16(&c.ws));
                if let (Some(to), Some(from)) = (&mut copy.bs, &c.bs) {
                    to.copy_(&if bias_rounded { round_to_bf16(from) } else { from.shallow_clone() });
                }
            });
            copy
        });
        let expected = f64_means([&layers[0], &layers[1], &layers[2]], 2, &f32s(&up), &f32s(&low));
        let ulp = expected.abs() * f64::from(f32::EPSILON) + 1e-12;
        let off = (ours.to_kind(Kind::Double) - &expected).abs() - ulp;
        assert!(off.max().double_value(&[]) <= 0.0, "over one fp32 ulp from the bf16 layers' f64 means");
        // The bf16 outputs pooled: each output rounded to bf16 moves its mean by far less than a bf16
        // rounding of the largest mean.
        // Each convolution of the bf16 values in fp32 (its bias fp32, GWC's rounded), rounded to bf16.
        let run = |c: &nn::Conv2D, x: &Tensor, groups, bias_rounded: bool| {
            let k = c.ws.size()[2];
            let bias = c.bs.as_ref().map(|b| if bias_rounded { round_to_bf16(b) } else { b.shallow_clone() });
            let w = f32s(&bf16(&c.ws));
            bf16(&f32s(x).conv2d(&w, bias.as_ref(), [1, 1], [k / 2, k / 2], [1, 1], groups))
        };
        let y1 = bf16(&(f32s(&run(&gwc, &up, 2, true)) + f32s(&run(&pwc1, &up, 1, false))));
        let parts = [y1, run(&pwc2, &low, 1, false), low.shallow_clone()];
        let pooled = Tensor::cat(&parts.map(|t| t.mean_dim(&[2i64, 3][..], true, Kind::Float)), 1);
        let largest = pooled.abs().max().double_value(&[]);
        let diff = (&ours - &pooled).abs().max().double_value(&[]);
        println!("bf16 means {diff:.3e} from the pooled bf16 outputs, largest mean {largest:.3e}");
        assert!(
            diff <= 0.25 * largest / 256.0,
            "{diff} from the pooled bf16 outputs (largest mean {largest})"
        );
    }

    /// The CRU's layers at ScConv's defaults for `c` channels.
    fn defaults(vs: &VarStore, c: i64) -> BranchMeans {
        let gwc = conv(vs, "gwc", c / 4, c, 3, 2, true);
        let (pwc1, pwc2) =
            (conv(vs, "pwc1", c / 4, c, 1, 1, false), conv(vs, "pwc2", c / 4, c - c / 4, 1, 1, false));
        means_of(&gwc, 2, &pwc1, &pwc2, false).unwrap()
    }

    #[test]
    fn the_means_come_from_the_inputs_where_that_is_less_work() {
        let vs = VarStore::new(Device::Cpu);
        // ResNet-50's four ScConv shapes: the weights outgrow the pixels at 256@14.
        for (c, size, cheaper) in [(64, 56, true), (128, 28, true), (256, 14, false), (512, 7, false)] {
            let means = defaults(&vs, c);
            assert_eq!(means.pays(size * size), cheaper, "{c}@{size}");
            let (up, low) = (
                channels_last([1, c / 4, size as i64, size as i64], 0.0),
                channels_last([1, c / 4, size as i64, size as i64], 0.0),
            );
            assert_eq!(means.means_where_cheaper(&up, &low).is_some(), cheaper, "{c}@{size}");
        }
    }

    #[test]
    fn other_kernels_kinds_and_layouts_are_left_to_the_pooling() {
        let vs = VarStore::new(Device::Cpu);
        let (pwc1, pwc2) = (conv(&vs, "pwc1", 16, 64, 1, 1, false), conv(&vs, "pwc2", 8, 56, 1, 1, false));
        let even = conv(&vs, "even", 16, 64, 2, 2, true);
        assert!(means_of(&even, 2, &pwc1, &pwc2, false).is_none(), "an even kernel changes the size");
        let means = means_of(&conv(&vs, "gwc", 16, 64, 3, 2, true), 2, &pwc1, &pwc2, false).unwrap();
        let (up, low) = (channels_last([1, 16, 4, 4], 0.0), channels_last([1, 8, 4, 4], 0.0));
        assert!(means.means(&up, &low).is_some());
        assert!(means.means(&up.contiguous(), &low).is_none(), "NCHW");
        assert!(means.means(&up.to_kind(Kind::BFloat16), &low).is_none(), "bf16 beside fp32");
        assert!(means.means(&up.to_kind(Kind::Double), &low.to_kind(Kind::Double)).is_none(), "f64");
        assert!(means.means(&up, &channels_last([1, 8, 2, 2], 0.0)).is_none(), "another size");
        assert!(means.means(&low, &low).is_none(), "other channels");
        let empty = (channels_last([0, 16, 4, 4], 0.0), channels_last([0, 8, 4, 4], 0.0));
        assert!(means.means(&empty.0, &empty.1).is_none(), "an empty batch");
    }
}
