"""Writes half-precision parity fixtures: the reference ScConv converted with `.half()` or
`.bfloat16()` (as a user deploys a trained model), run for inference on one device.

    python parity/generate_half_fixtures.py --out DIR [--device cpu|cuda] [--seed N]

Per case NAME the output folder gets
  NAME.safetensors                  the fp32 `state_dict()` (the Rust side converts its VarStore as
                                    PyTorch converts the module)
  NAME.DTYPE.tensors.safetensors    for DTYPE float16 and bfloat16: `input` (fp32), and what the converted
                                    module computes on `input.to(DTYPE)`: `output`, `gate.z`,
                                    `gate.info_mask`; and the fp32 module's `output.fp32`, `gate.z.fp32`
                                    and `gate.info_mask.fp32`
and one `manifest.json` (one entry per case and dtype). Every case has trained-looking GroupNorm
parameters (a non-zero beta), except `c64_init` (the reference's own initialisation).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate_fixtures as g  # noqa: E402
import scconv_versions  # noqa: E402

# (name, op_channel, (N, H, W), overrides)
CASES = [
    ("c64_init", 64, (2, 14, 14), {"init": True}),
    ("c64", 64, (2, 14, 14), {}),
    ("c128_group_num_4", 128, (2, 8, 8), {"group_num": 4}),
    ("c256_7x7", 256, (2, 7, 7), {}),
    ("c32_alpha_quarter", 32, (3, 9, 11), {"alpha": 0.25}),
    ("c64_v2023_09_12_torch_gn", 64, (2, 14, 14), {"variant": "2023-09-12", "torch_gn": True}),
    ("c64_v2023_09_14", 64, (2, 14, 14), {"variant": "2023-09-14"}),
    ("c64_v2023_10_19", 64, (2, 14, 14), {"variant": "2023-10-19"}),
    ("c128_v2023_10_19_own_gn_paper", 128, (2, 8, 8), {"variant": "2023-10-19", "torch_gn": False, "fuse": "paper"}),
]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def gate_of(model, x, config):
    """Output, z and the informative decisions (the soft gate of 2023-10-19 decides with `>`)."""
    gate = g.capture_gate(model)
    y = model(x)
    t = config["gate_treshold"]
    return y, gate["z"], gate["reweigts"] > t if scconv_versions.soft_gate(config) else gate["reweigts"] >= t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=20261128, help="base seed (case i: seed + i, input seed + 1000 + i)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # torch.save pickles where safetensors is not installed (e.g. a GPU machine without network).
    fmt = "safetensors" if g.save_file else "pt"
    manifest = {"generator": "parity/generate_half_fixtures.py", "torch_version": torch.__version__,
                "device": args.device, **g.cpu_kernels(args.device), "seed": args.seed, "cases": []}
    for index, (name, op_channel, (n, h, w), overrides) in enumerate(CASES):
        config = g.resolve(op_channel, overrides)
        torch.manual_seed(args.seed + index)
        model = scconv_versions.build(config)
        if not overrides.get("init"):
            g.randomize_trained_like(model, config)
        model = model.to(args.device).eval()
        state_dict = g.write(model.state_dict(), args.out, name, fmt)
        torch.manual_seed(args.seed + 1000 + index)
        x = torch.randn(n, op_channel, h, w).to(args.device)
        with torch.no_grad():
            y32, z32, info32 = gate_of(model, x, config)
            for dtype_name, dtype in DTYPES.items():
                converted = scconv_versions.build(config).to(args.device)
                converted.load_state_dict(model.state_dict())
                converted = converted.to(dtype).eval()
                y, z, info = gate_of(converted, x.to(dtype), config)
                tensors = {"input": x, "output": y, "gate.z": z, "gate.info_mask": info,
                           "output.fp32": y32, "gate.z.fp32": z32, "gate.info_mask.fp32": info32}
                tensors_file = g.write(tensors, args.out, f"{name}.{dtype_name}.tensors", fmt)
                manifest["cases"].append({
                    "name": f"{name}.{dtype_name}", "config": config, "dtype": dtype_name,
                    "input_shape": list(x.shape), "state_dict": state_dict, "tensors": tensors_file,
                })
        print(f"{name}: input {list(x.shape)}")
    g.write_manifest(manifest, args.out)


if __name__ == "__main__":
    main()
