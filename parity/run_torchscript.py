"""Runs a TorchScript file in Python, as a user of the exported module would.

    python parity/run_torchscript.py MODULE.pt INPUT.safetensors OUTPUT.safetensors

Reads the tensor `input`, writes `output = torch.jit.load(MODULE)(input)` (eval mode, no grad).
"""
import argparse

import torch
from safetensors.torch import load_file, save_file


def main():
    parser = argparse.ArgumentParser(
        description="Run a TorchScript file on the tensor `input` of a safetensors file, in eval mode "
                    "and without gradients, and write its result as the tensor `output`.")
    parser.add_argument("module", help="the TorchScript file (e.g. written by `scconv-tch export`)")
    parser.add_argument("input", help="a safetensors file holding a tensor named `input`")
    parser.add_argument("output", help="the safetensors file to write, holding `output`")
    args = parser.parse_args()
    module = torch.jit.load(args.module).eval()
    with torch.no_grad():
        output = module(load_file(args.input)["input"])
    save_file({"output": output.contiguous()}, args.output)


if __name__ == "__main__":
    main()
