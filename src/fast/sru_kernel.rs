//! The SRU after its statistics, as one pass over `x` on the CPU: per element the reference's fp32
//! operations give `gn_x` and `z` (same operations, same order, so the same bits), the gate decides,
//! and the cross-reconstruction writes both output halves. The reference makes about twelve passes
//! (sub, div, mul, add, mul, sigmoid, two comparisons, two mask products, two adds, a cat).
//!
//! Every published version is one rule per element (`Rule`): the hard masks on `x` (2023-07-27) or on
//! `gn_x` (2023-09-12/14), with `gn_x` computed here from the statistics (`GroupBatchnorm2d`) or given
//! by libtorch's `group_norm` (`torch_gn`); or the soft gate of 2023-10-19, which weighs `x` with the
//! sigmoid's own value and so reads `r = sigmoid(z)` as libtorch computed it (see `FastPath`).
use super::welford::SharedOut;
use tch::{Device, Kind, Tensor};

/// The custom GroupBatchnorm2d's statistics and affine, as plain fp32 values.
pub struct Normalisation {
    /// `mean` and `std + eps` of each (sample, group), row-major `(N, G)`.
    pub mean: Vec<f32>,
    pub denom: Vec<f32>,
    /// Per channel: the GroupBatchnorm2d affine.
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub group_num: usize,
}

/// What the gate needs per channel, as plain fp32 values.
pub struct GateConstants {
    /// `w_gamma` per channel.
    pub w_gamma: Vec<f32>,
    /// The hard gate's calibrated threshold (informative exactly when `z >= z_t`), or the soft gate's
    /// `gate_treshold` as fp32 (informative exactly when `r > t`, as libtorch compares in fp32).
    pub threshold: f32,
    /// The statistics when `gn_x` is computed here; `None` when libtorch's `group_norm` gives it.
    pub norm: Option<Normalisation>,
}

/// The element rule of a version: what the gate reads and what its masks multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Hard masks from `z >= z_t`, multiplying `x` (2023-07-27).
    MasksOnX,
    /// Hard masks from `z >= z_t`, multiplying `gn_x` (2023-09-12, 2023-09-14).
    MasksOnGnX,
    /// The soft gate on `x` from `r = sigmoid(z)`: `w1 = where(r > t, 1, r)`, `w2 = where(r > t, 0, r)`.
    SoftOnX,
}

/// One channel of one sample: its statistics, affine, `w_gamma` and threshold.
#[derive(Clone, Copy)]
pub(crate) struct ChannelGate {
    pub(crate) mean: f32,
    pub(crate) denom: f32,
    pub(crate) gamma: f32,
    pub(crate) beta: f32,
    pub(crate) w_gamma: f32,
    pub(crate) threshold: f32,
}

impl ChannelGate {
    pub(crate) fn new(k: &GateConstants, sample: usize, channel: usize, channels: usize) -> Self {
        let (mut mean, mut denom, mut gamma, mut beta) = (0.0, 1.0, 1.0, 0.0);
        if let Some(n) = &k.norm {
            let group = sample * n.group_num + channel / (channels / n.group_num);
            (mean, denom, gamma, beta) = (n.mean[group], n.denom[group], n.gamma[channel], n.beta[channel]);
        }
        ChannelGate { mean, denom, gamma, beta, w_gamma: k.w_gamma[channel], threshold: k.threshold }
    }

    /// `gn_x = ((x - mean) / denom) * gamma + beta`, rounded after each operation as libtorch does
    /// (Rust never contracts `a * b + c` into a fused multiply-add).
    #[inline(always)]
    fn gn(&self, x: f32) -> f32 {
        ((x - self.mean) / self.denom) * self.gamma + self.beta
    }

    /// The hard gate's masks for `z = gn_x * w_gamma` as 1.0 / 0.0; a NaN `z` is neither, as `>=` and
    /// `<` on a NaN sigmoid give in the reference.
    #[inline(always)]
    fn masks(&self, gn: f32) -> (f32, f32) {
        let z = gn * self.w_gamma;
        let info = if z >= self.threshold { 1.0 } else { 0.0 };
        let noninfo = if z < self.threshold { 1.0 } else { 0.0 };
        (info, noninfo)
    }

    /// The soft gate's weights `(w1, w2)` for the sigmoid's value `r`.
    #[inline(always)]
    fn soft_weights(&self, r: f32) -> (f32, f32) {
        if r > self.threshold {
            (1.0, 0.0)
        } else {
            (r, r)
        }
    }

    /// `(x_1, x_2)` at one element: `aux` is `gn_x` when libtorch computed it, `r` for the soft gate,
    /// else unused. Each part is a mask (or weight) times its source, as in the reference.
    #[inline(always)]
    pub(crate) fn parts<const RULE: u8, const GN_GIVEN: bool>(&self, x: f32, aux: f32) -> (f32, f32) {
        if RULE == SOFT {
            let (w1, w2) = self.soft_weights(aux);
            return (w1 * x, w2 * x);
        }
        let gn = if GN_GIVEN { aux } else { self.gn(x) };
        let (info, noninfo) = self.masks(gn);
        let source = if RULE == ON_GN_X { gn } else { x };
        (info * source, noninfo * source)
    }

    /// `(x_1, x_2)` at one element with the decision given (`info`; the other mask its complement, as
    /// `GateDecisions::from_info_mask` makes it), for the hard gates on the custom norm.
    #[inline(always)]
    pub(crate) fn parts_decided<const RULE: u8>(&self, x: f32, info: bool) -> (f32, f32) {
        let source = if RULE == ON_GN_X { self.gn(x) } else { x };
        let (info, noninfo) = if info { (1.0, 0.0) } else { (0.0, 1.0) };
        (info * source, noninfo * source)
    }

    /// The informative decision at one element, as `parts` decides it (for the parity checks, so not
    /// specialised): `r > t` for the soft gate (`aux` is `r`), else `z >= z_t` from `gn_x` (`aux` when
    /// libtorch computed it).
    pub(crate) fn informative(&self, rule: Rule, gn_given: bool, x: f32, aux: f32) -> bool {
        match rule {
            Rule::SoftOnX => aux > self.threshold,
            _ => self.masks(if gn_given { aux } else { self.gn(x) }).0 == 1.0,
        }
    }
}

// `Rule` as const generic parameters, so that each rule's loop is compiled (and vectorised) on its own.
pub(crate) const ON_X: u8 = 0;
pub(crate) const ON_GN_X: u8 = 1;
const SOFT: u8 = 2;

fn rule_code(rule: Rule) -> u8 {
    match rule {
        Rule::MasksOnX => ON_X,
        Rule::MasksOnGnX => ON_GN_X,
        Rule::SoftOnX => SOFT,
    }
}

/// A contiguous CPU tensor's elements. SAFETY: `t` holds `T`s (fp32 for `f32`), and the caller keeps
/// it alive and unwritten while the slice is used.
pub(crate) unsafe fn elements<T>(t: &Tensor) -> &[T] {
    std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel())
}

/// The SRU output for a contiguous fp32 CPU tensor `x` of shape `(N, C, H, W)` under `rule`; `aux`
/// (`x`'s shape) is libtorch's `gn_x` where `k.norm` is `None`, or `r` for the soft gate. Written into
/// `reuse` when that is a buffer of the same shape (the caller guarantees nothing else reads it
/// meanwhile), else into a new tensor.
pub fn fused_gate_reconstruct(
    x: &Tensor,
    aux: Option<&Tensor>,
    k: &GateConstants,
    rule: Rule,
    reuse: Option<Tensor>,
) -> Tensor {
    let x = x.contiguous();
    let aux = aux.map(Tensor::contiguous);
    let fits = |t: &Tensor| t.size() == x.size() && t.is_contiguous() && t.kind() == Kind::Float;
    let out = match reuse {
        Some(buffer) if fits(&buffer) && buffer.device() == Device::Cpu => buffer,
        _ => x.empty_like(),
    };
    // SAFETY: contiguous fp32 CPU tensors of x's shape, alive until the end of this function; `out`
    // is fresh or a buffer no one reads meanwhile, and distinct from `x` and `aux`.
    let (xs, aux_s, os) = unsafe {
        let os = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel());
        (elements(&x), aux.as_ref().map(|a| elements(a)), os)
    };
    let aux_s = aux_s.unwrap_or(xs);
    let gn_given = k.norm.is_none();
    match (rule_code(rule), gn_given) {
        (ON_X, false) => reconstruct::<ON_X, false>(&x, xs, aux_s, os, k),
        (ON_X, true) => reconstruct::<ON_X, true>(&x, xs, aux_s, os, k),
        (ON_GN_X, false) => reconstruct::<ON_GN_X, false>(&x, xs, aux_s, os, k),
        (ON_GN_X, true) => reconstruct::<ON_GN_X, true>(&x, xs, aux_s, os, k),
        _ => reconstruct::<SOFT, true>(&x, xs, aux_s, os, k),
    }
    out
}

/// The loop over (sample, channel pair), on libtorch's own threads (`crate::inference::parallel_for`,
/// the OpenMP pool its operations use: threads of our own were measured slower and erratic on a
/// 2-core machine, as those workers keep spinning after each libtorch operation). Each pair writes
/// its own two output planes with the same per-element operations wherever it runs.
fn reconstruct<const RULE: u8, const GN_GIVEN: bool>(
    x: &Tensor,
    xs: &[f32],
    aux: &[f32],
    os: &mut [f32],
    k: &GateConstants,
) {
    let [n, c, h, w] = <[i64; 4]>::try_from(x.size()).expect("caller checked the rank");
    let (n, c, plane) = (n as usize, c as usize, (h * w) as usize);
    let half = c / 2;
    let out = SharedOut(os.as_mut_ptr());
    let grain = (1 << 14) / plane.max(1) + 1;
    crate::inference::parallel_for(n * half, grain, |pairs| {
        for pair in pairs {
            let (s, ch) = (pair / half, pair % half);
            let (lo, hi) = ((s * c + ch) * plane, (s * c + ch + half) * plane);
            // SAFETY: pair (s, ch) alone writes planes ch and ch + half of sample s, inside `os`,
            // which outlives the call.
            let (o_lo, o_hi) = unsafe { (out.slice(lo, plane), out.slice(hi, plane)) };
            let gates = (ChannelGate::new(k, s, ch, c), ChannelGate::new(k, s, ch + half, c));
            let xs = (&xs[lo..lo + plane], &xs[hi..hi + plane]);
            let auxs = (&aux[lo..lo + plane], &aux[hi..hi + plane]);
            reconstruct_pair::<RULE, GN_GIVEN>(xs, auxs, gates, o_lo, o_hi);
        }
    });
}

/// `[x_11 + x_22, x_12 + x_21]` for one channel `lo` of the first half and its partner `hi`.
/// Written as an indexed loop over equal-length slices so that it vectorises.
fn reconstruct_pair<const RULE: u8, const GN_GIVEN: bool>(
    (x_lo, x_hi): (&[f32], &[f32]),
    (aux_lo, aux_hi): (&[f32], &[f32]),
    (g_lo, g_hi): (ChannelGate, ChannelGate),
    o_lo: &mut [f32],
    o_hi: &mut [f32],
) {
    let n = x_lo.len();
    let (x_hi, aux_lo, aux_hi, o_lo, o_hi) =
        (&x_hi[..n], &aux_lo[..n], &aux_hi[..n], &mut o_lo[..n], &mut o_hi[..n]);
    for i in 0..n {
        let (kept_a, passed_a) = g_lo.parts::<RULE, GN_GIVEN>(x_lo[i], aux_lo[i]);
        let (kept_b, passed_b) = g_hi.parts::<RULE, GN_GIVEN>(x_hi[i], aux_hi[i]);
        o_lo[i] = kept_a + passed_b;
        o_hi[i] = kept_b + passed_a;
    }
}

/// `z = gn_x * w_gamma` of the custom GroupBatchnorm2d in one pass (the soft gate's sigmoid input),
/// into a new tensor of `x`'s shape. `k.norm` must hold the statistics.
pub fn gate_input(x: &Tensor, k: &GateConstants) -> Tensor {
    let x = x.contiguous();
    let out = x.empty_like();
    let [_, c, h, w] = <[i64; 4]>::try_from(x.size()).expect("caller checked the rank");
    let (c, plane) = (c as usize, (h * w) as usize);
    // SAFETY: as in `fused_gate_reconstruct`; `out` is fresh.
    let (xs, os) =
        unsafe { (elements(&x), std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel())) };
    for (i, (o, x)) in os.chunks_mut(plane).zip(xs.chunks(plane)).enumerate() {
        let gate = ChannelGate::new(k, i / c, i % c, c);
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gate.gn(x) * gate.w_gamma;
        }
    }
    out
}

/// The kernel's informative mask for `x` (bool, `x`'s shape), from the same per-element rule the
/// forward pass uses: what the parity suite compares with the reference's decisions.
pub fn info_mask(x: &Tensor, aux: Option<&Tensor>, k: &GateConstants, rule: Rule) -> Tensor {
    let x = x.contiguous();
    let aux = aux.map(Tensor::contiguous);
    let [n, c, h, w] = <[i64; 4]>::try_from(x.size()).expect("caller checked the rank");
    let (c, plane) = (c as usize, (h * w) as usize);
    // SAFETY: as in `fused_gate_reconstruct`, for reading only.
    let (xs, aux_s) = unsafe { (elements(&x), aux.as_ref().map(|a| elements(a))) };
    let aux_s = aux_s.unwrap_or(xs);
    let decide = |i: usize, x: &[f32], aux: &[f32]| -> Vec<bool> {
        let gate = ChannelGate::new(k, i / c, i % c, c);
        x.iter().zip(aux).map(|(&x, &a)| gate.informative(rule, k.norm.is_none(), x, a)).collect()
    };
    let mask: Vec<bool> = xs
        .chunks(plane)
        .zip(aux_s.chunks(plane))
        .enumerate()
        .flat_map(|(i, (x, a))| decide(i, x, a))
        .collect();
    Tensor::from_slice(&mask).view([n, c as i64, h, w])
}
