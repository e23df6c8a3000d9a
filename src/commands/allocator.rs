//! The process's malloc: mimalloc, overriding the C library's, so that libtorch's and oneDNN's own
//! allocations (each convolution call allocates its descriptors, scratchpad and output) take
//! mimalloc's fast path instead of glibc's, whose consolidation of freed chunks cost ~12 us a call on
//! the CPU measured (docs/speed.md, "Batch 1"). Shared by the CLI and `examples/bench_worker.rs`.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 of v3's `mi_option_e`; `libmimalloc-sys` names no
/// constant for it). `describe` reports the value read back, and tests/info.rs checks that the
/// `MIMALLOC_PURGE_DELAY` variable sets this index, so a wrong index would show.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process for the next forward instead of returning it to the system: by
/// default mimalloc purges what has been free for 10 ms, so a forward after a pause (a server waiting
/// for its next request) page-faults its activations in again (Fashion-MNIST plain, batch 256, after
/// 0.5 s pauses: 213 ms a forward against 121 ms without purging; docs/speed.md, "Batch 1"). The
/// memory kept is the largest forward's, as ONNX Runtime's arena keeps it. A `MIMALLOC_PURGE_DELAY`
/// set by the user wins. Call first thing in `main`, before other threads start (mimalloc's options
/// are not synchronised).
pub fn keep_freed_memory() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain option; called before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Which malloc libtorch's tensors come from, checked on a live tensor rather than assumed from the
/// build: `mimalloc 3.3.2 (libtorch's allocations included)`, or the C library's.
pub fn describe() -> String {
    #[cfg(feature = "mimalloc")]
    {
        let tensor = tch::Tensor::zeros([4096], (tch::Kind::Float, tch::Device::Cpu));
        // SAFETY: both only read the allocator's bookkeeping; the tensor outlives the calls.
        let (from_mimalloc, version) = unsafe {
            (libmimalloc_sys::mi_is_in_heap_region(tensor.data_ptr()), libmimalloc_sys::mi_version())
        };
        // major, two digits minor, two digits patch (30302: 3.3.2)
        let version = format!("{}.{}.{}", version / 10000, version / 100 % 100, version % 100);
        // SAFETY: reads a plain option.
        let purge = match unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) } {
            delay if delay < 0 => "freed memory kept".to_string(),
            delay => format!("freed memory purged after {delay} ms"),
        };
        if from_mimalloc {
            return format!("mimalloc {version} (libtorch's allocations included; {purge})");
        }
        return format!("mimalloc {version} for Rust only (libtorch's allocations: the C library's)");
    }
    #[allow(unreachable_code)]
    "the C library's malloc".to_string()
}
