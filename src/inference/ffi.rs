//! The calls into `shim.cpp` (built by build.rs when it compiles: `cfg(scconv_cpu_shim)`): libtorch's
//! oneDNN convolution with a fused epilogue, and its thread pool. Without the shim the convolutions
//! report that they are not built and `parallel_for` runs on the calling thread.
use std::ops::Range;
use tch::Tensor;

/// A convolution's stride, padding, dilation (per spatial dimension) and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Stride in (height, width).
    pub stride: [i64; 2],
    /// Zero padding in (height, width).
    pub padding: [i64; 2],
    /// Dilation in (height, width).
    pub dilation: [i64; 2],
    /// Groups (1: dense).
    pub groups: i64,
}

impl ConvGeometry {
    /// A square kernel's geometry: `stride` and `padding` in both dimensions, no dilation.
    pub fn square(stride: i64, padding: i64, groups: i64) -> ConvGeometry {
        ConvGeometry { stride: [stride; 2], padding: [padding; 2], dilation: [1; 2], groups }
    }
}

/// Whether this build has the shim (libtorch's fused oneDNN convolutions, its thread pool).
pub fn shim_built() -> bool {
    cfg!(scconv_cpu_shim)
}

#[cfg(scconv_cpu_shim)]
mod raw {
    use std::os::raw::{c_char, c_int, c_void};
    use torch_sys::C_tensor;

    extern "C" {
        pub fn scc_conv_pointwise(
            x: *const C_tensor,
            w: *const C_tensor,
            b: *const C_tensor,
            padding: *const i64,
            stride: *const i64,
            dilation: *const i64,
            groups: i64,
            relu: c_int,
            out: *mut *mut C_tensor,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn scc_conv_pointwise_add_(
            other: *mut C_tensor,
            x: *const C_tensor,
            w: *const C_tensor,
            b: *const C_tensor,
            padding: *const i64,
            stride: *const i64,
            dilation: *const i64,
            groups: i64,
            relu: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn scc_reorder_conv_weight(
            w: *const C_tensor,
            padding: *const i64,
            stride: *const i64,
            dilation: *const i64,
            groups: i64,
            input_size: *const i64,
            out: *mut *mut C_tensor,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn scc_mkldnn_bf16_supported(out: *mut c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn scc_parallel_for(
            begin: i64,
            end: i64,
            grain: i64,
            body: extern "C" fn(*mut c_void, i64, i64),
            ctx: *mut c_void,
        );
    }
}

/// A C call that returns 0, or non-zero with a NUL-terminated message in its `err` buffer (the
/// shim's and `onednn.cpp`'s convention).
#[cfg(any(scconv_cpu_shim, scconv_onednn))]
pub(super) fn checked(
    f: impl FnOnce(*mut std::os::raw::c_char, usize) -> std::os::raw::c_int,
) -> Result<(), String> {
    let mut err = [0 as std::os::raw::c_char; 1024];
    match f(err.as_mut_ptr(), err.len()) {
        0 => Ok(()),
        // SAFETY: the shim writes a NUL-terminated message (snprintf) into `err`.
        _ => Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()),
    }
}

/// A shim call that writes a new heap tensor into its `out` argument on success.
#[cfg(scconv_cpu_shim)]
fn new_tensor(
    f: impl FnOnce(*mut *mut torch_sys::C_tensor, *mut std::os::raw::c_char, usize) -> std::os::raw::c_int,
) -> Result<Tensor, String> {
    let mut out = std::ptr::null_mut();
    checked(|err, len| f(&mut out, err, len))?;
    // SAFETY: the shim returned 0, so `out` is a `new at::Tensor` for us to own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `conv(x, w) + b`, then ReLU when `relu`, in one oneDNN primitive (`w`: a dense weight or one
/// reordered by `Tensor::mkldnn_reorder_conv2d_weight`).
#[cfg(scconv_cpu_shim)]
pub fn conv_pointwise(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &ConvGeometry,
    relu: bool,
) -> Result<Tensor, String> {
    let b = b.map_or(std::ptr::null(), Tensor::as_ptr);
    new_tensor(|out, err, len| unsafe {
        // SAFETY: live tensors for the call; `out` receives a new heap tensor.
        raw::scc_conv_pointwise(
            x.as_ptr(),
            w.as_ptr(),
            b,
            g.padding.as_ptr(),
            g.stride.as_ptr(),
            g.dilation.as_ptr(),
            g.groups,
            relu as _,
            out,
            err,
            len,
        )
    })
}

/// `other = conv(x, w) + b + other`, then ReLU when `relu`, in place, in one oneDNN primitive.
#[cfg(scconv_cpu_shim)]
pub fn conv_pointwise_add_(
    other: &mut Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &ConvGeometry,
    relu: bool,
) -> Result<(), String> {
    let b = b.map_or(std::ptr::null(), Tensor::as_ptr);
    checked(|err, len| unsafe {
        // SAFETY: live tensors for the call; `other` is written in place, as its `&mut` allows.
        raw::scc_conv_pointwise_add_(
            other.as_mut_ptr(),
            x.as_ptr(),
            w.as_ptr(),
            b,
            g.padding.as_ptr(),
            g.stride.as_ptr(),
            g.dilation.as_ptr(),
            g.groups,
            relu as _,
            err,
            len,
        )
    })
}

/// `w` reordered once into oneDNN's blocked layout for inputs of `input_size` (an mkldnn tensor).
#[cfg(scconv_cpu_shim)]
pub fn reorder_conv_weight(w: &Tensor, g: &ConvGeometry, input_size: [i64; 4]) -> Result<Tensor, String> {
    new_tensor(|out, err, len| unsafe {
        // SAFETY: a live tensor; `out` receives a new heap tensor.
        raw::scc_reorder_conv_weight(
            w.as_ptr(),
            g.padding.as_ptr(),
            g.stride.as_ptr(),
            g.dilation.as_ptr(),
            g.groups,
            input_size.as_ptr(),
            out,
            err,
            len,
        )
    })
}

/// Whether libtorch's oneDNN takes bf16 tensors on this CPU (`torch.ops.mkldnn._is_mkldnn_bf16_supported`).
#[cfg(scconv_cpu_shim)]
pub fn mkldnn_bf16_supported() -> Result<bool, String> {
    let mut out = 0;
    // SAFETY: `out` is a live int for the call.
    checked(|err, len| unsafe { raw::scc_mkldnn_bf16_supported(&mut out, err, len) })?;
    Ok(out != 0)
}

#[cfg(not(scconv_cpu_shim))]
pub fn mkldnn_bf16_supported() -> Result<bool, String> {
    Err("this build has no oneDNN shim (see the build warning)".into())
}

#[cfg(not(scconv_cpu_shim))]
pub fn reorder_conv_weight(_: &Tensor, _: &ConvGeometry, _: [i64; 4]) -> Result<Tensor, String> {
    Err("this build has no oneDNN shim (see the build warning)".into())
}

#[cfg(not(scconv_cpu_shim))]
pub fn conv_pointwise(
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: &ConvGeometry,
    _: bool,
) -> Result<Tensor, String> {
    Err("this build has no oneDNN shim (see the build warning)".into())
}

#[cfg(not(scconv_cpu_shim))]
pub fn conv_pointwise_add_(
    _: &mut Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: &ConvGeometry,
    _: bool,
) -> Result<(), String> {
    Err("this build has no oneDNN shim (see the build warning)".into())
}

/// Runs `body` over `0..n` in chunks of at least `grain` items on libtorch's own thread pool (the
/// OpenMP workers its operations use), so that no second pool competes with it. `body` must not panic
/// (a panic cannot cross the C++ frames: it aborts).
pub fn parallel_for<F: Fn(Range<usize>) + Sync>(n: usize, grain: usize, body: F) {
    #[cfg(scconv_cpu_shim)]
    {
        extern "C" fn trampoline<G: Fn(Range<usize>) + Sync>(ctx: *mut std::os::raw::c_void, b: i64, e: i64) {
            // SAFETY: `ctx` is the `&F` passed below, alive until scc_parallel_for returns.
            let body = unsafe { &*(ctx as *const G) };
            body(b as usize..e as usize);
        }
        let ctx = &body as *const _ as *mut std::os::raw::c_void;
        // SAFETY: `body` outlives the call, which returns when every chunk is done.
        unsafe { raw::scc_parallel_for(0, n as i64, grain.max(1) as i64, trampoline::<F>, ctx) };
    }
    #[cfg(not(scconv_cpu_shim))]
    {
        let _ = grain;
        body(0..n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks run on libtorch's OpenMP threads, not all on the caller's (the shim must be built
    /// with OpenMP for at::parallel_for's region to exist: without it every kernel of ours ran on one
    /// thread).
    #[test]
    fn parallel_for_uses_libtorchs_threads() {
        if !shim_built() || tch::get_num_threads() < 2 {
            return;
        }
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        parallel_for(64, 1, |_| {
            seen.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(std::time::Duration::from_millis(2));
        });
        let threads = seen.lock().unwrap().len();
        assert!(threads >= 2, "{threads} thread(s) of {}", tch::get_num_threads());
    }
}
