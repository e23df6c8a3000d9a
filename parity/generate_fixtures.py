"""Writes the parity fixtures: for each case the reference ScConv's state dict, an input, the output,
the gradients of a fixed scalar loss, and the reference's gate (its `gn_x * w_gamma` and decisions).

    python parity/generate_fixtures.py --out weights/parity            # the committed fixtures
    python parity/generate_fixtures.py --set versions --out weights/parity-versions
                                                                      # the later versions, the paper's fuse
    python parity/generate_fixtures.py --set offset --out weights/parity-offset
                                                                      # inputs with large channel offsets
    python parity/generate_fixtures.py --out DIR --seed N --device cuda  # fresh ones, on a GPU

Per case NAME the output folder gets
  NAME.safetensors          the model's `state_dict()`, unchanged (what a PyTorch user saves)
  NAME.tensors.safetensors  input, output, grad.input, grad.<param>, gate.z, gate.info_mask
and one `manifest.json` for all cases. A case that says `weights_from` reuses that case's model (the
same weights on another batch) and writes no state dict of its own.

The loss is `sum(output * loss_weight(output.shape))`, with `loss_weight` below: a fixed, signed,
irregular tensor that both sides compute with the same libtorch ops instead of storing it, so every
gradient is non-trivial and the fixtures stay small.
"""
import argparse
import json
import os
import sys

import torch

try:
    from safetensors.torch import save_file
except ImportError:  # e.g. a GPU machine without network: fall back to torch.save pickles (--format pt)
    save_file = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scconv_versions  # noqa: E402

DEFAULTS = dict(group_num=16, gate_treshold=0.5, alpha=0.5, squeeze_radio=2, group_size=2, group_kernel_size=3)

# (name, op_channel, (N, H, W), overrides of the defaults, weights_from). The first six are the defaults
# at the four ResNet-50 shapes, batch 1, and batch > 1 on the models of the two deepest shapes; the rest
# vary one setting each, on a small spatial size since only the channel arithmetic matters there.
CASES = [
    ("c64_56x56_b1", 64, (1, 56, 56), {}, None),
    ("c128_28x28_b1", 128, (1, 28, 28), {}, None),
    ("c256_14x14_b1", 256, (1, 14, 14), {}, None),
    ("c512_7x7_b1", 512, (1, 7, 7), {}, None),
    ("c256_14x14_b2", 256, (2, 14, 14), {}, "c256_14x14_b1"),
    ("c512_7x7_b4", 512, (4, 7, 7), {}, "c512_7x7_b1"),
    ("alpha_quarter", 64, (2, 12, 12), {"alpha": 0.25}, None),
    ("alpha_three_quarters", 64, (2, 12, 12), {"alpha": 0.75}, None),
    ("squeeze_radio_4", 64, (2, 12, 12), {"squeeze_radio": 4}, None),
    ("group_size_4", 64, (2, 12, 12), {"group_size": 4}, None),
    ("group_kernel_size_5", 64, (2, 12, 12), {"group_kernel_size": 5}, None),
    ("group_num_4", 32, (2, 12, 12), {"group_num": 4}, None),
    ("group_num_32", 128, (2, 8, 8), {"group_num": 32}, None),
    ("non_square_12x20", 64, (2, 12, 20), {}, None),
]

# The published later versions of the reference and the paper's fuse (`--set versions`): each version
# with its own defaults (group_num 4; torch_gn off, or on for 2023-10-19) and the other GroupNorm, the
# paper's fuse on three versions. All but `v2023_10_19_init` get trained-looking GroupNorm parameters.
VERSION_CASES = [
    ("v2023_09_12", 64, (2, 12, 12), {"variant": "2023-09-12"}, None),
    ("v2023_09_12_torch_gn", 64, (2, 12, 12), {"variant": "2023-09-12", "torch_gn": True}, None),
    ("v2023_09_14", 64, (2, 12, 12), {"variant": "2023-09-14"}, None),
    ("v2023_09_14_torch_gn_c128", 128, (1, 14, 14), {"variant": "2023-09-14", "torch_gn": True}, None),
    ("v2023_10_19", 64, (2, 12, 12), {"variant": "2023-10-19"}, None),
    ("v2023_10_19_init", 64, (2, 12, 12), {"variant": "2023-10-19", "init": True}, None),
    ("v2023_10_19_own_gn", 64, (2, 12, 12), {"variant": "2023-10-19", "torch_gn": False}, None),
    ("v2023_10_19_c256_7x7", 256, (2, 7, 7), {"variant": "2023-10-19"}, None),
    ("paper_fuse", 64, (2, 12, 12), {"fuse": "paper"}, None),
    ("paper_fuse_v2023_10_19", 64, (2, 12, 12), {"variant": "2023-10-19", "fuse": "paper"}, None),
    ("paper_fuse_v2023_09_14_alpha", 64, (2, 10, 14),
     {"variant": "2023-09-14", "fuse": "paper", "alpha": 0.25}, None),
]

# Inputs whose channels carry a large offset (`--set offset`), at up to 768 channels and batch 1-3:
# where the CRU's summation order shows (`offset` is added to every value; `per_channel`: a random
# offset per channel, of that scale). A merge of the fast path that summed in another order moved up
# to 4.7e-5 of the largest output on such inputs; the fast path must stay within the fp32 tolerance.
OFFSET_CASES = [
    ("offset_c64_b3", 64, (3, 7, 7), {"offset": 1000.0}, None),
    ("offset_c768_b2", 768, (2, 7, 7), {"offset": 100.0}, None),
    ("offset_c384_per_channel_v2023_10_19", 384, (1, 14, 14),
     {"variant": "2023-10-19", "offset": 100.0, "per_channel": True}, None),
    ("offset_c256_v2023_09_14", 256, (2, 7, 7), {"variant": "2023-09-14", "offset": 1000.0}, None),
    ("offset_c128_v2023_09_12_torch_gn_paper", 128, (3, 7, 7),
     {"variant": "2023-09-12", "torch_gn": True, "fuse": "paper", "offset": 100.0}, None),
]

CASE_SETS = {"seed": CASES, "versions": VERSION_CASES, "offset": OFFSET_CASES}

# Overrides that shape the case (its initialisation, its input), not the module's config.
CASE_ONLY = ("init", "offset", "per_channel")

# The smallest case is also written as a `torch.save` pickle, to test loading `.pt` files.
PT_CASE = "group_num_4"


def cpu_kernels(device):
    """For CPU fixtures, which CPU kernels made them (instruction set, threads), as the Rust side's
    `parity::cpu_kernels()` prints it: fixtures from another kind of CPU are not bit-for-bit comparable."""
    if device != "cpu":
        return {}
    return {"cpu_kernels": f"{torch.backends.cpu.get_cpu_capability()}/{torch.get_num_threads()} threads"}


def loss_weight(shape, device):
    """cos(0.7 * k) at flat position k. The Rust parity code computes the same (src/parity.rs)."""
    numel = 1
    for size in shape:
        numel *= size
    return torch.cos(torch.arange(numel, dtype=torch.float32, device=device) * 0.7).reshape(shape)


def randomize_trained_like(model, config):
    """A trained SRU has a non-zero beta; the reference initialises it to zeros. The cases that vary a
    setting get one, so that the `+ beta` is exercised; the default cases keep the reference's own
    initialisation, whose beta = 0 puts many more gate values z near 0 (inside the fp32 band).
    `nn.GroupNorm` starts with weight 1 (every `w_gamma` equal): trained, it is spread around 1."""
    with torch.no_grad():
        scconv_versions.gn_shift(model).normal_(0.0, 0.1)
        if config.get("torch_gn"):
            scconv_versions.gn_scale(model).normal_(1.0, 0.3)


def resolve(op_channel, overrides):
    """The full config of a case: the chosen version's defaults, then the overrides."""
    variant = overrides.get("variant", "2023-07-27")
    config = dict(DEFAULTS, op_channel=op_channel)
    if variant != "2023-07-27":
        config.update(variant=variant, group_num=4, torch_gn=variant == "2023-10-19")
    config.update({k: v for k, v in overrides.items() if k not in CASE_ONLY})
    return config


def capture_gate(model):
    """Records the sigmoid's input (the reference's `gn_x * w_gamma`) and output during forward."""
    seen = {}

    def hook(_module, inputs, output):
        seen["z"] = inputs[0].detach().clone()
        seen["reweigts"] = output.detach().clone()

    model.SRU.sigomid.register_forward_hook(hook)
    return seen


def run_case(op_channel, nhw, overrides, model_seed, input_seed, device):
    config = resolve(op_channel, overrides)
    torch.manual_seed(model_seed)
    model = scconv_versions.build(config)
    if overrides and not overrides.get("init"):
        randomize_trained_like(model, config)
    model = model.to(device)
    gate = capture_gate(model)
    n, h, w = nhw
    torch.manual_seed(input_seed)
    x = torch.randn(n, op_channel, h, w)
    if "offset" in overrides:
        scale = torch.randn(1, op_channel, 1, 1) if overrides.get("per_channel") else 1.0
        x = x + overrides["offset"] * scale
    x = x.to(device).requires_grad_()
    y = model(x)
    (y * loss_weight(y.shape, device)).sum().backward()

    tensors = {
        "input": x.detach(),
        "output": y.detach(),
        "grad.input": x.grad,
        "gate.z": gate["z"],
        "gate.info_mask": (gate["reweigts"] > config["gate_treshold"]) if scconv_versions.soft_gate(config)
        else (gate["reweigts"] >= config["gate_treshold"]),
    }
    without_grad = []
    for key, param in model.named_parameters():
        if param.grad is None:
            without_grad.append(key)
        else:
            tensors["grad." + key] = param.grad
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    return config, state_dict, tensors, without_grad


def to_cpu_contiguous(tensors):
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write(tensors, out, stem, fmt):
    """Writes `tensors` as OUT/STEM.safetensors or OUT/STEM.pt (both readable by `weights::read`)."""
    name = f"{stem}.{fmt}"
    if fmt == "safetensors":
        save_file(to_cpu_contiguous(tensors), os.path.join(out, name))
    else:
        torch.save(to_cpu_contiguous(tensors), os.path.join(out, name))
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=20231128,
                        help="base seed: case i builds its model with seed + i and its input with seed + 1000 + i")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", choices=sorted(CASE_SETS), default="seed",
                        help="which cases: the seed version's (default) or the later versions and the paper's fuse")
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors" if save_file else "pt",
                        help="file format (default: safetensors when the package is installed, else pt)")
    args = parser.parse_args()
    if args.format == "safetensors" and save_file is None:
        parser.error("--format safetensors needs the safetensors package (pip install safetensors)")

    generate(CASE_SETS[args.set], args.out, args.seed, args.device, args.format)


def generate(cases, out, seed, device, fmt, generator="parity/generate_fixtures.py", verbose=True):
    """Writes `cases` ((name, op_channel, (N, H, W), overrides, weights_from) each) and the manifest."""
    os.makedirs(out, exist_ok=True)
    manifest = {
        "generator": generator,
        "reference": "parity/reference_scconv.py (seed document 000_8c60a6467fa50790.txt) and, by the "
                     "config's variant, parity/reference_scconv_2023_*.py (parity/scconv_versions.py)",
        "torch_version": torch.__version__,
        "device": device,
        **cpu_kernels(device),
        "seed": seed,
        "loss": "sum(output * cos(0.7 * arange(numel)).reshape(output.shape))",
        "cases": [],
    }
    names = [case[0] for case in cases]
    for index, (name, op_channel, nhw, overrides, weights_from) in enumerate(cases):
        model_seed = seed + names.index(weights_from or name)
        input_seed = seed + 1000 + index
        config, state_dict, tensors, without_grad = run_case(
            op_channel, nhw, overrides, model_seed, input_seed, device)
        if weights_from is None:
            write(state_dict, out, name, fmt)
        tensors_file = write(tensors, out, f"{name}.tensors", fmt)
        if name == PT_CASE:
            torch.save(to_cpu_contiguous(state_dict), os.path.join(out, f"{name}.pt"))
        manifest["cases"].append({
            "name": name,
            "config": config,
            "input_shape": list(tensors["input"].shape),
            "model_seed": model_seed,
            "input_seed": input_seed,
            "state_dict": f"{weights_from or name}.{fmt}",
            "tensors": tensors_file,
            "params_without_grad": without_grad,
        })
        if verbose:
            print(f"{name}: input {list(tensors['input'].shape)}, params without grad: {without_grad}")
    write_manifest(manifest, out)


def write_manifest(manifest, out):
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
