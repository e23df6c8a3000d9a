//! The CRU's two squeeze convolutions (1x1, no bias) computed by the channels-last SRU's gate pass on
//! the rows it has just reconstructed, while they are in the L1 cache ([`Pass::FuseSqueezes`]
//! (super::Pass::FuseSqueezes), fp32 forms). Without it the gate pass writes `up` and `low` (the whole
//! activation) and two oneDNN calls read them back to write their squeezed halves; with it the SRU
//! writes only the squeezed halves (a quarter of the activation each at the default ratios).
//!
//! Each output is `sum_k x[k] * W[j][k]`, accumulated in `k` order with fused multiply-adds from zero:
//! oneDNN sums in its own order, so the squeezed values differ from the prepacked convolutions' by
//! fp32 rounding (the form's bound holds; gate decisions downstream can move, and are counted).
//! Every build (AVX-512, AVX2 + FMA, baseline) runs the same operations in the same order, so gives
//! the same bits.
use super::channels_last_sru::fp32_values;
use crate::error::ScConvError;
use tch::nn;

/// The most input channels a fused squeeze reads. Measured on an AVX-512 Xeon (docs/speed.md, "The
/// squeezes in the gate pass"), ScConv steps alone, fused against oneDNN's prepacked squeezes: 0.90-0.98x
/// the time at C = 32 and 64 (16 and 32 inputs a squeeze); at C = 128 0.98-1.16x at 28x28 and 256 images
/// of 7x7, 0.93x only at batch 1 of 7x7; 1.03-1.10x at 256 and 512 (with the weights' blocks kept in
/// L1 over the positions too; the kernel alone runs level with oneDNN's in the cache, so the cause there
/// is not the kernel's arithmetic).
pub(crate) const MOST_INPUTS: i64 = 32;

/// Output channels a block of the kernel: one AVX-512 register of fp32, two AVX2 ones.
const OUTPUTS_A_BLOCK: usize = 16;

/// The CRU's `squeeze1` and `squeeze2` as the gate pass applies them.
#[derive(Debug)]
pub(crate) struct FusedSqueezes {
    pub(crate) up: Pointwise,
    pub(crate) low: Pointwise,
}

impl FusedSqueezes {
    /// For the CRU's squeeze convolutions (fp32 copies of their weights), which read `inputs` (the
    /// CRU's up and low channels); `None` where either reads more than [`MOST_INPUTS`] channels or is
    /// not a plain 1x1 convolution of that many input channels without bias (never in the published
    /// versions).
    pub(crate) fn new(
        [squeeze1, squeeze2]: [&nn::Conv2D; 2],
        inputs: [i64; 2],
    ) -> Result<Option<FusedSqueezes>, ScConvError> {
        if inputs.iter().any(|&i| i > MOST_INPUTS) {
            return Ok(None);
        }
        match (Pointwise::new(squeeze1, inputs[0])?, Pointwise::new(squeeze2, inputs[1])?) {
            (Some(up), Some(low)) => Ok(Some(FusedSqueezes { up, low })),
            _ => Ok(None),
        }
    }
}

/// A 1x1 convolution without bias, its weight stored input by input (`by_input[k * outputs + j]` is
/// `W[j][k]`), so that a block of outputs is one contiguous load per input.
#[derive(Debug)]
pub(crate) struct Pointwise {
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    by_input: Vec<f32>,
}

impl Pointwise {
    /// `conv`'s weight, or `None` where it has a bias, a kernel larger than 1x1 or groups (fewer input
    /// channels a weight than the `inputs` it reads).
    fn new(conv: &nn::Conv2D, inputs: i64) -> Result<Option<Pointwise>, ScConvError> {
        let size = conv.ws.size();
        match size[..] {
            [_, i, 1, 1] if i == inputs && conv.bs.is_none() => {}
            _ => return Ok(None),
        }
        let outputs = size[0];
        let transposed = conv.ws.view([outputs, inputs]).transpose(0, 1);
        let by_input = fp32_values(&transposed, "a squeeze convolution's weight")?;
        Ok(Some(Pointwise { inputs: inputs as usize, outputs: outputs as usize, by_input }))
    }

    /// `out[p][j] = sum_k rows[p][k] * W[j][k]` for each position `p` (`rows`: positions x inputs,
    /// `out`: positions x outputs, both row-major).
    pub(crate) fn apply(&self, rows: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                // SAFETY: the CPU has AVX-512F (and so FMA).
                return unsafe { self.apply_avx512(rows, out) };
            }
            if has!("avx2") && has!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { self.apply_avx2(rows, out) };
            }
        }
        self.apply_positions::<4>(rows, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn apply_avx512(&self, rows: &[f32], out: &mut [f32]) {
        // 8 positions: 8 accumulators of one register, enough to cover the FMA's latency.
        self.apply_positions::<8>(rows, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(&self, rows: &[f32], out: &mut [f32]) {
        // 4 positions of two registers each: 8 of the 16 registers.
        self.apply_positions::<4>(rows, out)
    }

    /// `P` positions at a time, then the rest one by one.
    #[inline(always)]
    fn apply_positions<const P: usize>(&self, rows: &[f32], out: &mut [f32]) {
        let (k, m) = (self.inputs, self.outputs);
        let positions = rows.len() / k;
        let full = positions / P * P;
        for p in (0..full).step_by(P) {
            self.block::<P>(&rows[p * k..][..P * k], &mut out[p * m..][..P * m]);
        }
        for p in full..positions {
            self.block::<1>(&rows[p * k..][..k], &mut out[p * m..][..m]);
        }
    }

    /// `P` positions: blocks of [`OUTPUTS_A_BLOCK`] outputs in registers over every input, then a
    /// block of half as many, then the outputs past them one by one (the same sums in the same order).
    #[inline(always)]
    fn block<const P: usize>(&self, rows: &[f32], out: &mut [f32]) {
        let (k, m) = (self.inputs, self.outputs);
        let rows: [&[f32]; P] = std::array::from_fn(|p| &rows[p * k..][..k]);
        let full = m / OUTPUTS_A_BLOCK * OUTPUTS_A_BLOCK;
        for j0 in (0..full).step_by(OUTPUTS_A_BLOCK) {
            self.outputs_block::<P, OUTPUTS_A_BLOCK>(&rows, j0, out);
        }
        let mut done = full;
        if m - done >= OUTPUTS_A_BLOCK / 2 {
            self.outputs_block::<P, { OUTPUTS_A_BLOCK / 2 }>(&rows, done, out);
            done += OUTPUTS_A_BLOCK / 2;
        }
        for j in done..m {
            for (p, row) in rows.iter().enumerate() {
                out[p * m + j] = (0..k).fold(0.0f32, |acc, i| row[i].mul_add(self.by_input[i * m + j], acc));
            }
        }
    }

    /// Outputs `[j0, j0 + J)` of `P` positions, accumulated in registers.
    #[inline(always)]
    fn outputs_block<const P: usize, const J: usize>(&self, rows: &[&[f32]; P], j0: usize, out: &mut [f32]) {
        let m = self.outputs;
        let mut acc = [[0.0f32; J]; P];
        for (i, weights) in self.by_input.chunks_exact(m).enumerate() {
            let w: &[f32; J] = weights[j0..][..J].try_into().expect("a block");
            for p in 0..P {
                let x = rows[p][i];
                for j in 0..J {
                    acc[p][j] = x.mul_add(w[j], acc[p][j]);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            out[p * m + j0..][..J].copy_from_slice(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind, Tensor};

    /// A bias-free 1x1 convolution of `inputs` -> `outputs` channels and its kernel.
    fn squeeze(vs: &VarStore, inputs: i64, outputs: i64) -> (nn::Conv2D, Pointwise) {
        let config = nn::ConvConfig { bias: false, ..Default::default() };
        let conv = nn::conv2d(vs.root(), inputs, outputs, 1, config);
        let kernel = Pointwise::new(&conv, inputs).unwrap().expect("a plain 1x1 convolution");
        (conv, kernel)
    }

    /// Against libtorch's convolution: within the rounding of a k-term fp32 sum, at shapes with
    /// positions past the last block of 8 and outputs past the last block of 16.
    #[test]
    fn it_is_the_convolution_to_rounding() {
        let vs = VarStore::new(Device::Cpu);
        for (inputs, outputs, positions) in [(32, 16, 37), (16, 8, 5), (64, 40, 19), (64, 59, 19), (7, 3, 1)]
        {
            let (conv, kernel) = squeeze(&vs, inputs, outputs);
            let x = Tensor::randn([positions, inputs], (Kind::Float, Device::Cpu));
            let reference =
                tch::no_grad(|| x.view([positions, inputs, 1, 1]).apply(&conv).view([positions, outputs]));
            let rows = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
            let mut out = vec![f32::NAN; (positions * outputs) as usize];
            kernel.apply(&rows, &mut out);
            let ours = Tensor::from_slice(&out).view([positions, outputs]);
            // Each term |x_k w_jk|, summed: the bound of a k-term sum's rounding is k eps of it.
            let magnitude = x.abs().matmul(&conv.ws.detach().abs().view([outputs, inputs]).transpose(0, 1));
            let allowed = magnitude * (inputs as f64 * f64::from(f32::EPSILON));
            let excess = ((&ours - &reference).abs() - allowed).max().double_value(&[]);
            assert!(excess <= 0.0, "{inputs}->{outputs}: off by {excess} more than the rounding bound");
        }
    }

    /// The builds for each instruction set give the same bits (the same fused multiply-adds in the
    /// same order), whatever the blocks: 59 outputs are three blocks of 16, one of 8 and 3 alone.
    #[test]
    fn every_build_gives_the_same_bits() {
        let vs = VarStore::new(Device::Cpu);
        let (_conv, kernel) = squeeze(&vs, 48, 59);
        let rows = Vec::<f32>::try_from(Tensor::randn([29 * 48], (Kind::Float, Device::Cpu))).unwrap();
        let run = |f: &dyn Fn(&mut [f32])| {
            let mut out = vec![f32::NAN; 29 * 59];
            f(&mut out);
            out
        };
        let baseline = run(&|out| kernel.apply_positions::<4>(&rows, out));
        assert_eq!(baseline, run(&|out| kernel.apply_positions::<1>(&rows, out)));
        assert_eq!(baseline, run(&|out| kernel.apply(&rows, out)), "the build this CPU runs");
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                // SAFETY: checked just above.
                assert_eq!(baseline, run(&|out| unsafe { kernel.apply_avx2(&rows, out) }));
            }
            if has!("avx512f") {
                // SAFETY: checked just above.
                assert_eq!(baseline, run(&|out| unsafe { kernel.apply_avx512(&rows, out) }));
            }
        }
    }

    #[test]
    fn a_bias_or_a_larger_kernel_is_not_covered() {
        let vs = VarStore::new(Device::Cpu);
        let biased = nn::conv2d(vs.root(), 8, 4, 1, Default::default());
        assert!(Pointwise::new(&biased, 8).unwrap().is_none());
        let config = nn::ConvConfig { bias: false, padding: 1, ..Default::default() };
        assert!(Pointwise::new(&nn::conv2d(vs.root(), 8, 4, 3, config), 8).unwrap().is_none());
        let grouped = nn::ConvConfig { bias: false, groups: 2, ..Default::default() };
        assert!(Pointwise::new(&nn::conv2d(vs.root(), 8, 4, 1, grouped), 8).unwrap().is_none());
        let (c1, _) = squeeze(&vs, 8, 4);
        assert!(FusedSqueezes::new([&c1, &c1], [8, 8]).unwrap().is_some());
        assert!(FusedSqueezes::new([&c1, &biased], [8, 8]).unwrap().is_none());
        let (wide, _) = squeeze(&vs, MOST_INPUTS + 2, 4);
        let (narrow, _) = squeeze(&vs, 8, 4);
        assert!(FusedSqueezes::new([&wide, &narrow], [MOST_INPUTS + 2, 8]).unwrap().is_none());
    }
}
