#!/usr/bin/env python3
"""`make bench-peers`: this crate's modes against the runtimes a user would pick instead, on the same
networks (the PyTorch twins of parity/models.py; the trained Fashion-MNIST pair with its weights), in
one run on this machine.

1. Installs onnxruntime and openvino (and onnx, onnxscript, matplotlib) from PyPI into their own folder
   (default ~/.cache/scconv-tch/peers), never into the PyTorch venv; that folder goes at the *end* of
   sys.path, so the venv's torch and numpy are the ones imported.
2. Exports every network: ONNX (opset 17, torch.onnx.export with dynamo=False) for ONNX Runtime and
   OpenVINO (f32 as asked, and with its defaults: bf16 on CPUs with bf16 units; the precision it chose is
   recorded), TorchScript (trace, freeze, optimize_for_inference), torch.compile with freezing (fp32, and
   under CPU bf16 autocast).
3. Checks every runtime's logits against PyTorch eager on one batch: max |diff| / max |ref| and the
   argmax agreement; this crate's modes (the fp32 and bf16 inference forms included) through
   `examples/bench_worker.rs`, which reads the same weights. For the trained Fashion-MNIST networks, every
   runtime classifies the 10,000 test images (Debian's dataset-fashion-mnist; else the shipped 1,000):
   classes differing from PyTorch fp32 eager, and accuracy.
4. Times them in interleaved rounds in two warm processes (this one and the worker, which waits idle on
   its pipe while the peers run), the same threads and batches for all: images/s from the median.
5. Writes docs/bench/peers-cpu.json (with `lscpu`'s model and flags), a Markdown table (peers-cpu.md)
   and a picture (peers-cpu.png).

On a CPU without bf16 units (no `avx512_bf16` / `amx_bf16`) libtorch's bf16 convolutions fall back to
slow reference kernels and our bf16 form runs emulated: torch.compile bf16 is then checked for accuracy
and classes on the Fashion-MNIST networks but not timed, and the tables say so.

A peer that cannot be installed, exported or run fails the run, naming it.
"""
import argparse
import copy
import gzip
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "parity"))

# A pause before each runtime's turn: the thread pools of the one before (OpenMP's, ONNX Runtime's,
# OpenVINO's TBB) keep spinning for a while after their last call, and on 2 cores a spinning pool in
# the other process took the next runtime's CPU (measured: our Fashion-MNIST batch 1 at 173 images/s
# right after the peers, 1,095 alone). `OtherSide` records, per turn, the CPU the other process used
# (the table says the most), so a run shows whether the pause sufficed.
QUIET_S = 0.5
PEER_PACKAGES = ["onnxruntime==1.32.0", "onnx==1.23.2", "onnxscript==0.7.2", "openvino==2026.4.1", "matplotlib==3.11.2"]
MEAN, STD = 0.2860, 0.3530  # the training script's Fashion-MNIST normalisation (src/harness/data)


def cpu_seconds(pid):
    """The CPU seconds process `pid`'s threads have run so far: the scheduler's nanoseconds of each
    (/proc/PID/task/TID/schedstat; a thread that ends meanwhile takes its time along), or, where the
    kernel keeps no schedstat, user and system time in clock ticks (/proc/PID/stat, 10 ms steps)."""
    total, found = 0, False
    for path in pathlib.Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(path.read_text().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            pass  # the thread ended while being read
    if found:
        return total / 1e9
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherSide:
    """The CPU the process not being timed uses during a runtime's turn (the driver's, with the peers'
    thread pools, while ours runs; the worker's while a peer runs), as a share of one core: 0 when the
    other side is quiet, as a fair side-by-side run needs."""

    def __init__(self, pid):
        self.pid = pid

    def __enter__(self):
        self.cpu, self.start = cpu_seconds(self.pid), time.perf_counter()
        return self

    def __exit__(self, *_):
        self.share = (cpu_seconds(self.pid) - self.cpu) / (time.perf_counter() - self.start)


def fail(what, err):
    raise SystemExit(f"bench-peers: {what}: {err}")


def install_peers(folder):
    marker = folder / ".installed"
    if marker.exists() and marker.read_text().split() == PEER_PACKAGES:
        return
    print(f"bench-peers: installing {', '.join(PEER_PACKAGES)} into {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--target", str(folder), *PEER_PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail("could not install the peers (" + " ".join(PEER_PACKAGES) + ")", done.stderr[-2000:])
    marker.write_text(" ".join(PEER_PACKAGES))


def import_peers(folder):
    sys.path.append(str(folder))  # after the venv: its torch and numpy win
    peers = {}
    for name in ["onnxruntime", "openvino", "onnx", "matplotlib"]:
        try:
            peers[name] = __import__(name)
        except Exception as err:  # noqa: BLE001 - any import failure names the peer
            fail(f"could not import {name} from {folder}", err)
    import numpy
    import torch
    for module in (numpy, torch):
        if str(folder) in str(module.__file__):
            fail(f"{folder} shadows the venv's {module.__name__}", module.__file__)
    return peers


TEST_SET = pathlib.Path("/usr/share/datasets/fashion-mnist")


def machine_cpu():
    """lscpu's model name and flags, and whether the CPU has bf16 units."""
    fields = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        fail("lscpu", err)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "?"), "flags": " ".join(flags),
            "bf16_units": [f for f in flags if f in ("avx512_bf16", "amx_bf16")]}


def test_images():
    """The Fashion-MNIST test images and labels: Debian's 10,000, else the shipped first 1,000."""
    import numpy
    import torch
    images, labels = TEST_SET / "t10k-images-idx3-ubyte.gz", TEST_SET / "t10k-labels-idx1-ubyte.gz"
    if not images.exists():
        sample = ROOT / "weights/fashion-mnist-sample"
        images, labels = sample / "t10k-images-first1000-idx3-ubyte.gz", sample / "t10k-labels-first1000-idx1-ubyte.gz"
    pixels = numpy.frombuffer(gzip.open(images).read()[16:], dtype=numpy.uint8).reshape(-1, 28, 28)
    x = ((torch.from_numpy(pixels.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1)
    y = torch.from_numpy(numpy.frombuffer(gzip.open(labels).read()[8:], dtype=numpy.uint8).astype("int64"))
    return x, y, str(images.parent)


def logits(f, x, batch):
    """f's fp32 logits on x, `batch` at a time (the last chunk padded: some runtimes take one batch size;
    each chunk's copied, since ours map a file the next call overwrites)."""
    import torch
    out = []
    for begin in range(0, len(x), batch):
        chunk = x[begin:begin + batch]
        padded = torch.cat([chunk, chunk.new_zeros(batch - len(chunk), *chunk.shape[1:])]) if len(chunk) < batch else chunk
        with torch.no_grad():
            out.append(f(padded)[:len(chunk)].float().clone())
    return torch.cat(out)


def classes(f, x, batch):
    """f's classes on x, `batch` at a time."""
    return logits(f, x, batch).argmax(1)


def sample_images(n):
    """The first n shipped Fashion-MNIST test images, normalised as the training script does."""
    import numpy
    import torch
    path = ROOT / "weights/fashion-mnist-sample/t10k-images-first1000-idx3-ubyte.gz"
    data = numpy.frombuffer(gzip.open(path).read()[16:], dtype=numpy.uint8).reshape(-1, 28, 28)
    x = torch.from_numpy(data[:n].copy()).float()
    return ((x / 255.0 - MEAN) / STD).unsqueeze(1)


def networks():
    """(name, config, weights or None, input shape without the batch, batches)."""
    out = [
        ("resnet50", {"block": "bottleneck", "layers": [3, 4, 6, 3]}, None, (3, 224, 224), [8, 1]),
        ("sc_resnet50", {"block": "bottleneck", "layers": [3, 4, 6, 3], "sc": True}, None, (3, 224, 224), [8, 1]),
    ]
    for name in ["fmnist_plain", "fmnist_sc"]:
        record = json.loads((ROOT / f"weights/{name}.json").read_text())
        out.append((name, record["config"], ROOT / "weights" / record["weights"], (1, 28, 28), [256, 1]))
    return out


def worker_turn(batch):
    """(warm-up, timed) forwards of one turn in the worker's A/B scripts: a few at a large batch, more of
    the millisecond-long batch-1 forwards."""
    return (1, 3) if batch > 1 else (10, 30)


def alternated(keys, turns):
    """(turn, key) for `turns` turns of each key, the order reversed every other turn (A B, B A, ...), so
    that neither side always runs first after the other."""
    for turn in range(turns):
        for key in (keys if turn % 2 == 0 else keys[::-1]):
            yield turn, key


class Worker:
    """examples/bench_worker.rs over a pipe (`env`: more environment, e.g. ONEDNN_VERBOSE). Lines of its
    output that are not answers (oneDNN's verbose printing) are kept in `other_lines`."""

    def __init__(self, binary, threads, env=None):
        env = dict(os.environ, THREADS=str(threads), **(env or {}))
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.other_lines = []

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        while (out := self.proc.stdout.readline()) and not out.startswith("{"):
            self.other_lines.append(out.rstrip("\n"))
        answer = json.loads(out or '{"error": "the worker exited"}')
        if "error" in answer:
            fail(f"scconv-tch ({line.split()[0]} {line.split()[1]})", answer["error"])
        return answer


def build_twin(config, weights):
    import models
    import torch
    from safetensors.torch import load_file
    torch.manual_seed(0)
    model = models.build(config).eval()
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    return model


def export_onnx(model, example, path, dynamic_batch=False):
    """`model` as ONNX the way every benchmark here exports it (opset 17, the TorchScript exporter),
    its input `input` and output `logits`; `dynamic_batch`: any batch size."""
    import torch
    axes = {"dynamic_axes": {"input": {0: "batch"}}} if dynamic_batch else {}
    with torch.no_grad():
        torch.onnx.export(model, example, str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"], **axes)


def ort_options(ort, threads):
    """ONNX Runtime's session options here: `threads` for each operator, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def openvino_settings(threads, **extra):
    """OpenVINO's CPU settings here: one request at a time on `threads` threads, for latency (its
    default precision unless `extra` names one)."""
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", **extra}


def export_all(name, model, shape, batches, tmp, peers, threads, bf16_batches):
    """Every peer runtime for `model`, per batch: {runtime: {batch: callable(x) -> torch.Tensor}}, and the
    precision OpenVINO's defaults chose. torch.compile bf16 only at `bf16_batches`."""
    import numpy
    import torch
    ort, ov = peers["onnxruntime"], peers["openvino"]
    runtimes = {r: {} for r in PEERS}
    ov_default_precision = None
    onnx_path = tmp / f"{name}.onnx"
    example = torch.randn(batches[0], *shape)
    try:
        export_onnx(model, example, onnx_path, dynamic_batch=True)
    except Exception as err:  # noqa: BLE001
        fail(f"torch.onnx.export of {name}", err)
    options = ort_options(ort, threads)
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        fail(f"ONNX Runtime on {name}", err)
    core = ov.Core()
    for batch in batches:
        x = torch.randn(batch, *shape)
        runtimes["PyTorch eager"][batch] = model
        with torch.no_grad():
            try:
                traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x).eval()))
            except Exception as err:  # noqa: BLE001
                fail(f"TorchScript of {name} (batch {batch})", err)
            runtimes["TorchScript frozen"][batch] = traced
            try:
                with torch._inductor.config.patch(freezing=True):
                    compiled = torch.compile(copy.deepcopy(model), dynamic=False)
                    compiled(x)
            except Exception as err:  # noqa: BLE001
                fail(f"torch.compile of {name} (batch {batch})", err)
            runtimes["torch.compile freezing"][batch] = compiled
            if batch in bf16_batches:
                try:
                    with torch._inductor.config.patch(freezing=True), torch.autocast("cpu", dtype=torch.bfloat16):
                        compiled_bf16 = torch.compile(copy.deepcopy(model), dynamic=False)
                        compiled_bf16(x)
                except Exception as err:  # noqa: BLE001
                    fail(f"torch.compile bf16 of {name} (batch {batch})", err)
                runtimes["torch.compile bf16"][batch] = lambda x, c=compiled_bf16: autocast_bf16(c, x)
        runtimes["ONNX Runtime"][batch] = lambda x, s=session: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
        for runtime, precision in [("OpenVINO f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO default", {})]:
            try:
                ov_model = core.read_model(str(onnx_path))
                ov_model.reshape({"input": [batch, *shape]})
                ov_compiled = core.compile_model(ov_model, "CPU", openvino_settings(threads, **precision))
                if not precision:
                    hint = ov_compiled.get_property("INFERENCE_PRECISION_HINT")
                    ov_default_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            except Exception as err:  # noqa: BLE001
                fail(f"{runtime} on {name} (batch {batch})", err)
            runtimes[runtime][batch] = lambda x, c=ov_compiled: torch.from_numpy(numpy.asarray(c([x.numpy()])[0]))
    return runtimes, ov_default_precision


def autocast_bf16(f, x):
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return f(x).float()


def compare(out, ref):
    out, ref = out.float(), ref.float()
    return {"max_abs_diff_rel": float((out - ref).abs().max() / ref.abs().max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs/bench")
    parser.add_argument("--peers", type=pathlib.Path, default=pathlib.Path.home() / ".cache/scconv-tch/peers")
    parser.add_argument("--worker", type=pathlib.Path, default=ROOT / "target/release/examples/bench_worker")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per runtime per round")
    parser.add_argument("--only", nargs="*", help="network names (default: all four)")
    args = parser.parse_args()

    install_peers(args.peers)
    peers = import_peers(args.peers)
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(args.threads)
    # Every network's forward is one code object to dynamo: its compiles (fp32 and bf16, per batch, per
    # network) count against one recompile limit (8 by default), past which torch.compile silently runs
    # eager. Raise it so every compiled runtime is compiled.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.peers.parent / "inductor-cache"))
    worker = Worker(args.worker, args.threads)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-peers-"))

    cpu = machine_cpu()
    # libtorch's own check passes on AVX-512 CPUs that emulate bf16: the CPU's flags decide.
    bf16_native = bool(cpu["bf16_units"]) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cases, results = [], {"machine": {"cpu": platform.processor() or platform.machine(), "lscpu": cpu,
                                      "bf16_native": bf16_native, "threads": args.threads,
                                      "torch": torch.__version__, "onnxruntime": peers["onnxruntime"].__version__,
                                      "openvino": peers["openvino"].__version__, "when": time.strftime("%Y-%m-%d %H:%M")},
                          "networks": []}
    runtime = worker.ask("allocator")
    results["machine"]["our_allocator"] = runtime["allocator"]
    results["machine"]["our_onednn"] = runtime.get("own_onednn")
    test_x, test_y, test_source = test_images()
    results["machine"]["test_images"] = f"{len(test_x)} from {test_source}"
    for name, config, weights, shape, batches in networks():
        if args.only and name not in args.only:
            continue
        print(f"bench-peers: exporting {name}", flush=True)
        model = build_twin(config, weights)
        weights_file = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, str(weights_file))
        config_file = tmp / f"{name}.json"
        config_file.write_text(json.dumps(config))
        trained = shape == (1, 28, 28)
        # Without bf16 units torch.compile bf16 runs libtorch's slow fallback: accuracy and classes of the
        # Fashion-MNIST networks at their first batch size only, not timed.
        bf16_batches = batches if bf16_native else (batches[:1] if trained else [])
        runtimes, ov_default_precision = export_all(name, model, shape, batches, tmp, peers, args.threads, bf16_batches)
        ours = ["reference", "fast", "inference", "inference-bf16"] if config.get("sc") else ["reference", "inference", "inference-bf16"]
        for batch in batches:
            key = f"{name}@{batch}"
            worker.ask(f"load {key} {config_file} {weights_file}")
            worker.ask(f"compile {key} {batch} {' '.join(map(str, shape))}")
            bf16_form = worker.ask(f"compile-bf16 {key} {batch} {' '.join(map(str, shape))}")
        # Accuracy on one batch of the first size: real images for Fashion-MNIST, a seeded normal input else.
        batch = batches[0]
        torch.manual_seed(1)
        x = sample_images(batch) if shape == (1, 28, 28) else torch.randn(batch, *shape)
        with torch.no_grad():
            ref = model(x)
        accuracy = {}
        for runtime, per_batch in runtimes.items():
            if batch in per_batch:
                with torch.no_grad():
                    accuracy[runtime] = compare(per_batch[batch](x), ref)
        from safetensors.torch import load_file

        def ours_f(mode, key=f"{name}@{batch}"):
            def f(chunk):
                save_file({"input": chunk.contiguous()}, str(tmp / "input.safetensors"))
                worker.ask(f"run {key} {mode} {tmp / 'input.safetensors'} {tmp / 'out.safetensors'}")
                return load_file(str(tmp / "out.safetensors"))["logits"]
            return f

        for mode in ours:
            accuracy[our_name(mode)] = compare(ours_f(mode)(x), ref)
        save_file({"input": x.contiguous()}, str(tmp / "input.safetensors"))
        decisions = {mode: worker.ask(f"decisions {name}@{batch} {tmp / 'input.safetensors'} {mode}")["layers"]
                     for mode in ["inference", "inference-bf16"]} if config.get("sc") else {}
        entry = {"name": name, "batches": batches, "accuracy": accuracy, "inference_form_decisions": decisions.get("inference", []),
                 "bf16_form_decisions": decisions.get("inference-bf16", []), "bf16_form": bf16_form["arithmetic"],
                 "openvino_default_precision": ov_default_precision, "timings": {}}
        if trained:
            print(f"bench-peers: {name}: classes of {len(test_x)} test images, every runtime", flush=True)
            reference_classes = classes(model, test_x, batch)
            runners = {r: pb[batch] for r, pb in runtimes.items() if batch in pb}
            runners.update({our_name(mode): ours_f(mode) for mode in ours})
            entry["test_set"] = {}
            for runtime, f in runners.items():
                predicted = classes(f, test_x, batch)
                entry["test_set"][runtime] = {"differing_from_eager": int((predicted != reference_classes).sum()),
                                              "accuracy": float((predicted == test_y).float().mean())}
        results["networks"].append(entry)
        timed = {r: pb for r, pb in runtimes.items() if r != "torch.compile bf16" or bf16_native}
        cases.append((entry, shape, timed, ours))

    for round_ in range(args.rounds):
        print(f"bench-peers: round {round_ + 1} of {args.rounds}", flush=True)
        for entry, shape, runtimes, ours in cases:
            for batch in entry["batches"]:
                x = torch.randn(batch, *shape)
                timings = entry["timings"].setdefault(str(batch), {})
                other_side = entry.setdefault("other_side_cpu", {}).setdefault(str(batch), {})
                # Batch 1 runs take a millisecond or so: more of them, after more warm-up, per turn.
                warmup, runs = (1, args.runs) if batch > 1 else (10, 10 * args.runs)
                for runtime, per_batch in runtimes.items():
                    if batch not in per_batch:
                        continue
                    f = per_batch[batch]
                    time.sleep(QUIET_S)
                    with torch.no_grad(), OtherSide(worker.proc.pid) as other:
                        for _ in range(warmup):
                            f(x)
                        for _ in range(runs):
                            start = time.perf_counter()
                            f(x)
                            timings.setdefault(runtime, []).append((time.perf_counter() - start) * 1e3)
                    other_side.setdefault(runtime, []).append(other.share)
                for mode in ours:
                    time.sleep(QUIET_S)
                    with OtherSide(os.getpid()) as other:
                        ms = worker.ask(f"time {entry['name']}@{batch} {mode} {batch} {' '.join(map(str, shape))} {warmup} {runs}")["ms"]
                    timings.setdefault(our_name(mode), []).extend(ms)
                    other_side.setdefault(our_name(mode), []).append(other.share)

    for entry in results["networks"]:
        entry["images_per_second"] = {
            batch: {runtime: int(batch) / (statistics.median(ms) / 1e3) for runtime, ms in per_runtime.items()}
            for batch, per_runtime in entry["timings"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers-cpu.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "peers-cpu.md").write_text(table(results))
    picture(results, args.out / "peers-cpu.png", peers["matplotlib"])
    print(table(results))


PEERS = ["PyTorch eager", "TorchScript frozen", "torch.compile freezing", "ONNX Runtime", "OpenVINO f32",
         "OpenVINO default", "torch.compile bf16"]
FP32_PEERS = PEERS[:5]
OURS = ["scconv-tch reference", "scconv-tch fast", "scconv-tch inference", "scconv-tch inference bf16"]


def our_name(mode):
    return "scconv-tch " + mode.replace("inference-bf16", "inference bf16")


def cell(ips, runtime, bold=False):
    if runtime not in ips:
        return "—"
    return f"**{ips[runtime]:,.1f}**" if bold else f"{ips[runtime]:,.1f}"


def ratio(ips, ours, peer):
    return f"{ips[ours] / ips[peer]:.2f}x" if ours in ips and peer in ips else "—"


def table(results):
    m = results["machine"]
    cpu = m.get("lscpu", {})
    bf16 = ", ".join(cpu.get("bf16_units", [])) or "none"
    lines = [f"Images/s, {m['threads']} threads, forward only, median of every timed run over interleaved rounds "
             f"({m['when']}; torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, OpenVINO {m['openvino']}). "
             f"CPU: {cpu.get('model', m['cpu'])}; bf16 units: {bf16}. Ours ran with {m.get('our_allocator', 'the C library malloc')}"
             + (f" and its forms' convolutions as oneDNN {m['our_onednn']} primitives of its own" if m.get("our_onednn") else "") + ", "
             "the peers in Python with their own allocators. Best fp32 peer in bold; the last columns: "
             "our fp32 form over the best fp32 peer, our bf16 form over OpenVINO's default and over torch.compile bf16.", ""]
    if not m.get("bf16_native", True):
        lines += ["**This CPU has no bf16 units**: OpenVINO's default precision is f32 here (recorded below), "
                  "torch.compile bf16 is not timed (libtorch's bf16 convolutions fall back to slow kernels), and our "
                  "bf16 form runs emulated (bf16's numbers in fp32 tensors: no speed-up).", ""]
    lines += ["| network (batch) | " + " | ".join(PEERS + OURS) + " | fp32 form / best fp32 peer | bf16 form / OpenVINO default | bf16 form / torch.compile bf16 |",
              "|---|" + "---:|" * (len(PEERS) + len(OURS) + 3)]
    for entry in results["networks"]:
        for batch, ips in entry["images_per_second"].items():
            best = max(FP32_PEERS, key=lambda r: ips[r])
            cells = [cell(ips, r, r == best) for r in PEERS] + [cell(ips, r) for r in OURS]
            cells += [ratio(ips, "scconv-tch inference", best), ratio(ips, "scconv-tch inference bf16", "OpenVINO default"),
                      ratio(ips, "scconv-tch inference bf16", "torch.compile bf16")]
            lines.append(f"| {entry['name']} ({batch}) | " + " | ".join(cells) + " |")
    shares = [(share, e["name"], batch, runtime) for e in results["networks"]
              for batch, per in e.get("other_side_cpu", {}).items() for runtime, turn in per.items() for share in turn]
    if shares:
        most = max(shares)
        lines += ["", f"The process not being timed (the driver, with the peers' thread pools, during our turns; our "
                  f"worker during the peers') used at most {most[0]:.2f} of a core in any of the {len(shares)} turns "
                  f"({most[1]} ({most[2]}), {most[3]}'s turn): no runtime shared the cores with the other process."]
    single = [(e["name"], e["images_per_second"]["1"]) for e in results["networks"] if "1" in e["images_per_second"]]
    if single:
        lines += ["", "Batch 1, milliseconds per image (the median forward; a serving process's latency):", "",
                  "| network | " + " | ".join(PEERS + OURS) + " |", "|---|" + "---:|" * (len(PEERS) + len(OURS))]
        for name, ips in single:
            lines.append(f"| {name} | " + " | ".join(f"{1e3 / ips[r]:.3f}" if r in ips else "—" for r in PEERS + OURS) + " |")
    lines += ["", "Max |diff| / max |ref| against PyTorch eager on one batch (argmax agreement):", "",
              "| network | " + " | ".join(PEERS[1:] + OURS) + " |", "|---|" + "---:|" * (len(PEERS) - 1 + len(OURS))]
    for entry in results["networks"]:
        acc = entry["accuracy"]
        cells = [f"{acc[r]['max_abs_diff_rel']:.1e} ({acc[r]['argmax_agreement']:.3f})" if r in acc else "—"
                 for r in PEERS[1:] + OURS]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    lines += ["", "OpenVINO's default precision (`INFERENCE_PRECISION_HINT`) and our bf16 form's arithmetic, as each reported:", ""]
    for entry in results["networks"]:
        lines.append(f"- {entry['name']}: OpenVINO {entry.get('openvino_default_precision')}; ours {entry.get('bf16_form')}")
    tested = [e for e in results["networks"] if e.get("test_set")]
    if tested:
        runtimes = [r for r in PEERS + OURS if any(r in e["test_set"] for e in tested)]
        lines += ["", f"The trained networks on {m.get('test_images', 'the test images')}: classes differing from PyTorch fp32 eager "
                  "(accuracy):", "", "| network | " + " | ".join(runtimes) + " |", "|---|" + "---:|" * len(runtimes)]
        for entry in tested:
            t = entry["test_set"]
            cells = [f"{t[r]['differing_from_eager']} ({100 * t[r]['accuracy']:.2f}%)" if r in t else "—" for r in runtimes]
            lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    sc = [e for e in results["networks"] if e["inference_form_decisions"]]
    if sc:
        lines += ["", "Gate decisions of the inference forms that differ from the reference mode (same batch):", ""]
        for entry in sc:
            for label, key in [("fp32 form", "inference_form_decisions"), ("bf16 form", "bf16_form_decisions")]:
                layers = entry.get(key) or []
                if not layers:
                    continue
                total = sum(layer["differing"] for layer in layers)
                where = ", ".join(f"{layer['layer']} {layer['differing']}" for layer in layers if layer["differing"]) or "none"
                lines.append(f"- {entry['name']}, {label}: {total} of {sum(layer['positions'] for layer in layers):,} ({where})")
    pairs = [("sc_resnet50", "resnet50"), ("fmnist_sc", "fmnist_plain")]
    by_name = {e["name"]: e for e in results["networks"]}
    ratio_lines = []
    for sc_name, plain_name in pairs:
        if sc_name in by_name and plain_name in by_name:
            for batch in by_name[sc_name]["images_per_second"]:
                for form in ["scconv-tch inference", "scconv-tch inference bf16"]:
                    sc_ips = by_name[sc_name]["images_per_second"][batch].get(form)
                    plain_ips = by_name[plain_name]["images_per_second"][batch].get(form)
                    if sc_ips and plain_ips:
                        ratio_lines.append(f"- {sc_name} / {plain_name}, {form[11:]} form, batch {batch}: {sc_ips / plain_ips:.2f}x")
    if ratio_lines:
        lines += ["", "SC over plain in the inference forms:", "", *ratio_lines]
    return "\n".join(lines) + "\n"


def picture(results, path, matplotlib):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(f"{e['name']} ({b})", ips) for e in results["networks"] for b, ips in e["images_per_second"].items()]
    runtimes = PEERS + OURS
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), squeeze=False)
    for ax, (label, ips) in zip(axes[:, 0], rows):
        names = [r for r in runtimes if r in ips]
        colors = ["#8da0cb" if r in PEERS else "#fc8d62" for r in names]
        emulated = not results["machine"].get("bf16_native", True)
        labels = [f"{r} (emulated)" if emulated and r == "scconv-tch inference bf16" else r for r in names]
        ax.barh(labels, [ips[r] for r in names], color=colors)
        ax.set_title(label, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("images/s (higher is better); blue: peers, orange: scconv-tch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
