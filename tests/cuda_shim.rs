//! The CUDA shim is part of every build against a libtorch with CUDA (PyPI's `torch` is one): without
//! it the fused kernels would silently not exist and the fast path on CUDA would fall back to libtorch
//! operations. `build.rs` only warns when the CUDA headers are missing, so this test makes it an error
//! in this repository's own builds.
mod common;

#[test]
fn a_libtorch_with_cuda_gets_the_cuda_shim() {
    let libtorch_cuda = common::crate_dir().join(".libtorch/lib/libtorch_cuda.so");
    if !libtorch_cuda.exists() {
        println!("{} absent: a CPU-only libtorch, no shim expected", libtorch_cuda.display());
        return;
    }
    assert!(
        scconv_tch::cuda::kernels_built(),
        "libtorch has CUDA but this build has no CUDA shim: see build.rs's warning (the CUDA headers, \
         e.g. pip install nvidia-cuda-crt==13.0.88 into the torch venv, as scripts/setup_torch.sh does)"
    );
}
