//! The CUDA shim is part of every build against a libtorch with CUDA (PyPI's `torch` is one): without
//! it the fused kernels would silently not exist and the fast path on CUDA would fall back to libtorch
//! operations. `build.rs` only warns when the CUDA headers are missing, so this test makes it an error
//! in this repository's own builds.
mod common;

#[test]
fn a_libtorch_with_cuda_gets_the_cuda_shim() {
    // `scripts/setup_torch.sh` installs PyPI's torch, which has CUDA: a CPU-only libtorch here is not
    // this repository's setup, and would leave the shim untested, so it fails rather than skips.
    let libtorch_cuda = common::crate_dir().join(".libtorch/lib/libtorch_cuda.so");
    assert!(
        libtorch_cuda.exists(),
        "{} absent: a CPU-only libtorch; this repository's tests run against PyPI's torch 2.11.0 with CUDA \
         (scripts/setup_torch.sh)",
        libtorch_cuda.display()
    );
    assert!(
        scconv_tch::cuda::kernels_built(),
        "libtorch has CUDA but this build has no CUDA shim: see build.rs's warning (the CUDA headers, \
         e.g. pip install nvidia-cuda-crt==13.0.88 into the torch venv, as scripts/setup_torch.sh does)"
    );
}
