//! Links libtorch for everything cargo builds here (library tests, the binary, examples).
//! Link arguments do not propagate from tch to its users (tch-rs#907), so this crate emits them:
//! - an rpath to the libtorch lib folder, so binaries start without LD_LIBRARY_PATH;
//! - `--no-as-needed -ltorch_cuda` when that library exists: nothing references it by symbol, so the
//!   linker would drop it and `tch::Cuda::is_available()` would say false even on a GPU machine.
//!
//! It also checks that the libtorch found is the PyTorch version tch 0.24 was written for, and hands
//! the folder on to the build scripts of projects that depend on this crate (`links = "scconv_tch"`
//! turns `cargo:libtorch_lib=...` into their `DEP_SCCONV_TCH_LIBTORCH_LIB`), which emit the same two
//! link arguments for their own binaries: see `scripts/link_dependent.sh` and the README.
//!
//! With the `doc-only` feature (docs.rs, which has no libtorch) it does nothing.
use std::path::{Path, PathBuf};

const TORCH_VERSION: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(scconv_cuda_shim)");
    println!("cargo::rustc-check-cfg=cfg(scconv_cpu_shim)");
    println!("cargo::rustc-check-cfg=cfg(scconv_onednn)");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var_os("CARGO_FEATURE_DOC_ONLY").is_some() {
        return;
    }
    let lib_dir = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        panic!(
            "torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB); \
             build with the `doc-only` feature to document the crate without libtorch"
        )
    }));
    check_torch_version(&lib_dir);
    println!("cargo:libtorch_lib={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    build_cpu_shim(&lib_dir);
    build_own_onednn(&lib_dir);
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{},-ltorch_cuda,--as-needed", lib_dir.display());
        build_cuda_shim(&lib_dir);
    }
}

/// `src/inference/shim.cpp`: libtorch's oneDNN convolutions with fused epilogues and its thread pool,
/// which tch does not bind (about 5 s to compile). If it does not compile, the crate builds without it
/// and says so: the inference form then runs libtorch's plain convolutions (`cfg(scconv_cpu_shim)` off).
/// `SCCONV_NO_CPU_SHIM=1` builds without it on purpose (what `tests/cpu_shim.rs` must then catch).
fn build_cpu_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/inference/shim.cpp");
    println!("cargo:rerun-if-env-changed=SCCONV_NO_CPU_SHIM");
    if std::env::var_os("SCCONV_NO_CPU_SHIM").is_some_and(|v| v == "1") {
        println!("cargo:warning=SCCONV_NO_CPU_SHIM=1: the inference form's oneDNN shim is left out");
        return;
    }
    let torch = lib_dir.parent().unwrap_or(lib_dir);
    let compiled = cc::Build::new()
        .cpp(true)
        .file("src/inference/shim.cpp")
        .include(torch.join("include"))
        .flag("-std=c++17")
        // at::parallel_for's OpenMP region is in the header: without -fopenmp the compiler drops
        // its `#pragma omp parallel` and every chunk runs on the calling thread.
        .flag("-fopenmp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("scconv_cpu_shim");
    if let Err(err) = compiled {
        println!("cargo:warning=the inference form's oneDNN shim did not compile ({err}); it runs libtorch's plain convolutions");
        return;
    }
    for lib in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    // The OpenMP runtime libtorch itself loads (PyPI's wheel ships it beside it as libgomp.so.1;
    // other builds name it libgomp-<hash>.so.1), so that the shim's parallel regions run on
    // libtorch's own threads; else the system's.
    match shipped_libgomp(lib_dir) {
        Some(name) => println!("cargo:rustc-link-lib=dylib:+verbatim={name}"),
        None => println!("cargo:rustc-link-lib=dylib=gomp"),
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-cfg=scconv_cpu_shim");
}

/// `src/inference/onednn.cpp`: the form's convolutions as oneDNN primitives of our own, with the
/// `onednn` feature (part of `cli`) and a oneDNN found: `SCCONV_ONEDNN` (a prefix holding
/// `include/oneapi/dnnl/dnnl.hpp` and `lib/libdnnl.so.3`), else the virtual environment libtorch sits
/// in, where `make setup` installs PyPI's `onednn-cpu-gomp` (GNU OpenMP, libtorch's own threads).
/// Without one the crate builds without it and says so (`cfg(scconv_onednn)` off: libtorch's calls).
fn build_own_onednn(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/inference/onednn.cpp");
    println!("cargo:rerun-if-env-changed=SCCONV_ONEDNN");
    if std::env::var_os("CARGO_FEATURE_ONEDNN").is_none() {
        return;
    }
    // <venv>/lib/python3.x/site-packages/torch/lib -> <venv>
    let venv = lib_dir.canonicalize().ok().and_then(|lib| lib.ancestors().nth(5).map(Path::to_path_buf));
    let prefix = std::env::var_os("SCCONV_ONEDNN").map(PathBuf::from).or(venv);
    let Some(prefix) = prefix
        .filter(|p| p.join("include/oneapi/dnnl/dnnl.hpp").exists() && p.join("lib/libdnnl.so.3").exists())
    else {
        println!("cargo:warning=no oneDNN found (make setup installs it; or SCCONV_ONEDNN=PREFIX): the inference form calls libtorch's convolutions");
        return;
    };
    let compiled = cc::Build::new()
        .cpp(true)
        .file("src/inference/onednn.cpp")
        .include(prefix.join("include"))
        .flag("-std=c++17")
        .warnings(false)
        .try_compile("scconv_onednn");
    if let Err(err) = compiled {
        println!("cargo:warning=the own-oneDNN convolutions did not compile ({err}): the inference form calls libtorch's");
        return;
    }
    let lib = prefix.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=dnnl");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:onednn_lib={}", lib.display());
    println!("cargo:rustc-cfg=scconv_onednn");
}

/// `src/cuda/shim.cpp` (NVRTC, the driver's kernel launch on libtorch's stream, CUDA graphs), when the
/// CUDA headers are beside libtorch (PyPI's layout: `nvidia/cu13/include` next to `torch/`, with the
/// `nvidia-cuda-crt` package for `crt/host_config.h`) or under `$CUDA_HOME/include`. Without them, or if
/// the shim does not compile, the crate builds as before and says so in a warning: on CUDA the fast path
/// then runs libtorch operations (`cfg(scconv_cuda_shim)` is off and the kernels report that they are
/// not built).
fn build_cuda_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/cuda/shim.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let torch = lib_dir.parent().unwrap_or(lib_dir);
    let candidates = [
        torch.join("../nvidia/cu13/include"),
        PathBuf::from(std::env::var("CUDA_HOME").unwrap_or_default()).join("include"),
    ];
    let needed = ["cuda.h", "nvrtc.h", "crt/host_config.h"];
    let Some(cuda_include) = candidates.iter().find(|d| needed.iter().all(|h| d.join(h).exists())) else {
        println!(
            "cargo:warning=CUDA kernels not built: no folder beside libtorch or under CUDA_HOME has {} \
             (for PyPI's torch: pip install nvidia-cuda-crt==13.0.88); CUDA runs libtorch operations",
            needed.join(", ")
        );
        return;
    };
    let compiled = cc::Build::new()
        .cpp(true)
        .file("src/cuda/shim.cpp")
        .include(torch.join("include"))
        .include(cuda_include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("scconv_cuda_shim");
    if let Err(err) = compiled {
        println!("cargo:warning=CUDA kernels not built: the shim did not compile ({err}); CUDA runs libtorch operations");
        return;
    }
    for lib in ["c10_cuda", "torch_cuda", "c10", "dl"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-cfg=scconv_cuda_shim");
}

/// A PyPI install has `torch/version.py` next to `torch/lib`; a plain libtorch has `build-version`.
fn check_torch_version(lib_dir: &Path) {
    let root = lib_dir.parent().unwrap_or(lib_dir);
    let found = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| parse_version_py(&text))
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok());
    let Some(found) = found else {
        println!("cargo:warning=could not read the PyTorch version under {}", root.display());
        return;
    };
    let found = found.trim();
    let release = found.split('+').next().unwrap_or(found);
    if release != TORCH_VERSION {
        panic!(
            "found PyTorch {found} at {}, but tch 0.24 needs PyTorch {TORCH_VERSION}. \
             Run `scripts/setup_torch.sh` (it installs torch=={TORCH_VERSION} from PyPI into its own \
             virtual environment and points `.libtorch` at it), or set LIBTORCH to a {TORCH_VERSION} libtorch.",
            root.display()
        );
    }
}

fn parse_version_py(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    let value = line.split('=').nth(1)?.trim();
    Some(value.trim_matches(|c| c == '\'' || c == '"').to_string())
}

/// The file name of the GNU OpenMP runtime in libtorch's lib folder, where it ships one.
fn shipped_libgomp(lib_dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(lib_dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libgomp") && name.contains(".so"))
        .collect();
    names.sort();
    names.into_iter().next()
}
