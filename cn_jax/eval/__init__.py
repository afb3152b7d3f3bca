"""Evaluation: control adherence on the fill50k task (`circles`: the metric on
images; `control`: the held-out set sampled during training)."""

from cn_jax.eval.circles import (
    CircleScore,
    enclosed_disk,
    foreground_mask,
    iou,
    parse_prompt,
    roundness,
    score,
    score_batch,
)
from cn_jax.eval.control import HELD_OUT_SEED, ControlEvaluator, HeldOut, held_out_set

__all__ = [
    "HELD_OUT_SEED",
    "CircleScore",
    "ControlEvaluator",
    "HeldOut",
    "enclosed_disk",
    "foreground_mask",
    "held_out_set",
    "iou",
    "parse_prompt",
    "roundness",
    "score",
    "score_batch",
]
