#!/usr/bin/env bash
# The CUDA parity suite, in two halves, because the GPU machine has PyTorch 2.11 but no Rust:
#
#   scripts/cuda_parity.sh build   here: builds the `cuda`-feature test binaries and the CLI into .device/
#   scripts/cuda_parity.sh run     on the GPU machine, from the repository root, with .device/ copied there
#                                  (the device tool: carry [".device"]); writes logs to $OUT (or .device/out)
#
# `run` generates fixtures with PyTorch on the same GPU (inside the test, so under the same TF32 setting)
# and runs the suite twice: with TF32 (libtorch's default for cuDNN convolutions) and with
# NVIDIA_TF32_OVERRIDE=0. The binaries use that machine's libtorch through LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build() {
    scripts/setup_torch.sh
    rm -rf .device && mkdir -p .device/bin
    cargo build --features cuda
    cp target/debug/scconv-tch .device/bin/
    cargo test --features cuda --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys, shutil
NEEDED = {"parity_cuda", "parity_cpu", "fast_path"}
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] in NEEDED:
        shutil.copy(msg["executable"], ".device/bin/" + msg["target"]["name"])
' 
    # Only what `run` uses, stripped: the device tool carries at most 64 MiB with the working tree.
    strip --strip-all .device/bin/*
    ls -la .device/bin
}

run() {
    local out="${OUT:-.device/out}"
    mkdir -p "$out"
    # One log (the device tool returns few files), plus the raw bench JSON.
    local log="$out/cuda_run.log"
    : > "$log"
    local torch_lib
    torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SCCONV_ROOT="$PWD" SCCONV_FIXTURES="$PWD/weights/parity" SCCONV_PYTHON="$(command -v python3)" \
        SCCONV_BIN="$PWD/.device/bin/scconv-tch"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' | tee -a "$log"
    local status=0
    for tf32 in on off; do
        local env=()
        [ "$tf32" = off ] && env=(NVIDIA_TF32_OVERRIDE=0)
        echo "=== TF32 $tf32 ===" | tee -a "$log"
        env "${env[@]}" .device/bin/parity_cuda --test-threads=1 --nocapture 2>&1 | tee -a "$log" || status=1
        for execution in reference fast; do
            env "${env[@]}" .device/bin/scconv-tch parity --device cuda --execution $execution 2>&1 | tee -a "$log" || status=1
        done
    done
    # Timings: Rust (reference and fast) and the seed's Python ScConv, PyTorch's conv3x3, networks.
    python3 scripts/bench_compare.py --device cuda --runs 30 --binary .device/bin/scconv-tch --save "$out" 2>&1 \
        | tee -a "$log" || status=1
    .device/bin/scconv-tch bench --device cuda --runs 30 --cudnn-benchmark 2>&1 | tee -a "$log" || status=1
    for m in fmnist_plain fmnist_sc; do
        for e in reference fast; do
            .device/bin/scconv-tch infer --device cuda --model weights/$m.json --data sample --batch 1000 --execution $e \
                2>&1 | tee -a "$log" || status=1
        done
    done
    # The CPU parity suites run there too: the same binaries against the GPU machine's libtorch.
    for t in parity_cpu fast_path; do
        .device/bin/$t --test-threads=4 2>&1 | tail -3 | tee -a "$log" || status=1
    done
    echo "exit status $status" | tee -a "$log"
    return $status
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
