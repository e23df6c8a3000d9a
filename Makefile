# The two commands: `make demo` (the main job: PyTorch-trained SC and plain networks classifying
# Fashion-MNIST in Rust, then the block parity table) and `make test` (every test).
# Each runs the setup first: torch==2.11.0 from PyPI into its own virtual environment, and Debian's
# Fashion-MNIST package (both idempotent).
.PHONY: setup demo test fixtures model-fixtures sample train cuda-build cuda-run bench-peers

setup:
	@scripts/setup_torch.sh
	@scripts/setup_data.sh || echo "setup: continuing with the shipped 1,000-image sample"

# Release build: the fast path's Rust kernels are slow unoptimised.
# `infer --compare`: each trained network in every mode side by side (reference, fast, the fp32 and
# bf16 inference forms): accuracy, classes agreeing with PyTorch, differing gate decisions, images/s.
demo: setup
	cargo run --release --quiet -- infer --model weights/fmnist_sc.json --model weights/fmnist_plain.json --compare
	cargo run --release --quiet -- parity --execution fast

# The parity tests record their tables in target/parity-reports/. Then: the README's commands and a
# fresh project that depends on the crate (check_readme.sh), the speed tables against docs/bench/'s
# results (speed_tables.py), formatting and lints, and the package as
# crates.io and docs.rs take it (check_package.sh; last, since it cleans this crate's build artifacts).
test: setup
	cargo test
	scripts/check_readme.sh
	python3 scripts/speed_tables.py --check docs/speed.md README.md docs/bench/h200-fp32.json docs/bench/h200-bf16.json docs/bench/h200-fp16.json
	cargo fmt --check
	cargo clippy --quiet --all-targets -- -D warnings
	scripts/check_package.sh

# This crate's modes against PyTorch eager, TorchScript, torch.compile, ONNX Runtime and OpenVINO on the
# same networks, timed in one run (about 20 minutes; not part of `make test`). Installs the peers into
# ~/.cache/scconv-tch/peers, writes docs/bench/peers-cpu.{json,md,png}.
bench-peers: setup
	cargo build --release --quiet --example bench_worker
	.venv/bin/python scripts/bench_peers.py

# Rewrites the committed fixtures from the Python reference (byte-for-byte on the same kind of CPU:
# see the README).
fixtures: setup
	.venv/bin/python parity/generate_fixtures.py --out weights/parity
	.venv/bin/python parity/generate_fixtures.py --set versions --out weights/parity-versions
	.venv/bin/python parity/generate_fixtures.py --set offset --out weights/parity-offset

# Rewrites the committed whole-network fixtures of the trained networks.
model-fixtures: setup
	.venv/bin/python parity/generate_model_fixtures.py --out weights/parity-models --cases trained

# The shipped sample (first 1,000 test images) and the training run that produced weights/fmnist_*.
sample: setup
	.venv/bin/python scripts/make_sample.py

train: setup
	.venv/bin/python scripts/train.py

# The CUDA suite: build here, then run on a machine with a GPU and PyTorch 2.11 (see README).
cuda-build: setup
	scripts/cuda_parity.sh build

cuda-run:
	scripts/cuda_parity.sh run
