#!/usr/bin/env bash
# Reproduce the bundled tiny base (cn_jax/assets/tiny_base) with the project's
# own trainer: the `tiny` pixel-space UNet (32 px, no VAE) trained from scratch,
# text-to-image, on 50,000 synthetic circles ("<colour> circle with <colour>
# background", circle anywhere), v-prediction with zero terminal SNR. The text
# encoder keeps its seeded random weights. configs/tiny_base.yaml: 2,500 steps at
# batch 32, lr 1e-3 (warmup 200, cosine to 0), EMA 0.999; the EMA weights ship.
#
#   bash scripts/train_tiny_base.sh [OUT]   # OUT default: runs/tiny_base_export
#
# Cost: about 1.3 s a step at batch 32 on 2 CPU cores (2 s on one); minutes on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/tiny_base_export}"
CN=.venv/bin/cn-jax
[ -x "$CN" ] || { echo "run scripts/test.sh or scripts/demo.sh first (creates .venv)" >&2; exit 1; }
if [ ! -f runs/fill50k_base/prompt.json ]; then
  "$CN" data fill50k --out runs/fill50k_base --num 50000 --size 32 --seed 1
fi
"$CN" train --config configs/tiny_base.yaml --workdir runs/tiny_base
"$CN" export --run runs/tiny_base --out "$OUT" --ema
echo "wrote $OUT; to ship it: rm -rf cn_jax/assets/tiny_base && cp -r $OUT cn_jax/assets/tiny_base"
