#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian's dataset-fashion-mnist: gzipped IDX files under
# /usr/share/datasets/fashion-mnist) where it is missing. Idempotent. Without root or apt it says so and
# stops with an error: the shipped sample in weights/fashion-mnist-sample still serves `make demo`.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: $dir is missing; install Debian's dataset-fashion-mnist (needs root and apt-get)" >&2
    exit 1
fi
echo "setup: installing dataset-fashion-mnist (30 MB)"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
test -f "$dir/t10k-images-idx3-ubyte.gz"
