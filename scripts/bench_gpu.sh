#!/usr/bin/env bash
# Benchmarks on one GPU (H100 / H200), Stable Diffusion 1.5 shapes at 512 px in
# bfloat16, random weights (configs/sd15-shape.yaml), in this order: the
# ControlNet train step at batch 8, sampling (20 DDIM steps, CFG, one ControlNet)
# at batch 1, ControlNet vs fine-tuning at batch 8, the batch-8 train step again
# with XLA's attention instead of cuDNN's (model.attention=xla), sampling at
# batch 8, the train step at batch 1 and 16, two ControlNets at batch 1. Prints
# one table at the end; JSON and logs per item in $OUT/bench_gpu.
#
# Time: the whole run stays inside BUDGET_S (default 450 s, under 8 minutes with
# start-up): items run in the order above (most wanted first), each under
# `timeout` of the budget left, and an item is skipped when less than MIN_ITEM_S
# is left. An item that fails (e.g. out of memory at batch 16) is reported and
# the others still run. Programs compiled by one item are reused by the next
# through JAX's persistent compilation cache (compare's ControlNet step is train
# b8's), so a cached compile time is a cache read.
#
# Every setting is an environment variable, so the same script runs on CPU with
# the tiny model (how it is tested):
#   CONFIG=configs/bench-small.yaml PRECISION=float32 RESOLUTION=32 TRAIN_BATCHES=2 \
#   COMPARE_BATCH=2 SAMPLE_BATCHES=1 SAMPLE2_BATCH=1 TRAIN_STEPS=1 SAMPLE_STEPS=2 XLA_BASELINE=0 \
#   bash scripts/bench_gpu.sh
set -uo pipefail  # no -e: one failed item must not stop the others
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/sd15-shape.yaml}
PRECISION=${PRECISION:-bfloat16}
RESOLUTION=${RESOLUTION:-512}
TRAIN_BATCHES=${TRAIN_BATCHES:-"8 1 16"}
COMPARE_BATCH=${COMPARE_BATCH:-8}
SAMPLE_BATCHES=${SAMPLE_BATCHES:-"1 8"}
SAMPLE2_BATCH=${SAMPLE2_BATCH-1}  # two ControlNets; empty: skip
ATTENTION=${ATTENTION:-auto}  # model.attention of every item: auto (cuDNN where it applies) | xla
XLA_BASELINE=${XLA_BASELINE:-1}  # 1: also the first train item with model.attention=xla
TRAIN_STEPS=${TRAIN_STEPS:-10}
SAMPLE_STEPS=${SAMPLE_STEPS:-20}
BUDGET_S=${BUDGET_S:-450}
MIN_ITEM_S=${MIN_ITEM_S:-45}
out="${OUT:-/tmp}/bench_gpu"
mkdir -p "$out"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}

common=(--config "$CONFIG" "train.precision=$PRECISION" "data.resolution=$RESOLUTION"
  "model.attention=$ATTENTION")
start=$(date +%s)
results=()

item() {  # item NAME COMMAND...: run under the budget left; its JSON is $out/NAME.json
  local name=$1
  shift
  local left=$((BUDGET_S - ($(date +%s) - start)))
  if ((left < MIN_ITEM_S)); then
    echo "== $name: skipped (${left}s of the ${BUDGET_S}s budget left)"
    return
  fi
  echo "== $name (${left}s of the budget left)"
  local t0=$(date +%s)
  timeout --signal=KILL "$left" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v "^wrote " "$out/$name.log" | tail -n 14
  if ((rc != 0)); then
    echo "== $name: FAILED (exit $rc after $(($(date +%s) - t0))s; log: $out/$name.log)"
    rm -f "$out/$name.json"
  else
    results+=("$out/$name.json")
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# What `cn-jax bench` imports (transformers: the tokenizer random_pipeline loads).
if ! $PY -c "import jax, flax, optax, orbax.checkpoint, pydantic, yaml, transformers, PIL
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; then
  echo "bench_gpu.sh: a package cn-jax bench needs is missing (see the import error above)"
  exit 1
fi

read -r first train_rest <<<"$TRAIN_BATCHES"
read -r sfirst sample_rest <<<"$SAMPLE_BATCHES"
# Most wanted first: training speed, sampling speed, the ratios to fine-tuning, then
# the XLA attention path as the baseline for cuDNN's, then the other sizes.
item "train_b$first" $PY -m cn_jax.cli bench train "${common[@]}" \
  "train.batch_size=$first" --steps "$TRAIN_STEPS"
item "sample_b$sfirst" $PY -m cn_jax.cli bench sample "${common[@]}" --batch "$sfirst" \
  --steps "$SAMPLE_STEPS" --controlnets 1
item "compare_b$COMPARE_BATCH" $PY -m cn_jax.cli bench compare "${common[@]}" \
  "train.batch_size=$COMPARE_BATCH" --steps "$TRAIN_STEPS"
if [ "$XLA_BASELINE" = 1 ] && [ "$ATTENTION" != xla ]; then
  item "train_b${first}_xla" $PY -m cn_jax.cli bench train "${common[@]}" \
    "train.batch_size=$first" model.attention=xla --steps "$TRAIN_STEPS"
fi
for b in $sample_rest; do
  item "sample_b$b" $PY -m cn_jax.cli bench sample "${common[@]}" --batch "$b" \
    --steps "$SAMPLE_STEPS" --controlnets 1
done
for b in $train_rest; do
  item "train_b$b" $PY -m cn_jax.cli bench train "${common[@]}" \
    "train.batch_size=$b" --steps "$TRAIN_STEPS"
done
if [ -n "$SAMPLE2_BATCH" ]; then
  item "sample2_b$SAMPLE2_BATCH" $PY -m cn_jax.cli bench sample "${common[@]}" \
    --batch "$SAMPLE2_BATCH" --steps "$SAMPLE_STEPS" --controlnets 2
fi

echo
echo "== summary ($(($(date +%s) - start))s; $CONFIG, $PRECISION, $RESOLUTION px)"
if ((${#results[@]})); then
  $PY -m cn_jax.bench.report "${results[@]}"
else
  echo "no item finished"
  exit 1
fi
