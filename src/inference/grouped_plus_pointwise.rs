//! The CRU's `Y1 = GWC(up) + PWC1(up)` as one kernel on channels-last fp32 `up` (AVX-512 CPUs): each
//! block of outputs summed once in registers over the grouped convolution's taps and the point-wise
//! convolution's inputs, and written once. The form's oneDNN runs it as two calls (PWC1, then GWC
//! adding PWC1's output in its epilogue, so `Y1` is written, read back and written again), and its
//! grouped kernel is slow where a group reads few channels (8 at 64@56: docs/speed.md).
//!
//! Each output is `bias + sum over taps and a group's inputs of x * W_gwc + sum over inputs of x *
//! W_pwc1`, accumulated in that order with fused multiply-adds (a tap in the padding adds `0 * w`):
//! oneDNN sums in its own order, so `Y1` differs from the two calls' by fp32 rounding (the form's
//! bound holds; gate decisions downstream can move, and are counted). Each output row is computed
//! alone, so a batch gives each image the same bits whatever its tiles.
use super::channels_last_sru::{empty_channels_last, fp32_values, is_channels_last_fp32};
use super::parallel_for;
use crate::error::ScConvError;
use crate::fast::welford::SharedOut;
use tch::{nn, Kind, Tensor};

/// The most input channels a group of GWC reads where this kernel runs. Measured on an AVX-512 Xeon
/// against the form's two prepacked oneDNN calls (docs/speed.md, "GWC + PWC1 as one kernel"): 0.56-0.93x
/// their time with 4 or 8 inputs a group (the ScConvs of 32 and 64 channels at the default ratios), at
/// batch 1 and 8-10; with 16 (128 channels) 0.82x at 28x28 batch 1 but 1.07-1.10x at batch 8 and 1.57x
/// at 7x7, and 2-4.6x with 32 and 64 (a group's weights outgrow the L1 cache).
pub(crate) const MOST_INPUTS_A_GROUP: i64 = 8;

/// Output channels a block: two AVX-512 registers of fp32.
const BLOCK: usize = 32;

/// Positions of an output row a block: with [`BLOCK`] outputs, 28 of AVX-512's 32 registers hold the
/// sums (rows of 56, 28 and 14 positions, ResNet's and Fashion-MNIST's, are whole blocks).
const POSITIONS: usize = 14;

/// The CRU's GWC and PWC1 as one kernel.
#[derive(Debug)]
pub(crate) struct GroupedPlusPointwise {
    groups: usize,
    /// The squeezed upper part's channels: PWC1's inputs, GWC's over all groups.
    inputs: usize,
    outputs: usize,
    kernel: usize,
    /// Per group: `kernel^2 * inputs / groups` rows (tap by tap, input by input) of GWC's weights,
    /// then `inputs` rows of PWC1's, each row the group's `outputs / groups` output channels.
    packed: Vec<f32>,
    bias: Vec<f32>,
    /// A group's inputs at a position in the padding.
    zeros: Vec<f32>,
}

/// Where a block of outputs lies: its sample, row, the activation's size, its group and first output.
struct Block {
    sample: usize,
    y: usize,
    h: usize,
    w: usize,
    group: usize,
    first: usize,
}

impl GroupedPlusPointwise {
    /// For the CRU's `gwc` (`groups` groups, a square odd kernel padded to keep the size, stride 1, with
    /// or without bias) and `pwc1` (1x1, no bias), both reading `inputs` channels, on a CPU with
    /// AVX-512F; `None` where they are otherwise, a group reads more than [`MOST_INPUTS_A_GROUP`]
    /// channels or writes a number of channels that is not a multiple of 16, or the CPU has no AVX-512.
    pub(crate) fn new(
        gwc: &nn::Conv2D,
        pwc1: &nn::Conv2D,
        inputs: i64,
        groups: i64,
    ) -> Result<Option<GroupedPlusPointwise>, ScConvError> {
        if !covers(&gwc.ws.size(), &pwc1.ws.size(), pwc1.bs.is_some(), inputs, groups) || !has_avx512() {
            return Ok(None);
        }
        let [outputs, per_group_in, kernel, _] = <[i64; 4]>::try_from(gwc.ws.size()).expect("checked");
        let (taps, out_g) = (kernel * kernel, outputs / groups);
        // (group, tap, input of the group, output of the group), then (group, input, output of the group)
        let grouped = gwc.ws.view([groups, out_g, per_group_in, taps]).permute([0, 3, 2, 1]);
        let grouped = grouped.reshape([groups, taps * per_group_in, out_g]);
        let point = pwc1.ws.view([groups, out_g, inputs]).permute([0, 2, 1]);
        let packed = fp32_values(&Tensor::cat(&[grouped, point], 1), "the GWC and PWC1 weights")?;
        let bias = match &gwc.bs {
            Some(b) => fp32_values(b, "the GWC bias")?,
            None => vec![0.0; outputs as usize],
        };
        Ok(Some(GroupedPlusPointwise {
            groups: groups as usize,
            inputs: inputs as usize,
            outputs: outputs as usize,
            kernel: kernel as usize,
            packed,
            bias,
            zeros: vec![0.0; per_group_in as usize],
        }))
    }

    /// `Y1` of `up` (N, inputs, H, W), an fp32 CPU tensor with dense channels-last strides, as a new
    /// channels-last fp32 tensor (N, outputs, H, W); `None` for any other `up`.
    pub(crate) fn forward(&self, up: &Tensor) -> Option<Tensor> {
        if !is_channels_last_fp32(up) || up.size()[1] != self.inputs as i64 || up.numel() == 0 {
            return None;
        }
        let [n, _, h, w] = <[i64; 4]>::try_from(up.size()).ok()?.map(|d| d as usize);
        let out = empty_channels_last([n, self.outputs, h, w], Kind::Float);
        // SAFETY: `up` is a dense fp32 CPU tensor (checked above) alive for the call; `out` is new, of
        // `n * h * w * outputs` fp32 values, and nothing else holds it yet.
        let (up_values, out_values) = unsafe {
            let up_values = std::slice::from_raw_parts(up.data_ptr() as *const f32, up.numel());
            let out_values = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel());
            (up_values, out_values)
        };
        self.apply(up_values, out_values, [n, h, w]);
        Some(out)
    }

    /// `Y1` of channels-last `up` (`[n, h, w]` positions of `inputs` values each) into channels-last
    /// `out` (`outputs` values a position), output rows on libtorch's threads.
    fn apply(&self, up: &[f32], out: &mut [f32], [n, h, w]: [usize; 3]) {
        assert_eq!(up.len(), n * h * w * self.inputs, "up: {n}x{h}x{w} positions");
        assert_eq!(out.len(), n * h * w * self.outputs, "out: {n}x{h}x{w} positions");
        assert!(has_avx512(), "made only where the CPU has AVX-512F");
        let row_len = w * self.outputs;
        let out = SharedOut(out.as_mut_ptr());
        parallel_for(n * h, 1, |rows| {
            for row in rows {
                // SAFETY: row `row` alone writes its `row_len` values, inside `out`, alive for the call;
                // the CPU has AVX-512F (asserted above).
                let out_row = unsafe { out.slice(row * row_len, row_len) };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                unsafe {
                    self.row(up, out_row, row / h, row % h, [h, w])
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("no AVX-512 here: {}", out_row.len());
            }
        });
    }

    /// Output row `y` of `sample`: every group and block of outputs, the positions [`POSITIONS`] at a
    /// time, then the rest in blocks of 7, 4 and 1.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn row(&self, up: &[f32], out: &mut [f32], sample: usize, y: usize, [h, w]: [usize; 2]) {
        let out_g = self.outputs / self.groups;
        for group in 0..self.groups {
            for first in (0..out_g).step_by(BLOCK) {
                let at = Block { sample, y, h, w, group, first: group * out_g + first };
                match out_g - first >= BLOCK {
                    true => self.row_blocks::<{ BLOCK / 16 }>(up, out, &at),
                    false => self.row_blocks::<1>(up, out, &at),
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_blocks<const J: usize>(&self, up: &[f32], out: &mut [f32], at: &Block) {
        let mut x0 = 0;
        while at.w - x0 >= POSITIONS {
            self.block::<POSITIONS, J>(up, out, at, x0);
            x0 += POSITIONS;
        }
        if at.w - x0 >= 7 {
            self.block::<7, J>(up, out, at, x0);
            x0 += 7;
        }
        while at.w - x0 >= 4 {
            self.block::<4, J>(up, out, at, x0);
            x0 += 4;
        }
        while x0 < at.w {
            self.block::<1, J>(up, out, at, x0);
            x0 += 1;
        }
    }

    /// Outputs `[at.first, at.first + 16 J)` of positions `[x0, x0 + P)` of the row, summed in `P * J`
    /// registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const P: usize, const J: usize>(
        &self,
        up: &[f32],
        out: &mut [f32],
        at: &Block,
        x0: usize,
    ) {
        use std::arch::x86_64::*;
        let (inputs, per_group_in, kernel) = (self.inputs, self.inputs / self.groups, self.kernel);
        let out_g = self.outputs / self.groups;
        let rows = kernel * kernel * per_group_in + inputs;
        let weights = self.packed[at.group * rows * out_g..][..rows * out_g].as_ptr();
        let weights = weights.add(at.first - at.group * out_g);
        let bias = self.bias[at.first..][..16 * J].as_ptr();
        let mut acc = [[_mm512_setzero_ps(); J]; P];
        for sums in acc.iter_mut() {
            for (j, sum) in sums.iter_mut().enumerate() {
                *sum = _mm512_loadu_ps(bias.add(16 * j));
            }
        }
        let (pad, base) = (kernel / 2, up.as_ptr());
        let position = |yy: usize, xx: usize| ((at.sample * at.h + yy) * at.w + xx) * inputs;
        let mut sources = [self.zeros.as_ptr(); P];
        for tap in 0..kernel * kernel {
            let (iy, ix) = ((at.y + tap / kernel).wrapping_sub(pad), (x0 + tap % kernel).wrapping_sub(pad));
            for (p, source) in sources.iter_mut().enumerate() {
                let column = ix.wrapping_add(p);
                *source = match iy < at.h && column < at.w {
                    true => base.add(position(iy, column) + at.group * per_group_in),
                    false => self.zeros.as_ptr(),
                };
            }
            accumulate(&mut acc, &sources, per_group_in, weights.add(tap * per_group_in * out_g), out_g);
        }
        let centre: [*const f32; P] = std::array::from_fn(|p| base.add(position(at.y, x0 + p)));
        accumulate(&mut acc, &centre, inputs, weights.add((rows - inputs) * out_g), out_g);
        let o = out.as_mut_ptr();
        for (p, sums) in acc.iter().enumerate() {
            for (j, sum) in sums.iter().enumerate() {
                _mm512_storeu_ps(o.add((x0 + p) * self.outputs + at.first + 16 * j), *sum);
            }
        }
    }
}

/// `acc[p] += sum_k sources[p][k] * weights[k * row..][..16 J]` over `k < count`, in `k`'s order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate<const P: usize, const J: usize>(
    acc: &mut [[std::arch::x86_64::__m512; J]; P],
    sources: &[*const f32; P],
    count: usize,
    weights: *const f32,
    row: usize,
) {
    use std::arch::x86_64::*;
    for k in 0..count {
        let mut w = [_mm512_setzero_ps(); J];
        for (j, w) in w.iter_mut().enumerate() {
            *w = _mm512_loadu_ps(weights.add(k * row + 16 * j));
        }
        for (sums, source) in acc.iter_mut().zip(sources) {
            let x = _mm512_set1_ps(*source.add(k));
            for (sum, w) in sums.iter_mut().zip(&w) {
                *sum = _mm512_fmadd_ps(x, *w, *sum);
            }
        }
    }
}

/// Whether the kernel computes a GWC of weight size `gwc` (`groups` groups) and a PWC1 of weight size
/// `pwc1` (with a bias where `pwc1_bias`), both reading `inputs` channels: a square odd kernel, at most
/// [`MOST_INPUTS_A_GROUP`] inputs a group, a multiple of 16 outputs a group, PWC1 1x1 without bias.
/// (Stride 1 and padding `k / 2` are the CRU's own, `crate::cru`.)
fn covers(gwc: &[i64], pwc1: &[i64], pwc1_bias: bool, inputs: i64, groups: i64) -> bool {
    let [outputs, per_group_in, kernel, kernel_w] = gwc[..] else { return false };
    groups > 0
        && per_group_in * groups == inputs
        && per_group_in <= MOST_INPUTS_A_GROUP
        && kernel == kernel_w
        && kernel % 2 == 1
        && outputs % groups == 0
        && (outputs / groups) % 16 == 0
        && pwc1[..] == [outputs, inputs, 1, 1]
        && !pwc1_bias
}

/// Whether this CPU has AVX-512F, which the kernel's registers are.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, VarStore};
    use tch::Device;

    /// A CRU-like GWC (`groups`, `kernel`, bias as asked) and PWC1 reading `inputs` channels.
    fn layers(
        vs: &VarStore,
        inputs: i64,
        outputs: i64,
        groups: i64,
        kernel: i64,
        bias: bool,
    ) -> [nn::Conv2D; 2] {
        let grouped = nn::ConvConfig { padding: kernel / 2, groups, bias, ..Default::default() };
        let pointwise = nn::ConvConfig { bias: false, ..Default::default() };
        [
            nn::conv2d(vs.root() / "gwc", inputs, outputs, kernel, grouped),
            nn::conv2d(vs.root() / "pwc1", inputs, outputs, 1, pointwise),
        ]
    }

    fn channels_last(x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    }

    /// Against libtorch's two convolutions: within the rounding of each output's sum of terms, at
    /// widths past the last block of 14 positions (a block of 7, of 4, positions alone), blocks of 16
    /// outputs past the last of 32, a 5x5 kernel, with and without bias.
    #[test]
    fn it_is_gwc_plus_pwc1_to_rounding() {
        if !has_avx512() {
            println!(
                "no AVX-512 on this CPU: the kernel is not made here (see a_kernel_is_made_where_it_pays)"
            );
            return;
        }
        let vs = VarStore::new(Device::Cpu);
        // (inputs, outputs, groups, kernel, bias, [n, h, w])
        let cases = [
            (16, 64, 2, 3, true, [2, 9, 23]),
            (8, 32, 2, 3, true, [1, 5, 4]),
            (16, 96, 2, 3, false, [1, 6, 15]),
            (8, 32, 1, 5, true, [2, 7, 11]),
            (4, 16, 1, 3, true, [1, 1, 1]),
        ];
        for (inputs, outputs, groups, kernel, bias, [n, h, w]) in cases {
            let [gwc, pwc1] = layers(&vs, inputs, outputs, groups, kernel, bias);
            let ours =
                GroupedPlusPointwise::new(&gwc, &pwc1, inputs, groups).unwrap().expect("a covered case");
            let up = channels_last(&Tensor::randn([n, inputs, h, w], (Kind::Float, Device::Cpu)));
            let y1 = ours.forward(&up).expect("a channels-last fp32 input");
            let reference = tch::no_grad(|| gwc.forward(&up) + pwc1.forward(&up));
            // Each term |x w| (and |bias|), summed: the bound of a k-term sum's rounding is k eps of it.
            let magnitude = tch::no_grad(|| {
                let abs = |w: &Tensor| w.abs();
                let grouped =
                    up.abs().conv2d(&abs(&gwc.ws), gwc.bs.as_ref().map(abs), [1], [kernel / 2], [1], groups);
                grouped + up.abs().conv2d(&abs(&pwc1.ws), None::<Tensor>, [1], [0], [1], 1)
            });
            let terms = (kernel * kernel * inputs / groups + inputs + 1) as f64;
            let allowed = magnitude * (terms * f64::from(f32::EPSILON));
            let excess = ((&y1 - &reference).abs() - allowed).max().double_value(&[]);
            assert!(
                excess <= 0.0,
                "{inputs} -> {outputs} in {groups} groups: {excess} past the rounding bound"
            );
            assert_eq!(y1.stride(), [h * w * outputs, 1, w * outputs, outputs], "channels-last");
        }
    }

    /// Each output row is computed alone: an image gives the same bits in a batch as alone (the tile
    /// pass relies on it).
    #[test]
    fn an_image_gives_the_same_bits_in_any_batch() {
        if !has_avx512() {
            return;
        }
        let vs = VarStore::new(Device::Cpu);
        let [gwc, pwc1] = layers(&vs, 16, 64, 2, 3, true);
        let ours = GroupedPlusPointwise::new(&gwc, &pwc1, 16, 2).unwrap().unwrap();
        let batch = channels_last(&Tensor::randn([3, 16, 10, 17], (Kind::Float, Device::Cpu)));
        let together = ours.forward(&batch).unwrap();
        for i in 0..3 {
            let alone = ours.forward(&channels_last(&batch.narrow(0, i, 1))).unwrap();
            assert!(alone.equal(&together.narrow(0, i, 1)), "image {i}");
        }
    }

    /// Made for the CRU's layers where a group reads at most 8 channels and writes a multiple of 16,
    /// where the CPU has AVX-512; it reads channels-last fp32 `up` of its channels only.
    #[test]
    fn a_kernel_is_made_where_it_pays() {
        let covered = |inputs: i64, outputs: i64, groups: i64, k: i64| {
            covers(&[outputs, inputs / groups, k, k], &[outputs, inputs, 1, 1], false, inputs, groups)
        };
        assert!(covered(16, 64, 2, 3), "64 channels' CRU");
        assert!(covered(8, 32, 2, 3) && covered(8, 48, 1, 5), "32 channels' CRU, a 5x5 kernel");
        assert!(!covered(32, 128, 2, 3), "16 inputs a group");
        assert!(!covered(16, 40, 2, 3), "20 outputs a group");
        assert!(!covered(8, 32, 2, 2), "an even kernel");
        assert!(!covers(&[64, 8, 3, 3], &[64, 16, 1, 1], true, 16, 2), "PWC1 with a bias");
        assert!(!covers(&[64, 8, 3, 3], &[64, 8, 1, 1], false, 16, 2), "PWC1 reading other channels");
        let vs = VarStore::new(Device::Cpu);
        let [gwc, pwc1] = layers(&vs, 16, 64, 2, 3, true);
        let made = GroupedPlusPointwise::new(&gwc, &pwc1, 16, 2).unwrap();
        assert_eq!(made.is_some(), has_avx512(), "made where the CPU has AVX-512 only");
        if !has_avx512() {
            return;
        }
        let ours = made.unwrap();
        let nchw = Tensor::randn([2, 16, 5, 6], (Kind::Float, Device::Cpu));
        assert!(ours.forward(&nchw).is_none(), "NCHW");
        assert!(ours.forward(&channels_last(&nchw.to_kind(Kind::BFloat16))).is_none(), "bf16");
        assert!(ours.forward(&channels_last(&nchw.narrow(1, 0, 8))).is_none(), "8 channels");
        assert!(ours.forward(&channels_last(&nchw.narrow(0, 0, 0))).is_none(), "no images");
        assert!(ours.forward(&channels_last(&nchw)).is_some());
    }
}
