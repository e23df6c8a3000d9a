#!/usr/bin/env bash
# Installs PyTorch 2.11.0 (the version tch 0.24 is built against) from PyPI into a virtual
# environment outside the work tree, and points the crate at it through the `.libtorch` link.
# Idempotent: a venv that already holds torch 2.11.0 is reused.
set -euo pipefail

TORCH_VERSION="2.11.0"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SCCONV_VENV:-$HOME/.cache/scconv-tch/venv-torch-$TORCH_VERSION}"
python_bin="${PYTHON:-python3}"

installed_version() {
    "$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true
}

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    mkdir -p "$(dirname "$venv")"
    "$python_bin" -m venv "$venv"
fi

if [ "$(installed_version)" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION into $venv (about 4.7 GB, a minute or two)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
fi
# The CUDA headers libtorch's own headers include (crt/host_config.h), which the torch wheel's runtime
# package leaves out: needed to build the CUDA shim (src/cuda/shim.cpp), 1 MB, matching the wheel's
# CUDA 13.0 (NVRTC 13.0.88).
"$venv/bin/python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-crt")' 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet "nvidia-cuda-crt==13.0.88"
# oneDNN 3.2 built with GNU OpenMP (libtorch's own threads), 39 MB: the inference form's convolutions as
# primitives of our own (src/inference/onednn.cpp; libtorch does not export its oneDNN). No build.
"$venv/bin/python" -c 'import importlib.metadata as m; m.version("onednn-devel-cpu-gomp")' 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet "onednn-cpu-gomp==2023.2.0" "onednn-devel-cpu-gomp==2023.2.0"
# safetensors and numpy serve the parity generator; both are small.
"$venv/bin/python" -c 'import safetensors, numpy' 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet safetensors numpy

found="$(installed_version)"
if [ "$found" != "$TORCH_VERSION" ]; then
    echo "setup: error: $venv has torch '$found', tch 0.24 needs exactly $TORCH_VERSION." >&2
    echo "setup: remove $venv (or set SCCONV_VENV to another folder) and run this script again." >&2
    exit 1
fi

torch_dir="$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" "$repo_root/.libtorch"
ln -sfn "$venv" "$repo_root/.venv"
echo "setup: torch $found ready; .libtorch -> $torch_dir"
