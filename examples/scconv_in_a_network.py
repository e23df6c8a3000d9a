"""The PyTorch side of `examples/scconv_in_a_network.rs`: a small classifier with an ScConv (the
2023-10-19 version, upstream's current code) among ordinary layers, trained for a few steps and saved
the way a training script saves it: `nn.DataParallel`, then `torch.save({"model": ..., "optimizer":
..., "epoch": ...})` of its `OrderedDict` state dict. Also writes a batch and the network's outputs.

    python examples/scconv_in_a_network.py --out DIR
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity"))
from reference_scconv_2023_10_19 import ScConv  # noqa: E402


class Net(nn.Module):
    """features: conv 3x3 (3 -> 32), BatchNorm, ReLU, ScConv(32), ReLU, global pool; then head: linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            ScConv(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    net = nn.DataParallel(Net())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):  # a few steps on random data: weights and BatchNorm statistics move
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 5},
               os.path.join(args.out, "checkpoint.pt"))
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        features = net.module.features[:3](x)
        save_file({"input": x, "logits": net(x).contiguous(),
                   "scconv_input": features.contiguous(),
                   "scconv_output": net.module.features[3](features).contiguous()},
                  os.path.join(args.out, "expected.safetensors"))
    print(f"wrote {args.out}/checkpoint.pt (keys under model.module.) and expected.safetensors")


if __name__ == "__main__":
    main()
