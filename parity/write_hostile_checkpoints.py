"""Writes the hostile-checkpoint corpus for `tests/hostile_checkpoints.rs` (issue 18): torch.save
files as an adversarial user would hand them to the reader, and files PyTorch's own
`torch.load(weights_only=True)` reads that an earlier reader refused.

    python parity/write_hostile_checkpoints.py --out DIR [--small]

Every file holds the state dict of one ScConv (the config in `manifest.json`) somewhere, plus what
the case is about. `manifest.json` lists, per case: `file`, `select` (the prefix to load, or null),
`expect` ("loads": the model's keys load, bit-identical to PyTorch; "refused": one `error:` line),
`class` (the cause in issue 18 it exercises), `says` (text a refusal must contain, or null) and `pytorch` (what `torch.load(weights_only=True)` did
with it here: "loads", "refuses", or "not tried" for the files too big to try in a test run).
For each "loads" case that PyTorch loads, `<case>.expected.safetensors` holds the selected tensors
exactly as PyTorch's load gave them (the Rust side compares bit for bit); a "loads" case PyTorch
refuses (an opcode its weights_only unpickler lacks, such as DUP) or was not tried on holds the
state dict of `plain`.

The big files (tens of MB, or streams inflating to a GB) are written at test time; `--small` leaves
them out. Archives with lying directories are written by `write_zip` below (Python's zipfile cannot
lie); the rest by torch.save itself, some with their pickle spliced (`spliced`).
"""
import argparse
import collections
import io
import json
import os
import re
import struct
import sys
import zipfile
import zlib
import bz2
import concurrent.futures
import multiprocessing

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scconv_versions  # noqa: E402

CONFIG = {"op_channel": 16, "variant": "2023-07-27"}
MARKER = "__SPLICE_HERE__"
SPLICE_MEMO = 1_000_000  # memo slots the spliced opcodes use, far above torch.save's own


def state_dict():
    torch.manual_seed(18)
    model = scconv_versions.build(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def saved(obj, **kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def entries(archive):
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def replace_entry(items, suffix, transform):
    return [(name, transform(data) if name.endswith(suffix) else data) for name, data in items]


def spliced(sd, payload):
    """torch.save({"model": sd, "junk": MARKER}) with the marker string's opcodes replaced by
    `payload` (which must leave one value on the stack)."""
    marker = MARKER.encode()
    pickled = b"X" + struct.pack("<I", len(marker)) + marker
    items = entries(saved({"model": sd, "junk": MARKER}))
    return write_zip(replace_entry(items, "data.pkl", lambda d: d.replace(pickled, payload)))


def put(i):
    return b"r" + struct.pack("<I", i)


def get(i):
    return b"j" + struct.pack("<I", i)


def write_zip(items, method=None, declared=None, zip64=False, count=None, locator=None, extra=None):
    """A zip archive of `items` [(name, data)], stored unless `method` maps a name suffix to a method
    (8 deflate, 12 bzip2) and its compressed bytes; `declared` maps a suffix to the (compressed,
    uncompressed) sizes the directory claims; `zip64` writes the zip64 end records, `count` the
    entry count they claim, `locator` the offset the zip64 locator claims; `extra` maps a suffix to
    an extra field for that entry's headers."""
    method, declared, extra = method or {}, declared or {}, extra or {}
    out, central = bytearray(), bytearray()

    def pick(table, name, default):
        return next((v for k, v in table.items() if name.endswith(k)), default)

    for name, data in items:
        how, body = pick(method, name, (0, data))
        crc = zlib.crc32(data) if isinstance(data, bytes) else data[1]
        if not isinstance(data, bytes):
            data = data[0]
        usize = len(data) if isinstance(data, bytes) else data
        csize, usize = pick(declared, name, (len(body), usize))
        field = pick(extra, name, b"")
        big = csize >= 0xFFFFFFFF or usize >= 0xFFFFFFFF
        if big:
            field += struct.pack("<HHQQ", 1, 16, usize, csize)
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (csize, usize)
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, how, 0, 0x21, crc, *sizes, len(raw), len(field))
        out += raw + field + body
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x31E, 45, 0, how, 0, 0x21, crc, *sizes,
                               len(raw), len(field), 0, 0, 0, 0, offset)
        central += raw + field
    cd_offset, n = len(out), len(items) if count is None else count
    out += central
    if zip64:
        eocd64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64 if locator is None else locator, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(out)


def deflated_bomb(prefix, zeros_mib):
    """A raw deflate stream of `prefix` then `zeros_mib` MiB of zeros, and its (data size, crc):
    each MiB of zeros after a full flush compresses to the same bytes, so it is written once."""
    mib = b"\0" * (1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(zeros_mib):
        crc = zlib.crc32(mib, crc)
    return head + block * zeros_mib + tail, len(prefix) + (zeros_mib << 20), crc


def cases(sd, small):
    """(name, bytes, select, expect, class, try PyTorch)"""
    model = lambda extra, **kw: saved({"model": sd, "extra": extra}, **kw)  # noqa: E731
    yield "plain", saved(sd), None, "loads", "control", True
    # 1. nesting
    yield "nested_lists", spliced(sd, b"]" * 200_000 + b"a" * 199_999), "model.", "loads", "1 nesting", True
    yield "nested_tuples", spliced(sd, b"N" + b"\x85" * 1_000_000), "model.", "loads", "1 nesting", True
    dicts = b"}" + b"X\x01\x00\x00\x00k}" * 99_999 + b"s" * 99_999
    yield "nested_dicts", spliced(sd, dicts), "model.", "loads", "1 nesting", True
    yield "nested_lists_unselected", spliced(sd, b"]" * 200_000 + b"a" * 199_999), None, "refused", "1 nesting", True
    # 2. sharing
    m = SPLICE_MEMO
    yield "memo_doubling", spliced(sd, b"]" + put(m) + (get(m) + b"a" + put(m)) * 40), "model.", "loads", "2 sharing", True
    yield "dup_doubling", spliced(sd, b"]" + b"2a" * 40), "model.", "loads", "2 sharing", True
    recalled = b"](" + b"N" * 1_000_000 + b"e" + put(m) + b"0(" + get(m) * 64 + b"l"
    yield "list_recalled", spliced(sd, recalled), "model.", "loads", "2 sharing", True
    yield "shared_state_dict", saved({"model": sd, "ema": sd}), "ema.", "loads", "2 sharing", True
    if not small:
        deep = 1_200_000  # half the reader's value budget (384 MiB, 152 bytes a list): 5 s in a debug build
        yield "nesting_near_the_budget", spliced(sd, b"]" * deep + b"a" * (deep - 1)), "model.", "loads", "1 nesting", True
        yield "twelve_million_nones", spliced(sd, b"](" + b"N" * 12_000_000 + b"e"), "model.", "loads", "2 sharing", True
    # 3, 4. the zip directory
    items = entries(saved(sd))
    yield "zip64_declared_pickle", write_zip(items, declared={"data.pkl": (1 << 40, 1 << 40)}), None, "refused", "3 directory", True
    yield "zip64_declared_storage", write_zip(items, declared={"data/0": (1 << 40, 1 << 40)}), None, "refused", "3 directory", True
    yield "zip64_plain", write_zip(items, zip64=True), None, "loads", "3 directory", True
    if not small:
        big = entries(saved({"model": sd, "big": torch.zeros(25_000_000)}))
        yield "zip64_count_90M", write_zip(big, zip64=True, count=90_000_000), "model.", "refused", "3 directory", True
        yield "zip64_locator_0", write_zip(big, zip64=True, locator=0), "model.", "refused", "4 progress", True
    # 5. bombs
    pkl = next(d for n, d in items if n.endswith("data.pkl"))
    zeros = b"\0" * (64 << 20)
    bzipped = (12, bz2.compress(zeros, 9))
    yield "bzip2_storage", write_zip(items, method={"data/0": bzipped}, declared={"data/0": (len(bzipped[1]), 128)}), None, "refused", "5 bombs", True
    if not small:
        stream, size, crc = deflated_bomb(pkl, 1100)
        yield "deflate_pickle_bomb", write_zip(replace_entry(items, "data.pkl", lambda d: (d, crc)), method={"data.pkl": (8, stream)}, declared={"data.pkl": (len(stream), size)}), None, "loads", "5 bombs", False
        yield "deflate_pickle_lying_size", write_zip(replace_entry(items, "data.pkl", lambda d: (d, crc)), method={"data.pkl": (8, stream)}, declared={"data.pkl": (len(stream), 128)}), None, "refused", "5 bombs", True
    deflated = zlib.compressobj(9, zlib.DEFLATED, -15)
    honest = deflated.compress(pkl) + deflated.flush()
    yield "deflate_pickle", write_zip(items, method={"data.pkl": (8, honest)}), None, "loads", "5 bombs", True
    # 6. a huge value in an error
    yield "reduce_on_a_list", spliced(sd, b"](" + b"K\x01" * 1_000_000 + b"e)R"), "model.", "refused", "6 error text", True
    # 7. an AES extra field without the encryption flag
    aes = struct.pack("<HHHHBH", 0x9901, 7, 2, 0x4541, 3, 0)
    yield "aes_extra_field", write_zip(items, extra={"data.pkl": aes}), None, "loads", "7 third-party panics", True
    # 8. a storage typed two ways (hand-made: torch.save does not write it)
    # (storage_typed_twice is written by two_typed_storage)
    # 9. what weights_only loads
    yield "big_int", model(2**64 - 1), "model.", "loads", "9 allowlist", True
    yield "bytes", model(b"\x00\xffraw"), "model.", "loads", "9 allowlist", True
    yield "set", model({1, 2, 3}), "model.", "loads", "9 allowlist", True
    yield "complex", model(1 + 2j), "model.", "loads", "9 allowlist", True
    yield "device", model(torch.device("cuda:0")), "model.", "loads", "9 allowlist", True
    yield "dtype", model(torch.float16), "model.", "loads", "9 allowlist", True
    yield "size", model(torch.Size([2, 3])), "model.", "loads", "9 allowlist", True
    yield "counter", model(collections.Counter({"a": 2})), "model.", "loads", "9 allowlist", True
    yield "complex_storage", model(torch.randn(3, dtype=torch.complex64)), "model.", "loads", "9 allowlist", True
    yield "uint16_tensor", model(torch.arange(5).to(torch.uint16)), "model.", "loads", "9 allowlist", True
    yield "float8_tensor", model(torch.randn(4).to(torch.float8_e4m3fn)), "model.", "loads", "9 allowlist", True
    yield "qtensor", model(torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)), "model.", "loads", "9 allowlist", True
    yield "sparse", model(torch.randn(3, 3).to_sparse()), "model.", "loads", "9 allowlist", True
    p = torch.nn.Parameter(torch.randn(2))
    p.note = "extra attribute"
    yield "parameter_with_state", model([p]), "model.", "loads", "9 allowlist", True
    yield "parameters", saved(collections.OrderedDict((k, torch.nn.Parameter(v)) for k, v in sd.items())), None, "loads", "9 allowlist", True
    noted = collections.OrderedDict((k, v.clone()) for k, v in sd.items())
    noted["SRU.gn.gamma"].note = "an attribute"  # pickled through torch._tensor._rebuild_from_type_v2
    yield "tensor_with_attributes", saved(noted), None, "loads", "9 allowlist", True
    unusable = collections.OrderedDict(sd)
    unusable["SRU.gn.gamma"] = sd["SRU.gn.gamma"].to(torch.uint16)
    yield "model_key_of_an_unreadable_dtype", saved(unusable), None, "refused", "9 allowlist", True
    expanded = collections.OrderedDict(sd)
    expanded["SRU.gn.beta"] = torch.zeros(1).expand(*sd["SRU.gn.beta"].shape)
    yield "stride_0_view", saved(expanded), None, "loads", "9 allowlist", True
    pairs = saved(list(sd.items()))  # a list of (key, tensor) pairs, called below as OrderedDict(pairs)
    pairs = entries(pairs)
    prefix = b"\x80\x02ccollections\nOrderedDict\nq\x00"
    yield "ordered_dict_from_pairs", write_zip(replace_entry(pairs, "data.pkl", lambda d: prefix + d[2:-1] + b"\x85R.")), None, "loads", "9 allowlist", True
    for protocol in (1, 3, 4, 5):
        yield f"protocol_{protocol}", saved(sd, pickle_protocol=protocol), None, "loads", "9 protocols", True
    # 4 (hints): the whole prefix is named; lists flatten with their indices
    yield "doubled_prefix", saved({f"module.module.{k}": v for k, v in sd.items()}), "module.", "refused", "9 hints", True
    yield "prefix_cut", saved({"model": {f"module.{k}": v for k, v in sd.items()}}), "model.mod", "refused", "9 hints", True
    yield "prefix_no_dot", saved({"model": {f"module.{k}": v for k, v in sd.items()}}), "model", "refused", "9 hints", True
    yield "state_dicts_in_a_list", saved({"models": [sd, sd]}), "models.1.", "loads", "9 hints", True
    # 5, 6: keys that could mislead a terminal
    tricky = collections.OrderedDict(sd)
    tricky["evil\u202ekey\nerror: forged line"] = torch.ones(1)
    tricky["x" * 100_000] = torch.ones(1)
    yield "tricky_keys", saved(tricky), None, "refused", "6 escaping", True


# What a refusal must say: the whole prefix that matches, a misleading key escaped.
SAYS = {
    "doubled_prefix": "--select module.module.",
    "prefix_cut": "--select model.module.",
    "prefix_no_dot": "--select model.module.",
    "tricky_keys": "evil\\u{202e}key\\nerror: forged line",
    "storage_typed_twice": "read one storage",
    "nested_lists_unselected": "--select model.",
    "model_key_of_an_unreadable_dtype": "wrong dtype for SRU.gn.gamma: a tensor of dtype uint16",
    "deflate_pickle_lying_size": "its pickle is cut at the entry's declared size (128 bytes)",
    "storage_of_i64_max_elements": "claims 9223372036854775807 elements",
}


def two_typed_storage(sd):
    """A float tensor and a half tensor over one storage: torch.save types each storage once, so
    the half one's persistent id is rewritten to point at the float one's storage."""
    sd = collections.OrderedDict(sd)
    sd["SRU.gn.gamma"] = sd["SRU.gn.gamma"].half()
    items = entries(saved(sd))
    # storages are numbered in pickling order; the gamma's (first key) is "0", beta's is "1"
    return write_zip(replace_entry(items, "data.pkl", lambda d: d.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x001", 1)))


def huge_storage(sd):
    """The first storage's element count (in its persistent id: 'storage', type, key, 'cpu', count)
    rewritten to i64::MAX, as LONG1 with 8 bytes."""
    items = entries(saved(sd))
    # the location string, its memo put (BINPUT or LONG_BINPUT) if any, then the count
    count = re.compile(rb"(X\x03\x00\x00\x00cpu(?:q.|r....)?)(K.|M..|J....)", re.S)
    huge = b"\x8a\x08" + struct.pack("<q", 2**63 - 1)
    rewritten = lambda d: count.sub(lambda m: m.group(1) + huge, d, count=1)  # noqa: E731
    return write_zip(replace_entry(items, "data.pkl", rewritten))


def children(value):
    if isinstance(value, dict):  # keys that are not strings or ints name nothing (as in Rust)
        return [(str(k), v) for k, v in value.items() if isinstance(k, (str, int)) and not isinstance(k, bool)]
    if isinstance(value, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(value)]
    return []


def holds_tensors(root):
    """id -> whether a tensor lies anywhere below the container (cycles and sharing included): the
    containers holding one directly, then every container that reaches them (reversed edges)."""
    parents, holding, stack = {id(root): []}, [], [root]
    while stack:
        value = stack.pop()
        for _, child in children(value):
            if isinstance(child, (dict, list, tuple)):
                if id(child) not in parents:
                    parents[id(child)] = []
                    stack.append(child)
                parents[id(child)].append(id(value))
            elif isinstance(child, torch.Tensor):
                holding.append(id(value))
    known = dict.fromkeys(parents, False)
    while holding:
        container = holding.pop()
        if not known[container]:
            known[container] = True
            holding.extend(parents[container])
    return known


def flatten(root):
    """Dotted keys of every tensor (dicts by key, lists and tuples by index), as the Rust reader
    flattens: containers without tensors and cycles back to a container on the path skipped."""
    known, out, stack = holds_tensors(root), {}, [(root, "", frozenset())]
    while stack:
        value, key, path = stack.pop()
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif known.get(id(value)) and id(value) not in path:
            for k, v in children(value):
                if isinstance(v, torch.Tensor) or known.get(id(v)):
                    stack.append((v, f"{key}.{k}" if key else k, path | {id(value)}))
    return out


def pytorch_verdict(path, select, keys):
    try:
        loaded = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 (what PyTorch says is recorded, whatever it is)
        return "refuses", str(e).splitlines()[0][:200], None
    found = flatten(loaded)
    chosen = {k[len(select or ""):]: v for k, v in found.items() if k.startswith(select or "")}
    if set(chosen) != keys:
        return "loads (without the model's keys)", None, None
    return "loads", None, chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="leave out the big files")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sd = state_dict()
    keys = set(sd)
    manifest = {"config": CONFIG, "cases": []}
    every = list(cases(sd, args.small)) + [
        ("storage_typed_twice", two_typed_storage(sd), None, "refused", "8 dtype", True),
        ("storage_of_i64_max_elements", huge_storage(sd), None, "refused", "6 error text", True),
    ]
    # PyTorch's verdicts (its pure-Python unpickler: most of this script's time) two at a time, in fresh
    # interpreters, each file's asked for as soon as it is written.
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = []
        for name, data, select, _, _, try_torch in every:
            path = os.path.join(args.out, f"{name}.pt")
            with open(path, "wb") as f:
                f.write(data)
            pending.append(pool.submit(pytorch_verdict, path, select, keys) if try_torch else None)
        verdicts = [v.result() if v else ("not tried", None, None) for v in pending]
    for (name, _, select, expect, cause, _), (verdict, why, chosen) in zip(every, verdicts):
        if expect == "loads" and chosen is not None:
            save_file({k: v.contiguous() for k, v in chosen.items()}, os.path.join(args.out, f"{name}.expected.safetensors"))
        if expect == "loads" and verdict.startswith("loads ("):
            sys.exit(f"{name}: declared loadable, but torch.load(weights_only=True) {verdict}: {why}")
        manifest["cases"].append({"name": name, "file": f"{name}.pt", "select": select, "expect": expect,
                                  "class": cause, "says": SAYS.get(name), "pytorch": verdict,
                                  "pytorch_error": why})
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(manifest['cases'])} files in {args.out}")


if __name__ == "__main__":
    main()
