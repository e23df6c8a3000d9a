"""Runs `scconv-tch bench` and scripts/bench_reference.py one after the other on this machine and prints
the ratios side by side: the seed's Python ScConv / the fast Rust ScConv (the speed-up), and each ScConv /
PyTorch's conv3x3. Environment variables (e.g. MALLOC_MMAP_THRESHOLD_) reach both processes.

    .venv/bin/python scripts/bench_compare.py [--device cpu|cuda] [--runs 20] [--binary target/debug/scconv-tch]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default="20")
    parser.add_argument("--warmup", default="5")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "scconv-tch"))
    parser.add_argument("--save", default=None, help="folder to keep both raw JSON outputs in")
    args = parser.parse_args()
    common = ["--device", args.device, "--runs", args.runs, "--warmup", args.warmup]
    rust = json.loads(subprocess.run([args.binary, "bench", "--json", *common], check=True, capture_output=True,
                                     text=True).stdout)
    python = json.loads(subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_reference.py"), *common],
                                       check=True, capture_output=True, text=True).stdout)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, value in [("rust", rust), ("python", python)]:
            with open(os.path.join(args.save, f"bench_{name}_{args.device}.json"), "w") as f:
                json.dump(value, f, indent=1)
    print(f"{args.device}, Rust {rust['threads']} threads, PyTorch {python['torch_version']} {python['threads']} threads; "
          "median ms, forward only")
    print(f"{'shape':<9} {'batch':>5} {'Py ScConv':>10} {'Rust ref':>9} {'Rust fast':>10} {'Py conv':>8} "
          f"{'Py/fast':>8} {'Py/ref':>7} {'Py ScConv/conv':>15} {'fast/conv':>10}")
    for r, p in zip(rust["blocks"], python["blocks"]):
        assert (r["channels"], r["size"], r["batch"]) == (p["channels"], p["size"], p["batch"])
        ps, pc = p["scconv"]["median_ms"], p["conv3x3"]["median_ms"]
        rs, rf = r["scconv"]["median_ms"], r["scconv_fast"]["median_ms"]
        print(f"{r['channels']}@{r['size']:<6} {r['batch']:>5} {ps:>10.3f} {rs:>9.3f} {rf:>10.3f} {pc:>8.3f} "
              f"{ps / rf:>7.2f}x {ps / rs:>6.2f}x {ps / pc:>14.2f}x {rf / pc:>9.2f}x")
    for n in rust.get("networks", []):
        print(f"{n['name']:<14} batch {n['batch']:>3}: {n['images_per_second']:>9.1f} images/s (Rust)")


if __name__ == "__main__":
    main()
