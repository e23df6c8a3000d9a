#!/usr/bin/env python3
"""Batch-1 latency of our fp32 inference form against ONNX Runtime's, alternated in short turns.

`make bench-peers` gives each runtime one turn per round (a pause, 10 warm-up forwards, 30 timed), so
on a VM whose speed drifts over seconds (docs/speed.md) a runtime's batch-1 median depends on which
phase its turns met. Here the two alternate many times in one run, `--runs` forwards a turn after
`--warmup`, so both meet the same phases; each turn's median is printed and the medians and minima
over all turns summarised, at each thread count asked. Same networks and weights as `make bench-peers`
(whose peer folder and helpers this reuses); ours through `examples/bench_worker.rs`.

    .venv/bin/python scripts/bench_batch1.py --only fmnist_plain fmnist_sc --threads 2 1
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


def ort_session(ort, model, shape, threads, folder):
    import torch
    path = folder / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(1, *shape), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=pathlib.Path, default=pathlib.Path.home() / ".cache/scconv-tch/peers")
    parser.add_argument("--worker", type=pathlib.Path, default=bench_peers.ROOT / "target/release/examples/bench_worker")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--only", nargs="*", help="network names (default: all four)")
    args = parser.parse_args()

    bench_peers.install_peers(args.peers)
    ort = bench_peers.import_peers(args.peers)["onnxruntime"]
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
            session = ort_session(ort, model, shape, threads, folder)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()
                       if not k.endswith("num_batches_tracked")}, str(folder / "w.safetensors"))
            (folder / "config.json").write_text(json.dumps(config))
            worker = bench_peers.Worker(args.worker, threads)
            worker.ask(f"load n {folder / 'config.json'} {folder / 'w.safetensors'}")
            worker.ask(f"compile n 1 {' '.join(map(str, shape))}")
            x = numpy.random.default_rng(0).standard_normal((1, *shape), dtype=numpy.float32)
            theirs, ours = [], []
            for turn in range(args.turns):
                time.sleep(bench_peers.QUIET_S)
                ms = []
                for i in range(args.warmup + args.runs):
                    start = time.perf_counter()
                    session.run(None, {"input": x})
                    ms.append((time.perf_counter() - start) * 1e3)
                theirs.append(ms[args.warmup:])
                time.sleep(bench_peers.QUIET_S)
                ours.append(worker.ask(f"time n inference 1 {' '.join(map(str, shape))} {args.warmup} {args.runs}")["ms"])
                print(f"{name}, {threads} threads, turn {turn + 1}: ONNX Runtime {statistics.median(theirs[-1]):.3f} ms, "
                      f"ours {statistics.median(ours[-1]):.3f} ms", flush=True)
            worker.proc.stdin.close()
            every = lambda turns: [v for t in turns for v in t]  # noqa: E731
            a, b = every(theirs), every(ours)
            print(f"{name}, {threads} threads, all turns: ONNX Runtime median {statistics.median(a):.3f} / min {min(a):.3f} ms, "
                  f"ours {statistics.median(b):.3f} / {min(b):.3f} ms: ours over ONNX Runtime "
                  f"{statistics.median(a) / statistics.median(b):.2f}x", flush=True)


if __name__ == "__main__":
    main()
