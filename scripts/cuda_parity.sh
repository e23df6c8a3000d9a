#!/usr/bin/env bash
# The CUDA parity suite, in two halves, because the GPU machine has PyTorch 2.11 but no Rust:
#
#   scripts/cuda_parity.sh build   here: builds the `cuda`-feature test binaries and the CLI into .device/
#   scripts/cuda_parity.sh run     on the GPU machine, from the repository root, with .device/ copied there
#                                  (the device tool: carry [".device"]); writes logs to $OUT (or .device/out)
#
# `run` generates fixtures with PyTorch on the same GPU (inside the test, so under the same TF32 setting)
# and runs the suite with TF32 (libtorch's default for cuDNN convolutions), then the speed runs
# (`bench --json`, fp32, bf16 and fp16, eager and CUDA graphs, into $OUT/bench-*.json; the CLI's parity
# over every committed fixture set through the fast path; fp32 with 2023-10-19's ScConvs), then the suite again
# with NVIDIA_TF32_OVERRIDE=0. Each step has its own time limit, most important first, so that one
# device session (15 minutes, start-up included) always brings back the parity verdict and the timings.
# The binaries use that machine's libtorch through LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build() {
    scripts/setup_torch.sh
    rm -rf .device && mkdir -p .device/bin
    # The CLI in release (it times things); the tests in debug, as `cargo test` builds them.
    cargo build --release --features cuda
    cp target/release/scconv-tch .device/bin/
    cargo test --features cuda --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys, shutil
NEEDED = {"parity_cuda"}
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
    step() { # step SECONDS LABEL COMMAND...: runs COMMAND with a time limit, logging; failure noted.
        local limit=$1 label=$2
        shift 2
        echo "=== $label (limit ${limit}s) ===" | tee -a "$log"
        local start=$SECONDS
        local rc=0
        # (set -e and pipefail would end the whole run at the first failing step)
        if ! timeout "$limit" "$@" 2>&1 | tee -a "$log"; then rc=1; fi
        echo "=== $label: exit $rc after $((SECONDS - start))s ===" | tee -a "$log"
        [ "$rc" = 0 ] || status=1
    }
    step 200 "parity_cuda, TF32 on" .device/bin/parity_cuda --test-threads=1 --nocapture
    for dtype in float bf16 half; do
        step 130 "bench $dtype" sh -c ".device/bin/scconv-tch bench --device cuda --dtype $dtype --runs 30 \
            --cudnn-benchmark --cuda-graph --json > $out/bench-cuda-$dtype.json"
        python3 -c "import json,sys; d=json.load(open('$out/bench-cuda-$dtype.json')); print(json.dumps(d)[:6000])" \
            2>&1 | tee -a "$log"
    done
    step 40 "CLI parity, fast path" .device/bin/scconv-tch parity --device cuda --execution fast
    for set in parity-versions parity-offset; do
        step 40 "CLI parity, fast path, $set" .device/bin/scconv-tch parity "weights/$set" --device cuda --execution fast
    done
    echo '{"variant": "2023-10-19"}' > "$out/v2023_10_19.json"
    step 130 "bench float, 2023-10-19" sh -c ".device/bin/scconv-tch bench --device cuda --runs 30 --cudnn-benchmark \
        --cuda-graph --scconv $out/v2023_10_19.json --json > $out/bench-cuda-float-v2023_10_19.json"
    step 45 "trained networks, fast path" .device/bin/scconv-tch infer --device cuda --model weights/fmnist_sc.json \
        --data sample --batch 1000 --execution fast
    step 200 "parity_cuda, TF32 off" env NVIDIA_TF32_OVERRIDE=0 .device/bin/parity_cuda --test-threads=1 --nocapture
    echo "exit status $status" | tee -a "$log"
    return $status
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
