//! The inference form's convolutions as oneDNN primitives of our own (`onednn.cpp`, built where the
//! `onednn` feature is on and build.rs finds oneDNN: `cfg(scconv_onednn)`): created once per input
//! size by the own-primitives pass, executed on each call's data pointers, where libtorch's
//! `mkldnn::_convolution_pointwise` rebuilds descriptors and looks the primitive up on every call.
//! fp32 or bf16 (the native bf16 form's), channels-last input and output, ReLU and residual add in the
//! epilogue, as the fused form's libtorch call computes them; any other input is left to libtorch.
use super::channels_last_sru::{empty_channels_last, is_channels_last};
#[cfg(scconv_onednn)]
use super::ffi::checked;
use super::ffi::ConvGeometry;
use tch::{Device, Kind, Tensor};

/// Whether this build has its own oneDNN primitives, and which oneDNN: `Some("3.2.0")`.
pub fn own_onednn_version() -> Option<String> {
    #[cfg(scconv_onednn)]
    {
        let mut text = [0 as std::os::raw::c_char; 32];
        // SAFETY: writes a NUL-terminated string of at most `len` bytes.
        unsafe { raw::scc_dnnl_version(text.as_mut_ptr(), text.len()) };
        // SAFETY: NUL-terminated by snprintf.
        return Some(unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) }.to_string_lossy().into_owned());
    }
    #[allow(unreachable_code)]
    None
}

#[cfg(scconv_onednn)]
mod raw {
    use std::os::raw::{c_char, c_int, c_void};
    extern "C" {
        pub fn scc_dnnl_conv_create(
            w: *const c_void,
            w_size: *const i64,
            b: *const c_void,
            b_sum: *const c_void,
            input: *const i64,
            stride: *const i64,
            padding: *const i64,
            dilation: *const i64,
            groups: i64,
            relu: c_int,
            bf16: c_int,
            out: *mut *mut c_void,
            output: *mut i64,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn scc_dnnl_conv_run(
            conv: *mut c_void,
            x: *const c_void,
            y: *mut c_void,
            add: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn scc_dnnl_conv_free(conv: *mut c_void);
        pub fn scc_dnnl_version(out: *mut c_char, len: usize);
    }
}

/// The C++ side's primitive, its weights and scratchpad (never made in a build without our oneDNN).
#[derive(Debug)]
#[cfg_attr(not(scconv_onednn), allow(dead_code))]
struct Handle(*mut std::os::raw::c_void);

// SAFETY: owned by one `OwnConv` alone, used by one thread at a time (behind its mutex).
unsafe impl Send for Handle {}

/// One convolution (with its bias and optional ReLU) as a primitive for one input size and kind (fp32
/// or bf16: input, weight and output alike; the bias fp32, and with the residual add of that kind).
/// Two threads may share it: runs take turns (the scratchpad is the primitive's own).
#[derive(Debug)]
pub(crate) struct OwnConv {
    #[cfg_attr(not(scconv_onednn), allow(dead_code))]
    handle: std::sync::Mutex<Handle>,
    input: [i64; 4],
    output: [i64; 4],
    kind: Kind,
}

impl Drop for OwnConv {
    fn drop(&mut self) {
        #[cfg(scconv_onednn)]
        if let Ok(handle) = self.handle.get_mut() {
            // SAFETY: created by scc_dnnl_conv_create, freed once.
            unsafe { raw::scc_dnnl_conv_free(handle.0) };
        }
    }
}

/// Whether `t` is a CPU tensor of `kind` and `size` with dense channels-last strides.
fn fits(t: &Tensor, kind: Kind, size: [i64; 4]) -> bool {
    t.kind() == kind && t.device() == Device::Cpu && t.size() == size && is_channels_last(t)
}

impl OwnConv {
    /// The primitive for channels-last inputs of `input` (N, C, H, W) of the weight's kind, its
    /// `bias` fp32 and its `residual_bias` (the bias with the residual add) of the weight's kind, both
    /// or neither; `None` where this build has none, or the tensors are not so on the CPU.
    pub(crate) fn new(
        weight: &Tensor,
        biases: Option<(&Tensor, &Tensor)>,
        g: &ConvGeometry,
        input: [i64; 4],
        relu: bool,
    ) -> Result<Option<OwnConv>, String> {
        let kind = weight.kind();
        let taken = |t: &Tensor, kind| t.kind() == kind && t.device() == Device::Cpu;
        let supported = matches!(kind, Kind::Float | Kind::BFloat16)
            && taken(weight, kind)
            && biases.is_none_or(|(b, sum)| taken(b, Kind::Float) && taken(sum, kind));
        if own_onednn_version().is_none() || !supported {
            return Ok(None);
        }
        #[cfg(scconv_onednn)]
        {
            let weight = weight.contiguous();
            let biases = biases.map(|(b, sum)| (b.contiguous(), sum.contiguous()));
            let pointer = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
                biases.as_ref().map_or(std::ptr::null(), |b| pick(b).data_ptr() as *const _)
            };
            let w_size = weight.size();
            let (mut handle, mut output) = (std::ptr::null_mut(), [0i64; 4]);
            checked(|err, len| unsafe {
                // SAFETY: live contiguous tensors of the kinds checked above (the flag says which); the
                // sizes are four values each.
                raw::scc_dnnl_conv_create(
                    weight.data_ptr(),
                    w_size.as_ptr(),
                    pointer(|b| &b.0),
                    pointer(|b| &b.1),
                    input.as_ptr(),
                    g.stride.as_ptr(),
                    g.padding.as_ptr(),
                    g.dilation.as_ptr(),
                    g.groups,
                    relu as _,
                    (kind == Kind::BFloat16) as _,
                    &mut handle,
                    output.as_mut_ptr(),
                    err,
                    len,
                )
            })?;
            return Ok(Some(OwnConv { handle: std::sync::Mutex::new(Handle(handle)), input, output, kind }));
        }
        #[allow(unreachable_code)]
        {
            let _ = (g, input, relu);
            Ok(None)
        }
    }

    /// `relu?(conv(x) + b)` as a new channels-last tensor, or `None` where `x` is not what the
    /// primitive was made for (the caller calls libtorch).
    pub(crate) fn forward(&self, x: &Tensor) -> Option<Tensor> {
        if !fits(x, self.kind, self.input) {
            return None;
        }
        let y = empty_channels_last(self.output.map(|d| d as usize), self.kind);
        self.run(x, &y, false).then_some(y)
    }

    /// `residual = relu?(conv(x) + b + residual)` in place; `false` (nothing written) where `x` or
    /// `residual` is not what the primitive was made for.
    pub(crate) fn forward_add(&self, x: &Tensor, residual: &mut Tensor) -> bool {
        fits(x, self.kind, self.input)
            && fits(residual, self.kind, self.output)
            && self.run(x, residual, true)
    }

    fn run(&self, x: &Tensor, y: &Tensor, add: bool) -> bool {
        #[cfg(scconv_onednn)]
        {
            let handle = self.handle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let ran = checked(|err, len| unsafe {
                // SAFETY: `x` and `y` are dense channels-last CPU tensors of the primitive's sizes and
                // kind (checked by the callers), alive for the call; `y` is written, nothing else reads it.
                raw::scc_dnnl_conv_run(handle.0, x.data_ptr(), y.data_ptr(), add as _, err, len)
            });
            // oneDNN accepted these sizes when the primitive was made: a failure now is a bug or an
            // allocation failure, a panic as tch's own operations make it.
            if let Err(e) = ran {
                panic!("oneDNN convolution failed: {e}");
            }
            return true;
        }
        #[allow(unreachable_code)]
        {
            let _ = (x, y, add);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    /// A form's convolution can still move to another thread with its own primitive inside (as its
    /// tensors can; they are not Sync), and the primitive alone may be shared.
    #[test]
    fn a_convolution_can_move_to_another_thread() {
        fn send<T: Send>() {}
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<super::OwnConv>();
        send::<crate::inference::InferenceConv>();
    }
}
