"""Runs a TorchScript file in Python, as a user of the exported module would.

    python parity/run_torchscript.py MODULE.pt INPUT.safetensors OUTPUT.safetensors

Reads the tensor `input`, writes `output = torch.jit.load(MODULE)(input)` (eval mode, no grad).
"""
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    module_path, input_path, output_path = sys.argv[1:4]
    module = torch.jit.load(module_path).eval()
    with torch.no_grad():
        output = module(load_file(input_path)["input"])
    save_file({"output": output.contiguous()}, output_path)


if __name__ == "__main__":
    main()
