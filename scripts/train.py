"""Trains the small-image plain and SC ResNets on Fashion-MNIST in PyTorch with one recipe, and writes for
each network `weights/NAME.safetensors` (its state_dict) and `weights/NAME.json` (config, recipe, test
accuracy, parameter count, PyTorch version, and PyTorch's predicted class for every test image).

    .venv/bin/python scripts/train.py                 # both networks, the recipe below
    .venv/bin/python scripts/train.py --only sc --epochs 1 --device cuda

Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4 on conv/linear weights), batch 128, one-cycle
learning rate peaking at 0.1, cross-entropy; augmentation: random 28x28 crop of the 2-pixel zero-padded
image and random horizontal flip; inputs normalised as (x / 255 - 0.2860) / 0.3530 (the Rust side does the
same, src/data/normalize.rs); seed 0 for weights, batch order and augmentation.
"""
import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "parity"))
from models import build, count_parameters  # noqa: E402

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
NETWORKS = {
    "plain": {"block": "basic", "layers": [1, 1, 1], "widths": [32, 64, 128], "num_classes": 10,
              "in_channels": 1, "small_input": True, "sc": False},
    "sc": {"block": "basic", "layers": [1, 1, 1], "widths": [32, 64, 128], "num_classes": 10,
           "in_channels": 1, "small_input": True, "sc": True},
}


def read_idx(path):
    """An IDX file (gzipped or not) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images_u8):
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(x, generator):
    """Random crop of the 2-pixel zero-padded image (pad value: normalised black) and horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=(0.0 - MEAN) / STD)
    offsets = torch.randint(0, 5, (n, 2), generator=generator)
    crops = torch.stack([padded[i, :, dy:dy + 28, dx:dx + 28] for i, (dy, dx) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def parameter_groups(model, weight_decay):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def predict(model, images, device, batch_size=500):
    model.eval()
    preds = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start:start + batch_size]).to(device)
        preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds)


def train(name, args, train_set, test_set):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = NETWORKS[name]
    model = build(config).to(args.device)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4), lr=args.lr, momentum=0.9, nesterov=True)
    images, labels = train_set
    steps_per_epoch = (images.shape[0] + args.batch_size - 1) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(images.shape[0], generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(normalize(images[idx]), generator).to(args.device)
            y = labels[idx].to(args.device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.shape[0]
            if step % 50 == 0 or step == steps_per_epoch - 1:
                print(f"[{name}] epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / total:.4f} train acc {correct / total:.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
        test_acc = (predict(model, test_set[0], args.device) == test_set[1]).float().mean().item()
        print(f"[{name}] epoch {epoch + 1}: test accuracy {test_acc:.4f}", flush=True)

    predictions = predict(model, test_set[0], args.device)
    accuracy = (predictions == test_set[1]).float().mean().item()
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, os.path.join(args.out, f"fmnist_{name}.safetensors"))
    record = {
        "name": f"fmnist_{name}",
        "config": config,
        "weights": f"fmnist_{name}.safetensors",
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 train / 10,000 test",
        "normalization": {"mean": MEAN, "std": STD, "formula": "(x / 255 - mean) / std"},
        "recipe": {
            "optimizer": "SGD momentum 0.9 nesterov, weight decay 5e-4 on weights (ndim > 1)",
            "schedule": f"OneCycleLR max_lr {args.lr}", "epochs": args.epochs, "batch_size": args.batch_size,
            "augmentation": "random 28x28 crop of 2-pixel padded image, random horizontal flip",
            "seed": 0, "device": args.device, "train_seconds": round(time.time() - start, 1),
        },
        "test_accuracy": accuracy,
        "parameters": count_parameters(model),
        "torch_version": torch.__version__,
        "test_predictions": predictions.tolist(),
    }
    with open(os.path.join(args.out, f"fmnist_{name}.json"), "w") as f:
        json.dump(record, f)
        f.write("\n")
    print(f"[{name}] done: test accuracy {accuracy:.4f}, {record['parameters']:,} parameters", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--out", default=os.path.join(ROOT, "weights"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=sorted(NETWORKS))
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke tests)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_split(args.data, "train"), load_split(args.data, "test")
    if args.limit:
        train_set = (train_set[0][:args.limit], train_set[1][:args.limit])
    for name in [args.only] if args.only else ["plain", "sc"]:
        train(name, args, train_set, test_set)


if __name__ == "__main__":
    main()
