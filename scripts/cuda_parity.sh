#!/usr/bin/env bash
# The CUDA parity suite, in two halves, because the GPU machine has PyTorch 2.11 but no Rust:
#
#   scripts/cuda_parity.sh build   here: builds the `cuda`-feature test binaries, the CLI and the benchmark
#                                  worker into .device/
#   scripts/cuda_parity.sh run     on the GPU machine, from the repository root, with .device/ copied there
#                                  (the device tool: carry [".device"]); writes logs to $OUT (or .device/out)
#   scripts/cuda_parity.sh cpu     the last part of `run` alone: that machine's own CPU (below)
#
# `run` generates fixtures with PyTorch on the same GPU (inside the test, so under the same TF32 setting)
# and runs the suite with TF32 (libtorch's default for cuDNN convolutions), then the speed runs
# (`bench --json`, fp32, bf16 and fp16, eager and CUDA graphs, into $OUT/bench-*.json; the CLI's parity
# over every committed fixture set through the fast path; fp32 with 2023-10-19's ScConvs), then the suite again
# with NVIDIA_TF32_OVERRIDE=0. Each step has its own time limit, most important first, so that one
# device session (15 minutes, start-up included) always brings back the parity verdict and the timings.
# The binaries use that machine's libtorch through LD_LIBRARY_PATH.
#
# Then the GPU machine's own CPU (`cpu`): its `lscpu` always, and where it has bf16 units (`amx_bf16`,
# `avx512_bf16`; none of the 2-core VMs this project is built on has had them) CPU bf16 checks for
# issue 26 on two pinned cores (the CPU figures here come from 2-core VMs): the fp32 and bf16 inference
# forms of the four networks alternated, with each one's profile by section
# (scripts/forms_side_by_side.py), and the oneDNN kernels of SC-ResNet-50's bf16 form with whether its
# pool-first pass pays (scripts/ab_passes.py). The device binaries have no oneDNN of the crate's own (see
# `build`), so these forms run every convolution through libtorch's oneDNN: what they measure is that
# form, not the one `make bench-peers` times here (the log says which, from the worker's `allocator`).
# SCCONV_CPU_CHECKS=always runs them on any CPU (to try the step where there are none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build() {
    scripts/setup_torch.sh
    rm -rf .device && mkdir -p .device/bin
    # Without the crate's own oneDNN (`SCCONV_ONEDNN` at nothing): its library (55 MB) is not on the GPU
    # machine and would not fit the 64 MiB the device tool carries with the working tree, so the forms
    # there call libtorch's oneDNN (the CUDA paths never use it).
    # In a target folder of their own, so that the local CLI and worker keep their own oneDNN.
    export SCCONV_ONEDNN=/nonexistent CARGO_TARGET_DIR=target/device
    # The CLI and the worker in release (they time things); the tests in debug, as `cargo test` builds them.
    cargo build --release --features cuda --bin scconv-tch --example bench_worker
    cp target/device/release/scconv-tch target/device/release/examples/bench_worker .device/bin/
    cargo test --features cuda --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys, shutil
NEEDED = {"parity_cuda"}
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] in NEEDED:
        shutil.copy(msg["executable"], ".device/bin/" + msg["target"]["name"])
' 
    # Only what `run` uses, stripped and compressed (`run` unpacks them with Python's lzma): the device
    # tool carries at most 64 MiB with the working tree, which holds ~52 MiB of fixtures and weights.
    strip --strip-all .device/bin/*
    local binary
    for binary in .device/bin/*; do
        if [ "$(readelf -d "$binary" | grep -c 'NEEDED.*libdnnl')" != 0 ]; then
            echo "$binary needs libdnnl, which the GPU machine does not have" >&2
            return 1
        fi
    done
    xz -T0 -9 .device/bin/*
    ls -la .device/bin
    python3 - <<'PY'
import os, pathlib, subprocess, sys
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
files = [pathlib.Path(f) for f in listed if f and os.path.isfile(f)] + \
    [f for f in pathlib.Path(".device").rglob("*") if f.is_file()]
mib = sum(f.stat().st_size for f in files) / 2**20
print(f"what travels to the GPU machine (working tree and .device): {mib:.1f} MiB of 64")
sys.exit("over the device tool's 64 MiB" if mib > 64 else 0)
PY
}

# The binaries `build` packed, unpacked into a temporary folder outside the repository (so that a run
# here leaves nothing more to carry), whose path it prints.
unpack() {
    python3 - <<'PY'
import lzma, os, pathlib, tempfile
folder = pathlib.Path(tempfile.mkdtemp(prefix="scconv-device-bin-"))
for packed in pathlib.Path(".device/bin").glob("*.xz"):
    binary = folder / packed.stem
    binary.write_bytes(lzma.decompress(packed.read_bytes()))
    os.chmod(binary, 0o755)
print(folder)
PY
}

run() {
    local out="${OUT:-.device/out}" bin
    mkdir -p "$out"
    bin="$(unpack)"
    # One log (the device tool returns few files), plus the raw bench JSON.
    local log="$out/cuda_run.log"
    : > "$log"
    local torch_lib
    torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export SCCONV_ROOT="$PWD" SCCONV_FIXTURES="$PWD/weights/parity" SCCONV_PYTHON="$(command -v python3)" \
        SCCONV_BIN="$bin/scconv-tch"
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
    step 200 "parity_cuda, TF32 on" "$bin/parity_cuda" --test-threads=1 --nocapture
    for dtype in float bf16 half; do
        step 130 "bench $dtype" sh -c "$bin/scconv-tch bench --device cuda --dtype $dtype --runs 30 \
            --cudnn-benchmark --cuda-graph --json > $out/bench-cuda-$dtype.json"
        python3 -c "import json,sys; d=json.load(open('$out/bench-cuda-$dtype.json')); print(json.dumps(d)[:6000])" \
            2>&1 | tee -a "$log"
    done
    step 40 "CLI parity, fast path" "$bin/scconv-tch" parity --device cuda --execution fast
    for set in parity-versions parity-offset; do
        step 40 "CLI parity, fast path, $set" "$bin/scconv-tch" parity "weights/$set" --device cuda --execution fast
    done
    echo '{"variant": "2023-10-19"}' > "$out/v2023_10_19.json"
    step 130 "bench float, 2023-10-19" sh -c "$bin/scconv-tch bench --device cuda --runs 30 --cudnn-benchmark \
        --cuda-graph --scconv $out/v2023_10_19.json --json > $out/bench-cuda-float-v2023_10_19.json"
    step 45 "trained networks, fast path" "$bin/scconv-tch" infer --device cuda --model weights/fmnist_sc.json \
        --data sample --batch 1000 --execution fast
    step 200 "parity_cuda, TF32 off" env NVIDIA_TF32_OVERRIDE=0 "$bin/parity_cuda" --test-threads=1 --nocapture
    cpu_checks "$out" "$log" "$bin" || status=1
    echo "exit status $status" | tee -a "$log"
    return $status
}

# The GPU machine's CPU: `lscpu` always; the CPU bf16 checks where it has bf16 units (see the top).
cpu_checks() {
    local out=$1 log=$2 bin=$3 status=0
    lscpu > "$out/lscpu.txt"
    grep -E '^(Model name|CPU\(s\)|Flags)' "$out/lscpu.txt" | tee -a "$log"
    if ! grep -qwE 'amx_bf16|avx512_bf16' "$out/lscpu.txt" && [ "${SCCONV_CPU_CHECKS:-}" != always ]; then
        echo "=== CPU bf16 checks: skipped (no bf16 units on this CPU) ===" | tee -a "$log"
        return 0
    fi
    # Two cores, as on the VMs the CPU figures come from (THREADS: the worker's libtorch threads): the
    # first two allowed CPUs on distinct physical cores.
    local pin=() cores
    cores="$(python3 - <<'PY'
import os
seen, chosen = set(), []
for cpu in sorted(os.sched_getaffinity(0)):
    try:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        core = tuple(open(f"{topology}/{name}").read().strip() for name in ("physical_package_id", "core_id"))
    except OSError:
        core = (cpu,)
    if core not in seen:
        seen.add(core)
        chosen.append(str(cpu))
print(",".join(chosen[:2]))
PY
)"
    if command -v taskset >/dev/null; then
        pin=(taskset -c "$cores")
        echo "CPU checks pinned to CPUs $cores" | tee -a "$log"
    else
        echo "CPU checks not pinned (no taskset): two threads on any of the machine's CPUs" | tee -a "$log"
    fi
    export THREADS=2 OMP_NUM_THREADS=2
    echo allocator | "$bin/bench_worker" | tee -a "$log"
    cpu_step() { # cpu_step SECONDS LABEL COMMAND...
        local limit=$1 label=$2
        shift 2
        echo "=== $label (limit ${limit}s) ===" | tee -a "$log"
        local start=$SECONDS rc=0
        if ! timeout "$limit" "${pin[@]}" "$@" 2>&1 | { grep -v Warning || true; } | tee -a "$log"; then rc=1; fi
        echo "=== $label: exit $rc after $((SECONDS - start))s ===" | tee -a "$log"
        [ "$rc" = 0 ] || status=1
    }
    cpu_step 200 "CPU: fp32 and bf16 forms side by side, with their sections" python3 scripts/forms_side_by_side.py \
        --worker "$bin/bench_worker" --turns 4 --json "$out/cpu-forms.json"
    cpu_step 100 "CPU bf16: SC-ResNet-50's oneDNN kernels, and pool-first" python3 scripts/ab_passes.py \
        --worker "$bin/bench_worker" --network sc_resnet50 --batch 8 --precision bf16 --without pool-first \
        --turns 4 --onednn-kernels
    return $status
}

cpu() {
    local out="${OUT:-.device/out}" bin
    mkdir -p "$out"
    bin="$(unpack)"
    local torch_lib
    torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    cpu_checks "$out" "$out/cpu_run.log" "$bin"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    cpu) cpu ;;
    *) echo "usage: $0 build|run|cpu" >&2; exit 2 ;;
esac
