#!/usr/bin/env bash
# Sets up a Cargo project that depends on scconv-tch so that its binaries link libtorch and start
# without LD_LIBRARY_PATH. It writes two files into the project (and refuses to overwrite them):
#   .cargo/config.toml  LIBTORCH for torch-sys (the PyTorch 2.11.0 that scripts/setup_torch.sh installed,
#                       through this checkout's `.libtorch` link, or $LIBTORCH when set);
#   build.rs            the rpath to libtorch's folder (and to scconv-tch's own oneDNN with its `onednn`
#                       feature) and `--no-as-needed -ltorch_cuda` when it exists
#                       (link arguments do not pass from a dependency to its dependents: tch-rs#907).
# Usage: scripts/link_dependent.sh PROJECT_DIR
set -euo pipefail
project="${1:?usage: scripts/link_dependent.sh PROJECT_DIR}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
libtorch="${LIBTORCH:-$repo_root/.libtorch}"
if [ ! -f "$project/Cargo.toml" ]; then
    echo "link_dependent: $project has no Cargo.toml" >&2
    exit 2
fi
if [ ! -d "$libtorch/lib" ]; then
    echo "link_dependent: no libtorch at $libtorch (run scripts/setup_torch.sh, or set LIBTORCH)" >&2
    exit 2
fi
for file in "$project/.cargo/config.toml" "$project/build.rs"; do
    if [ -e "$file" ]; then
        echo "link_dependent: $file exists; merge the lines from scripts/link_dependent.sh by hand" >&2
        exit 2
    fi
done
mkdir -p "$project/.cargo"
cat > "$project/.cargo/config.toml" <<TOML
# torch-sys finds libtorch here (written by scconv-tch's scripts/link_dependent.sh).
[env]
LIBTORCH = "$libtorch"
TOML
cat > "$project/build.rs" <<'RUST'
//! Links libtorch into this project's binaries: scconv-tch hands its folder over as
//! DEP_SCCONV_TCH_LIBTORCH_LIB (written by scconv-tch's scripts/link_dependent.sh).
fn main() {
    let lib = std::env::var("DEP_SCCONV_TCH_LIBTORCH_LIB")
        .expect("scconv-tch must be a direct dependency (it reports libtorch's folder)");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
    }
    // With scconv-tch's `onednn` feature: its own oneDNN's folder.
    if let Ok(onednn) = std::env::var("DEP_SCCONV_TCH_ONEDNN_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{onednn}");
    }
}
RUST
echo "link_dependent: wrote $project/.cargo/config.toml and $project/build.rs (LIBTORCH=$libtorch)"
