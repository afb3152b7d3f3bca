#!/usr/bin/env bash
# The device check for a session lent a GPU (run from the repository root with
# the GPU machine's preinstalled JAX): the GPU-marked tests (the GPU's own
# kernels in float32 and bfloat16 against the CPU result) and a few real train
# steps (tiny config, float32 and bfloat16), then the benchmark script
# (scripts/bench_gpu.sh, SD 1.5 shape at 512 px in bfloat16; BENCH_BUDGET_S,
# default 300 s). Record the card, date and figures in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_gpu.py
if ! python3 -c "import datasets, transformers, tensorboardX" 2>/dev/null; then
  echo "train steps skipped: datasets/transformers/tensorboardX not installed on this machine"
  exit 0
fi
out="${OUT:-/tmp}/gpu_check"
mkdir -p "$out"
python3 -m cn_jax.cli data fill50k --out "$out/fill50k" --num 256 --size 32
for precision in float32 bfloat16; do
  python3 -m cn_jax.cli train --config configs/tiny.yaml --workdir "$out/run_$precision" \
    data.path="$out/fill50k" train.max_steps=20 train.log_every=5 train.precision=$precision
done
BUDGET_S="${BENCH_BUDGET_S:-300}" OUT="$out" bash scripts/bench_gpu.sh
