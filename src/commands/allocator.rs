//! The process's malloc: mimalloc, overriding the C library's, so that libtorch's and oneDNN's own
//! allocations (each convolution call allocates its descriptors, scratchpad and output) take
//! mimalloc's fast path instead of glibc's, whose consolidation of freed chunks cost ~12 us a call on
//! the CPU measured (docs/speed.md, "Batch 1"). Shared by the CLI and `examples/bench_worker.rs`.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        if from_mimalloc {
            return format!("mimalloc {version} (libtorch's allocations included)");
        }
        return format!("mimalloc {version} for Rust only (libtorch's allocations: the C library's)");
    }
    #[allow(unreachable_code)]
    "the C library's malloc".to_string()
}
