#!/usr/bin/env python3
"""Each convolution's time in OpenVINO and in our inference form, side by side, for one network.

OpenVINO's own per-node counters (`PERF_COUNT`) against oneDNN's per-primitive times in our worker
(`ONEDNN_VERBOSE=profile_exec` on `examples/bench_worker.rs`), both after warm-up forwards, grouped by
the convolution's geometry (channels in and out, input size, kernel, stride, groups: the same geometry
in several blocks is summed) and the kernel each picked. `--bf16`: OpenVINO's default precision
(bf16 on CPUs with bf16 units) against our bf16 form. Same networks and weights as `make bench-peers`
(whose peer folder and helpers this reuses). Profiling adds its own cost to both, so compare the
convolutions with each other, and time whole forwards with `scripts/bench_batch1.py`.

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


def ours(worker, config_path, weights, batch, shape, count, args):
    size = " ".join(map(str, (batch, *shape)))
    compile_, mode = ("compile-bf16", "inference-bf16") if args.bf16 else ("compile", "inference")
    requests = [f"load n {config_path} {weights or '-'}", f"{compile_} n {size}",
                f"time n {mode} {size} {args.warmup} {args.runs}"]
    env = dict(os.environ, THREADS=str(args.threads), ONEDNN_VERBOSE="profile_exec")
    # oneDNN prints through C stdio, buffered apart from the worker's answers: read it all at the end.
    out = subprocess.run([str(worker)], input="\n".join(requests) + "\n", capture_output=True, text=True,
                         env=env, check=True).stdout
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        bench_peers.fail("scconv-tch", errors[0])
    total, executions, kernels = collections.defaultdict(float), collections.Counter(), {}
    for line in out.splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields or "convolution" not in fields:
            continue
        m = DESCRIPTOR.search(line)
        if not m:
            continue
        groups_before, groups_after, c_in, c_out, size_in, kernel, stride = m.groups()
        groups = int(groups_before or groups_after or 1)
        c_in, c_out, size_in, kernel, stride = (int(v) for v in (c_in, c_out, size_in, kernel, stride))
        key = (c_in, c_out, size_in, kernel, stride, groups)
        total[key] += float(fields[-1]) * 1e3
        executions[key] += 1
        kernels[key] = fields[fields.index("convolution") + 1]
    # Per forward: the forwards that ran are the executions of a geometry PyTorch's model has over its
    # count there (the same for each; geometries a step of ours merged are then divided alike).
    forwards = max(executions[key] / count[key] for key in executions if key in count)
    per_forward = {key: total[key] / forwards for key in total}
    return per_forward, kernels, answers[-1]["ms"]


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

    bench_peers.install_peers(args.peers)
    ov = bench_peers.import_peers(args.peers)["openvino"]
    import torch
    torch.set_num_threads(args.threads)
    name, config, weights, shape, _ = next(n for n in bench_peers.networks() if n[0] == args.network)
    model = bench_peers.build_twin(config, weights)
    geometry = geometries(model, shape)
    count = collections.Counter(geometry.values())
    folder = pathlib.Path(tempfile.mkdtemp(prefix="profile-convs-"))
    bench_peers.export_onnx(model, torch.randn(args.batch, *shape), folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps(config))
    theirs, their_kernels, their_forwards = openvino(ov, folder / "model.onnx", geometry, args.batch, shape, args)
    mine, my_kernels, my_forwards = ours(args.worker, folder / "config.json", weights, args.batch, shape, count, args)

    cpu = bench_peers.machine_cpu()
    precision = "OpenVINO default precision, our bf16 form" if args.bf16 else "fp32"
    print(f"{name}, batch {args.batch}, {args.threads} threads, {precision}; CPU {cpu['model']}, bf16 units: "
          f"{', '.join(cpu['bf16_units']) or 'none'}")
    print(f"forward, profiled (ms median / min): OpenVINO {statistics.median(their_forwards):.3f} / "
          f"{min(their_forwards):.3f}, ours {statistics.median(my_forwards):.3f} / {min(my_forwards):.3f}")
    print(f"| convolution (in -> out @size kxk /stride groups) | count | OpenVINO us | ours us | ours / OpenVINO | "
          "OpenVINO kernel | our kernel |")
    print("|---|---:|---:|---:|---:|---|---|")
    sums = [0.0, 0.0]
    # Geometries only our form runs (a step that merged convolutions: GWC + PWC1 as one) get rows too.
    keys = set(count) | set(mine)
    for key in sorted(keys, key=lambda k: (-k[2], k[0], k[1], k[3])):
        a, b = theirs.get(key), mine.get(key)
        sums[0] += a or 0.0
        sums[1] += b or 0.0
        ratio = f"{b / a:.2f}" if a and b else "-"
        cells = [f"{v:.0f}" if v is not None else "-" for v in (a, b)]
        runs = count[key] if key in count else "ours only"
        print(f"| {key[0]} -> {key[1]} @{key[2]} {key[3]}x{key[3]} /{key[4]} g{key[5]} | {runs} | {cells[0]} | "
              f"{cells[1]} | {ratio} | {their_kernels.get(key, '-')} | {my_kernels.get(key, '-')} |")
    print(f"| all convolutions | {sum(count.values())} in PyTorch's model | {sums[0]:.0f} | {sums[1]:.0f} | "
          f"{sums[1] / sums[0]:.2f} | | |" if sums[0] else "")


if __name__ == "__main__":
    main()
