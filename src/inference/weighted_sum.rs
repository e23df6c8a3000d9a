//! The CRU's weighted sum and what follows it in a channels-last ScConv step (the folded BatchNorm's
//! shift, the residual add, the ReLU, the form's store) in one pass over the tensors, where libtorch's
//! operations make five (seven in the bf16 forms). Per element the same operations in the same order,
//! so the same bits: `Y1 * w0` rounded, the branch added as libtorch's `addcmul_` adds it (one fused
//! multiply-add: its CPU kernels are built with FMA contraction), `+ shift`, `+ residual`, then the
//! ReLU as libtorch's `clamp_min(0)` (NaN and -0 kept), and in the bf16 forms the result rounded to
//! bf16 as libtorch's `to(bf16)` rounds it (ties to even; a NaN stays a NaN).
//!
//! `Y1`, the branches and the residual are fp32, or bf16 in the native bf16 form, read as libtorch
//! promotes them (exactly). The result goes into `Y1` in place (fp32, or bf16 values in fp32 tensors:
//! the emulated bf16 form), or into a new bf16 tensor (the native bf16 form). Runs where the CPU has
//! AVX2 and FMA and every tensor is channels-last and of the sizes the CRU gives them; the caller runs
//! libtorch's passes otherwise.
use super::channels_last_sru::is_channels_last;
use super::elements::{Bf16, Bf16Bits, Bf16Values, Store, Value};
use super::precision::Arithmetic;
use crate::fast::sru_kernel::elements as values;
use crate::fast::welford::SharedOut;
use crate::fast::FuseParts;
use crate::inference::parallel_for;
use std::marker::PhantomData;
use tch::{Device, Kind, Tensor};

/// Elements of the output one task writes.
const TASK_ELEMENTS: usize = 1 << 14;

/// `store(relu(weighted_sum(parts) + shift [+ residual]))`, as `store` stores a step's output (into
/// `parts.y1` in place, or a new bf16 tensor), or `None` where this pass does not run (see the module
/// comment). `shift`: `(1, C, 1, 1)`.
pub(crate) fn weighted_sum_shift_add_relu(
    parts: &FuseParts,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    store: &Arithmetic,
) -> Option<Tensor> {
    let operands = operands(parts, shift, residual)?;
    // Written in place, `y1` is fp32; read only (into a new bf16 tensor), fp32 or bf16.
    let y1_fits = parts.y1.kind() == Kind::Float || *store == Arithmetic::Bf16Native;
    if !y1_fits || residual.is_some_and(|r| r.size() != parts.y1.size()) {
        return None;
    }
    // SAFETY: `operands` checked the tensors' kinds and layouts, `y1` is bf16 only where the output
    // is a new tensor (checked above); the CPU has AVX2 and FMA.
    unsafe { by_kinds!(parts, run(parts, &operands, residual, relu, store)) }
}

/// The fuse's weights `[w0, w1, w2]` (`(N, C | head | C - head, 1, 1)`) and the shift `(1, C, 1, 1)`,
/// contiguous fp32: what the one passes read besides the tensors of `FuseParts`.
pub(super) struct Operands {
    pub(super) weights: [Tensor; 3],
    pub(super) shift: Tensor,
}

/// `Operands` where a one pass runs on `parts`: a CPU with AVX2 and FMA; the branches and the residual
/// of one kind, fp32 or bf16, and `Y1` fp32 or bf16, each a dense channels-last CPU tensor; the weights
/// and the shift fp32. `None` otherwise (the caller runs libtorch's passes).
pub(super) fn operands(parts: &FuseParts, shift: &Tensor, residual: Option<&Tensor>) -> Option<Operands> {
    #[cfg(target_arch = "x86_64")]
    let cpu = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = false;
    let kind = parts.low.kind();
    let fp32_or_bf16 = |kind: Kind| matches!(kind, Kind::Float | Kind::BFloat16);
    let read = |t: &Tensor, kind: Kind| t.kind() == kind && t.device() == Device::Cpu && is_channels_last(t);
    let fp32_cpu = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
    let fits = cpu
        && fp32_or_bf16(kind)
        && fp32_or_bf16(parts.y1.kind())
        && read(&parts.y1, parts.y1.kind())
        && read(&parts.y2_head, kind)
        && read(&parts.low, kind)
        && residual.is_none_or(|r| read(r, kind))
        && fp32_cpu(shift)
        && fp32_cpu(&parts.weights)
        && sizes_fit(parts, shift);
    fits.then(|| {
        let weights = parts.split_weights();
        let weights = [0, 1, 2].map(|i| weights[i].contiguous());
        Operands { weights, shift: shift.contiguous() }
    })
}

/// Whether the branches are `Y1`'s batch and size, their channels `Y1`'s, the weights `(N, 2C, 1, 1)`
/// and the shift `C` values: the CRU's sizes, which the passes index by (checked, so that anything
/// else falls back to libtorch rather than out of bounds).
fn sizes_fit(parts: &FuseParts, shift: &Tensor) -> bool {
    let Ok([n, c, h, w]) = <[i64; 4]>::try_from(parts.y1.size()) else { return false };
    let (head, low) = (parts.y2_head.size(), parts.low.size());
    let same_grid = |s: &[i64]| s.len() == 4 && s[0] == n && s[2] == h && s[3] == w;
    same_grid(&head)
        && same_grid(&low)
        && head[1] + low[1] == c
        && parts.weights.size() == [n, 2 * c, 1, 1]
        && shift.numel() == c as usize
}

/// `$run::<V, Y>(args)` with `V` the branches' element type (`f32` or `Bf16`) and `Y` `Y1`'s, as
/// `$parts` holds them (after `operands`).
macro_rules! by_kinds {
    ($parts:expr, $run:ident($($arg:expr),*)) => {
        match ($parts.low.kind(), $parts.y1.kind()) {
            (Kind::BFloat16, Kind::BFloat16) => $run::<Bf16, Bf16>($($arg),*),
            (Kind::BFloat16, _) => $run::<Bf16, f32>($($arg),*),
            (_, Kind::BFloat16) => $run::<f32, Bf16>($($arg),*),
            _ => $run::<f32, f32>($($arg),*),
        }
    };
}
pub(super) use by_kinds;

/// The pass over every position of `parts`, into the tensor `store` asks for (returned).
/// SAFETY: the branches and the residual hold `V`s, `y1` holds `Y`s (fp32 unless `store` is native
/// bf16), every tensor is a dense channels-last CPU tensor of the sizes the pass reads, alive and
/// unwritten by others until it returns; the CPU has AVX2 and FMA.
unsafe fn run<V: Value, Y: Value>(
    parts: &FuseParts,
    Operands { weights: w, shift }: &Operands,
    residual: Option<&Tensor>,
    relu: bool,
    store: &Arithmetic,
) -> Option<Tensor> {
    let [n, c, h, width] = <[i64; 4]>::try_from(parts.y1.size()).ok()?;
    let (n, c, positions) = (n as usize, c as usize, (h * width) as usize);
    let reads = Reads::<V> {
        y2_head: values(&parts.y2_head),
        low: values(&parts.low),
        w: [values(&w[0]), values(&w[1]), values(&w[2])],
        shift: values(shift),
        residual: residual.map(|r| values(r)),
        channels: c,
        head: parts.y2_head.size()[1] as usize,
        relu,
    };
    // Native, `Y1` is read (a slice) and a new bf16 tensor written; else `Y1` is written in place
    // (through the task's own rows only, no shared slice of it).
    let (out, y1) = match store {
        Arithmetic::Bf16Native => {
            let strides = [h * width * c as i64, 1, width * c as i64, c as i64];
            let out = Tensor::empty_strided(parts.y1.size(), strides, (Kind::BFloat16, Device::Cpu));
            (out, values::<Y>(&parts.y1))
        }
        _ => (parts.y1.shallow_clone(), &[][..]),
    };
    let (into, in_place) =
        (SharedOut(out.data_ptr() as *mut u16), SharedOut(parts.y1.data_ptr() as *mut f32));
    let chunk = (TASK_ELEMENTS / c).max(1);
    let chunks = positions.div_ceil(chunk);
    parallel_for(n * chunks, 1, |tasks| {
        for task in tasks {
            let (sample, first) = (task / chunks, task % chunks * chunk);
            let rows = (sample * positions + first)..(sample * positions + (first + chunk).min(positions));
            let (offset, len) = (rows.start * c, rows.len() * c);
            // SAFETY: these rows of the output are this task's alone (of `y1` too where it is the
            // output); the CPU has AVX2 and FMA.
            match store {
                Arithmetic::Fp32 => positions_avx2_fma(
                    &reads,
                    sample,
                    rows,
                    InPlace::<f32>(in_place.slice(offset, len), PhantomData),
                ),
                Arithmetic::Bf16Emulated { .. } => positions_avx2_fma(
                    &reads,
                    sample,
                    rows,
                    InPlace::<Bf16Values>(in_place.slice(offset, len), PhantomData),
                ),
                Arithmetic::Bf16Native => {
                    let out = IntoBf16 { y1: &y1[offset..][..len], out: into.slice(offset, len) };
                    positions_avx2_fma(&reads, sample, rows, out)
                }
            }
        }
    });
    Some(out)
}

/// Where a stretch of the result goes, and where its `Y1` values come from.
trait Out: Sized {
    /// Its length.
    fn len(&self) -> usize;
    /// `Y1` at `i`.
    fn y1(&self, i: usize) -> f32;
    /// Stores the result at `i`.
    fn put(&mut self, i: usize, v: f32);
    /// The first `mid` elements and the rest.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// In place in `Y1`'s fp32 values, stored by `S` (fp32, or bf16 values: the emulated bf16 form).
struct InPlace<'a, S>(&'a mut [f32], PhantomData<S>);

impl<S: Store<Elem = f32>> Out for InPlace<'_, S> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn y1(&self, i: usize) -> f32 {
        self.0[i]
    }
    #[inline(always)]
    fn put(&mut self, i: usize, v: f32) {
        self.0[i] = S::put(v);
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.0.split_at_mut(mid);
        (InPlace(a, PhantomData), InPlace(b, PhantomData))
    }
}

/// Into a bf16 tensor's elements, from `Y1`'s values (the native bf16 form).
struct IntoBf16<'a, Y> {
    y1: &'a [Y],
    out: &'a mut [u16],
}

impl<Y: Value> Out for IntoBf16<'_, Y> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.out.len()
    }
    #[inline(always)]
    fn y1(&self, i: usize) -> f32 {
        self.y1[i].value()
    }
    #[inline(always)]
    fn put(&mut self, i: usize, v: f32) {
        self.out[i] = Bf16Bits::put(v);
    }
    #[inline(always)]
    fn split_at(self, mid: usize) -> (Self, Self) {
        let ((y1_a, y1_b), (out_a, out_b)) = (self.y1.split_at(mid), self.out.split_at_mut(mid));
        (IntoBf16 { y1: y1_a, out: out_a }, IntoBf16 { y1: y1_b, out: out_b })
    }
}

/// What the pass reads besides `y1`, as values: the branches and the residual channels-last, the
/// weights `(N, C | head | C - head)`, the shift `(C)`.
struct Reads<'a, V> {
    y2_head: &'a [V],
    low: &'a [V],
    w: [&'a [f32]; 3],
    shift: &'a [f32],
    residual: Option<&'a [V]>,
    channels: usize,
    head: usize,
    relu: bool,
}

/// Position rows `rows` (global indices, all of sample `sample`), written to `out` (those rows).
#[inline(always)]
fn positions<V: Value, O: Out>(r: &Reads<V>, sample: usize, rows: std::ops::Range<usize>, out: O) {
    match (r.residual.is_some(), r.relu) {
        (true, true) => positions_as::<V, O, true, true>(r, sample, rows, out),
        (true, false) => positions_as::<V, O, true, false>(r, sample, rows, out),
        (false, true) => positions_as::<V, O, false, true>(r, sample, rows, out),
        (false, false) => positions_as::<V, O, false, false>(r, sample, rows, out),
    }
}

#[inline(always)]
fn positions_as<V: Value, O: Out, const RESIDUAL: bool, const RELU: bool>(
    r: &Reads<V>,
    sample: usize,
    rows: std::ops::Range<usize>,
    mut out: O,
) {
    let (c, head) = (r.channels, r.head);
    let tail = c - head;
    let w0 = &r.w[0][sample * c..][..c];
    let (w0_head, w0_tail) = w0.split_at(head);
    let (w1, w2) = (&r.w[1][sample * head..][..head], &r.w[2][sample * tail..][..tail]);
    let (shift_head, shift_tail) = r.shift[..c].split_at(head);
    let no_residual = vec![V::ZERO; c];
    for row in rows {
        let (row_out, rest) = out.split_at(c);
        out = rest;
        let (out_head, out_tail) = row_out.split_at(head);
        let (y2, low) = (&r.y2_head[row * head..][..head], &r.low[row * tail..][..tail]);
        let residual = match (RESIDUAL, r.residual) {
            (true, Some(residual)) => &residual[row * c..][..c],
            _ => &no_residual[..],
        };
        let (res_head, res_tail) = residual.split_at(head);
        segment::<V, O, RESIDUAL, RELU>(out_head, y2, w0_head, w1, shift_head, res_head);
        segment::<V, O, RESIDUAL, RELU>(out_tail, low, w0_tail, w2, shift_tail, res_tail);
    }
}

/// One stretch of a position's channels: `relu(branch * w + y1 * w0 + shift [+ residual])`, each
/// operation rounded as libtorch's passes round it, each value stored once.
#[inline(always)]
fn segment<V: Value, O: Out, const RESIDUAL: bool, const RELU: bool>(
    mut out: O,
    branch: &[V],
    w0: &[f32],
    w: &[f32],
    shift: &[f32],
    residual: &[V],
) {
    let n = out.len();
    let (branch, w0, w, shift, residual) = (&branch[..n], &w0[..n], &w[..n], &shift[..n], &residual[..n]);
    for ch in 0..n {
        let t = weighted(out.y1(ch), w0[ch], branch[ch].value(), w[ch]);
        out.put(ch, shift_add_relu::<RESIDUAL, RELU>(t, shift[ch], residual[ch].value()));
    }
}

/// `y1 * w0 + branch * w` as libtorch's weighted sum rounds it: `y1 * w0` rounded, then the branch
/// added in one fused multiply-add (`addcmul_`).
#[inline(always)]
pub(super) fn weighted(y1: f32, w0: f32, branch: f32, w: f32) -> f32 {
    branch.mul_add(w, y1 * w0)
}

/// `relu(t + shift [+ residual])`, each addition rounded, the ReLU as libtorch's `clamp_min(0)`.
#[inline(always)]
pub(super) fn shift_add_relu<const RESIDUAL: bool, const RELU: bool>(
    t: f32,
    shift: f32,
    residual: f32,
) -> f32 {
    let mut t = t + shift;
    if RESIDUAL {
        t += residual;
    }
    if RELU {
        // libtorch's clamp_min(0): `0 > t ? 0 : t`, so NaN and -0 pass.
        t = if 0.0 > t { 0.0 } else { t };
    }
    t
}

/// `positions` built for AVX2 and FMA (elsewhere never called: `operands` refuses other CPUs).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn positions_avx2_fma<V: Value, O: Out>(
    r: &Reads<V>,
    sample: usize,
    rows: std::ops::Range<usize>,
    out: O,
) {
    positions(r, sample, rows, out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// `p`'s branches as bf16 tensors (channels-last kept), and `y1` too where `y1_too`.
    fn bf16_branches(p: &FuseParts, y1_too: bool) -> FuseParts {
        let bf16 = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let y1 = if y1_too { bf16(&p.y1) } else { copy(p).y1 };
        FuseParts { y1, y2_head: bf16(&p.y2_head), low: bf16(&p.low), weights: p.weights.shallow_clone() }
    }

    /// Bit for bit, NaN-ness for NaNs (libtorch's own NaN bits, sign included, differ by code path),
    /// signed zeros too.
    fn assert_same(out: &Tensor, expected: &Tensor, what: &str) {
        assert_eq!(out.kind(), expected.kind(), "{what}");
        assert!(is_channels_last(out), "{what}: channels-last");
        let (out, expected) = (out.to_kind(Kind::Float), expected.to_kind(Kind::Float));
        let same = out.isnan().logical_and(&expected.isnan()).logical_or(&out.eq_tensor(&expected));
        assert!(same.all().int64_value(&[]) == 1, "{what}");
        let signs = |t: &Tensor| t.signbit().logical_and(&t.isnan().logical_not()).sum(Kind::Int64);
        assert!(signs(&out).equal(&signs(&expected)), "{what}: signed zeros");
    }

    /// The one pass gives libtorch's passes' bits (weighted sum, `+= shift`, `+= residual`, `relu_`,
    /// the form's store), NaN and signed zeros included, with and without residual and ReLU, in each
    /// arithmetic: fp32; bf16 emulated (fp32 tensors, rounded); native bf16 (bf16 branches and
    /// residual, `Y1` fp32 or bf16, a bf16 output).
    #[test]
    fn one_pass_is_libtorchs_passes_bit_for_bit() {
        let fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let emulated = Arithmetic::Bf16Emulated { why: "a test".into() };
        for (n, c, head, hw) in [(2, 64, 48, 9), (3, 32, 24, 5), (1, 128, 96, 4)] {
            let shift = Tensor::randn([1, c, 1, 1], (Kind::Float, Device::Cpu));
            for (with_residual, relu) in [(true, true), (false, true), (true, false)] {
                let native = [(Arithmetic::Bf16Native, false), (Arithmetic::Bf16Native, true)];
                for (store, bf16_y1) in
                    [(Arithmetic::Fp32, false), (emulated.clone(), false)].into_iter().chain(native)
                {
                    let p = match store {
                        Arithmetic::Bf16Native => bf16_branches(&parts(n, c, head, hw), bf16_y1),
                        _ => parts(n, c, head, hw),
                    };
                    let residual = with_residual.then(|| nhwc([n, c, hw, hw]).to_kind(p.low.kind()));
                    let expected = tch::no_grad(|| {
                        let mut y = copy(&p).weighted_sum();
                        y += &shift;
                        store.store(&super::super::conv::epilogue(
                            y,
                            residual.as_ref().map(|r| r.copy()),
                            relu,
                            true,
                        ))
                    });
                    let out = tch::no_grad(|| {
                        weighted_sum_shift_add_relu(&p, &shift, residual.as_ref(), relu, &store)
                    });
                    let (name, tail) = (store.name(), if bf16_y1 { ", bf16 y1" } else { "" });
                    let what =
                        format!("{n} {c} {head} {hw} residual {with_residual} relu {relu} {name}{tail}");
                    match out {
                        Some(out) => assert_same(&out, &expected, &what),
                        None => assert!(!fma, "runs on every CPU with AVX2 and FMA: {what}"),
                    }
                }
            }
        }
    }

    /// Other layouts, sizes, kinds: left to libtorch's passes (`None`), never indexed out of bounds.
    #[test]
    fn other_layouts_are_left_to_libtorch() {
        let p = parts(2, 16, 12, 4);
        let nchw = FuseParts { y1: p.y1.contiguous(), ..copy(&p) };
        let shift = Tensor::zeros([1, 16, 1, 1], (Kind::Float, Device::Cpu));
        assert!(weighted_sum_shift_add_relu(&nchw, &shift, None, true, &Arithmetic::Fp32).is_none());
        let residual = nhwc([2, 16, 4, 4]).contiguous();
        assert!(weighted_sum_shift_add_relu(&p, &shift, Some(&residual), true, &Arithmetic::Fp32).is_none());
        let other_size = FuseParts { low: nhwc([2, 4, 3, 4]), ..copy(&p) };
        assert!(weighted_sum_shift_add_relu(&other_size, &shift, None, true, &Arithmetic::Fp32).is_none());
        let other_channels = FuseParts { low: nhwc([2, 5, 4, 4]), ..copy(&p) };
        assert!(weighted_sum_shift_add_relu(&other_channels, &shift, None, true, &Arithmetic::Fp32).is_none());
        let other_weights =
            FuseParts { weights: Tensor::rand([2, 30, 1, 1], (Kind::Float, Device::Cpu)), ..copy(&p) };
        assert!(weighted_sum_shift_add_relu(&other_weights, &shift, None, true, &Arithmetic::Fp32).is_none());
        let mixed = FuseParts { low: p.low.to_kind(Kind::BFloat16), ..copy(&p) };
        assert!(weighted_sum_shift_add_relu(&mixed, &shift, None, true, &Arithmetic::Bf16Native).is_none());
    }
}
