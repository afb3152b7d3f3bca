#!/usr/bin/env bash
# The device check for a session lent a GPU: the GPU-marked tests (the GPU's
# own kernels in float32 and bfloat16 against the CPU result). Uses the JAX
# already installed on the GPU machine; later issues add a train step and the
# benchmark script here. Record the card, date and figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_gpu.py
