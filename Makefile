# The two commands: `make demo` (the main job: the parity table) and `make test` (every test).
# Each runs the setup first: torch==2.11.0 from PyPI into its own virtual environment (idempotent).
.PHONY: setup demo test fixtures cuda-build cuda-run

setup:
	@scripts/setup_torch.sh

demo: setup
	cargo run --quiet -- parity

# The parity tests record their tables in target/parity-reports/.
test: setup
	cargo test

# Rewrites the committed fixtures from the Python reference (byte-for-byte reproducible).
fixtures: setup
	.venv/bin/python parity/generate_fixtures.py --out weights/parity

# The CUDA suite: build here, then run on a machine with a GPU and PyTorch 2.11 (see README).
cuda-build: setup
	scripts/cuda_parity.sh build

cuda-run:
	scripts/cuda_parity.sh run
