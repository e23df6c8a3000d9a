#!/usr/bin/env bash
# The crate as a dependency, the way a user adds it: a fresh Cargo project outside this tree
# (scripts/dependent/, the README's example) that depends on the crate by path without the CLI,
# set up by scripts/link_dependent.sh, built, and run with no LD_LIBRARY_PATH. It loads a PyTorch
# state dict and checks its output against PyTorch's; readelf confirms libtorch_cuda.so stays NEEDED
# (else CUDA would be reported unavailable on a GPU machine). Builds into this checkout's target/ with
# its Cargo.lock, so tch and torch-sys are reused, not rebuilt.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
project="$(mktemp -d "${TMPDIR:-/tmp}/scconv-dependent.XXXXXX")"
trap 'rm -rf "$project"' EXIT

cp -r "$repo_root/scripts/dependent/." "$project/"
sed -i "s|SCCONV_TCH_PATH|$repo_root|" "$project/Cargo.toml"
cp "$repo_root/Cargo.lock" "$project/Cargo.lock"
"$repo_root/scripts/link_dependent.sh" "$project"

export CARGO_TARGET_DIR="$repo_root/target"
(cd "$project" && cargo build --quiet)
binary="$CARGO_TARGET_DIR/debug/scconv-user"

echo "dependent: running $binary (no LD_LIBRARY_PATH)"
(cd "$repo_root" && env -u LD_LIBRARY_PATH "$binary")

needed="$(readelf -d "$binary" | grep NEEDED)"
if [ -f "$repo_root/.libtorch/lib/libtorch_cuda.so" ] && ! grep -q 'libtorch_cuda.so' <<<"$needed"; then
    echo "dependent: FAILED: libtorch_cuda.so is not NEEDED by $binary:" >&2
    echo "$needed" >&2
    exit 1
fi
# What the library itself brings (its direct dependencies): none of the CLI's.
direct="$(cargo tree --manifest-path "$project/Cargo.toml" -e normal -p scconv-tch --depth 1 --prefix none)"
for cli_only in clap indicatif image flate2 anyhow; do
    if grep -q "^$cli_only " <<<"$direct"; then
        echo "dependent: FAILED: $cli_only (a CLI dependency) is a dependency of the library:" >&2
        echo "$direct" >&2
        exit 1
    fi
done
echo "dependent: ok (libtorch_cuda.so NEEDED; no CLI dependencies in the library)"
