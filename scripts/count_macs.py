"""Counts the multiply-adds of a network's forward pass for one image, by hooks on its layers.

Convention: multiply-adds (MACs; FLOPs are about twice this) of convolutions (weights x inputs, bias
adds not counted) and linear layers only. GroupNorm/BatchNorm, the gate's sigmoid and comparisons, the
softmax, pooling and element-wise work are not counted: they are O(C H W), not O(C^2 H W).

    .venv/bin/python scripts/count_macs.py weights/fmnist_plain.json weights/fmnist_sc.json
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "parity"))
from models import build, count_parameters  # noqa: E402


def macs(model, shape):
    total = [0]

    def conv_hook(m, _inputs, output):
        total[0] += output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, _inputs, output):
        total[0] += output.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return total[0]


def main():
    parser = argparse.ArgumentParser(
        description="Parameters and multiply-adds per 28x28 image of trained networks (PyTorch side).")
    parser.add_argument("records", nargs="+", metavar="RECORD.json",
                        help="a training record, e.g. weights/fmnist_sc.json")
    for path in parser.parse_args().records:
        with open(path) as f:
            record = json.load(f)
        model = build(record["config"])
        shape = (record["config"].get("in_channels", 3), 28, 28)
        print(f"{record['name']}: {count_parameters(model):,} parameters, {macs(model, shape):,} MACs per 28x28 image")


if __name__ == "__main__":
    main()
