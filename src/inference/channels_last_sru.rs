//! The form's SRU on channels-last (NHWC) activations, the layout the prepacked convolutions around it
//! read and write fastest (docs/speed.md): two passes over `x` instead of the fast path's four.
//! 1. The GroupBatchnorm2d statistics of every group in one read: per channel, sums of `x - K` and
//!    `(x - K)^2` in f64 (`K` the group's first value, so the variance does not cancel on a large
//!    common offset), combined per group. The reference's are libtorch's fp32 `mean` and its Welford
//!    `std`: these round differently in the last bit now and then, which can move a `z` that sits at
//!    the gate's threshold (the form's differing decisions are counted, `--decisions`).
//! 2. Per element the fast path's operations (`ChannelGate`: `gn_x` and `z` in the reference's order,
//!    `z >= z_t`), the cross-reconstruction, and the CRU's two squeeze inputs written as separate
//!    channels-last tensors (no split, no copies).
//!
//! For the hard gate on the custom norm (2023-07-27, 2023-09-12/14 without `torch_gn`), as the CUDA
//! kernels; other versions keep the fast path's NCHW step.
use super::elements::{stored, Bf16Bits, Store, Stored, Value};
use super::fused_squeeze::FusedSqueezes;
use crate::config::Variant;
use crate::error::ScConvError;
use crate::fast::sru_kernel::{elements, ChannelGate, GateConstants, Normalisation, Rule, ON_GN_X, ON_X};
use crate::fast::welford::SharedOut;
use crate::fast::{rule_of, threshold};
use crate::inference::parallel_for;
use crate::sru::Sru;
use tch::{Device, Kind, Tensor};

/// Elements of `x` one task reads: enough to amortise a task, small enough for both threads.
const TASK_ELEMENTS: usize = 1 << 14;

/// The SRU's constants as the channels-last kernel reads them.
#[derive(Debug)]
pub(crate) struct ChannelsLastSru {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    w_gamma: Vec<f32>,
    /// The hard gate's calibrated `z_t` (`crate::fast::threshold`).
    threshold: f32,
    groups: usize,
    eps: f32,
    rule: Rule,
    /// The CRU's split: channels `[0, up_channel)` go to `up`, the rest to `low`.
    up_channel: usize,
}

/// A tensor's shape as (N, C, H, W) element counts.
fn dims(x: &Tensor) -> [usize; 4] {
    let size = x.size();
    [size[0], size[1], size[2], size[3]].map(|d| d as usize)
}

/// Whether the 4-d `t` is laid out as dense channels-last (NHWC): every dimension longer than one
/// has that layout's stride. A dimension of one is never stepped along, so its stride does not matter
/// (PyTorch's own check skips it too): a one-channel NCHW image, the networks' input, is channels-last
/// as it is, and the stem convolution runs it without a copy.
pub(crate) fn is_channels_last(t: &Tensor) -> bool {
    let size = t.size();
    let [_, c, h, w] = size[..] else { return false };
    let dense = [h * w * c, 1, w * c, c];
    size.iter().zip(t.stride()).zip(dense).all(|((&size, stride), dense)| size == 1 || stride == dense)
}

/// Whether `t` is an fp32 CPU tensor with dense channels-last strides: what the form's own kernels
/// and primitives read.
pub(crate) fn is_channels_last_fp32(t: &Tensor) -> bool {
    t.kind() == Kind::Float && t.device() == Device::Cpu && is_channels_last(t)
}

/// The 4-d `x` with dense channels-last strides (a copy only where it has other strides).
pub(crate) fn to_channels_last(x: &Tensor) -> Tensor {
    match is_channels_last(x) {
        true => x.shallow_clone(),
        false => x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
    }
}

/// `x` in fp32, channels-last (a copy only where it is not so already).
pub(crate) fn channels_last_fp32(x: &Tensor) -> Tensor {
    to_channels_last(&super::precision::as_fp32(x))
}

/// `x` as this kernel reads it: channels-last, in fp32 unless it is bf16 already (a copy only where
/// it is neither).
pub(crate) fn channels_last_input(x: &Tensor) -> Tensor {
    match x.kind() {
        Kind::BFloat16 => to_channels_last(x),
        _ => channels_last_fp32(x),
    }
}

/// The elements of `t` as fp32 values in its logical order (for the kernels' constants); `what` names
/// them in the error.
pub(crate) fn fp32_values(t: &Tensor, what: &str) -> Result<Vec<f32>, ScConvError> {
    Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).flatten(0, -1))
        .map_err(|e| ScConvError::InvalidInput(format!("{what}: {e}")))
}

/// An uninitialised channels-last tensor of logical shape (N, C, H, W).
pub(crate) fn empty_channels_last([n, c, h, w]: [usize; 4], kind: Kind) -> Tensor {
    let [n, c, h, w] = [n, c, h, w].map(|d| d as i64);
    Tensor::empty_strided([n, c, h, w], [h * w * c, 1, w * c, c], (kind, Device::Cpu))
}

impl ChannelsLastSru {
    /// For `sru` (an fp32 CPU module of the seed's version or 2023-09-12/14 on the custom norm);
    /// `None` for the other versions (the soft gate, `nn.GroupNorm`).
    pub(crate) fn new(sru: &Sru, up_channel: i64) -> Result<Option<ChannelsLastSru>, ScConvError> {
        if !ChannelsLastSru::covers(sru) {
            return Ok(None);
        }
        let values = |t: &Tensor| fp32_values(t, "the SRU's constants");
        let w_gamma = tch::no_grad(|| sru.w_gamma());
        Ok(Some(ChannelsLastSru {
            gamma: values(&sru.gn.gamma)?,
            beta: values(&sru.gn.beta)?,
            w_gamma: values(&w_gamma)?,
            threshold: threshold::calibrate_for(sru.gate_treshold, Device::Cpu, Kind::Float)?,
            groups: sru.gn.group_num as usize,
            eps: sru.gn.eps as f32, // the reference adds a Python float to an fp32 tensor in fp32
            rule: rule_of(sru),
            up_channel: up_channel as usize,
        }))
    }

    /// Whether this kernel computes `sru`'s version: the hard gate on the custom norm.
    pub(crate) fn covers(sru: &Sru) -> bool {
        rule_of(sru) != Rule::SoftOnX && !sru.gn.torch_gn && sru.variant != Variant::V20231019
    }

    /// The SRU of `x` (fp32 or bf16, channels-last contiguous: `channels_last_input`) as the CRU's two
    /// squeeze inputs `(up, low)`, channels-last, fp32 or (`bf16`) rounded to bf16 as libtorch's
    /// `to(bf16)` rounds; with `given` (an info mask of `x`'s shape) deciding in place of the gate.
    /// With `squeezes` (fp32 only), those inputs squeezed (`fused_squeeze`): the squeeze convolutions'
    /// outputs instead.
    ///
    /// Written into `reuse` where it holds two tensors of the sizes needed that nothing else reads
    /// meanwhile (the step's buffers of its previous forward): fresh tensors of this size cost a page
    /// fault per 4 KiB written.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        given: Option<&Tensor>,
        squeezes: Option<&FusedSqueezes>,
        reuse: Option<(Tensor, Tensor)>,
        bf16: bool,
    ) -> (Tensor, Tensor) {
        let [n, c, h, w] = dims(x);
        let gates = self.gates(x);
        let channels = match squeezes {
            Some(s) => [s.up.outputs, s.low.outputs],
            None => [self.up_channel, c - self.up_channel],
        };
        let kind = if bf16 && squeezes.is_none() { Kind::BFloat16 } else { Kind::Float };
        let sizes = channels.map(|channels| [n, channels, h, w]);
        let (up, low) = match reuse {
            Some((up, low)) if [dims(&up), dims(&low)] == sizes && [up.kind(), low.kind()] == [kind; 2] => {
                (up, low)
            }
            _ => (empty_channels_last(sizes[0], kind), empty_channels_last(sizes[1], kind)),
        };
        let given = given.map(|m| m.permute([0, 2, 3, 1]).to_kind(Kind::Uint8).contiguous());
        // SAFETY: `x`, `given`, `up` and `low` are contiguous CPU tensors of the sizes read, alive
        // until the end of this function; `up` and `low` are fresh or buffers no one reads meanwhile.
        let (xs, mask) = unsafe { (stored(x), given.as_ref().map(|m| elements::<u8>(m))) };
        let gates = GateArrays::of(&gates);
        let (mask, positions) = (mask.unwrap_or(&[]), h * w);
        let up_channel = self.up_channel;
        match xs.expect("an fp32 or bf16 input (channels_last_input)") {
            Stored::F32(xs) => {
                let rows = Rows { xs, gates, mask, channels: c, positions, up_channel };
                self.reconstruct_into(&rows, n, (&up, &low), channels, squeezes)
            }
            Stored::Bf16(xs) => {
                let rows = Rows { xs, gates, mask, channels: c, positions, up_channel };
                self.reconstruct_into(&rows, n, (&up, &low), channels, squeezes)
            }
        }
        (up, low)
    }

    /// `rows` reconstructed into `up` and `low` as their kind stores values (fp32 or bf16).
    fn reconstruct_into<X: Value>(
        &self,
        rows: &Rows<X>,
        n: usize,
        (up, low): (&Tensor, &Tensor),
        channels: [usize; 2],
        squeezes: Option<&FusedSqueezes>,
    ) {
        match up.kind() {
            Kind::BFloat16 => {
                let out = Outputs::<Bf16Bits> {
                    up: SharedOut(up.data_ptr() as *mut u16),
                    low: SharedOut(low.data_ptr() as *mut u16),
                    channels,
                    squeezes: None,
                };
                self.reconstruct_by_rule(rows, n, &out)
            }
            _ => {
                let out = Outputs::<f32> {
                    up: SharedOut(up.data_ptr() as *mut f32),
                    low: SharedOut(low.data_ptr() as *mut f32),
                    channels,
                    squeezes,
                };
                self.reconstruct_by_rule(rows, n, &out)
            }
        }
    }

    fn reconstruct_by_rule<X: Value, S: Store>(&self, rows: &Rows<X>, n: usize, out: &Outputs<S>)
    where
        S::Elem: Send,
    {
        match (self.rule == Rule::MasksOnGnX, !rows.mask.is_empty()) {
            (false, false) => rows.reconstruct::<S, ON_X, false>(n, out),
            (true, false) => rows.reconstruct::<S, ON_GN_X, false>(n, out),
            (false, true) => rows.reconstruct::<S, ON_X, true>(n, out),
            (true, true) => rows.reconstruct::<S, ON_GN_X, true>(n, out),
        }
    }

    /// The informative mask this kernel decides on `x` (bool, `x`'s logical shape).
    pub(crate) fn info_mask(&self, x: &Tensor) -> Tensor {
        let [n, c, h, w] = dims(x);
        let gates = self.gates(x);
        let decide = |i: usize, v: f32| {
            let (sample, channel) = (i / (h * w * c), i % c);
            gates[sample * c + channel].informative(self.rule, false, v, 0.0) as u8
        };
        // SAFETY: as in `forward`, for reading only.
        let mask: Vec<u8> = match unsafe { stored(x) }.expect("an fp32 or bf16 input") {
            Stored::F32(xs) => xs.iter().enumerate().map(|(i, v)| decide(i, v.value())).collect(),
            Stored::Bf16(xs) => xs.iter().enumerate().map(|(i, v)| decide(i, v.value())).collect(),
        };
        let [n, c, h, w] = [n, c, h, w].map(|d| d as i64);
        Tensor::from_slice(&mask).view([n, h, w, c]).permute([0, 3, 1, 2]).to_kind(Kind::Bool)
    }

    /// Every (sample, channel)'s gate from this `x`'s statistics.
    fn gates(&self, x: &Tensor) -> Vec<ChannelGate> {
        let [n, c, h, w] = dims(x);
        // SAFETY: as in `forward`, for reading only.
        let (mean, denom) = match unsafe { stored(x) }.expect("an fp32 or bf16 input") {
            Stored::F32(xs) => self.statistics(xs, n, c, h * w),
            Stored::Bf16(xs) => self.statistics(xs, n, c, h * w),
        };
        let constants = GateConstants {
            w_gamma: self.w_gamma.clone(),
            threshold: self.threshold,
            norm: Some(Normalisation {
                mean,
                denom,
                gamma: self.gamma.clone(),
                beta: self.beta.clone(),
                group_num: self.groups,
            }),
        };
        (0..n * c).map(|i| ChannelGate::new(&constants, i / c, i % c, c)).collect()
    }

    /// `mean` and `std + eps` (unbiased, as the reference's `std`) of each (sample, group), row-major
    /// `(N, G)`, from channels-last `xs`.
    fn statistics<X: Value>(&self, xs: &[X], n: usize, c: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let (groups, per_group) = (self.groups, c / self.groups);
        // The shift of every channel: its group's first value in the sample.
        let shift: Vec<f64> = (0..n * c)
            .map(|i| f64::from(xs[(i / c) * positions * c + (i % c) / per_group * per_group].value()))
            .collect();
        let chunk = (TASK_ELEMENTS / c).max(1);
        let chunks = positions.div_ceil(chunk);
        // Per task (sample, chunk of positions): each channel's shifted sum and sum of squares.
        let mut partial = vec![0.0f64; n * chunks * 2 * c];
        let out = SharedOut(partial.as_mut_ptr());
        parallel_for(n * chunks, 1, |tasks| {
            for task in tasks {
                let (sample, first) = (task / chunks, task % chunks * chunk);
                let last = (first + chunk).min(positions);
                // SAFETY: task `task` alone writes its 2c sums, inside `partial`, which outlives the call.
                let sums = unsafe { out.slice(task * 2 * c, 2 * c) };
                let rows = &xs[(sample * positions + first) * c..(sample * positions + last) * c];
                let shift = &shift[sample * c..][..c];
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: the CPU has AVX2.
                    unsafe { shifted_sums_avx2(rows, shift, sums) };
                    continue;
                }
                shifted_sums(rows, shift, sums);
            }
        });
        let count = (positions * per_group) as f64;
        let (mut mean, mut denom) = (Vec::with_capacity(n * groups), Vec::with_capacity(n * groups));
        for sample in 0..n {
            for group in 0..groups {
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for chunk in 0..chunks {
                    let sums = &partial[(sample * chunks + chunk) * 2 * c..][..2 * c];
                    s1 += sums[group * per_group..][..per_group].iter().sum::<f64>();
                    s2 += sums[c + group * per_group..][..per_group].iter().sum::<f64>();
                }
                let k = shift[sample * c + group * per_group];
                let variance = ((s2 - s1 * s1 / count) / (count - 1.0)).max(0.0);
                mean.push((k + s1 / count) as f32);
                denom.push(variance.sqrt() as f32 + self.eps);
            }
        }
        (mean, denom)
    }
}

/// Every (sample, channel)'s gate constants, one array per field (so that the channel loop
/// vectorises), row-major `(N, C)`.
struct GateArrays {
    mean: Vec<f32>,
    denom: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    w_gamma: Vec<f32>,
    threshold: f32,
}

impl GateArrays {
    fn of(gates: &[ChannelGate]) -> GateArrays {
        let field = |f: fn(&ChannelGate) -> f32| gates.iter().map(f).collect();
        GateArrays {
            mean: field(|g| g.mean),
            denom: field(|g| g.denom),
            gamma: field(|g| g.gamma),
            beta: field(|g| g.beta),
            w_gamma: field(|g| g.w_gamma),
            threshold: gates.first().map_or(0.0, |g| g.threshold),
        }
    }

    /// Channels `[from, from + len)` of sample row `at` (= sample * C) as gates, by index.
    fn slice(&self, at: usize, len: usize) -> GateSlice<'_> {
        GateSlice {
            mean: &self.mean[at..][..len],
            denom: &self.denom[at..][..len],
            gamma: &self.gamma[at..][..len],
            beta: &self.beta[at..][..len],
            w_gamma: &self.w_gamma[at..][..len],
            threshold: self.threshold,
        }
    }
}

/// A run of channels' gates, field by field: `GateSlice`, a sample's channels; `GateBlock`, `LANES` of
/// them as fixed-size arrays (so the gate pass's lanes are registers).
struct Gates<T> {
    mean: T,
    denom: T,
    gamma: T,
    beta: T,
    w_gamma: T,
    threshold: f32,
}

type GateSlice<'a> = Gates<&'a [f32]>;
type GateBlock<'a> = Gates<&'a [f32; LANES]>;

impl<T: Copy + AsRef<[f32]>> Gates<T> {
    #[inline(always)]
    fn gate(&self, i: usize) -> ChannelGate {
        let at = |field: T| field.as_ref()[i];
        ChannelGate {
            mean: at(self.mean),
            denom: at(self.denom),
            gamma: at(self.gamma),
            beta: at(self.beta),
            w_gamma: at(self.w_gamma),
            threshold: self.threshold,
        }
    }
}

impl<'a> GateSlice<'a> {
    /// The gates of channels `[ch, ch + LANES)`.
    #[inline(always)]
    fn block(&self, ch: usize) -> GateBlock<'a> {
        let lanes = |v: &'a [f32]| lanes(v, ch);
        Gates {
            mean: lanes(self.mean),
            denom: lanes(self.denom),
            gamma: lanes(self.gamma),
            beta: lanes(self.beta),
            w_gamma: lanes(self.w_gamma),
            threshold: self.threshold,
        }
    }
}

/// The gate pass's inputs: channels-last `xs`, the gates, and the given decisions (`GIVEN`).
struct Rows<'a, X> {
    xs: &'a [X],
    gates: GateArrays,
    mask: &'a [u8],
    channels: usize,
    positions: usize,
    up_channel: usize,
}

/// Where the gate pass writes: `up` and `low` (channels-last, `channels` each a position, stored by
/// `S`), squeezed by `squeezes` where given (fp32 only).
struct Outputs<'a, S: Store> {
    up: SharedOut<S::Elem>,
    low: SharedOut<S::Elem>,
    channels: [usize; 2],
    squeezes: Option<&'a FusedSqueezes>,
}

/// Values of the reconstructed rows the fused squeezes hold at once (16 KiB, so that they stay in L1
/// while each block of outputs passes over them). Alternated in one process against 64 KiB on an
/// AVX-512 Xeon (docs/speed.md): the step 0.94-0.97x the time at 64@56, 0.96x at 128@28, level at the
/// other shapes.
const SQUEEZE_SCRATCH: usize = 1 << 12;

impl<X: Value> Rows<'_, X> {
    /// `[x_11 + x_22, x_12 + x_21]` at every position, written as `up` (the first `up_channel`
    /// channels) and `low` (the rest), or squeezed (`out.squeezes`): `(x_1, x_2)` of each element by
    /// `RULE`'s gate, or by the decision `mask` gives (`GIVEN`). Tasks are (sample, chunk of
    /// positions), on libtorch's threads.
    fn reconstruct<S: Store, const RULE: u8, const GIVEN: bool>(&self, n: usize, out: &Outputs<S>)
    where
        S::Elem: Send,
    {
        let (c, positions) = (self.channels, self.positions);
        let chunk = (TASK_ELEMENTS / c).max(1);
        let chunks = positions.div_ceil(chunk);
        parallel_for(n * chunks, 1, |tasks| {
            for task in tasks {
                let (sample, first) = (task / chunks, task % chunks * chunk);
                let last = (first + chunk).min(positions);
                let (from, to) = (sample * positions + first, sample * positions + last);
                // SAFETY: positions [from, to) are written by this task alone, inside `up` and `low`
                // (N * positions rows of `channels` values each, alive for the call).
                let (up, low) = unsafe {
                    let [up, low] = out.channels;
                    (out.up.slice(from * up, (to - from) * up), out.low.slice(from * low, (to - from) * low))
                };
                match out.squeezes {
                    Some(squeezes) => {
                        let fp32 = (S::as_fp32(up), S::as_fp32(low));
                        let (Some(up), Some(low)) = fp32 else { unreachable!("fused squeezes write fp32") };
                        self.rows_squeezed::<RULE, GIVEN>(sample, from, to, squeezes, up, low)
                    }
                    None => self.rows_into::<S, RULE, GIVEN>(sample, from, to, up, low),
                }
            }
        });
    }

    /// Positions `[from, to)` of sample `sample` into `up` and `low` (their rows).
    fn rows_into<S: Store, const RULE: u8, const GIVEN: bool>(
        &self,
        sample: usize,
        from: usize,
        to: usize,
        up: &mut [S::Elem],
        low: &mut [S::Elem],
    ) {
        let (c, half) = (self.channels, self.channels / 2);
        let halves = (self.gates.slice(sample * c, half), self.gates.slice(sample * c + half, half));
        let xs = &self.xs[from * c..to * c];
        let mask = if GIVEN { &self.mask[from * c..to * c] } else { &[][..] };
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { reconstruct_rows_avx2::<X, S, RULE, GIVEN>(xs, mask, &halves, up, low) };
        }
        reconstruct_rows::<X, S, RULE, GIVEN>(xs, mask, &halves, up, low);
    }

    /// As `rows_into`, a few positions at a time into a scratch that stays in the cache, squeezed from
    /// there into `up` and `low` (the squeezed rows).
    fn rows_squeezed<const RULE: u8, const GIVEN: bool>(
        &self,
        sample: usize,
        from: usize,
        to: usize,
        squeezes: &FusedSqueezes,
        up: &mut [f32],
        low: &mut [f32],
    ) {
        let (c, cup) = (self.channels, self.up_channel);
        let step = (SQUEEZE_SCRATCH / c).max(1);
        let mut scratch = vec![0.0f32; step.min(to - from) * c];
        let [s_up, s_low] = [squeezes.up.outputs, squeezes.low.outputs];
        for start in (from..to).step_by(step) {
            let end = (start + step).min(to);
            let rows = end - start;
            let (rows_up, rows_low) = scratch[..rows * c].split_at_mut(rows * cup);
            self.rows_into::<f32, RULE, GIVEN>(sample, start, end, rows_up, rows_low);
            let at = start - from;
            squeezes.up.apply(rows_up, &mut up[at * s_up..][..rows * s_up]);
            squeezes.low.apply(rows_low, &mut low[at * s_low..][..rows * s_low]);
        }
    }
}

/// Whether this CPU runs the AVX2 builds of the loops: 8 lanes instead of the baseline's 4, the same
/// operations in the same order, so the same bits (Rust never contracts into fused multiply-adds).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Each channel's sums of `x - shift` and `(x - shift)^2` over channels-last `rows`, added into
/// `sums` (`[s1; c]` then `[s2; c]`).
#[inline(always)]
fn shifted_sums<X: Value>(rows: &[X], shift: &[f64], sums: &mut [f64]) {
    let c = shift.len();
    let (s1, s2) = sums.split_at_mut(c);
    let (s1, s2) = (&mut s1[..c], &mut s2[..c]);
    for row in rows.chunks_exact(c) {
        for ch in 0..c {
            let d = f64::from(row[ch].value()) - shift[ch];
            s1[ch] += d;
            s2[ch] += d * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn shifted_sums_avx2<X: Value>(rows: &[X], shift: &[f64], sums: &mut [f64]) {
    shifted_sums(rows, shift, sums)
}

/// The SRU of channels-last `xs` (whole positions), `(lo, hi)` the gates of the two halves of the
/// channels: `[x_11 + x_22, x_12 + x_21]` at each position, its first `up.len() / positions` channels
/// into `up`, the rest into `low`.
#[inline(always)]
fn reconstruct_rows<X: Value, S: Store, const RULE: u8, const GIVEN: bool>(
    xs: &[X],
    mask: &[u8],
    (lo, hi): &(GateSlice, GateSlice),
    up: &mut [S::Elem],
    low: &mut [S::Elem],
) {
    let half = lo.mean.len();
    let c = 2 * half;
    let positions = xs.len() / c;
    let cup = up.len() / positions.max(1);
    if cup == half && !GIVEN {
        return reconstruct_blocks::<X, S, RULE>(xs, lo, hi, up, low);
    }
    if cup == half {
        // The CRU splits where the reconstruction does (alpha = 1/2, the default): straight into both.
        for p in 0..positions {
            reconstruct_row::<X, S, RULE, GIVEN>(
                &xs[p * c..][..c],
                mask_row(mask, p, c),
                (lo, hi),
                &mut up[p * half..][..half],
                &mut low[p * half..][..half],
            );
        }
        return;
    }
    let mut row_out = vec![0.0f32; c];
    for p in 0..positions {
        let (out_lo, out_hi) = row_out.split_at_mut(half);
        reconstruct_row::<X, f32, RULE, GIVEN>(
            &xs[p * c..][..c],
            mask_row(mask, p, c),
            (lo, hi),
            out_lo,
            out_hi,
        );
        let (row_up, row_low) = row_out.split_at(cup);
        for (o, &v) in up[p * cup..][..cup].iter_mut().zip(row_up) {
            *o = S::put(v);
        }
        for (o, &v) in low[p * (c - cup)..][..c - cup].iter_mut().zip(row_low) {
            *o = S::put(v);
        }
    }
}

/// Position `p`'s decisions, where given (`GIVEN`; else `mask` is empty).
#[inline(always)]
fn mask_row(mask: &[u8], p: usize, c: usize) -> &[u8] {
    mask.get(p * c..(p + 1) * c).unwrap_or(&[])
}

/// One position: channels-last `x` (C values), its output channels `[0, C/2)` into `out_lo` and
/// `[C/2, C)` into `out_hi`. (A function, not a closure: closures do not inherit `target_feature`.)
#[inline(always)]
fn reconstruct_row<X: Value, S: Store, const RULE: u8, const GIVEN: bool>(
    x: &[X],
    mask: &[u8],
    (lo, hi): (&GateSlice, &GateSlice),
    out_lo: &mut [S::Elem],
    out_hi: &mut [S::Elem],
) {
    let half = lo.mean.len();
    let (x_lo, x_hi) = (&x[..half], &x[half..][..half]);
    let (out_lo, out_hi) = (&mut out_lo[..half], &mut out_hi[..half]);
    if GIVEN {
        let (m_lo, m_hi) = (&mask[..half], &mask[half..][..half]);
        for ch in 0..half {
            let (kept_a, passed_a) = lo.gate(ch).parts_decided::<RULE>(x_lo[ch].value(), m_lo[ch] != 0);
            let (kept_b, passed_b) = hi.gate(ch).parts_decided::<RULE>(x_hi[ch].value(), m_hi[ch] != 0);
            out_lo[ch] = S::put(kept_a + passed_b);
            out_hi[ch] = S::put(kept_b + passed_a);
        }
    } else {
        for ch in 0..half {
            let (kept_a, passed_a) = lo.gate(ch).parts::<RULE, false>(x_lo[ch].value(), 0.0);
            let (kept_b, passed_b) = hi.gate(ch).parts::<RULE, false>(x_hi[ch].value(), 0.0);
            out_lo[ch] = S::put(kept_a + passed_b);
            out_hi[ch] = S::put(kept_b + passed_a);
        }
    }
}

/// The gate pass where the CRU splits where the reconstruction does and no decisions are given, block
/// by block: each `LANES` channels' gates are loaded once, then every position's `LANES` values run
/// through them as fixed-size arrays (one register each). Row by row, a row of 64@56 has only 32
/// channels a half, and each row paid the loops' set-up: 1.17 -> ~0.6 ms there, batch 8. The same
/// operations per element as `reconstruct_row`, so the same bits.
#[inline(always)]
fn reconstruct_blocks<X: Value, S: Store, const RULE: u8>(
    xs: &[X],
    lo: &GateSlice,
    hi: &GateSlice,
    up: &mut [S::Elem],
    low: &mut [S::Elem],
) {
    let half = lo.mean.len();
    let c = 2 * half;
    let positions = xs.len() / c;
    let blocks = half / LANES * LANES;
    for ch in (0..blocks).step_by(LANES) {
        let (ga, gb) = (lo.block(ch), hi.block(ch));
        for p in 0..positions {
            let row = &xs[p * c..][..c];
            let (a, b) = (lanes(row, ch), lanes(row, half + ch));
            let (y_lo, y_hi): (&mut [S::Elem; LANES], &mut [S::Elem; LANES]) =
                (lanes_mut(up, p * half + ch), lanes_mut(low, p * half + ch));
            for i in 0..LANES {
                let (kept_a, passed_a) = ga.gate(i).parts::<RULE, false>(a[i].value(), 0.0);
                let (kept_b, passed_b) = gb.gate(i).parts::<RULE, false>(b[i].value(), 0.0);
                y_lo[i] = S::put(kept_a + passed_b);
                y_hi[i] = S::put(kept_b + passed_a);
            }
        }
    }
    if blocks == half {
        return;
    }
    for p in 0..positions {
        let row = &xs[p * c..][..c];
        for ch in blocks..half {
            let (kept_a, passed_a) = lo.gate(ch).parts::<RULE, false>(row[ch].value(), 0.0);
            let (kept_b, passed_b) = hi.gate(ch).parts::<RULE, false>(row[half + ch].value(), 0.0);
            up[p * half + ch] = S::put(kept_a + passed_b);
            low[p * half + ch] = S::put(kept_b + passed_a);
        }
    }
}

/// Channels a block of the gate pass: one AVX2 register of fp32.
const LANES: usize = 8;

/// `v[from..from + LANES]` as an array.
#[inline(always)]
fn lanes<T>(v: &[T], from: usize) -> &[T; LANES] {
    v[from..][..LANES].try_into().expect("a block")
}

/// `v[from..from + LANES]` as a mutable array.
#[inline(always)]
fn lanes_mut<T>(v: &mut [T], from: usize) -> &mut [T; LANES] {
    (&mut v[from..][..LANES]).try_into().expect("a block")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn reconstruct_rows_avx2<X: Value, S: Store, const RULE: u8, const GIVEN: bool>(
    xs: &[X],
    mask: &[u8],
    halves: &(GateSlice, GateSlice),
    up: &mut [S::Elem],
    low: &mut [S::Elem],
) {
    reconstruct_rows::<X, S, RULE, GIVEN>(xs, mask, halves, up, low)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scconv, ScConvConfig};
    use tch::nn::VarStore;

    /// An SRU of `config` with trained-like affine parameters, and its channels-last kernel.
    fn sru_and_kernel(config: &ScConvConfig) -> (VarStore, crate::ScConv, ChannelsLastSru) {
        let vs = VarStore::new(Device::Cpu);
        let mut model = scconv(vs.root(), config).unwrap();
        tch::no_grad(|| {
            model.SRU.gn.beta.copy_(&(Tensor::randn_like(&model.SRU.gn.beta) * 0.1));
            model.SRU.gn.gamma.copy_(&Tensor::randn_like(&model.SRU.gn.gamma));
        });
        let kernel = ChannelsLastSru::new(&model.SRU, config.up_channel()).unwrap().unwrap();
        (vs, model, kernel)
    }

    #[test]
    fn a_dimension_of_one_has_no_stride_that_matters() {
        let opts = (Kind::Float, Device::Cpu);
        // A one-channel NCHW image is laid out as channels-last; a many-channel one is not.
        assert!(is_channels_last(&Tensor::zeros([2, 1, 5, 6], opts)));
        assert!(!is_channels_last(&Tensor::zeros([2, 3, 5, 6], opts)));
        assert!(is_channels_last(&to_channels_last(&Tensor::zeros([2, 3, 5, 6], opts))));
        // A batch of one, whatever its stride.
        let one = Tensor::zeros([90], opts).as_strided([1, 3, 5, 6], [7, 1, 18, 3], None);
        assert!(is_channels_last(&one));
        // A dimension longer than one with another stride is not: channels or rows padded.
        let nhwc = |n, h, w, c| Tensor::zeros([n, h, w, c], opts).permute([0, 3, 1, 2]);
        assert!(is_channels_last(&nhwc(1, 2, 5, 8)));
        assert!(!is_channels_last(&nhwc(1, 2, 5, 8).narrow(1, 0, 3)));
        assert!(!is_channels_last(&nhwc(1, 4, 4, 2).narrow(3, 0, 3)));
    }

    fn configs() -> Vec<ScConvConfig> {
        vec![
            ScConvConfig::new(64),
            ScConvConfig { group_num: 4, ..ScConvConfig::new(32) },
            ScConvConfig::for_variant(32, Variant::V20230912),
            // 20 channels a half: two blocks of eight and a remainder in the gate pass.
            ScConvConfig { group_num: 4, ..ScConvConfig::new(40) },
        ]
    }

    /// The shifted f64 sums give the reference's statistics to fp32 rounding, also on a large common
    /// offset (where plain sums of squares cancel).
    #[test]
    fn statistics_are_the_references_to_rounding() {
        for offset in [0.0, 1000.0] {
            let config = ScConvConfig::new(64);
            let (_vs, model, kernel) = sru_and_kernel(&config);
            let x = Tensor::randn([3, 64, 9, 7], (Kind::Float, Device::Cpu)) * 2.5 + offset;
            let grouped = x.view([3, 16, -1]);
            let mean = Vec::<f32>::try_from(grouped.mean_dim(2, false, None).flatten(0, -1)).unwrap();
            let std = Vec::<f32>::try_from(grouped.std_dim(2, true, false).flatten(0, -1)).unwrap();
            let xs = channels_last_fp32(&x);
            // SAFETY: `xs` is a contiguous fp32 CPU tensor alive for the call.
            let (ours_mean, ours_denom) = kernel.statistics(unsafe { elements::<f32>(&xs) }, 3, 64, 63);
            let eps = model.SRU.gn.eps as f32;
            for i in 0..mean.len() {
                let close = |a: f32, b: f32| (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1.0);
                assert!(
                    close(ours_mean[i], mean[i]),
                    "offset {offset}: mean {} vs {}",
                    ours_mean[i],
                    mean[i]
                );
                assert!(
                    close(ours_denom[i], std[i] + eps),
                    "offset {offset}: std {} vs {}",
                    ours_denom[i],
                    std[i]
                );
            }
        }
    }

    /// With the reference's decisions given, `(up, low)` is the reference SRU's output split at
    /// `up_channel`: bit for bit where the masks multiply `x` (no statistic reaches the output), to
    /// fp32 rounding where they multiply `gn_x`.
    #[test]
    fn with_the_references_decisions_it_is_the_reference_sru() {
        for config in configs() {
            let (_vs, model, kernel) = sru_and_kernel(&config);
            let x = Tensor::randn([2, config.op_channel, 11, 6], (Kind::Float, Device::Cpu));
            let decisions = tch::no_grad(|| model.SRU.gate(&x).decisions);
            let reference = tch::no_grad(|| model.SRU.forward_with_decisions(&x, &decisions));
            let (up, low) =
                kernel.forward(&channels_last_fp32(&x), Some(&decisions.info_mask), None, None, false);
            let split = reference.split_with_sizes([config.up_channel(), config.low_channel()], 1);
            for (ours, theirs) in [(&up, &split[0]), (&low, &split[1])] {
                let diff = (ours - theirs).abs().max().double_value(&[]);
                match config.variant {
                    Variant::V20230727 => assert!(ours.equal(theirs), "{config:?}: off by {diff}"),
                    _ => assert!(diff <= 1e-5 * theirs.abs().max().double_value(&[]), "{config:?}: {diff}"),
                }
            }
            assert_eq!(
                up.stride(),
                [11 * 6 * config.up_channel(), 1, 6 * config.up_channel(), config.up_channel()]
            );
        }
    }

    /// Its own decisions: what `info_mask` reports is what `forward` applies, and they differ from the
    /// reference's only where `z` lies within rounding of the threshold (none on these inputs).
    #[test]
    fn its_decisions_are_the_ones_it_reports_and_the_references() {
        for config in configs() {
            let (_vs, model, kernel) = sru_and_kernel(&config);
            let x = channels_last_fp32(&Tensor::randn(
                [2, config.op_channel, 10, 10],
                (Kind::Float, Device::Cpu),
            ));
            let mask = kernel.info_mask(&x);
            let reference = tch::no_grad(|| model.SRU.gate(&x.contiguous()).decisions.info_mask);
            assert!(mask.equal(&reference), "{config:?}");
            let (up, low) = kernel.forward(&x, None, None, None, false);
            let (given_up, given_low) =
                kernel.forward(&x, Some(&mask), None, Some((up.empty_like(), low.empty_like())), false);
            assert!(up.equal(&given_up) && low.equal(&given_low), "{config:?}");
        }
    }

    /// With the squeezes fused, its outputs are the squeeze kernel's on the rows it writes without
    /// them, bit for bit, its own decisions or given ones, reusing buffers or not.
    #[test]
    fn the_fused_squeezes_squeeze_the_rows_it_writes() {
        for config in configs() {
            let (_vs, model, kernel) = sru_and_kernel(&config);
            let cru = &model.CRU;
            let inputs = [config.up_channel(), config.low_channel()];
            let squeezes = FusedSqueezes::new([&cru.squeeze1, &cru.squeeze2], inputs).unwrap().unwrap();
            // 23 x 13 positions: the last task of each sample and its scratch's last step are partial.
            let x = channels_last_fp32(&Tensor::randn(
                [2, config.op_channel, 23, 13],
                (Kind::Float, Device::Cpu),
            ));
            let mask = kernel.info_mask(&x);
            for given in [None, Some(&mask)] {
                let (up, low) = kernel.forward(&x, given, None, None, false);
                let squeezed = kernel.forward(&x, given, Some(&squeezes), None, false);
                let reused = kernel.forward(
                    &x,
                    given,
                    Some(&squeezes),
                    Some((squeezed.0.zeros_like(), squeezed.1.zeros_like())),
                    false,
                );
                for (rows, kernel, ours, again) in [
                    (&up, &squeezes.up, &squeezed.0, &reused.0),
                    (&low, &squeezes.low, &squeezed.1, &reused.1),
                ] {
                    let [n, _, h, w] = dims(rows);
                    // SAFETY: `rows` is a contiguous fp32 CPU tensor, alive for the call.
                    let mut expected = vec![0.0f32; n * h * w * kernel.outputs];
                    kernel.apply(unsafe { elements(rows) }, &mut expected);
                    assert_eq!(dims(ours), [n, kernel.outputs, h, w]);
                    assert!(is_channels_last(ours) && is_channels_last(again));
                    // SAFETY: as above.
                    assert_eq!(unsafe { elements::<f32>(ours) }, &expected[..], "{config:?}");
                    assert!(ours.equal(again), "{config:?}");
                }
            }
        }
    }

    /// A bf16 `x` (the native bf16 form's) is read exactly and a bf16 output is the fp32 output rounded
    /// as libtorch's `to(bf16)` rounds it: bit for bit what the fp32 kernel does on `x`'s fp32 copy
    /// followed by the squeeze convolutions' cast, the same decisions, with and without given ones,
    /// into reused buffers of either kind too.
    #[test]
    fn bf16_in_and_out_is_the_fp32_kernel_on_the_same_values() {
        // Also a split off the halves (alpha 1/4): the row-by-row copy into `up` and `low`.
        let quarter = ScConvConfig { alpha: 0.25, ..ScConvConfig::new(32) };
        for config in configs().into_iter().chain([quarter]) {
            let (_vs, _model, kernel) = sru_and_kernel(&config);
            let x = Tensor::randn([2, config.op_channel, 9, 7], (Kind::Float, Device::Cpu)) * 3.0;
            let bf16 = channels_last_input(&x.to_kind(Kind::BFloat16));
            assert_eq!(bf16.kind(), Kind::BFloat16);
            let fp32 = channels_last_fp32(&bf16);
            let mask = kernel.info_mask(&fp32);
            assert!(kernel.info_mask(&bf16).equal(&mask), "{config:?}: the same decisions");
            for given in [None, Some(&mask)] {
                let (up, low) = kernel.forward(&fp32, given, None, None, false);
                for out_bf16 in [false, true] {
                    let reuse = kernel.forward(&fp32, None, None, None, !out_bf16);
                    for reuse in [None, Some(reuse)] {
                        let (ours_up, ours_low) = kernel.forward(&bf16, given, None, reuse, out_bf16);
                        for (ours, theirs) in [(&ours_up, &up), (&ours_low, &low)] {
                            let expected =
                                if out_bf16 { theirs.to_kind(Kind::BFloat16) } else { theirs.copy() };
                            assert_eq!(ours.kind(), expected.kind(), "{config:?}");
                            assert!(is_channels_last(ours), "{config:?}");
                            assert!(ours.equal(&expected), "{config:?}, bf16 out {out_bf16}");
                        }
                    }
                }
            }
        }
    }

    /// The baseline and AVX2 builds of both loops give the same bits (40 channels: two blocks of 8 in
    /// each half and a remainder of 4).
    #[test]
    fn every_build_gives_the_same_bits() {
        let config = ScConvConfig { group_num: 4, ..ScConvConfig::new(40) };
        let (_vs, _model, kernel) = sru_and_kernel(&config);
        let (c, half, positions) = (40, 20, 57);
        let x = channels_last_fp32(&Tensor::randn([1, 40, 3, 19], (Kind::Float, Device::Cpu)));
        // SAFETY: `x` is a contiguous fp32 CPU tensor alive for the test.
        let xs = unsafe { elements::<f32>(&x) };
        let shift: Vec<f64> = xs[..c].iter().map(|&v| f64::from(v) - 0.25).collect();
        let sums = |f: &dyn Fn(&mut [f64])| {
            let mut sums = vec![0.0; 2 * c];
            f(&mut sums);
            sums
        };
        let gates = GateArrays::of(&kernel.gates(&x));
        let halves = (gates.slice(0, half), gates.slice(half, half));
        let rows = |f: &dyn Fn(&mut [f32], &mut [f32])| {
            let (mut up, mut low) = (vec![f32::NAN; positions * half], vec![f32::NAN; positions * half]);
            f(&mut up, &mut low);
            (up, low)
        };
        let baseline_sums = sums(&|s| shifted_sums(xs, &shift, s));
        let on_x = rows(&|u, l| reconstruct_rows::<f32, f32, ON_X, false>(xs, &[], &halves, u, l));
        let on_gn_x = rows(&|u, l| reconstruct_rows::<f32, f32, ON_GN_X, false>(xs, &[], &halves, u, l));
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (each call): only where the CPU has AVX2.
            if avx2() {
                assert_eq!(baseline_sums, sums(&|s| unsafe { shifted_sums_avx2(xs, &shift, s) }));
                let build = |u: &mut [f32], l: &mut [f32]| unsafe {
                    reconstruct_rows_avx2::<f32, f32, ON_X, false>(xs, &[], &halves, u, l)
                };
                assert_eq!(on_x, rows(&build));
                let build = |u: &mut [f32], l: &mut [f32]| unsafe {
                    reconstruct_rows_avx2::<f32, f32, ON_GN_X, false>(xs, &[], &halves, u, l)
                };
                assert_eq!(on_gn_x, rows(&build));
            }
        }
    }

    #[test]
    fn the_soft_gate_and_torch_gn_are_not_covered() {
        for config in [
            ScConvConfig::for_variant(32, Variant::V20231019),
            ScConvConfig { torch_gn: true, ..ScConvConfig::for_variant(32, Variant::V20230912) },
        ] {
            let vs = VarStore::new(Device::Cpu);
            let model = scconv(vs.root(), &config).unwrap();
            assert!(ChannelsLastSru::new(&model.SRU, config.up_channel()).unwrap().is_none(), "{config:?}");
        }
    }
}
