"""Writes PyTorch files the way people save them, for the checkpoint tests (`tests/checkpoints.rs`):

    python parity/write_checkpoints.py --out DIR [--seed N]

For each reference version V (2023-07-27, 2023-09-12, 2023-09-14, 2023-10-19) with its defaults:
  state_dict_V.pt        torch.save(model.state_dict())               (an OrderedDict)
  expected_V.safetensors an input and the model's output on it
For the 2023-10-19 model M (nn.GroupNorm, soft gate) also:
  checkpoint.pt          {"model": state_dict, "optimizer": SGD state, "epoch": 3, "best": 0.91}
  dataparallel.pt        nn.DataParallel(M).state_dict()              (keys under `module.`)
  half.pt, bfloat16.pt, double.pt   the state dict in that dtype; expected_half.safetensors etc.: the
                         output of M after load_state_dict of those weights (copy_ converts them)
  whole_model.pt         torch.save(M)                                (a pickled nn.Module)
  foreign_global.pt      a dict whose pickle asks for os.system (written, never loaded here)
  no_crc32.pt            M's state dict saved after torch.serialization.set_crc32_options(False)
                         (every entry's stored CRC-32 is 0)
  corrupt_storage.pt     M's state dict with one byte of one storage flipped, its CRC-32 left as
                         written (PyTorch 2.11's torch.load reads it without a word)
  corrupt_pickle.pt      the same with one byte of a key in data.pkl flipped
and `manifest.json` naming the config of each file.
"""
import argparse
import json
import os
import struct
import sys
import zipfile
from collections import OrderedDict

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scconv_versions  # noqa: E402

VERSIONS = ["2023-07-27", "2023-09-12", "2023-09-14", "2023-10-19"]
CHANNELS = 32


class RunsShell:
    """An object whose pickle calls os.system when unpickled by Python (the Rust reader refuses it)."""

    def __reduce__(self):
        return (os.system, ("true",))


def trained_like(model):
    with torch.no_grad():
        scconv_versions.gn_shift(model).normal_(0.0, 0.1)
        scale = scconv_versions.gn_scale(model)
        if scale.dim() == 1:
            scale.normal_(1.0, 0.3)
    return model.eval()


def output(model, x):
    with torch.no_grad():
        return model(x).contiguous()


def entry_data_start(path, suffix):
    """Where the bytes of the archive entry whose name ends with `suffix` begin in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
        assert info.compress_type == zipfile.ZIP_STORED, "torch.save stores its entries"
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def find_in_entry(path, suffix, needle):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(suffix))
        return archive.read(name).index(needle)


def write_flipped(path, suffix, offset, out):
    """A copy of `path` with byte `offset` of the entry ending in `suffix` flipped (its CRC-32 kept)."""
    data = bytearray(open(path, "rb").read())
    data[entry_data_start(path, suffix) + offset] ^= 0x01
    open(out, "wb").write(bytes(data))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=7, help="seed of the models and inputs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    x = torch.randn(2, CHANNELS, 9, 11)
    manifest = {}
    for version in VERSIONS:
        config = {"op_channel": CHANNELS, "variant": version}
        model = trained_like(scconv_versions.build(config))
        torch.save(model.state_dict(), os.path.join(args.out, f"state_dict_{version}.pt"))
        save_file({"input": x, "output": output(model, x)}, os.path.join(args.out, f"expected_{version}.safetensors"))
        manifest[version] = config
    head = model  # 2023-10-19

    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save({"model": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "best": 0.91},
               os.path.join(args.out, "checkpoint.pt"))
    save_file({"input": x, "output": output(head, x)}, os.path.join(args.out, "expected_checkpoint.safetensors"))
    torch.save(torch.nn.DataParallel(head).state_dict(), os.path.join(args.out, "dataparallel.pt"))

    for name, dtype in [("half", torch.float16), ("bfloat16", torch.bfloat16), ("double", torch.float64)]:
        converted = OrderedDict((k, v.to(dtype)) for k, v in head.state_dict().items())
        torch.save(converted, os.path.join(args.out, f"{name}.pt"))
        twin = scconv_versions.build(manifest["2023-10-19"]).eval()
        twin.load_state_dict(converted)
        save_file({"input": x, "output": output(twin, x)}, os.path.join(args.out, f"expected_{name}.safetensors"))

    torch.save(head, os.path.join(args.out, "whole_model.pt"))
    torch.save({"weight": torch.ones(2), "payload": RunsShell()}, os.path.join(args.out, "foreign_global.pt"))
    torch.serialization.set_crc32_options(False)
    torch.save(head.state_dict(), os.path.join(args.out, "no_crc32.pt"))
    torch.serialization.set_crc32_options(True)
    plain = os.path.join(args.out, "state_dict_2023-10-19.pt")
    write_flipped(plain, "data/0", 1, os.path.join(args.out, "corrupt_storage.pt"))
    write_flipped(plain, "data.pkl", find_in_entry(plain, "data.pkl", b"SRU.gn.weight") + 7,
                  os.path.join(args.out, "corrupt_pickle.pt"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"checkpoints for {', '.join(VERSIONS)} in {args.out}")


if __name__ == "__main__":
    main()
