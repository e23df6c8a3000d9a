//! The CRU's weighted sum and what follows it in a channels-last ScConv step (the folded BatchNorm's
//! shift, the residual add, the ReLU) in one pass over the tensors, where libtorch's operations make
//! five. Per element the same operations in the same order, so the same bits: `Y1 * w0` rounded, the
//! branch added as libtorch's `addcmul_` adds it (one fused multiply-add: its CPU kernels are built
//! with FMA contraction), `+ shift`, `+ residual`, then the ReLU as libtorch's `clamp_min(0)` (NaN and
//! -0 kept). Runs where the CPU has AVX2 and FMA and every tensor is fp32 and channels-last; the caller
//! runs libtorch's passes otherwise.
use super::channels_last_sru::is_channels_last_fp32;
use crate::fast::sru_kernel::elements as values;
use crate::fast::welford::SharedOut;
use crate::fast::FuseParts;
use crate::inference::parallel_for;
use tch::{Kind, Tensor};

/// Elements of the output one task writes.
const TASK_ELEMENTS: usize = 1 << 14;

/// `relu(weighted_sum(parts) + shift [+ residual])` written into `parts.y1` (returned), or `None`
/// where this pass does not run (see the module comment). `shift`: `(1, C, 1, 1)`.
pub(crate) fn weighted_sum_shift_add_relu(
    parts: &FuseParts,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Option<Tensor> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpu = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let tensors = [&parts.y1, &parts.y2_head, &parts.low];
        let fits =
            tensors.iter().all(|t| is_channels_last_fp32(t)) && residual.is_none_or(is_channels_last_fp32);
        if !cpu || !fits || shift.kind() != Kind::Float || parts.weights.kind() != Kind::Float {
            return None;
        }
        let [n, c, h, w] = <[i64; 4]>::try_from(parts.y1.size()).ok()?;
        if residual.is_some_and(|r| r.size() != parts.y1.size()) {
            return None;
        }
        let weights: Vec<Tensor> = parts.split_weights().iter().map(|w| w.contiguous()).collect();
        let shift = shift.contiguous();
        let (n, c, positions) = (n as usize, c as usize, (h * w) as usize);
        let head = parts.y2_head.size()[1] as usize;
        // SAFETY: every tensor read is a contiguous fp32 CPU tensor alive until the end of this block;
        // `y1` is written, position rows by one task each, and read by nothing else meanwhile.
        unsafe {
            let reads = Reads {
                y2_head: values(&parts.y2_head),
                low: values(&parts.low),
                w: [values(&weights[0]), values(&weights[1]), values(&weights[2])],
                shift: values(&shift),
                residual: residual.map(|r| values(r)),
                channels: c,
                head,
                relu,
            };
            let out = SharedOut(parts.y1.data_ptr() as *mut f32);
            let chunk = (TASK_ELEMENTS / c).max(1);
            let chunks = positions.div_ceil(chunk);
            parallel_for(n * chunks, 1, |tasks| {
                for task in tasks {
                    let (sample, first) = (task / chunks, task % chunks * chunk);
                    let rows =
                        (sample * positions + first)..(sample * positions + (first + chunk).min(positions));
                    // SAFETY: these rows of `y1` are this task's alone; the CPU has AVX2 and FMA.
                    let y1 = out.slice(rows.start * c, rows.len() * c);
                    positions_avx2_fma(&reads, sample, rows, y1);
                }
            });
        }
        Some(parts.y1.shallow_clone())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (parts, shift, residual, relu);
        None
    }
}

/// What the pass reads besides `y1`, as values: the branches and the residual channels-last, the
/// weights `(N, C | head | C - head)`, the shift `(C)`.
struct Reads<'a> {
    y2_head: &'a [f32],
    low: &'a [f32],
    w: [&'a [f32]; 3],
    shift: &'a [f32],
    residual: Option<&'a [f32]>,
    channels: usize,
    head: usize,
    relu: bool,
}

/// Position rows `rows` (global indices, all of sample `sample`) of `y1`, in place.
#[inline(always)]
fn positions(r: &Reads, sample: usize, rows: std::ops::Range<usize>, y1: &mut [f32]) {
    match (r.residual.is_some(), r.relu) {
        (true, true) => positions_as::<true, true>(r, sample, rows, y1),
        (true, false) => positions_as::<true, false>(r, sample, rows, y1),
        (false, true) => positions_as::<false, true>(r, sample, rows, y1),
        (false, false) => positions_as::<false, false>(r, sample, rows, y1),
    }
}

#[inline(always)]
fn positions_as<const RESIDUAL: bool, const RELU: bool>(
    r: &Reads,
    sample: usize,
    rows: std::ops::Range<usize>,
    y1: &mut [f32],
) {
    let (c, head) = (r.channels, r.head);
    let tail = c - head;
    let w0 = &r.w[0][sample * c..][..c];
    let (w0_head, w0_tail) = w0.split_at(head);
    let (w1, w2) = (&r.w[1][sample * head..][..head], &r.w[2][sample * tail..][..tail]);
    let (shift_head, shift_tail) = r.shift[..c].split_at(head);
    let no_residual = vec![0.0f32; c];
    for (i, row) in rows.enumerate() {
        let (out_head, out_tail) = y1[i * c..][..c].split_at_mut(head);
        let (y2, low) = (&r.y2_head[row * head..][..head], &r.low[row * tail..][..tail]);
        let residual = match (RESIDUAL, r.residual) {
            (true, Some(residual)) => &residual[row * c..][..c],
            _ => &no_residual[..],
        };
        let (res_head, res_tail) = residual.split_at(head);
        segment::<RESIDUAL, RELU>(out_head, y2, w0_head, w1, shift_head, res_head);
        segment::<RESIDUAL, RELU>(out_tail, low, w0_tail, w2, shift_tail, res_tail);
    }
}

/// One stretch of a position's channels: `relu(branch * w + y1 * w0 + shift [+ residual])`, each
/// operation rounded as libtorch's passes round it, each value stored once.
#[inline(always)]
fn segment<const RESIDUAL: bool, const RELU: bool>(
    out: &mut [f32],
    branch: &[f32],
    w0: &[f32],
    w: &[f32],
    shift: &[f32],
    residual: &[f32],
) {
    let n = out.len();
    let (branch, w0, w, shift, residual) = (&branch[..n], &w0[..n], &w[..n], &shift[..n], &residual[..n]);
    for ch in 0..n {
        let mut t = branch[ch].mul_add(w[ch], out[ch] * w0[ch]) + shift[ch];
        if RESIDUAL {
            t += residual[ch];
        }
        if RELU {
            // libtorch's clamp_min(0): `0 > t ? 0 : t`, so NaN and -0 pass.
            t = if 0.0 > t { 0.0 } else { t };
        }
        out[ch] = t;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn positions_avx2_fma(r: &Reads, sample: usize, rows: std::ops::Range<usize>, y1: &mut [f32]) {
    positions(r, sample, rows, y1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn nhwc(size: [i64; 4]) -> Tensor {
        let [n, c, h, w] = size;
        Tensor::randn([n, h, w, c], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2])
    }

    fn parts(n: i64, c: i64, head: i64, hw: i64) -> FuseParts {
        let weights = Tensor::rand([n, c + c, 1, 1], (Kind::Float, Device::Cpu));
        let y1 = nhwc([n, c, hw, hw]);
        // Values where the ReLU's edge cases show: exact zeros of both signs, a NaN.
        let flat = y1.permute([0, 2, 3, 1]).view([-1]);
        for (i, v) in [0.0f64, -0.0, f64::NAN].iter().enumerate() {
            let _ = flat.narrow(0, 5 * i as i64 + 1, 1).fill_(*v);
        }
        FuseParts { y1, y2_head: nhwc([n, head, hw, hw]), low: nhwc([n, c - head, hw, hw]), weights }
    }

    fn copy(p: &FuseParts) -> FuseParts {
        let keep = |t: &Tensor| {
            let mut out = t.empty_like();
            out.copy_(t);
            out
        };
        FuseParts {
            y1: keep(&p.y1),
            y2_head: p.y2_head.shallow_clone(),
            low: p.low.shallow_clone(),
            weights: p.weights.shallow_clone(),
        }
    }

    /// The one pass gives libtorch's passes' bits (weighted sum, `+= shift`, `+= residual`, `relu_`),
    /// NaN and signed zeros included, with and without residual and ReLU.
    #[test]
    fn one_pass_is_libtorchs_passes_bit_for_bit() {
        let fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        for (n, c, head, hw) in [(2, 64, 48, 9), (3, 32, 24, 5), (1, 128, 96, 4)] {
            let shift = Tensor::randn([1, c, 1, 1], (Kind::Float, Device::Cpu));
            for (with_residual, relu) in [(true, true), (false, true), (true, false)] {
                let p = parts(n, c, head, hw);
                let residual = with_residual.then(|| nhwc([n, c, hw, hw]));
                let expected = tch::no_grad(|| {
                    let mut y = copy(&p).weighted_sum();
                    y += &shift;
                    super::super::conv::epilogue(y, residual.as_ref().map(|r| r.copy()), relu, true)
                });
                let out = tch::no_grad(|| weighted_sum_shift_add_relu(&p, &shift, residual.as_ref(), relu));
                match out {
                    Some(out) => {
                        let same =
                            out.isnan().logical_and(&expected.isnan()).logical_or(&out.eq_tensor(&expected));
                        assert!(
                            same.all().int64_value(&[]) == 1,
                            "{n} {c} {head} {hw} {with_residual} {relu}"
                        );
                        let signs = |t: &Tensor| t.signbit().sum(Kind::Int64);
                        assert!(signs(&out).equal(&signs(&expected)), "signed zeros");
                    }
                    None => assert!(!fma, "runs on every CPU with AVX2 and FMA"),
                }
            }
        }
    }

    #[test]
    fn other_layouts_are_left_to_libtorch() {
        let p = parts(2, 16, 12, 4);
        let nchw = FuseParts { y1: p.y1.contiguous(), ..copy(&p) };
        let shift = Tensor::zeros([1, 16, 1, 1], (Kind::Float, Device::Cpu));
        assert!(weighted_sum_shift_add_relu(&nchw, &shift, None, true).is_none());
        let residual = nhwc([2, 16, 4, 4]).contiguous();
        assert!(weighted_sum_shift_add_relu(&p, &shift, Some(&residual), true).is_none());
    }
}
