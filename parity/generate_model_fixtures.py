"""Writes whole-network parity fixtures: eval-mode logits of a batch and the gate of every ScConv.

    python parity/generate_model_fixtures.py --out DIR --cases random [--seed N] [--device cuda] [--only NAME[,NAME...]]
    python parity/generate_model_fixtures.py --out weights/parity-models --cases trained
    python parity/generate_model_fixtures.py --out weights/parity-models/versions --cases versions

`random`: plain and SC ResNet-18, SC ResNet-50 and a small SC net whose stride-2 conv keeps its width,
with the reference's initialisation plus randomised BatchNorm statistics (so eval mode is not trivial),
on random 64x64 (or 32x32) inputs; their state dicts are written too (`NAME.safetensors`, not committed:
ResNet-50's is 66 MB); the last is an SC-ResNet-18 of the current head (2023-10-19: torch_gn, group_num 4).
`versions`: a small SC network per later version, their state dicts written too (committed). `trained`: the Fashion-MNIST networks of `weights/fmnist_*.json` on the first test
images of the shipped sample.

Per case: `NAME.tensors.safetensors` with `input`, `logits`, and for each ScConv at path P (e.g.
`layer1.0.conv2`) `gate.P.z` and `gate.P.info_mask`; one `manifest.json` for all cases. The trained cases,
and on the CPU the random SC cases of the seed's version, also hold `logits_bf16_autocast`: the same batch
under PyTorch's CPU bf16 autocast with the fp32 run's gate decisions injected (PyTorch's own bf16 accuracy,
the bound of the bf16 inference form's tests).
"""
import argparse
import gzip
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from generate_fixtures import cpu_kernels, save_file, write, write_manifest  # noqa: E402
from models import ARCHS, build  # noqa: E402
import scconv_versions  # noqa: E402

RANDOM_CASES = [
    ("resnet18_64px", {"arch": "resnet18"}, (2, 3, 64, 64)),
    ("sc_resnet18_64px", {"arch": "resnet18", "sc": True}, (2, 3, 64, 64)),
    ("sc_resnet50_64px", {"arch": "resnet50", "sc": True}, (2, 3, 64, 64)),
    ("sc_small_pooled_32px", {"block": "basic", "layers": [1, 1, 1], "widths": [32, 32, 64], "num_classes": 10,
                              "small_input": True, "sc": True}, (2, 3, 32, 32)),
    ("sc_resnet18_v2023_10_19_64px", {"arch": "resnet18", "sc": True, "scconv": {"variant": "2023-10-19"}},
     (2, 3, 64, 64)),
]

# One small SC network per later version (`--cases versions`, committed in weights/parity-models/versions):
# the version's own defaults (group_num 4; torch_gn off, or on for 2023-10-19), one with the paper's fuse.
SMALL = {"block": "basic", "layers": [1, 1, 1], "widths": [32, 32, 64], "num_classes": 10, "small_input": True,
         "sc": True}
VERSION_CASES = [
    ("sc_small_v2023_09_12", dict(SMALL, scconv={"variant": "2023-09-12"}), (2, 3, 32, 32)),
    ("sc_small_v2023_09_14_torch_gn", dict(SMALL, scconv={"variant": "2023-09-14", "torch_gn": True}),
     (2, 3, 32, 32)),
    ("sc_small_v2023_10_19", dict(SMALL, scconv={"variant": "2023-10-19"}), (2, 3, 32, 32)),
    ("sc_small_v2023_10_19_paper", dict(SMALL, scconv={"variant": "2023-10-19", "fuse": "paper"}), (2, 3, 32, 32)),
]
TRAINED_CASES = ["fmnist_plain", "fmnist_sc"]
TRAINED_BATCH = 8
MEAN, STD = 0.2860, 0.3530


def full_config(config):
    """The config with the architecture spelt out, as the Rust `ResNetConfig` reads it."""
    config = dict(config)
    if "arch" in config:
        config["block"], config["layers"] = ARCHS[config.pop("arch")]
    return config


def randomize_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def trained_like_sru(model):
    """Trained-looking GroupNorm parameters in every ScConv, as the block fixtures have them."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "ScConv":
                scconv_versions.gn_shift(module).normal_(0.0, 0.1)
                scconv_versions.gn_scale(module).normal_(1.0, 0.3)


def record_gates(model, config):
    """The sigmoid's input and the informative decisions of every ScConv (of any version: the soft gate
    of 2023-10-19 decides with `>`, the others with `>=`)."""
    gates = {}
    soft = scconv_versions.soft_gate(config.get("scconv") or {})
    for path, module in model.named_modules():
        if type(module).__name__ == "ScConv":
            def hook(_m, inputs, output, path=path, threshold=module.SRU.gate_treshold):
                gates[f"gate.{path}.z"] = inputs[0].detach()
                gates[f"gate.{path}.info_mask"] = output.detach() > threshold if soft else output.detach() >= threshold
            module.SRU.sigomid.register_forward_hook(hook)
    return gates


def bf16_autocast_logits(model, x, gates):
    """Logits under CPU bf16 autocast, each ScConv's gate taking the fp32 run's decisions (`gates`):
    its sigmoid's output replaced by the recorded mask as 1.0 / 0.0, which the seed's `>= 0.5` reads back
    unchanged (the trained networks are the seed's version, whose output uses the gate only so)."""
    handles = []
    for path, module in model.named_modules():
        if type(module).__name__ == "ScConv":
            mask = gates[f"gate.{path}.info_mask"]
            handles.append(module.SRU.sigomid.register_forward_hook(lambda _m, _i, _o, mask=mask: mask.float()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).float()
    for handle in handles:
        handle.remove()
    return logits


def sample_images(count):
    path = os.path.join(ROOT, "weights", "fashion-mnist-sample", "t10k-images-first1000-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        data = f.read()
    pixels = torch.frombuffer(bytearray(data[16:16 + count * 784]), dtype=torch.uint8).view(count, 28, 28)
    return ((pixels.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def run(model, config, x, device):
    model = model.to(device).eval()
    gates = record_gates(model, config)
    with torch.no_grad():
        logits = model(x.to(device))
    return dict(input=x, logits=logits, **gates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", choices=["random", "versions", "trained"], required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--format", choices=["safetensors", "pt"], default=None,
                        help="pt: every file by torch.save (a state dict as torch.save(model.state_dict()))")
    parser.add_argument("--only", default=None, help="just the cases of these names (comma-separated)")
    args = parser.parse_args()
    fmt = args.format or ("safetensors" if save_file else "pt")
    os.makedirs(args.out, exist_ok=True)
    manifest = {"generator": "parity/generate_model_fixtures.py", "torch_version": torch.__version__,
                "device": args.device, **cpu_kernels(args.device), "seed": args.seed, "cases": []}
    if args.cases in ("random", "versions"):
        for index, (name, config, shape) in enumerate(RANDOM_CASES if args.cases == "random" else VERSION_CASES):
            if args.only is not None and name not in args.only.split(","):
                continue
            torch.manual_seed(args.seed + index)
            model = build(config)
            randomize_batchnorm(model)
            if config.get("scconv"):
                trained_like_sru(model)
            x = torch.randn(*shape)
            state_dict = {k: v for k, v in model.state_dict().items()}
            state_file = write(state_dict, args.out, name, fmt)
            tensors = run(model, config, x, args.device)
            if args.device == "cpu" and config.get("sc") and not config.get("scconv"):
                tensors["logits_bf16_autocast"] = bf16_autocast_logits(model, tensors["input"], tensors)
            manifest["cases"].append({"name": name, "config": full_config(config), "state_dict": state_file,
                                      "tensors": write(tensors, args.out, f"{name}.tensors", fmt)})
            print(f"{name}: logits {list(tensors['logits'].shape)}, {sum(k.endswith('.z') for k in tensors)} gates")
    else:
        for name in TRAINED_CASES:
            with open(os.path.join(ROOT, "weights", f"{name}.json")) as f:
                record = json.load(f)
            model = build(record["config"])
            from safetensors.torch import load_file  # trained weights are safetensors; only this mode needs it
            model.load_state_dict(load_file(os.path.join(ROOT, "weights", record["weights"])))
            tensors = run(model, record["config"], sample_images(TRAINED_BATCH), args.device)
            assert not record["config"].get("scconv"), "the injected bf16 gates assume the seed's version"
            tensors["logits_bf16_autocast"] = bf16_autocast_logits(model, tensors["input"], tensors)
            manifest["cases"].append({"name": name, "config": full_config(record["config"]),
                                      "state_dict": os.path.relpath(os.path.join(ROOT, "weights", record["weights"]),
                                                                    os.path.abspath(args.out)),
                                      "tensors": write(tensors, args.out, f"{name}.tensors", fmt)})
            print(f"{name}: logits {list(tensors['logits'].shape)}")
    write_manifest(manifest, args.out)


if __name__ == "__main__":
    main()
