#!/usr/bin/env bash
# The crate as crates.io and docs.rs would take it:
# - `cargo package`: what ships (src, build.rs, README, LICENSE, CHANGELOG; the fixtures and weights
#   stay in the repository) and that the .crate is under crates.io's 10 MB limit;
# - `cargo publish --dry-run`: the packaged crate builds on its own (the verify step);
# - the docs.rs build: `doc-only`, no default features, with no libtorch anywhere (LIBTORCH points
#   nowhere), every public item documented (missing_docs and rustdoc warnings are errors).
# The verify step builds the packaged copy into target/ under this crate's own unit names, so its
# artifacts are cleaned afterwards: otherwise cargo would take them for this checkout's builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit=$((10 * 1000 * 1000))

cargo package --no-verify --quiet --allow-dirty
crate="target/package/scconv-tch-$(cargo pkgid | sed 's/.*[#@]//').crate"
size=$(stat -c %s "$crate")
files="$(cargo package --list --allow-dirty)"
echo "package: $crate, $size bytes ($(wc -l <<<"$files") files)"
if [ "$size" -ge "$limit" ]; then
    echo "package: FAILED: $size bytes, over crates.io's limit of $limit" >&2
    exit 1
fi
if grep -q '^weights/\|^tests/\|^parity/' <<<"$files"; then
    echo "package: FAILED: fixtures, tests or the Python side are in the package" >&2
    exit 1
fi
for needed in LICENSE CHANGELOG.md README.md build.rs src/lib.rs src/cuda/shim.cpp src/cuda/kernels.cu; do
    grep -qx "$needed" <<<"$files" || { echo "package: FAILED: $needed is not in the package" >&2; exit 1; }
done

LIBTORCH=/nonexistent RUSTDOCFLAGS="-D warnings" \
    cargo doc --quiet --no-deps --no-default-features --features doc-only
echo "package: the docs.rs build (doc-only, no libtorch) documents every public item"

status=0
cargo publish --dry-run --allow-dirty 2>&1 | grep -v '^warning: ignoring \(test\|example\)' || status=$?
cargo clean --quiet -p scconv-tch
if [ "$status" -ne 0 ]; then
    echo "package: FAILED: cargo publish --dry-run" >&2
    exit 1
fi
echo "package: cargo publish --dry-run passes"
