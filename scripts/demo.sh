#!/usr/bin/env bash
# The embedded default, from a fresh clone: a ControlNet learns control on a CPU.
#
#   bash scripts/demo.sh            # ~11 min on 2 CPU cores (packages cached)
#   bash scripts/demo.sh --long     # ~30 min: 2,000 steps (lr decayed) on 50,000 samples
#   bash scripts/demo.sh --quick    # seconds of training: checks the plumbing (the tests use it)
#   bash scripts/demo.sh --out DIR  # write somewhere else than runs/demo
#
# Steps: the environment (.venv), a synthetic fill50k (circle outline ->
# filled circle in the prompted colours), `cn-jax train` of a ControlNet on the
# locked bundled tiny base (held-out IoU evaluated at step 0 and every K
# steps), `cn-jax export` (diffusers folder), `cn-jax sample` (condition | base
# alone | with the ControlNet), `cn-jax report` (metrics.json, control_curve.png).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=default
OUT=runs/demo
while [ $# -gt 0 ]; do
  case "$1" in
    --long) MODE=long ;;
    --quick) MODE=quick ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s)
say() { printf '\n== [%s] %s (%ds)\n' "$1" "$2" "$(( $(date +%s) - T0 ))"; }

say 1/6 "environment"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cn_jax_runtime
if [ -f .venv/.cn_jax_installed ] && [ ! pyproject.toml -nt .venv/.cn_jax_installed ]; then
  echo "using .venv (installed by scripts/test.sh)"
elif [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing cn-jax into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
  touch "$stamp"
else
  echo "using .venv"
fi
CN=.venv/bin/cn-jax

# Per mode: dataset size, training overrides, sampled rows.
case "$MODE" in
  default) NUM=10000; ROWS=8; TRAIN=() ;;
  long)    NUM=50000; ROWS=8; TRAIN=(train.max_steps=2000 train.lr_schedule=cosine eval.every=100
                               train.checkpoint_every=500) ;;
  quick)   NUM=64;    ROWS=2; TRAIN=(train.max_steps=2 train.batch_size=8 train.checkpoint_every=2
                               eval.every=1 eval.samples=2 eval.sampler_steps=2) ;;
esac
SAMPLE_STEPS=20
[ "$MODE" = quick ] && SAMPLE_STEPS=2
# The picture uses the guidance the held-out evaluation uses.
GUIDANCE=$(.venv/bin/python -c \
  "from cn_jax.config import load_config; print(load_config('configs/demo.yaml').eval.guidance_scale)")

say 2/6 "data: $NUM training samples + a held-out set (32 px)"
mkdir -p "$OUT"
if [ ! -f "$OUT/data/prompt.json" ] || [ "$(wc -l < "$OUT/data/prompt.json")" -ne "$NUM" ]; then
  "$CN" data fill50k --out "$OUT/data" --num "$NUM" --size 32 --seed 0
fi
# The same held-out conditions the training-time evaluation scores (its own seed).
HELD_OUT_SEED=$(.venv/bin/python -c "from cn_jax.eval import HELD_OUT_SEED; print(HELD_OUT_SEED)")
"$CN" data fill50k --out "$OUT/heldout" --num "$ROWS" --size 32 --seed "$HELD_OUT_SEED"

say 3/6 "train a ControlNet on the locked tiny base ($MODE)"
rm -rf "$OUT/run" "$OUT/controlnet"  # a demo starts from scratch
T_TRAIN=$(date +%s)
"$CN" train --config configs/demo.yaml --workdir "$OUT/run" "data.path=$OUT/data" ${TRAIN[@]+"${TRAIN[@]}"}
TRAIN_SECONDS=$(( $(date +%s) - T_TRAIN ))

say 4/6 "export the ControlNet (diffusers folder)"
"$CN" export --run "$OUT/run" --out "$OUT/controlnet"

say 5/6 "sample held-out conditions: condition | base alone | with the ControlNet"
"$CN" sample --base bundled:tiny --controlnet "$OUT/controlnet" --dataset "$OUT/heldout" \
  --rows "$ROWS" --compare-base --steps "$SAMPLE_STEPS" --guidance "$GUIDANCE" --out "$OUT/samples.png"

say 6/6 "report"
"$CN" report --run "$OUT/run" --out "$OUT" --seconds "$TRAIN_SECONDS"
echo
echo "done in $(( $(date +%s) - T0 ))s: $OUT/samples.png, $OUT/control_curve.png, $OUT/metrics.json, $OUT/controlnet/"
