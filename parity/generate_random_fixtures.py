"""Randomized parity fixtures: COUNT valid ScConv configurations and small shapes drawn with SEED, written
in the format of generate_fixtures.py (same manifest, same tensors), plus `invalid.json`: random invalid
configurations with what the reference does with each (raises, or runs and returns).

    python parity/generate_random_fixtures.py --out DIR --seed N [--count 200] [--invalid 60]

Validity follows the crate's rules (src/config.rs): C even, C >= group_num, C % group_num == 0,
0 < alpha < 1, both halves squeezed to at least one channel, group_size dividing the grouped conv's input
and output channels, odd group_kernel_size.
"""
import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_fixtures import generate, save_file  # noqa: E402
from reference_scconv import ScConv  # noqa: E402

# Each valid draw picks a version of the reference (the seed half of the time) and, for one in four,
# the paper's fuse; `torch_gn` is drawn where the version has it.
VARIANTS = ["2023-07-27", "2023-07-27", "2023-07-27", "2023-09-12", "2023-09-14", "2023-10-19"]


def is_valid(c):
    up = int(c["alpha"] * c["op_channel"])
    low = c["op_channel"] - up
    r, g = c["squeeze_radio"], c["group_size"]
    return (c["group_num"] > 0 and c["op_channel"] % 2 == 0 and c["op_channel"] >= c["group_num"]
            and c["op_channel"] % c["group_num"] == 0 and 0 < c["alpha"] < 1 and 0 < c["gate_treshold"] < 1
            and r > 0 and up // r > 0 and low // r > 0 and g > 0 and (up // r) % g == 0
            and c["op_channel"] % g == 0 and c["group_kernel_size"] > 0 and c["group_kernel_size"] % 2 == 1)


def draw(rng, wild):
    """One configuration; `wild` widens the ranges so that many draws are invalid."""
    group_num = rng.choice([1, 2, 4, 8, 16] + ([0, 3, 5, 32] if wild else []))
    if wild:
        channels = rng.randint(2, 96)
    else:  # a multiple of group_num, made even
        channels = group_num * rng.randint(1, max(1, 64 // group_num))
        channels *= 1 + channels % 2
    return {
        "op_channel": channels,
        "group_num": group_num,
        "gate_treshold": 0.5,
        "alpha": rng.choice([0.0, 1.0, 0.05] if wild and rng.random() < 0.2 else [0.25, 0.375, 0.5, 0.625, 0.75]),
        "squeeze_radio": rng.choice([1, 2, 4] + ([0, 8, 16] if wild else [])),
        "group_size": rng.choice([1, 2, 4] + ([0, 3, 8] if wild else [])),
        "group_kernel_size": rng.choice([1, 3, 5] + ([2, 4] if wild else [])),
    }


def valid_cases(rng, count):
    cases = []
    while len(cases) < count:
        config = draw(rng, wild=False)
        if not is_valid(config):
            continue
        nhw = (rng.randint(1, 3), rng.randint(2, 9), rng.randint(2, 9))
        overrides = {k: v for k, v in config.items() if k != "op_channel"}
        variant = rng.choice(VARIANTS)
        if variant != "2023-07-27":
            overrides.update(variant=variant, torch_gn=rng.random() < 0.5)
        if rng.random() < 0.25:
            overrides["fuse"] = "paper"
        if rng.random() < 0.2:  # channels with a large offset, where summation orders show
            overrides.update(offset=rng.choice([10.0, 100.0, 1000.0]), per_channel=rng.random() < 0.5)
        cases.append((f"random_{len(cases):03d}", config["op_channel"], nhw, overrides, None))
    return cases


def reference_outcome(config):
    """What the reference does with a configuration: 'raises: ...' or 'runs'."""
    try:
        model = ScConv(**config)
        with torch.no_grad():
            model(torch.randn(1, config["op_channel"], 6, 6))
        return "runs"
    except Exception as e:  # noqa: BLE001 - any failure of the reference is the outcome recorded
        return f"raises: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def invalid_configs(rng, count):
    found = []
    while len(found) < count:
        config = draw(rng, wild=True)
        if is_valid(config) or config["op_channel"] <= 0:
            continue
        found.append({"config": config, "reference": reference_outcome(dict(config))})
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--invalid", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    fmt = "safetensors" if save_file else "pt"
    generate(valid_cases(rng, args.count), args.out, args.seed, args.device, fmt,
             generator="parity/generate_random_fixtures.py", verbose=False)
    with open(os.path.join(args.out, "invalid.json"), "w") as f:
        json.dump(invalid_configs(rng, args.invalid), f, indent=1)
    print(f"{args.count} random valid cases and {args.invalid} invalid configs with seed {args.seed} in {args.out}")


if __name__ == "__main__":
    main()
