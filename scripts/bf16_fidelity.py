#!/usr/bin/env python3
"""How far each bf16 runtime's logits are from PyTorch fp32 on the trained Fashion-MNIST networks'
test images (Debian's 10,000, else the shipped 1,000), untimed: our bf16 inference form, OpenVINO
with bf16 inference precision, and torch.compile (freezing) under CPU bf16 autocast.

Classes that differ from PyTorch fp32 are what issue 26 counts, but a count of a few dozen images is
decided by near ties: images whose two best fp32 logits are a bf16 rounding or two apart flip with
any runtime's rounding order. So beside the classes this prints the logit error over every image
(relative to each image's largest fp32 logit: RMS, 99th percentile, largest), how many of each
runtime's differing images another runtime's differ on too, and how many images are near ties.

OpenVINO is asked for bf16 explicitly (`INFERENCE_PRECISION_HINT`), which it honours on AVX-512 CPUs
without bf16 units too (emulated there), so its bf16 numbers can be counted on any such machine; the
JSON records the precision it reports and the one it picks by default on this CPU (bf16 where the
CPU has bf16 units: then this is OpenVINO's default). Ours is `Precision::Bf16` (native where the CPU
has bf16 units, emulated elsewhere, with the same numbers) and any `--ours` precisions besides. The
peers come from `make bench-peers`' folder (installed there on first use).

    cargo build --release --example bench_worker
    .venv/bin/python scripts/bf16_fidelity.py --ours bf16 bf16-onednn --json docs/bench/bf16-fidelity.json
"""
import argparse
import copy
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_peers  # noqa: E402  (the networks, peers and worker of `make bench-peers`)

BATCH = 256
NEAR_TIE = 2 ** -7  # a relative top-2 margin under two bf16 roundings (2^-8 each) of the largest logit


def openvino_bf16(ov, onnx_path, threads):
    """OpenVINO compiled for bf16 as asked, the precision it reports, and the one it picks by default."""
    import numpy
    import torch
    core = ov.Core()
    precision = {}

    def compiled(**hint):
        model = core.read_model(str(onnx_path))
        model.reshape({"input": [BATCH, 1, 28, 28]})
        return core.compile_model(model, "CPU", bench_peers.openvino_settings(threads, **hint))

    c = compiled(INFERENCE_PRECISION_HINT="bf16")
    for key, asked in [("reported", c), ("default_here", compiled())]:
        hint = asked.get_property("INFERENCE_PRECISION_HINT")
        precision[key] = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return (lambda x: torch.from_numpy(numpy.asarray(c([x.numpy()])[0]))), precision


def torch_compile_bf16(model):
    """torch.compile with freezing under CPU bf16 autocast, as `make bench-peers` builds it (without
    grad: Inductor freezes only then, and a first call with grad would be recompiled unfrozen)."""
    import torch
    with torch.no_grad(), torch._inductor.config.patch(freezing=True), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        compiled(torch.zeros(BATCH, 1, 28, 28))
    return lambda x: bench_peers.autocast_bf16(compiled, x)


def ours(worker, key, precision, tmp):
    """Our bf16 form of `precision` through the worker, and how it ran (native, or emulated and why)."""
    from safetensors.torch import load_file, save_file
    answer = worker.ask(f"compile-bf16 {key}-{precision} {BATCH} 1 28 28 {precision}")

    def f(x):
        save_file({"input": x.contiguous()}, str(tmp / "input.safetensors"))
        worker.ask(f"run {key}-{precision} inference-bf16 {tmp / 'input.safetensors'} {tmp / 'out.safetensors'}")
        return load_file(str(tmp / "out.safetensors"))["logits"]  # mapped: bench_peers.logits copies it
    return f, answer["arithmetic"]


def measure(logits, reference, labels):
    """One runtime's differences from the fp32 logits, the error relative to each image's largest logit."""
    error = ((logits - reference).abs() / reference.abs().amax(1, keepdim=True)).flatten()
    differing = (logits.argmax(1) != reference.argmax(1)).nonzero().flatten()
    return {"differing_classes": len(differing), "accuracy": float((logits.argmax(1) == labels).float().mean()),
            "error_rms": float(error.pow(2).mean().sqrt()), "error_p99": float(error.quantile(0.99)),
            "error_max": float(error.max()), "differing_images": differing.tolist()}


def network(name, peers, worker, x, y, args, tmp):
    import torch
    record = json.loads((ROOT / f"weights/{name}.json").read_text())
    weights = ROOT / "weights" / record["weights"]
    model = bench_peers.build_twin(record["config"], weights)
    (tmp / f"{name}.json").write_text(json.dumps(record["config"]))
    for precision in args.ours:
        worker.ask(f"load {name}-{precision} {tmp / f'{name}.json'} {weights}")
    bench_peers.export_onnx(model, torch.zeros(BATCH, 1, 28, 28), tmp / f"{name}.onnx")
    reference = bench_peers.logits(model, x, BATCH)
    top2 = reference.topk(2, 1).values
    margin = (top2[:, 0] - top2[:, 1]) / reference.abs().amax(1)
    found = {"name": name, "fp32_accuracy": float((reference.argmax(1) == y).float().mean()),
             "near_ties": int((margin < NEAR_TIE).sum()), "runtimes": {}}
    runtimes = {}
    for precision in args.ours:
        f, arithmetic = ours(worker, name, precision, tmp)
        runtimes[f"scconv-tch bf16 form ({precision})"] = (f, {"arithmetic": arithmetic})
    f, precision = openvino_bf16(peers["openvino"], tmp / f"{name}.onnx", args.threads)
    runtimes["OpenVINO bf16"] = (f, {"precision": precision})
    runtimes["torch.compile bf16"] = (torch_compile_bf16(model), {})
    for runtime, (f, about) in runtimes.items():
        print(f"bf16-fidelity: {name}: {runtime}", flush=True)
        found["runtimes"][runtime] = {**about, **measure(bench_peers.logits(f, x, BATCH), reference, y)}
    for runtime, entry in found["runtimes"].items():
        mine = set(entry["differing_images"])
        entry["shared_with"] = {other: len(mine & set(e["differing_images"]))
                                for other, e in found["runtimes"].items() if other != runtime}
        entry["differing_near_ties"] = int((margin[sorted(mine)] < NEAR_TIE).sum()) if mine else 0
    return found


def table(results):
    m = results["machine"]
    lines = [f"bf16 runtimes against PyTorch fp32 eager, {m['test_images']}, batch {BATCH}, {m['when']}.",
             f"CPU: {m['cpu']}; bf16 units: {', '.join(m['bf16_units']) or 'none'}. Error: |logit - fp32 logit| "
             "over the image's largest |fp32 logit|, over every logit.", ""]
    for n in results["networks"]:
        lines += [f"**{n['name']}**: fp32 accuracy {100 * n['fp32_accuracy']:.2f}%; near ties (top-2 fp32 "
                  f"margin under 2^-7 of the largest logit): {n['near_ties']}", "",
                  "| runtime | classes differing | of them near ties | accuracy | error RMS | error p99 | error max | "
                  "differing images shared with |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for runtime, e in n["runtimes"].items():
            shared = ", ".join(f"{k}: {v}" for k, v in e["shared_with"].items())
            lines.append(f"| {runtime} | {e['differing_classes']} | {e['differing_near_ties']} | {100 * e['accuracy']:.2f}% | "
                         f"{e['error_rms']:.2e} | {e['error_p99']:.2e} | {e['error_max']:.2e} | {shared} |")
        lines.append("")
    for runtime, e in results["networks"][0]["runtimes"].items():
        lines.append(f"- {runtime}: {how_it_ran(e)}")
    return "\n".join(lines) + "\n"


def how_it_ran(entry):
    if "arithmetic" in entry:
        return entry["arithmetic"]
    if "precision" in entry:
        p = entry["precision"]
        return f"OpenVINO asked for bf16 reports {p['reported']}; its default precision on this CPU is {p['default_here']}"
    return "torch.compile with freezing under CPU bf16 autocast"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=pathlib.Path, help="write every figure here (and the table beside it, .md)")
    parser.add_argument("--peers", type=pathlib.Path, default=pathlib.Path.home() / ".cache/scconv-tch/peers")
    parser.add_argument("--worker", type=pathlib.Path, default=ROOT / "target/release/examples/bench_worker")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours", nargs="+", default=["bf16"],
                        help="our bf16 form's precisions: bf16 (native where the CPU has bf16 units, else emulated), "
                             "bf16-onednn (oneDNN's bf16 kernels on any AVX-512 CPU), bf16-emulated")
    parser.add_argument("--only", nargs="*", default=["fmnist_plain", "fmnist_sc"])
    args = parser.parse_args()

    bench_peers.install_peers(args.peers)
    peers = bench_peers.import_peers(args.peers)
    import torch
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    cpu = bench_peers.machine_cpu()
    x, y, source = bench_peers.test_images()
    results = {"machine": {"cpu": cpu["model"], "flags": cpu["flags"], "bf16_units": cpu["bf16_units"],
                           "threads": args.threads, "torch": torch.__version__,
                           "openvino": peers["openvino"].__version__, "test_images": f"{len(x)} from {source}",
                           "when": time.strftime("%Y-%m-%d %H:%M")}, "networks": []}
    worker = bench_peers.Worker(args.worker, args.threads)
    with tempfile.TemporaryDirectory(prefix="bf16-fidelity-") as tmp:
        for name in args.only:
            results["networks"].append(network(name, peers, worker, x, y, args, pathlib.Path(tmp)))
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(table(results))


if __name__ == "__main__":
    main()
