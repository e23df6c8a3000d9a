"""Cuts the shipped Fashion-MNIST sample: the first 1,000 test images and labels, as gzipped IDX files in
weights/fashion-mnist-sample/ (byte-for-byte reproducible: gzip mtime 0).

    .venv/bin/python scripts/make_sample.py [--data /usr/share/datasets/fashion-mnist] [--count 1000]
"""
import argparse
import gzip
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cut(source, target, count):
    with gzip.open(source, "rb") as f:
        data = f.read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    item = 1
    for d in dims[1:]:
        item *= d
    header = bytes(data[:4]) + count.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims[1:])
    body = data[4 + 4 * rank: 4 + 4 * rank + count * item]
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(header + body)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    out = os.path.join(ROOT, "weights", "fashion-mnist-sample")
    os.makedirs(out, exist_ok=True)
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        cut(os.path.join(args.data, f"t10k-{kind}-{idx}-ubyte.gz"),
            os.path.join(out, f"t10k-{kind}-first{args.count}-{idx}-ubyte.gz"), args.count)
    print(f"wrote the first {args.count} test images and labels to {out}")


if __name__ == "__main__":
    main()
