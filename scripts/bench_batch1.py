#!/usr/bin/env python3
"""Batch-1 latency of our fp32 inference form against ONNX Runtime's and OpenVINO's (f32), alternated in short turns
(`--batch` for other sizes).

`make bench-peers` gives each runtime one turn per round (a pause, 10 warm-up forwards, 30 timed), so
on a VM whose speed drifts over seconds (docs/speed.md) a runtime's batch-1 median depends on which
phase its turns met. Here the runtimes alternate many times in one run, `--runs` forwards a turn after
`--warmup`, so both meet the same phases; each turn's median is printed and the medians and minima
over all turns summarised, at each thread count asked. Same networks and weights as `make bench-peers`
(whose peer folder and helpers this reuses); ours through `examples/bench_worker.rs`.

    .venv/bin/python scripts/bench_batch1.py --only fmnist_plain fmnist_sc --threads 2 1
    .venv/bin/python scripts/bench_batch1.py --only resnet50 sc_resnet50 --runs 40 --runtimes openvino
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_peers  # noqa: E402


def ort_session(ort, path, threads):
    session = ort.InferenceSession(str(path), bench_peers.ort_options(ort, threads), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})


def openvino_f32(ov, path, threads):
    """OpenVINO in f32 with the settings `make bench-peers` gives it."""
    settings = bench_peers.openvino_settings(threads, INFERENCE_PRECISION_HINT="f32")
    request = ov.Core().compile_model(str(path), "CPU", settings).create_infer_request()
    return lambda x: request.infer([x])


PEER_RUNTIMES = {"onnxruntime": ("ONNX Runtime", ort_session), "openvino": ("OpenVINO f32", openvino_f32)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=pathlib.Path, default=pathlib.Path.home() / ".cache/scconv-tch/peers")
    parser.add_argument("--worker", type=pathlib.Path, default=bench_peers.ROOT / "target/release/examples/bench_worker")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--only", nargs="*", help="network names (default: all four)")
    parser.add_argument("--batch", type=int, default=1, help="images a forward (default 1: the latency case)")
    parser.add_argument("--runtimes", nargs="+", choices=list(PEER_RUNTIMES), default=list(PEER_RUNTIMES),
                        help="the peers alternated with ours (default: both)")
    args = parser.parse_args()

    bench_peers.install_peers(args.peers)
    modules = bench_peers.import_peers(args.peers)
    import numpy
    import torch
    from safetensors.torch import save_file
    print(f"CPU: {bench_peers.machine_cpu()}")
    for name, config, weights, shape, _ in bench_peers.networks():
        if args.only and name not in args.only:
            continue
        model = bench_peers.build_twin(config, weights)
        for threads in args.threads:
            torch.set_num_threads(threads)
            folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-batch1-"))
            path = folder / "model.onnx"
            bench_peers.export_onnx(model, torch.randn(args.batch, *shape), path)
            peers = {label: make(modules[key], path, threads) for key, (label, make) in PEER_RUNTIMES.items()
                     if key in args.runtimes}
            save_file({k: v.contiguous() for k, v in model.state_dict().items()
                       if not k.endswith("num_batches_tracked")}, str(folder / "w.safetensors"))
            (folder / "config.json").write_text(json.dumps(config))
            worker = bench_peers.Worker(args.worker, threads)
            worker.ask(f"load n {folder / 'config.json'} {folder / 'w.safetensors'}")
            size = " ".join(map(str, (args.batch, *shape)))
            worker.ask(f"compile n {size}")
            x = numpy.random.default_rng(0).standard_normal((args.batch, *shape), dtype=numpy.float32)
            turns = {label: [] for label in [*peers, "ours"]}
            for turn in range(args.turns):
                for label, run in peers.items():
                    time.sleep(bench_peers.QUIET_S)
                    ms = []
                    for i in range(args.warmup + args.runs):
                        start = time.perf_counter()
                        run(x)
                        ms.append((time.perf_counter() - start) * 1e3)
                    turns[label].append(ms[args.warmup:])
                time.sleep(bench_peers.QUIET_S)
                turns["ours"].append(worker.ask(f"time n inference {size} {args.warmup} {args.runs}")["ms"])
                print(f"{name} ({args.batch}), {threads} threads, turn {turn + 1}: "
                      + ", ".join(f"{label} {statistics.median(t[-1]):.3f} ms" for label, t in turns.items()), flush=True)
            worker.proc.stdin.close()
            every = {label: [v for t in ts for v in t] for label, ts in turns.items()}
            ours = statistics.median(every["ours"])
            print(f"{name} ({args.batch}), {threads} threads, all turns (median / min ms): "
                  + ", ".join(f"{label} {statistics.median(v):.3f} / {min(v):.3f}" for label, v in every.items())
                  + "; ours over " + ", ".join(f"{label} {statistics.median(every[label]) / ours:.2f}x" for label in peers),
                  flush=True)


if __name__ == "__main__":
    main()
