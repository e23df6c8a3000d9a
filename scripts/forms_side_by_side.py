#!/usr/bin/env python3
"""The fp32 and bf16 inference forms of each network timed turn by turn in one warm
`examples/bench_worker.rs`, then each form's time by section (the 3x3 convolutions, the SRU, the CRU's
parts, ...: `bench --profile`'s sections) side by side: what the bf16 form gains over the fp32 one on
this CPU, and where each spends its forward (on an AMX CPU: what the ScConv's steps cost against the
convolutions). The networks and weights of `make bench-peers`; `--precision` picks the bf16 form's
(`bf16`: native where the CPU has bf16 units, else emulated; `bf16-onednn`: oneDNN's bf16 kernels on
any AVX-512 CPU). Prints the CPU's model and bf16 units first; `--json` writes every figure.

    cargo build --release --example bench_worker
    .venv/bin/python scripts/forms_side_by_side.py --only sc_resnet50 fmnist_sc
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_peers  # noqa: E402  (the networks of `make bench-peers`; torch is imported there lazily)

FORMS = {"fp32": ("compile", "inference"), "bf16": ("compile-bf16", "inference-bf16")}


def side_by_side(worker, name, config_file, weights, shape, batch, args):
    """{form: {"ms": [turn medians], "sections": {section: ms}, "arithmetic": ...}} for one network."""
    dims = f"{batch} {' '.join(map(str, shape))}"
    found = {}
    for form, (command, _) in FORMS.items():
        worker.ask(f"load {name}-{form} {config_file} {weights or '-'}")
        answer = worker.ask(f"{command} {name}-{form} {dims}" + (f" {args.precision}" if form == "bf16" else ""))
        found[form] = {"ms": [], "arithmetic": answer.get("arithmetic", "fp32")}
    warmup, runs = bench_peers.worker_turn(batch)
    for _, form in bench_peers.alternated(list(FORMS), args.turns):
        ms = worker.ask(f"time {name}-{form} {FORMS[form][1]} {dims} {warmup} {runs}")["ms"]
        found[form]["ms"].append(statistics.median(ms))
    for form in FORMS:
        answer = worker.ask(f"profile {name}-{form} {FORMS[form][1]} {dims} {warmup} {runs}")
        found[form]["sections"] = dict(answer["sections"])
    return found


def report(name, batch, found):
    fp32, bf16 = (statistics.median(found[f]["ms"]) for f in FORMS)
    fp32_min, bf16_min = (min(found[f]["ms"]) for f in FORMS)
    print(f"\n{name} (batch {batch}): fp32 form {fp32:.3f} ms (min {fp32_min:.3f}), bf16 form {bf16:.3f} ms "
          f"(min {bf16_min:.3f}; {found['bf16']['arithmetic']}): the bf16 form takes {bf16 / fp32:.2f}x the time "
          f"({bf16_min / fp32_min:.2f}x by the minima)")
    sections = sorted(set(found["fp32"]["sections"]) | set(found["bf16"]["sections"]))
    print("| section | fp32 form ms | bf16 form ms |")
    print("|---|---:|---:|")
    for section in sections:
        cells = [found[f]["sections"].get(section) for f in FORMS]
        print(f"| {section} | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in cells) + " |")
    rest = [t - sum(found[f]["sections"].values()) for f, t in zip(FORMS, (fp32, bf16))]
    print("| rest (the forward less its sections) | " + " | ".join(f"{v:.3f}" for v in rest) + " |")
    print(f"| forward (median of the turns) | {fp32:.3f} | {bf16:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [n[0] for n in bench_peers.networks()]
    parser.add_argument("--only", nargs="*", choices=names, help="networks (default: all four)")
    parser.add_argument("--batches", nargs="*", type=int, help="batch sizes (default: each network's, 8 or 256, and 1)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "bf16-onednn", "bf16-emulated"])
    parser.add_argument("--turns", type=int, default=6, help="turns of each form, alternated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    parser.add_argument("--worker", type=pathlib.Path, default=ROOT / "target/release/examples/bench_worker")
    args = parser.parse_args()
    if not args.worker.exists():
        raise SystemExit(f"forms_side_by_side: no worker at {args.worker}: cargo build --release --example bench_worker")
    cpu = bench_peers.machine_cpu()
    print(f"CPU {cpu['model']}; bf16 units: {', '.join(cpu['bf16_units']) or 'none'}; {args.threads} threads")
    results = {"cpu": cpu, "threads": args.threads, "precision": args.precision, "networks": []}
    worker = bench_peers.Worker(args.worker, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, weights, shape, batches in bench_peers.networks():
            if args.only and name not in args.only:
                continue
            config_file = pathlib.Path(tmp) / f"{name}.json"
            config_file.write_text(json.dumps(config))
            for batch in args.batches or batches:
                found = side_by_side(worker, f"{name}-{batch}", config_file, weights, shape, batch, args)
                report(name, batch, found)
                results["networks"].append({"network": name, "batch": batch, "forms": found})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
