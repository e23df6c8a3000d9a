#!/usr/bin/env python3
"""Each convolution's time in OpenVINO, ONNX Runtime and our inference form, side by side, for one network.

OpenVINO's own per-node counters (`PERF_COUNT`) and ONNX Runtime's profiler (`enable_profiling`)
against oneDNN's per-primitive times in our worker (`ONEDNN_VERBOSE=profile_exec` on
`examples/bench_worker.rs`), all after warm-up forwards, grouped by the convolution's geometry
(channels in and out, input size, kernel, stride, groups: the same geometry in several blocks is
summed) and the kernel each picked. Per forward: the peers' medians over the timed forwards, ours the
mean (oneDNN's lines do not say which forward they belong to). `--bf16`: OpenVINO's default precision
(bf16 on CPUs with bf16 units) against our bf16 form (ONNX Runtime, fp32 only, is left out). Same
networks and weights as `make bench-peers` (whose peer folder and helpers this reuses). Profiling adds
its own cost to each, so compare the convolutions with each other, and time whole forwards with
`scripts/bench_batch1.py`.

    .venv/bin/python scripts/profile_convs.py resnet50 --batch 1
"""
import argparse
import collections
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_peers  # noqa: E402

# oneDNN's problem descriptor in both versions' verbose formats: mb1_ic64oc64_ih56oh56kh3sh1..., and
# for groups mb1_g2ic8oc32_... (3.2, our primitives) or g2mb1_ic8oc32_... (3.10, libtorch's calls).
DESCRIPTOR = re.compile(r"(?:g(\d+))?mb\d+_(?:g(\d+))?_?ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+)sh(\d+)")


def geometries(model, shape):
    """{module name: (in, out, input size, kernel, stride, groups)} of every Conv2d, from one forward."""
    import torch
    found = {}

    def hook(name):
        def record(module, inputs, _):
            found[name] = (module.in_channels, module.out_channels, int(inputs[0].shape[2]),
                           module.kernel_size[0], module.stride[0], module.groups)
        return record
    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, *shape))
    for h in hooks:
        h.remove()
    return found


def module_of(node_name):
    """The PyTorch module an exported Conv node came from: '/layer1/layer1.0/downsample/downsample.0/Conv'
    names layer1.0.downsample.0 (each scope repeats its parent's name as a prefix)."""
    scopes = node_name.strip("/").split("/")
    if "Conv" not in scopes:
        return None
    name = []
    for scope in scopes[:scopes.index("Conv")]:
        if name and scope.startswith(name[-1] + "."):
            name[-1] = scope
        else:
            name.append(scope)
    return ".".join(name)


def openvino(ov, onnx_path, geometry, batch, shape, args):
    precision = {} if args.bf16 else {"INFERENCE_PRECISION_HINT": "f32"}
    settings = bench_peers.openvino_settings(args.threads, PERF_COUNT="YES", **precision)
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", settings)
    request = compiled.create_infer_request()
    x = __import__("numpy").random.default_rng(0).standard_normal((batch, *shape), dtype="float32")
    per_run, kernels, forwards = collections.defaultdict(list), {}, []
    for i in range(args.warmup + args.runs):
        start = time.perf_counter()
        request.infer([x])
        if i < args.warmup:
            continue
        forwards.append((time.perf_counter() - start) * 1e3)
        this_run = collections.defaultdict(float)
        for node in request.get_profiling_info():
            convolution = node.node_type in ("Convolution", "GroupConvolution")
            key = geometry.get(module_of(node.node_name)) if convolution else None
            if key is not None:
                this_run[key] += node.real_time.total_seconds() * 1e6
                kernels[key] = node.exec_type
        for key, us in this_run.items():
            per_run[key].append(us)
    return {key: statistics.median(v) for key, v in per_run.items()}, kernels, forwards


def onnxruntime(ort, onnx_path, batch, shape, args):
    """ONNX Runtime's per-node times (its profiler's JSON): a node's geometry from its input, weight and
    output shapes, which it records in PyTorch's NCHW order (whatever layout its kernels use)."""
    options = bench_peers.ort_options(ort, args.threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.with_name("onnxruntime-profile"))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = __import__("numpy").random.default_rng(0).standard_normal((batch, *shape), dtype="float32")
    forwards = []
    for i in range(args.warmup + args.runs):
        start = time.perf_counter()
        session.run(None, {"input": x})
        forwards.append((time.perf_counter() - start) * 1e3)
    events = json.loads(pathlib.Path(session.end_profiling()).read_text())
    per_node, kernels = collections.defaultdict(list), {}
    for event in events:
        fields = event.get("args", {})
        if event.get("cat") != "Node" or fields.get("op_name") not in ("Conv", "FusedConv"):
            continue
        x_shape, w_shape = (next(iter(t.values())) for t in fields["input_type_shape"][:2])
        y_shape = next(iter(fields["output_type_shape"][0].values()))
        # The stride from the sizes: these networks pad a kxk kernel by k // 2, so out = ceil(in / stride)
        # and the ratio rounds to the stride (1 or 2 here; not so for stride 3 or unpadded kernels).
        key = (x_shape[1], w_shape[0], x_shape[2], w_shape[2], round(x_shape[2] / y_shape[2]), x_shape[1] // w_shape[1])
        per_node[(event["name"], key)].append(event["dur"])
        kernels[key] = fields["op_name"] + (" NCHWc" if "nchwc" in event["name"] else "")
    # The warm-up forwards are profiled too: each node's last `runs` calls are the timed forwards'. Per
    # geometry, the median over those forwards of its nodes' sum in each (as OpenVINO's figures).
    per_run = collections.defaultdict(lambda: [0.0] * args.runs)
    for (_, key), durations in per_node.items():
        for i, us in enumerate(durations[-args.runs:]):
            per_run[key][i] += us
    return {key: statistics.median(sums) for key, sums in per_run.items()}, kernels, forwards[args.warmup:]


def ours(worker, config_path, weights, batch, shape, args):
    size = " ".join(map(str, (batch, *shape)))
    compile_, mode = ("compile-bf16", "inference-bf16") if args.bf16 else ("compile", "inference")
    requests = [f"load n {config_path} {weights or '-'}", f"{compile_} n {size}",
                f"time n {mode} {size} {args.warmup} 0", f"time n {mode} {size} 0 {args.runs}"]
    env = dict(os.environ, THREADS=str(args.threads), ONEDNN_VERBOSE="profile_exec")
    # oneDNN prints through C stdio: line-buffered (`stdbuf`), its lines come in order with the worker's
    # answers, so the executions between the last two answers are the timed forwards' (not compile's
    # or the warm-up's, and a batch the form runs in tiles is counted whole).
    out = subprocess.run(["stdbuf", "-oL", str(worker)], input="\n".join(requests) + "\n", capture_output=True,
                         text=True, env=env, check=True).stdout
    answers, timed, per_run, kernels = [], False, collections.defaultdict(float), {}
    for line in out.splitlines():
        if line.startswith("{"):
            answers.append(json.loads(line))
            timed = len(answers) == 3
            continue
        fields = line.split(",")
        if not timed or not line.startswith("onednn_verbose") or "exec" not in fields or "convolution" not in fields:
            continue
        m = DESCRIPTOR.search(line)
        if not m:
            continue
        groups_before, groups_after, c_in, c_out, size_in, kernel, stride = m.groups()
        groups = int(groups_before or groups_after or 1)
        key = tuple(int(v) for v in (c_in, c_out, size_in, kernel, stride)) + (groups,)
        per_run[key] += float(fields[-1]) * 1e3 / args.runs
        kernels[key] = fields[fields.index("convolution") + 1]
    errors = [a["error"] for a in answers if "error" in a]
    if errors or len(answers) != 4:
        bench_peers.fail("scconv-tch", errors[0] if errors else f"{len(answers)} answers to 4 requests")
    return per_run, kernels, answers[-1]["ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("network", choices=[n[0] for n in bench_peers.networks()])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--bf16", action="store_true", help="OpenVINO's default precision against our bf16 form")
    parser.add_argument("--peers", type=pathlib.Path, default=pathlib.Path.home() / ".cache/scconv-tch/peers")
    parser.add_argument("--worker", type=pathlib.Path, default=bench_peers.ROOT / "target/release/examples/bench_worker")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    bench_peers.install_peers(args.peers)
    peers = bench_peers.import_peers(args.peers)
    import torch
    torch.set_num_threads(args.threads)
    name, config, weights, shape, _ = next(n for n in bench_peers.networks() if n[0] == args.network)
    model = bench_peers.build_twin(config, weights)
    geometry = geometries(model, shape)
    count = collections.Counter(geometry.values())
    folder = pathlib.Path(tempfile.mkdtemp(prefix="profile-convs-"))
    bench_peers.export_onnx(model, torch.randn(args.batch, *shape), folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps(config))
    runtimes = {"OpenVINO": openvino(peers["openvino"], folder / "model.onnx", geometry, args.batch, shape, args)}
    if not args.bf16:
        runtimes["ONNX Runtime"] = onnxruntime(peers["onnxruntime"], folder / "model.onnx", args.batch, shape, args)
    runtimes["ours"] = ours(args.worker, folder / "config.json", weights, args.batch, shape, args)
    print_table(name, runtimes, count, args)


def print_table(name, runtimes, count, args):
    """One row per geometry: each runtime's microseconds and kernel, ours over the fastest peer."""
    cpu = bench_peers.machine_cpu()
    precision = "OpenVINO default precision, our bf16 form" if args.bf16 else "fp32"
    print(f"{name}, batch {args.batch}, {args.threads} threads, {precision}; CPU {cpu['model']}, bf16 units: "
          f"{', '.join(cpu['bf16_units']) or 'none'}")
    print("forward, profiled (ms median / min): " + ", ".join(
        f"{who} {statistics.median(f):.3f} / {min(f):.3f}" for who, (_, _, f) in runtimes.items()))
    peers = [who for who in runtimes if who != "ours"]
    print("| convolution (in -> out @size kxk /stride groups) | count | "
          + " | ".join(f"{who} us" for who in runtimes) + " | ours / fastest peer | "
          + " | ".join(f"{who} kernel" for who in runtimes) + " |")
    print("|---|---:|" + "---:|" * (len(runtimes) + 1) + "---|" * len(runtimes))
    sums = dict.fromkeys(runtimes, 0.0)
    # Geometries only one runtime runs (a step of ours that merged convolutions: GWC + PWC1 as one) get
    # rows too.
    keys = set(count).union(*(times for times, _, _ in runtimes.values()))
    for key in sorted(keys, key=lambda k: (-k[2], k[0], k[1], k[3])):
        us = {who: times.get(key) for who, (times, _, _) in runtimes.items()}
        for who, v in us.items():
            sums[who] += v or 0.0
        fastest = min((us[p] for p in peers if us[p]), default=None)
        ratio = f"{us['ours'] / fastest:.2f}" if fastest and us["ours"] else "-"
        cells = " | ".join(f"{v:.0f}" if v is not None else "-" for v in us.values())
        kernels = " | ".join(kernels.get(key, "-") for _, kernels, _ in runtimes.values())
        runs = count[key] if key in count else "ours only"
        print(f"| {key[0]} -> {key[1]} @{key[2]} {key[3]}x{key[3]} /{key[4]} g{key[5]} | {runs} | {cells} | "
              f"{ratio} | {kernels} |")
    fastest = min(sums[p] for p in peers)
    print(f"| all convolutions | {sum(count.values())} in PyTorch's model | "
          + " | ".join(f"{v:.0f}" for v in sums.values())
          + (f" | {sums['ours'] / fastest:.2f} |" if fastest else " | - |") + " |" * len(runtimes))


if __name__ == "__main__":
    main()
