#!/usr/bin/env python3
"""What a pass is worth on this machine: a network's inference form compiled with every pass of its
precision and again without the passes named, the two timed turn by turn in one warm
`examples/bench_worker.rs` (so both meet the same phases of a VM whose speed drifts), then the medians
and minima of each and their ratio. With `--onednn-kernels`, the oneDNN kernels each form's convolutions
ran, counted by name (`ONEDNN_VERBOSE`: libtorch's oneDNN prints `onednn_verbose,v1,...`, this crate's
own primitives `onednn_verbose,exec,...`), e.g. to see whether a bf16 form runs AMX kernels
(`avx10_1_512_amx`, `avx512_core_amx`) in both.

The networks and weights of `make bench-peers` (ResNet-50 / SC-ResNet-50 with random weights at 224x224,
the trained Fashion-MNIST pair). Build the worker first: `cargo build --release --example bench_worker`.

    .venv/bin/python scripts/ab_passes.py --network sc_resnet50 --batch 8 --precision bf16 --without pool-first
    .venv/bin/python scripts/ab_passes.py --network fmnist_sc --batch 1 --precision bf16 --without own-primitives
    .venv/bin/python scripts/ab_passes.py --network fmnist_plain --batch 1 --without own-primitives --onednn-kernels
"""
import argparse
import collections
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_peers  # noqa: E402  (the networks of `make bench-peers`; torch is imported there lazily)


def kernels(lines):
    """oneDNN convolution executions in `lines`, counted by (whose oneDNN, kernel name)."""
    counts = collections.Counter()
    for line in lines:
        fields = line.split(",")
        if fields[:4] == ["onednn_verbose", "v1", "primitive", "exec"] and fields[5] == "convolution":
            counts[("libtorch's oneDNN", fields[6])] += 1
        elif fields[:2] == ["onednn_verbose", "exec"] and fields[3] == "convolution":
            counts[("ours", fields[4])] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [n[0] for n in bench_peers.networks()]
    parser.add_argument("--network", choices=names, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-onednn", "bf16-emulated"])
    parser.add_argument("--without", required=True, help="comma-separated pass names (`Pass`'s kebab-case names)")
    parser.add_argument("--turns", type=int, default=8, help="turns of each form, alternated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onednn-kernels", action="store_true", help="also list the oneDNN kernels each form ran")
    parser.add_argument("--worker", type=pathlib.Path, default=ROOT / "target/release/examples/bench_worker")
    args = parser.parse_args()
    if not args.worker.exists():
        raise SystemExit(f"ab_passes: no worker at {args.worker}: cargo build --release --example bench_worker")
    name, config, weights, shape, _ = next(n for n in bench_peers.networks() if n[0] == args.network)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = pathlib.Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config))
        dims = f"{args.batch} {' '.join(map(str, shape))}"
        mode = "inference" if args.precision == "fp32" else "inference-bf16"
        without = set(filter(None, args.without.split(",")))

        def forms(onednn_verbose):
            """A worker with the network compiled twice: `all` (every pass), `without`."""
            worker = bench_peers.Worker(args.worker, args.threads, {"ONEDNN_VERBOSE": "1"} if onednn_verbose else None)
            command = "compile" if mode == "inference" else "compile-bf16"
            precision = "" if mode == "inference" else f" {args.precision}"
            for key in ["all", "without"]:
                worker.ask(f"load {key} {config_file} {weights or '-'}")
            every = worker.ask(f"{command} all {dims}{precision}")["passes"]
            unknown = without - set(every)
            if unknown:
                raise SystemExit(f"ab_passes: {', '.join(sorted(unknown))} not among the form's passes ({','.join(every)})")
            rest = ",".join(p for p in every if p not in without)
            answer = worker.ask(f"{command} without {dims}{precision} {rest}")
            return worker, every, answer.get("arithmetic")

        worker, every, arithmetic = forms(False)
        print(f"{name} at batch {args.batch}, {args.precision}, {args.threads} threads: every pass ({','.join(every)}) "
              f"against without {','.join(sorted(without))}" + (f"; {arithmetic}" if arithmetic else ""))
        warmup, runs = bench_peers.worker_turn(args.batch)
        times = {"all": [], "without": []}
        for _, key in bench_peers.alternated(["all", "without"], args.turns):
            times[key] += worker.ask(f"time {key} {mode} {dims} {warmup} {runs}")["ms"]
        for key in ["all", "without"]:
            print(f"  {key:8s} median {statistics.median(times[key]):.3f} ms, min {min(times[key]):.3f} ms ({len(times[key])} forwards)")
        ratio = statistics.median(times["all"]) / statistics.median(times["without"])
        minima = min(times["all"]) / min(times["without"])
        print(f"  every pass / without: {ratio:.3f}x by the medians, {minima:.3f}x by the minima (below 1: the passes pay)")
        if args.onednn_kernels:
            # Another worker, oneDNN printing each call (which slows it): one forward of each form.
            verbose, _, _ = forms(True)
            for key in ["all", "without"]:
                verbose.other_lines.clear()
                verbose.ask(f"time {key} {mode} {dims} 0 1")
                for (whose, kernel), count in sorted(kernels(verbose.other_lines).items()):
                    print(f"  {key:8s} {whose:18s} {kernel:40s} {count} calls a forward")

if __name__ == "__main__":
    main()
