"""Times the seed's Python ScConv (parity/reference_scconv.py) and PyTorch's 3x3 conv at the ResNet-50
shapes, the same way `scconv-tch bench` times the Rust ones (forward only, no grad, warm-up, then the
median of several runs; CUDA synchronised). Prints JSON.

    .venv/bin/python scripts/bench_reference.py [--device cpu|cuda] [--batches 1,8] [--runs 20]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity"))
from reference_scconv import ScConv  # noqa: E402

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def timing(fn, device, warmup, runs):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - start) * 1e3)
    ms.sort()
    return {"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1], "runs": len(ms)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 64] if args.device == "cuda" else [1, 8])
    blocks = []
    with torch.no_grad():
        for batch in batches:
            for channels, size in SHAPES:
                block = ScConv(channels).to(args.device).eval()
                conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(args.device).eval()
                x = torch.randn(batch, channels, size, size, device=args.device)
                blocks.append({"channels": channels, "size": size, "batch": batch,
                               "scconv": timing(lambda: block(x), args.device, args.warmup, args.runs),
                               "conv3x3": timing(lambda: conv(x), args.device, args.warmup, args.runs)})
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                      "blocks": blocks}, indent=2))


if __name__ == "__main__":
    main()
