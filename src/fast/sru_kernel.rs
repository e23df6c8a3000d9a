//! The SRU after its statistics, as one pass over `x` on the CPU: per element the reference's five
//! fp32 operations give `z` (same operations, same order, so the same bits), the cheap gate decides,
//! and the cross-reconstruction writes both output halves. The reference makes about twelve passes
//! (sub, div, mul, add, mul, sigmoid, two comparisons, two mask products, two adds, a cat).
use tch::{Device, Kind, Tensor};

/// What the gate needs per group and per channel, as plain fp32 values.
pub struct GateConstants {
    /// `mean` and `std + eps` of each (sample, group), row-major `(N, G)`.
    pub mean: Vec<f32>,
    pub denom: Vec<f32>,
    /// Per channel: the GroupBatchnorm2d affine and `w_gamma`.
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub w_gamma: Vec<f32>,
    pub group_num: usize,
    /// The calibrated threshold: informative exactly when `z >= z_t`.
    pub z_t: f32,
}

/// One channel of one sample: `z` for an element, and the gate's two masks as 1.0 / 0.0.
#[derive(Clone, Copy)]
struct ChannelGate {
    mean: f32,
    denom: f32,
    gamma: f32,
    beta: f32,
    w_gamma: f32,
    z_t: f32,
}

impl ChannelGate {
    fn new(k: &GateConstants, sample: usize, channel: usize, channels: usize) -> Self {
        let group = sample * k.group_num + channel / (channels / k.group_num);
        ChannelGate {
            mean: k.mean[group],
            denom: k.denom[group],
            gamma: k.gamma[channel],
            beta: k.beta[channel],
            w_gamma: k.w_gamma[channel],
            z_t: k.z_t,
        }
    }

    /// `(info, noninfo)` for `x`: `z = (((x - mean) / denom) * gamma + beta) * w_gamma`, rounded after
    /// each operation as libtorch does (Rust never contracts `a * b + c` into a fused multiply-add).
    /// A NaN `z` is neither, as `>=` and `<` on a NaN sigmoid give in the reference.
    #[inline(always)]
    fn masks(&self, x: f32) -> (f32, f32) {
        let z = (((x - self.mean) / self.denom) * self.gamma + self.beta) * self.w_gamma;
        let info = if z >= self.z_t { 1.0 } else { 0.0 };
        let noninfo = if z < self.z_t { 1.0 } else { 0.0 };
        (info, noninfo)
    }
}

/// The SRU output for a contiguous fp32 CPU tensor `x` of shape `(N, C, H, W)`, written into `reuse`
/// when that is a buffer of the same shape (the caller guarantees nothing else reads it meanwhile), else
/// into a new tensor.
pub fn fused_gate_reconstruct(x: &Tensor, k: &GateConstants, reuse: Option<Tensor>) -> Tensor {
    let x = x.contiguous();
    let [n, c, h, w] = <[i64; 4]>::try_from(x.size()).expect("caller checked the rank");
    let (n, c, plane) = (n as usize, c as usize, (h * w) as usize);
    let fits = |t: &Tensor| t.size() == x.size() && t.is_contiguous() && t.kind() == Kind::Float;
    let out = match reuse {
        Some(buffer) if fits(&buffer) && buffer.device() == Device::Cpu => buffer,
        _ => Tensor::empty([n as i64, c as i64, h, w], (Kind::Float, Device::Cpu)),
    };
    // SAFETY: both tensors are contiguous fp32 on the CPU with n * c * plane elements; `x` and `out`
    // live until the end of this function, and `out` is fresh or a buffer no one reads meanwhile.
    let (xs, os) = unsafe {
        let len = n * c * plane;
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, len),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, len),
        )
    };
    // On the calling thread: threads of our own were measured slower and erratic on a 2-core machine,
    // as libtorch's OpenMP workers keep spinning after each of its parallel operations (medians up to
    // 2x worse, outliers of 15 ms).
    let half = c / 2;
    for (s, (o, x)) in os.chunks_mut(c * plane).zip(xs.chunks(c * plane)).enumerate() {
        let (o_lo, o_hi) = o.split_at_mut(half * plane);
        for (ch, (o_lo, o_hi)) in o_lo.chunks_mut(plane).zip(o_hi.chunks_mut(plane)).enumerate() {
            let (x_lo, x_hi) = (&x[ch * plane..][..plane], &x[(ch + half) * plane..][..plane]);
            let (g_lo, g_hi) = (ChannelGate::new(k, s, ch, c), ChannelGate::new(k, s, ch + half, c));
            reconstruct_pair(x_lo, x_hi, g_lo, g_hi, o_lo, o_hi);
        }
    }
    out
}

/// `[x_11 + x_22, x_12 + x_21]` for one channel `lo` of the first half and its partner `hi`:
/// each part is a mask times `x` (so NaN and infinity propagate as in the reference).
/// Written as an indexed loop over equal-length slices so that it vectorises.
fn reconstruct_pair(
    x_lo: &[f32],
    x_hi: &[f32],
    g_lo: ChannelGate,
    g_hi: ChannelGate,
    o_lo: &mut [f32],
    o_hi: &mut [f32],
) {
    let n = x_lo.len();
    let (x_hi, o_lo, o_hi) = (&x_hi[..n], &mut o_lo[..n], &mut o_hi[..n]);
    for i in 0..n {
        let (a, b) = (x_lo[i], x_hi[i]);
        let (info_a, noninfo_a) = g_lo.masks(a);
        let (info_b, noninfo_b) = g_hi.masks(b);
        o_lo[i] = info_a * a + noninfo_b * b;
        o_hi[i] = info_b * b + noninfo_a * a;
    }
}

/// The kernel's informative mask for `x` (bool, `x`'s shape), from the same `ChannelGate::masks` the
/// forward pass uses: what the parity suite compares with the reference's decisions.
pub fn info_mask(x: &Tensor, k: &GateConstants) -> Tensor {
    let x = x.contiguous();
    let [n, c, h, w] = <[i64; 4]>::try_from(x.size()).expect("caller checked the rank");
    let (c, plane) = (c as usize, (h * w) as usize);
    // SAFETY: as in `fused_gate_reconstruct`, for `x` only.
    let xs = unsafe { std::slice::from_raw_parts(x.data_ptr() as *const f32, n as usize * c * plane) };
    let mask: Vec<bool> = xs
        .chunks(plane)
        .enumerate()
        .flat_map(|(i, x)| {
            let gate = ChannelGate::new(k, i / c, i % c, c);
            x.iter().map(move |&v| gate.masks(v).0 == 1.0)
        })
        .collect();
    Tensor::from_slice(&mask).view([n, c as i64, h, w])
}
