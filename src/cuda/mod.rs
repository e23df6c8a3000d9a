//! CUDA kernels of our own for the fast path, compiled at run time by NVRTC, and CUDA graphs.
//!
//! tch binds neither, so a small C++ shim (`shim.cpp`, built by `build.rs` when libtorch has CUDA)
//! loads NVRTC and the CUDA driver with `dlopen`, launches on libtorch's current stream and wraps
//! `at::cuda::CUDAGraph`. The kernels (`kernels.cu`) are compiled with `--fmad=false`: every operation
//! rounds as libtorch's separate kernels round it, so the fused SRU decides exactly as the reference.
mod ffi;
mod graph;

pub use graph::CudaGraph;

use crate::error::ScConvError;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The kernels' source, compiled once per (device, dtype).
const SOURCE: &str = include_str!("kernels.cu");
const KERNELS: [&str; 3] = ["sru_gate_reconstruct", "sru_info_mask", "cru_weighted_sum"];
const THREADS: u32 = 256;

/// The dtypes the kernels are written for, as `SCALAR_KIND` in `kernels.cu`.
fn scalar_kind(kind: Kind) -> Option<u8> {
    match kind {
        Kind::Float => Some(0),
        Kind::Half => Some(1),
        Kind::BFloat16 => Some(2),
        _ => None,
    }
}

fn cuda_error(what: impl std::fmt::Display) -> ScConvError {
    ScConvError::Cuda(format!("kernels: {what}"))
}

/// NVRTC's options: the dtype, the target, and no fused multiply-add (see the module docs).
fn options(kind: Kind, arch: (i32, i32), cubin: bool) -> Result<Vec<String>, ScConvError> {
    let code = scalar_kind(kind).ok_or_else(|| cuda_error(format!("no kernels for {kind:?}")))?;
    let target = if cubin { "sm" } else { "compute" };
    Ok(vec![
        format!("--gpu-architecture={target}_{}{}", arch.0, arch.1),
        "--fmad=false".into(),
        format!("-DSCALAR_KIND={code}"),
    ])
}

/// The kernels for `kind`, compiled for compute capability `arch`: a CUBIN when `cubin`, else PTX.
/// Needs NVRTC only (no GPU).
pub(crate) fn compile(kind: Kind, arch: (i32, i32), cubin: bool) -> Result<Vec<u8>, ScConvError> {
    ffi::compile(SOURCE, "scconv_kernels.cu", &options(kind, arch, cubin)?, cubin).map_err(cuda_error)
}

/// Function handles of one compiled module (driver handles, valid for the process).
#[derive(Clone, Copy)]
struct Functions([usize; KERNELS.len()]);

static LOADED: Mutex<Option<HashMap<(usize, u8), Functions>>> = Mutex::new(None);

fn functions(device: usize, kind: Kind) -> Result<Functions, ScConvError> {
    let code = scalar_kind(kind).ok_or_else(|| cuda_error(format!("no kernels for {kind:?}")))?;
    let mut loaded = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = loaded.get_or_insert_with(HashMap::new);
    if let Some(f) = cache.get(&(device, code)) {
        return Ok(*f);
    }
    let arch = ffi::device_arch(device).map_err(cuda_error)?;
    let image = compile(kind, arch, true)?;
    let module = ffi::load_module(device, &image).map_err(cuda_error)?;
    let mut handles = [0usize; KERNELS.len()];
    for (handle, name) in handles.iter_mut().zip(KERNELS) {
        *handle = ffi::function(module, name).map_err(cuda_error)?;
    }
    let f = Functions(handles);
    cache.insert((device, code), f);
    Ok(f)
}

/// Whether this build has the CUDA shim (built by `build.rs` when libtorch has CUDA and the CUDA
/// headers are found; else the fast path runs libtorch operations on CUDA).
pub fn kernels_built() -> bool {
    cfg!(scconv_cuda_shim)
}

/// Whether the fused kernels run on `device` for `kind`: built into this binary, NVRTC and a driver
/// found, compiled for the device. The first call compiles (about a second); later ones are free.
pub fn kernels_available(device: Device, kind: Kind) -> Result<(), ScConvError> {
    match device {
        Device::Cuda(index) => functions(index, kind).map(|_| ()),
        other => Err(cuda_error(format!("{other:?} is not a CUDA device"))),
    }
}

/// True while libtorch's current stream on `device` is being captured into a CUDA graph (nothing
/// that synchronises with the host may run then).
pub(crate) fn capturing(device: Device) -> bool {
    matches!(device, Device::Cuda(index) if ffi::stream_capturing(index))
}

/// A kernel argument: a pointer to the value, as `cuLaunchKernel` takes them.
enum Arg {
    Ptr(*mut std::ffi::c_void),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl Arg {
    fn of(t: &Tensor) -> Arg {
        Arg::Ptr(t.data_ptr())
    }

    fn address(&mut self) -> *mut std::ffi::c_void {
        match self {
            Arg::Ptr(p) => p as *mut _ as *mut std::ffi::c_void,
            Arg::I64(v) => v as *mut _ as *mut std::ffi::c_void,
            Arg::I32(v) => v as *mut _ as *mut std::ffi::c_void,
            Arg::F32(v) => v as *mut _ as *mut std::ffi::c_void,
        }
    }
}

fn launch(
    device: usize,
    kind: Kind,
    kernel: usize,
    threads: i64,
    mut args: Vec<Arg>,
) -> Result<(), ScConvError> {
    let f = functions(device, kind)?.0[kernel];
    // Grid-stride loops: enough blocks to fill the GPU, capped.
    let blocks = ((threads + THREADS as i64 - 1) / THREADS as i64).clamp(1, 65_535 * 8) as u32;
    let mut pointers: Vec<*mut std::ffi::c_void> = args.iter_mut().map(Arg::address).collect();
    ffi::launch(device, f, blocks, THREADS, &mut pointers).map_err(cuda_error)
}

fn cuda_index(t: &Tensor) -> Result<usize, ScConvError> {
    match t.device() {
        Device::Cuda(index) => Ok(index),
        other => Err(cuda_error(format!("tensor on {other:?}"))),
    }
}

/// The SRU's statistics and constants for the kernels: `mean` and `denom = std + eps` of each (sample,
/// group) as `(N, G)` tensors computed by libtorch (its reductions decide the bits the gate sees),
/// per-channel `gamma`, `beta`, `w_gamma`, and the calibrated threshold.
pub(crate) struct SruInputs<'a> {
    pub mean: &'a Tensor,
    pub denom: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub w_gamma: &'a Tensor,
    pub groups: i64,
    pub z_t: f32,
    /// The masks multiply `gn_x` (2023-09-12/14) instead of `x`.
    pub masks_gn_x: bool,
}

impl SruInputs<'_> {
    fn args(&self, x: &Tensor, out: &Tensor) -> Vec<Arg> {
        let size = x.size();
        vec![
            Arg::of(x),
            Arg::of(out),
            Arg::of(self.mean),
            Arg::of(self.denom),
            Arg::of(self.gamma),
            Arg::of(self.beta),
            Arg::of(self.w_gamma),
            Arg::F32(self.z_t),
            Arg::I64(size[0]),
            Arg::I32(size[1] as i32),
            Arg::I32(self.groups as i32),
            Arg::I64(size[2] * size[3]),
            Arg::I32(self.masks_gn_x as i32),
        ]
    }

    /// All inputs contiguous in `x`'s dtype and device (the kernel indexes them flat).
    fn contiguous(&self, x: &Tensor) -> [Tensor; 5] {
        let like = |t: &Tensor| t.to_device(x.device()).to_kind(x.kind()).contiguous();
        [like(self.mean), like(self.denom), like(self.gamma), like(self.beta), like(self.w_gamma)]
    }
}

/// Runs SRU kernel `kernel` over `threads` threads on `x` with `k`'s inputs (made contiguous in
/// `x`'s dtype), writing `out`.
fn launch_sru(
    kernel: usize,
    threads: i64,
    x: &Tensor,
    k: &SruInputs,
    out: &Tensor,
) -> Result<(), ScConvError> {
    let device = cuda_index(x)?;
    let [mean, denom, gamma, beta, w_gamma] = k.contiguous(x);
    let k = SruInputs { mean: &mean, denom: &denom, gamma: &gamma, beta: &beta, w_gamma: &w_gamma, ..*k };
    launch(device, x.kind(), kernel, threads, k.args(x, out))
}

/// The fused SRU on a CUDA tensor `x` (N, C, H, W): the gate and the cross-reconstruction in one pass.
pub(crate) fn sru_gate_reconstruct(x: &Tensor, k: &SruInputs) -> Result<Tensor, ScConvError> {
    let x = x.contiguous();
    let out = x.empty_like();
    launch_sru(0, x.numel() as i64 / 2, &x, k, &out)?;
    Ok(out)
}

/// The fused SRU's informative mask (bool, `x`'s shape).
pub(crate) fn sru_info_mask(x: &Tensor, k: &SruInputs) -> Result<Tensor, ScConvError> {
    let x = x.contiguous();
    let mask = Tensor::empty(x.size(), (Kind::Uint8, x.device()));
    launch_sru(1, x.numel() as i64, &x, k, &mask)?;
    Ok(mask.to_kind(Kind::Bool))
}

/// The CRU fuse's weighted sum in one kernel, in place in `Y1` (C channels): `w[:, :C] * Y1 +
/// w[:, C:] * Y2` with `Y2 = cat(y2_head, low)` read from its parts and `weights` the softmax over the
/// `(N, 2C, 1, 1)` pooled values (libtorch's pooling, as the reference takes it: a pooling kernel of
/// our own was tried, and its other summation order changed pooled values in the last bit, which on
/// the GPU flipped in-band gate decisions of later blocks of the trained network).
pub(crate) fn cru_weighted_sum(
    y1: Tensor,
    y2_head: &Tensor,
    low: &Tensor,
    weights: &Tensor,
) -> Result<Tensor, ScConvError> {
    let device = cuda_index(&y1)?;
    let (y1, y2_head, low, weights) =
        (y1.contiguous(), y2_head.contiguous(), low.contiguous(), weights.contiguous());
    let [n, c, h, w] = <[i64; 4]>::try_from(y1.size()).map_err(|_| cuda_error("Y1 is not 4-d"))?;
    let args = vec![
        Arg::of(&y1),
        Arg::of(&y2_head),
        Arg::of(&low),
        Arg::of(&weights),
        Arg::I64(n),
        Arg::I32(c as i32),
        Arg::I32(y2_head.size()[1] as i32),
        Arg::I64(h * w),
    ];
    launch(device, y1.kind(), 2, n * c * h * w, args)?;
    Ok(y1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: the kernels compile here for every dtype, to PTX for an H100/H200 (9.0) and
    /// to a CUBIN for an A100 (8.0), with fused multiply-add off (the PTX has no `fma` instruction).
    #[test]
    #[cfg_attr(not(scconv_cuda_shim), ignore = "this build has no CUDA shim")]
    fn kernels_compile_with_nvrtc_without_a_gpu() {
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            let ptx = compile(kind, (9, 0), false).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            let ptx = String::from_utf8_lossy(&ptx);
            for name in KERNELS {
                assert!(ptx.contains(&format!(".entry {name}")), "{kind:?}: {name} missing");
            }
            assert!(!ptx.contains("fma."), "{kind:?}: a fused multiply-add was emitted");
            let cubin = compile(kind, (8, 0), true).unwrap();
            assert_eq!(&cubin[..4], b"\x7fELF", "{kind:?}: a CUBIN is an ELF image");
        }
    }

    #[test]
    fn other_dtypes_are_refused_by_name() {
        let err = options(Kind::Double, (9, 0), false).unwrap_err().to_string();
        assert!(err.contains("no kernels for Double"), "{err}");
    }

    #[test]
    fn a_cpu_device_is_refused() {
        let err = kernels_available(Device::Cpu, Kind::Float).unwrap_err().to_string();
        assert!(err.contains("Cpu is not a CUDA device"), "{err}");
    }
}
