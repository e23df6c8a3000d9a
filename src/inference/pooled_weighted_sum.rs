//! The one pass of `weighted_sum` for a step whose ScConv a 2x2 average pool follows (the stride-2
//! blocks of SC-ResNet): the weighted sum at the four positions of each window, pooled as libtorch's
//! `avg_pool2d` pools a channels-last fp32 tensor (a zeroed sum, the window's positions added row by
//! row, divided by 4), then the shift, the residual add, the ReLU and the form's store, written once
//! into the pooled tensor. libtorch's operations write the whole weighted sum, read it back to pool it
//! and then make three or four passes over the pooled tensor; the same operations per element in the
//! same order, so the same bits.
//!
//! `Y1`, the branches and the residual are fp32 or bf16 (read exactly); the result is a new
//! channels-last tensor stored as the step stores its output. An odd last row or column is left out,
//! as `avg_pool2d` without `ceil_mode` leaves it. Runs where the CPU has AVX2 and FMA and every tensor
//! is channels-last; the caller runs libtorch's passes otherwise.
use super::elements::{Bf16, Bf16Bits, Bf16Values, Store, Value};
use super::precision::Arithmetic;
use super::weighted_sum::{by_kinds, operands, shift_add_relu, weighted, Operands};
use crate::fast::sru_kernel::elements as values;
use crate::fast::welford::SharedOut;
use crate::fast::FuseParts;
use crate::inference::parallel_for;
use tch::{Device, Kind, Tensor};

/// Elements of the output one task writes.
const TASK_ELEMENTS: usize = 1 << 13;

/// `store(relu(avg_pool2d(weighted_sum(parts), 2) + shift [+ residual]))` as a new tensor, or `None`
/// where this pass does not run (see the module comment). `shift`: `(1, C, 1, 1)`; `residual`: the
/// pooled size.
pub(crate) fn weighted_sum_pool_shift_add_relu(
    parts: &FuseParts,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    store: &Arithmetic,
) -> Option<Tensor> {
    let operands = operands(parts, shift, residual)?;
    let [n, c, h, w] = <[i64; 4]>::try_from(parts.y1.size()).ok()?;
    let pooled = [n, c, h / 2, w / 2];
    if residual.is_some_and(|r| r.size() != pooled) || pooled.contains(&0) {
        return None;
    }
    // SAFETY: `operands` checked the tensors' kinds and layouts; the CPU has AVX2 and FMA.
    unsafe { by_kinds!(parts, run(parts, &operands, residual, relu, store)) }
}

/// The pass over every window of `parts` into a new tensor as `store` stores values (returned).
/// SAFETY: the branches and the residual hold `V`s, `y1` holds `Y`s, every tensor is a dense
/// channels-last CPU tensor of the sizes the pass reads, alive and unwritten until it returns; the CPU
/// has AVX2 and FMA.
unsafe fn run<V: Value, Y: Value>(
    parts: &FuseParts,
    Operands { weights: w, shift }: &Operands,
    residual: Option<&Tensor>,
    relu: bool,
    store: &Arithmetic,
) -> Option<Tensor> {
    let [n, c, h, width] = <[i64; 4]>::try_from(parts.y1.size()).ok()?;
    let (out_h, out_w) = (h / 2, width / 2);
    let kind = match store {
        Arithmetic::Bf16Native => Kind::BFloat16,
        _ => Kind::Float,
    };
    let strides = [out_h * out_w * c, 1, out_w * c, c];
    let out = Tensor::empty_strided([n, c, out_h, out_w], strides, (kind, Device::Cpu));
    let reads = Reads::<V, Y> {
        y1: values(&parts.y1),
        y2_head: values(&parts.y2_head),
        low: values(&parts.low),
        w: [values(&w[0]), values(&w[1]), values(&w[2])],
        shift: values(shift),
        residual: residual.map(|r| values(r)),
        channels: c as usize,
        head: parts.y2_head.size()[1] as usize,
        width: width as usize,
        rows: h as usize,
        relu,
    };
    let (n, c, positions) = (n as usize, c as usize, (out_h * out_w) as usize);
    let (floats, bits) = (SharedOut(out.data_ptr() as *mut f32), SharedOut(out.data_ptr() as *mut u16));
    let chunk = (TASK_ELEMENTS / c).max(1);
    let chunks = positions.div_ceil(chunk);
    parallel_for(n * chunks, 1, |tasks| {
        for task in tasks {
            let (sample, first) = (task / chunks, task % chunks * chunk);
            let windows = first..(first + chunk).min(positions);
            let (offset, len) = ((sample * positions + windows.start) * c, windows.len() * c);
            // SAFETY: these windows of the output are this task's alone; the CPU has AVX2 and FMA.
            match store {
                Arithmetic::Fp32 => {
                    windows_avx2_fma::<V, Y, f32>(&reads, sample, windows, floats.slice(offset, len))
                }
                Arithmetic::Bf16Emulated { .. } => {
                    windows_avx2_fma::<V, Y, Bf16Values>(&reads, sample, windows, floats.slice(offset, len))
                }
                Arithmetic::Bf16Native => {
                    windows_avx2_fma::<V, Y, Bf16Bits>(&reads, sample, windows, bits.slice(offset, len))
                }
            }
        }
    });
    Some(out)
}

/// What the pass reads: `Y1`, the branches and the (pooled) residual channels-last, the weights
/// `(N, C | head | C - head)`, the shift `(C)`; the input's width and height.
struct Reads<'a, V, Y> {
    y1: &'a [Y],
    y2_head: &'a [V],
    low: &'a [V],
    w: [&'a [f32]; 3],
    shift: &'a [f32],
    residual: Option<&'a [V]>,
    channels: usize,
    head: usize,
    width: usize,
    rows: usize,
    relu: bool,
}

/// Output positions `windows` (within sample `sample`), written to `out` (those positions).
#[inline(always)]
fn windows<V: Value, Y: Value, S: Store>(
    r: &Reads<V, Y>,
    sample: usize,
    windows: std::ops::Range<usize>,
    out: &mut [S::Elem],
) {
    match (r.residual.is_some(), r.relu) {
        (true, true) => windows_as::<V, Y, S, true, true>(r, sample, windows, out),
        (true, false) => windows_as::<V, Y, S, true, false>(r, sample, windows, out),
        (false, true) => windows_as::<V, Y, S, false, true>(r, sample, windows, out),
        (false, false) => windows_as::<V, Y, S, false, false>(r, sample, windows, out),
    }
}

#[inline(always)]
fn windows_as<V: Value, Y: Value, S: Store, const RESIDUAL: bool, const RELU: bool>(
    r: &Reads<V, Y>,
    sample: usize,
    windows: std::ops::Range<usize>,
    out: &mut [S::Elem],
) {
    let (c, head) = (r.channels, r.head);
    let tail = c - head;
    let w0 = &r.w[0][sample * c..][..c];
    let (w0_head, w0_tail) = w0.split_at(head);
    let (w1, w2) = (&r.w[1][sample * head..][..head], &r.w[2][sample * tail..][..tail]);
    let (shift_head, shift_tail) = r.shift[..c].split_at(head);
    let no_residual = vec![V::ZERO; c];
    let out_w = r.width / 2;
    let out_positions = out_w * (r.rows / 2);
    for (i, window) in windows.enumerate() {
        // The window's positions in `avg_pool2d`'s order: row by row, left to right.
        let (row, col) = (window / out_w, window % out_w);
        let top = sample * r.rows * r.width + 2 * row * r.width + 2 * col;
        let inputs = [top, top + 1, top + r.width, top + r.width + 1];
        let (out_head, out_tail) = out[i * c..][..c].split_at_mut(head);
        let residual = match (RESIDUAL, r.residual) {
            (true, Some(residual)) => &residual[(sample * out_positions + window) * c..][..c],
            _ => &no_residual[..],
        };
        let (res_head, res_tail) = residual.split_at(head);
        let y1 = inputs.map(|p| &r.y1[p * c..][..c]);
        let (y2, low) =
            (inputs.map(|p| &r.y2_head[p * head..][..head]), inputs.map(|p| &r.low[p * tail..][..tail]));
        let (y1_head, y1_tail) = (y1.map(|y| &y[..head]), y1.map(|y| &y[head..]));
        segment::<V, Y, S, RESIDUAL, RELU>(out_head, y1_head, y2, w0_head, w1, shift_head, res_head);
        segment::<V, Y, S, RESIDUAL, RELU>(out_tail, y1_tail, low, w0_tail, w2, shift_tail, res_tail);
    }
}

/// One stretch of a window's channels: the four weighted sums added into a zeroed sum, divided by 4,
/// then shift, residual, ReLU and the store.
#[inline(always)]
fn segment<V: Value, Y: Value, S: Store, const RESIDUAL: bool, const RELU: bool>(
    out: &mut [S::Elem],
    y1: [&[Y]; 4],
    branch: [&[V]; 4],
    w0: &[f32],
    w: &[f32],
    shift: &[f32],
    residual: &[V],
) {
    let n = out.len();
    let (y1, branch) = (y1.map(|y| &y[..n]), branch.map(|b| &b[..n]));
    let (w0, w, shift, residual) = (&w0[..n], &w[..n], &shift[..n], &residual[..n]);
    for ch in 0..n {
        let mut sum = 0.0f32;
        for k in 0..4 {
            sum += weighted(y1[k][ch].value(), w0[ch], branch[k][ch].value(), w[ch]);
        }
        out[ch] = S::put(shift_add_relu::<RESIDUAL, RELU>(sum / 4.0, shift[ch], residual[ch].value()));
    }
}

/// `windows` built for AVX2 and FMA (elsewhere never called: `operands` refuses other CPUs).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn windows_avx2_fma<V: Value, Y: Value, S: Store>(
    r: &Reads<V, Y>,
    sample: usize,
    positions: std::ops::Range<usize>,
    out: &mut [S::Elem],
) {
    windows::<V, Y, S>(r, sample, positions, out)
}

#[cfg(test)]
mod tests {
    use super::super::channels_last_sru::is_channels_last;
    use super::*;

    fn nhwc(size: [i64; 4], kind: Kind) -> Tensor {
        let [n, c, h, w] = size;
        Tensor::randn([n, h, w, c], (Kind::Float, Device::Cpu)).to_kind(kind).permute([0, 3, 1, 2])
    }

    /// `FuseParts` of `(n, c, h, w)` with `head` channels of `PWC2(low)`, the branches of `kind` and
    /// `Y1` of `y1_kind`; `Y1` holds exact zeros of both signs and a NaN.
    fn parts(size: [i64; 4], head: i64, kind: Kind, y1_kind: Kind) -> FuseParts {
        let [n, c, h, w] = size;
        let y1 = nhwc(size, Kind::Float);
        let flat = y1.permute([0, 2, 3, 1]).view([-1]);
        for (i, v) in [0.0f64, -0.0, f64::NAN].iter().enumerate() {
            let _ = flat.narrow(0, 7 * i as i64 + 1, 1).fill_(*v);
        }
        FuseParts {
            y1: y1.to_kind(y1_kind),
            y2_head: nhwc([n, head, h, w], kind),
            low: nhwc([n, c - head, h, w], kind),
            weights: Tensor::rand([n, c + c, 1, 1], (Kind::Float, Device::Cpu)),
        }
    }

    /// libtorch's passes as the step runs them where this pass does not: the weighted sum into an fp32
    /// `Y1`, `avg_pool2d`, `+= shift`, the residual add and ReLU in place, the store.
    fn libtorch(
        p: &FuseParts,
        shift: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        store: &Arithmetic,
    ) -> Tensor {
        let p = FuseParts {
            y1: p.y1.copy(),
            y2_head: p.y2_head.shallow_clone(),
            low: p.low.shallow_clone(),
            weights: p.weights.shallow_clone(),
        };
        let mut y = p.weighted_sum().avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
        y += shift;
        store.store(&super::super::conv::epilogue(y, residual.map(|r| r.copy()), relu, true))
    }

    /// The one pass gives libtorch's passes' bits in each arithmetic (fp32; bf16 emulated; native
    /// bf16 with bf16 branches and residual, `Y1` fp32 or bf16), with and without residual and ReLU,
    /// on even and odd sizes, NaN-ness and signed zeros included.
    #[test]
    fn one_pooled_pass_is_libtorchs_passes_bit_for_bit() {
        let fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let emulated = Arithmetic::Bf16Emulated { why: "a test".into() };
        let (f, b) = (Kind::Float, Kind::BFloat16);
        let arithmetics = [
            (Arithmetic::Fp32, f, f),
            (emulated, f, f),
            (Arithmetic::Bf16Native, b, f),
            (Arithmetic::Bf16Native, b, b),
        ];
        for ([n, c, h, w], head) in [([2, 64, 10, 8], 48), ([3, 32, 7, 9], 24), ([1, 128, 4, 4], 96)] {
            let shift = Tensor::randn([1, c, 1, 1], (Kind::Float, Device::Cpu));
            for (with_residual, relu) in [(true, true), (false, true), (true, false)] {
                for (store, kind, y1_kind) in &arithmetics {
                    let p = parts([n, c, h, w], head, *kind, *y1_kind);
                    let residual = with_residual.then(|| nhwc([n, c, h / 2, w / 2], *kind));
                    let expected = tch::no_grad(|| libtorch(&p, &shift, residual.as_ref(), relu, store));
                    let out = tch::no_grad(|| {
                        weighted_sum_pool_shift_add_relu(&p, &shift, residual.as_ref(), relu, store)
                    });
                    let what = format!(
                        "{n} {c} {h}x{w} residual {with_residual} relu {relu} {} y1 {y1_kind:?}",
                        store.name()
                    );
                    let Some(out) = out else {
                        assert!(!fma, "runs on every CPU with AVX2 and FMA: {what}");
                        continue;
                    };
                    assert_eq!(out.kind(), expected.kind(), "{what}");
                    assert_eq!(out.size(), expected.size(), "{what}");
                    assert!(is_channels_last(&out), "{what}: channels-last");
                    let (out, expected) = (out.to_kind(Kind::Float), expected.to_kind(Kind::Float));
                    let same =
                        out.isnan().logical_and(&expected.isnan()).logical_or(&out.eq_tensor(&expected));
                    assert!(same.all().int64_value(&[]) == 1, "{what}");
                    let signs =
                        |t: &Tensor| t.signbit().logical_and(&t.isnan().logical_not()).sum(Kind::Int64);
                    assert!(signs(&out).equal(&signs(&expected)), "{what}: signed zeros");
                }
            }
        }
    }

    #[test]
    fn other_layouts_and_sizes_are_left_to_libtorch() {
        let (f, shift) = (Kind::Float, Tensor::zeros([1, 16, 1, 1], (Kind::Float, Device::Cpu)));
        let p = parts([2, 16, 4, 4], 12, f, f);
        let nchw = FuseParts { y1: p.y1.contiguous(), ..parts([2, 16, 4, 4], 12, f, f) };
        assert!(weighted_sum_pool_shift_add_relu(&nchw, &shift, None, true, &Arithmetic::Fp32).is_none());
        let unpooled = nhwc([2, 16, 4, 4], f);
        assert!(
            weighted_sum_pool_shift_add_relu(&p, &shift, Some(&unpooled), true, &Arithmetic::Fp32).is_none()
        );
        let single = parts([2, 16, 1, 4], 12, f, f);
        assert!(weighted_sum_pool_shift_add_relu(&single, &shift, None, true, &Arithmetic::Fp32).is_none());
    }
}
