#!/usr/bin/env bash
# The device check for a session lent a GPU, run from the repository root with the
# GPU machine's preinstalled JAX, in one call of about TOTAL_S seconds (default 540):
#   0. the compile probe (scripts/gpu_compile_probe.py): XLA's compile time for a
#      small UNet + ControlNet with the default flags and with autotuning off; the
#      rest runs with the faster (the 2026-11-28 check found compiles of minutes);
#   1. the GPU-marked tests (tests/test_gpu.py: the GPU's kernels in float32 and
#      bfloat16, cuDNN and XLA attention, against the CPU float32 result);
#   2. a few real train steps (tiny config, bfloat16, `cn-jax train`);
#   3. scripts/bench_gpu.sh (SD 1.5 shape, 512 px, bfloat16) in the time left but REAL_S;
#   4. about 20 real `cn-jax train` steps at SD 1.5 shape, 512 px, bfloat16, batch 8, the VAE
#      in the step: samples/s and data wait (metrics.jsonl), one checkpoint save's blocking time.
# Packages the machine lacks (pydantic, datasets, tensorboardX) travel as wheels in
# .whl (`bash scripts/gpu_wheels.sh` fetches them); they are installed to /tmp/site first.
# Compiled programs: JAX's persistent cache starts from .gpu_cache/ when that folder
# is carried, and comes back as $OUT/jax_cache.tgz (unpack it into .gpu_cache/ and
# carry it next time: same image, same code, no compile).
# Everything is logged to $OUT/console.log; the JSON results and logs come back
# packed in $OUT/gpu_check.tar.gz. Record the card, date and figures in
# docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
TOTAL_S=${TOTAL_S:-540}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
work=/tmp/gpu_check
mkdir -p "$work"
export JAX_COMPILATION_CACHE_DIR=$work/jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
[ -d .gpu_cache ] && cp -r .gpu_cache/. "$JAX_COMPILATION_CACHE_DIR"/
exec > >(tee "$OUT/console.log") 2>&1
pack() {
  tar -czf "$OUT/gpu_check.tar.gz" -C "$work" --exclude=jax_cache --exclude=fill50k \
    --exclude=checkpoints . 2>/dev/null
  tar -czf "$OUT/jax_cache.tgz" -C "$JAX_COMPILATION_CACHE_DIR" . 2>/dev/null
  if [ "$(stat -c %s "$OUT/jax_cache.tgz")" -gt 16000000 ]; then
    echo "jax cache over 16 MB: not returned"
    rm -f "$OUT/jax_cache.tgz"
  fi
}
trap pack EXIT
left() { echo $((TOTAL_S - ($(date +%s) - start))); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax, orbax.checkpoint as o, pydantic; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== 0. compile probe ($(left)s left)"
python3 scripts/gpu_compile_probe.py --timeout "${PROBE_S:-60}" --variant= \
  --variant=--xla_gpu_autotune_level=0 | tee "$work/probe.log"
fastest=$(sed -n "s/^fastest: XLA_FLAGS='\(.*\)'$/\1/p" "$work/probe.log")
export XLA_FLAGS=$fastest
echo "XLA_FLAGS for the rest: '$XLA_FLAGS'"

echo "== 1. GPU tests ($(left)s left)"
# Fully optimised kernels: tests/conftest.py defaults to XLA's quick compile mode
# for the CPU suite, but the GPU's parity is measured on what users run.
JAX_DISABLE_MOST_OPTIMIZATIONS=0 timeout --signal=KILL "${TEST_S:-150}" python3 -m pytest -v -p no:cacheprovider -m gpu -s \
  -o faulthandler_timeout=120 --durations=0 tests/test_gpu.py 2>&1 | tee "$work/test_gpu.log" \
  | grep -E "rel err|PASSED|FAILED|passed|failed|skipped|Error|error|Timeout" | head -60
# If cuDNN's attention failed its test, benchmark with XLA's (and say so).
if grep -q "FAILED.*test_cudnn_attention\|FAILED.*bfloat16-auto" "$work/test_gpu.log"; then
  echo "cuDNN attention failed its test: benchmarks use model.attention=xla"
  export ATTENTION=xla
fi

echo "== 2. train steps, tiny, bfloat16 ($(left)s left)"
if python3 -c "import datasets, transformers, tensorboardX" 2>/dev/null; then
  python3 -m cn_jax.cli data fill50k --out "$work/fill50k" --num 256 --size 32 >/dev/null
  PYTHONFAULTHANDLER=1 timeout --signal=ABRT "${TRAIN_S:-90}" python3 -m cn_jax.cli train \
    --config configs/tiny.yaml --workdir "$work/run_bfloat16" data.path="$work/fill50k" \
    train.max_steps=10 train.log_every=5 train.precision=bfloat16 train.checkpoint_every=10 \
    >"$work/train.log" 2>&1
  echo "train exit $?"
  grep -iE "compiled|loss|error" "$work/train.log" | tail -8
else
  echo "train steps skipped: datasets/transformers/tensorboardX not importable"
fi

budget=$(($(left) - 20 - ${REAL_S:-120}))
echo "== 3. bench_gpu.sh (${budget}s)"
BUDGET_S=$budget OUT=$work bash scripts/bench_gpu.sh

# Real `cn-jax train` steps at SD 1.5 shape with the VAE in the step: samples/s, the data
# wait and a checkpoint save (its compile may come from bench_gpu's through the cache).
echo "== 4. cn-jax train, ${REAL_CONFIG:-configs/sd15-shape.yaml}, ${REAL_RES:-512} px ($(left)s left)"
if python3 -c "import datasets, transformers, tensorboardX" 2>/dev/null; then
  python3 -m cn_jax.cli data fill50k --out "$work/fill50k_real" --num "${REAL_ROWS:-256}" \
    --size "${REAL_RES:-512}" >/dev/null
  timeout --signal=ABRT "$(($(left) - 15))" python3 -m cn_jax.cli train \
    --config "${REAL_CONFIG:-configs/sd15-shape.yaml}" --workdir "$work/run_real" \
    data.path="$work/fill50k_real" data.resolution="${REAL_RES:-512}" \
    train.batch_size="${REAL_BATCH:-8}" train.max_steps="${REAL_STEPS:-20}" train.log_every=5 \
    train.checkpoint_every="${REAL_STEPS:-20}" train.precision="${REAL_PRECISION:-bfloat16}" \
    model.attention="${ATTENTION:-auto}" >"$work/train_real.log" 2>&1
  echo "train exit $?"
  grep -E "compiled|checkpoint step|error" "$work/train_real.log" | tail -4
  tail -1 "$work/run_real/metrics.jsonl" 2>/dev/null
else
  echo "real train steps skipped: datasets/transformers/tensorboardX not importable"
fi
echo "== done in $(($(date +%s) - start))s"
