//! Safe wrappers over `shim.cpp`'s C functions. In a build without the shim (no CUDA headers beside
//! libtorch) every function says so instead.
use std::ffi::{c_char, c_int, c_void, CStr, CString};

#[cfg(scconv_cuda_shim)]
mod raw {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    extern "C" {
        pub fn scc_free(p: *mut c_void);
        pub fn scc_nvrtc_compile(
            src: *const c_char,
            name: *const c_char,
            opts: *const *const c_char,
            nopts: c_int,
            cubin: c_int,
            image: *mut *mut c_char,
            image_len: *mut usize,
            log: *mut *mut c_char,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_device_arch(
            device: c_int,
            major: *mut c_int,
            minor: *mut c_int,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_module_load(
            device: c_int,
            image: *const c_void,
            module: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_module_function(
            module: *mut c_void,
            name: *const c_char,
            f: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_launch(
            device: c_int,
            f: *mut c_void,
            grid: c_uint,
            block: c_uint,
            args: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_stream_capturing(device: c_int) -> c_int;
        pub fn scc_graph_new() -> *mut c_void;
        pub fn scc_graph_free(graph: *mut c_void);
        pub fn scc_graph_capture(
            graph: *mut c_void,
            device: c_int,
            warmup: c_int,
            body: extern "C" fn(*mut c_void),
            ctx: *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn scc_graph_replay(graph: *mut c_void, err: *mut c_char, errlen: usize) -> c_int;
    }
}

#[cfg_attr(scconv_cuda_shim, allow(dead_code))]
const NOT_BUILT: &str = "this build has no CUDA shim (libtorch without CUDA, or no CUDA headers beside it)";

/// Calls `f` with an error buffer; its message when `f` returns non-zero.
#[cfg_attr(not(scconv_cuda_shim), allow(dead_code))]
fn checked(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = vec![0 as c_char; 1024];
    match f(err.as_mut_ptr(), err.len()) {
        0 => Ok(()),
        // SAFETY: the shim writes a NUL-terminated message (snprintf) into the buffer.
        _ => Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()),
    }
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// NVRTC's output for `src`: a CUBIN, or PTX (without its trailing NUL). The error carries NVRTC's log.
#[cfg(scconv_cuda_shim)]
pub fn compile(src: &str, name: &str, options: &[String], cubin: bool) -> Result<Vec<u8>, String> {
    let (src, name) = (c_string(src)?, c_string(name)?);
    let options: Vec<CString> = options.iter().map(|o| c_string(o)).collect::<Result<_, _>>()?;
    let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let (mut image, mut len, mut log) = (std::ptr::null_mut(), 0usize, std::ptr::null_mut());
    let result = checked(|err, errlen| unsafe {
        raw::scc_nvrtc_compile(
            src.as_ptr(),
            name.as_ptr(),
            pointers.as_ptr(),
            pointers.len() as c_int,
            cubin as c_int,
            &mut image,
            &mut len,
            &mut log,
            err,
            errlen,
        )
    });
    // SAFETY: on return `log` is null or a NUL-terminated malloc'd string, `image` null or `len` malloc'd
    // bytes; both are ours to free.
    let log_text = unsafe {
        let text =
            if log.is_null() { String::new() } else { CStr::from_ptr(log).to_string_lossy().into_owned() };
        raw::scc_free(log as *mut c_void);
        text
    };
    let bytes = unsafe {
        let bytes = if image.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(image as *const u8, len).to_vec()
        };
        raw::scc_free(image as *mut c_void);
        bytes
    };
    result.map_err(|e| format!("NVRTC: {e}\n{log_text}"))?;
    let text_end =
        if cubin { bytes.len() } else { bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len()) };
    Ok(bytes[..text_end].to_vec())
}

/// The compute capability of CUDA device `device`.
#[cfg(scconv_cuda_shim)]
pub fn device_arch(device: usize) -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    checked(|err, len| unsafe { raw::scc_device_arch(device as c_int, &mut major, &mut minor, err, len) })?;
    Ok((major, minor))
}

/// Loads a CUBIN into the primary context of `device`; the module lives as long as the process.
#[cfg(scconv_cuda_shim)]
pub fn load_module(device: usize, image: &[u8]) -> Result<usize, String> {
    let mut module = std::ptr::null_mut();
    checked(|err, len| unsafe {
        raw::scc_module_load(device as c_int, image.as_ptr() as *const c_void, &mut module, err, len)
    })?;
    Ok(module as usize)
}

/// A kernel of a loaded module, by name.
#[cfg(scconv_cuda_shim)]
pub fn function(module: usize, name: &str) -> Result<usize, String> {
    let name = c_string(name)?;
    let mut f = std::ptr::null_mut();
    checked(|err, len| unsafe {
        raw::scc_module_function(module as *mut c_void, name.as_ptr(), &mut f, err, len)
    })?;
    Ok(f as usize)
}

/// Launches kernel `f` on libtorch's current stream of `device`. `args` point at the kernel's
/// arguments, in order and of the kernel's types (the caller's duty).
#[cfg(scconv_cuda_shim)]
pub fn launch(
    device: usize,
    f: usize,
    grid: u32,
    block: u32,
    args: &mut [*mut c_void],
) -> Result<(), String> {
    checked(|err, len| unsafe {
        raw::scc_launch(device as c_int, f as *mut c_void, grid, block, args.as_mut_ptr(), err, len)
    })
}

/// Whether libtorch's current stream of `device` is being captured.
#[cfg(scconv_cuda_shim)]
pub fn stream_capturing(device: usize) -> bool {
    unsafe { raw::scc_stream_capturing(device as c_int) == 1 }
}

/// An `at::cuda::CUDAGraph`, freed on drop.
pub struct Graph(*mut c_void);

#[cfg(scconv_cuda_shim)]
impl Graph {
    pub fn new() -> Result<Graph, String> {
        let raw = unsafe { raw::scc_graph_new() };
        if raw.is_null() {
            return Err("at::cuda::CUDAGraph could not be created".into());
        }
        Ok(Graph(raw))
    }

    /// Runs `body` `warmup` times, then captures one more run (on a side stream of `device`). A panic
    /// in `body` is caught and reported as the error.
    pub fn capture(&mut self, device: usize, warmup: usize, mut body: impl FnMut()) -> Result<(), String> {
        struct Context<'a> {
            body: &'a mut dyn FnMut(),
            panic: Option<String>,
        }
        extern "C" fn trampoline(ctx: *mut c_void) {
            // SAFETY: `ctx` is the `Context` below, alive for the whole capture call.
            let ctx = unsafe { &mut *(ctx as *mut Context) };
            if ctx.panic.is_some() {
                return;
            }
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.body)()));
            if let Err(payload) = run {
                ctx.panic = Some(crate::input::panic_message(payload.as_ref()));
            }
        }
        let mut ctx = Context { body: &mut body, panic: None };
        let ctx_ptr = &mut ctx as *mut Context as *mut c_void;
        let result = checked(|err, len| unsafe {
            raw::scc_graph_capture(self.0, device as c_int, warmup as c_int, trampoline, ctx_ptr, err, len)
        });
        match ctx.panic {
            Some(message) => Err(format!("the captured forward failed: {message}")),
            None => result,
        }
    }

    pub fn replay(&self) -> Result<(), String> {
        checked(|err, len| unsafe { raw::scc_graph_replay(self.0, err, len) })
    }
}

#[cfg(scconv_cuda_shim)]
impl Drop for Graph {
    fn drop(&mut self) {
        unsafe { raw::scc_graph_free(self.0) }
    }
}

#[cfg(not(scconv_cuda_shim))]
mod absent {
    use super::*;

    pub fn compile(_: &str, _: &str, _: &[String], _: bool) -> Result<Vec<u8>, String> {
        Err(NOT_BUILT.into())
    }
    pub fn device_arch(_: usize) -> Result<(i32, i32), String> {
        Err(NOT_BUILT.into())
    }
    pub fn load_module(_: usize, _: &[u8]) -> Result<usize, String> {
        Err(NOT_BUILT.into())
    }
    pub fn function(_: usize, _: &str) -> Result<usize, String> {
        Err(NOT_BUILT.into())
    }
    pub fn launch(_: usize, _: usize, _: u32, _: u32, _: &mut [*mut c_void]) -> Result<(), String> {
        Err(NOT_BUILT.into())
    }
    pub fn stream_capturing(_: usize) -> bool {
        false
    }

    impl Graph {
        pub fn new() -> Result<Graph, String> {
            Err(NOT_BUILT.into())
        }
        pub fn capture(&mut self, _: usize, _: usize, _: impl FnMut()) -> Result<(), String> {
            Err(NOT_BUILT.into())
        }
        pub fn replay(&self) -> Result<(), String> {
            Err(NOT_BUILT.into())
        }
    }
}
#[cfg(not(scconv_cuda_shim))]
pub use absent::*;
