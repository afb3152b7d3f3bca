"""What is trained, what is frozen, and the optimizer over the trained part only.

All parameters of a run live in one tree `{"controlnet", "unet", "vae",
"text_encoder"}`. Regex rules over parameter paths give every leaf a label
(a learning-rate group, or "frozen"); a leaf no rule covers is an error, so
nothing is trained or frozen by accident. The tree is then split in two:
`TrainState.params` holds only the trainable leaves (and the optimizer state
exists only for them), `frozen` holds the rest and is never differentiated or
donated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cn_jax.config import TrainConfig

FROZEN = "frozen"

# Ordered (pattern, label) rules per `train.trainable`; the first full match wins.
RULES: dict[str, list[tuple[str, str]]] = {
    "controlnet": [
        (r"controlnet/.*", "controlnet"),
        (r"(unet|vae|text_encoder)/.*", FROZEN),
    ],
    # The original `sd_locked=False`: the UNet decoder (output blocks and the
    # output head) trains too, at its own learning rate.
    "controlnet+decoder": [
        (r"controlnet/.*", "controlnet"),
        (r"unet/(up_blocks_\d+|conv_norm_out|conv_out)/.*", "decoder"),
        (r"(unet|vae|text_encoder)/.*", FROZEN),
    ],
    # Plain fine-tuning of the whole UNet, no ControlNet: the benchmark baseline.
    "unet": [
        (r"unet/.*", "unet"),
        (r"(vae|text_encoder)/.*", FROZEN),
    ],
}


def _flatten(tree: Mapping) -> dict[str, Any]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def labels_for(params: Mapping, trainable: str) -> dict[str, str]:
    """Path -> label for every leaf of `params`, by `RULES[trainable]`.

    Raises:
      ValueError: naming every leaf no rule covers.
    """
    rules = [(re.compile(p), label) for p, label in RULES[trainable]]
    labels, uncovered = {}, []
    for path in _flatten(params):
        label = next((lab for rx, lab in rules if rx.fullmatch(path)), None)
        if label is None:
            uncovered.append(path)
        labels[path] = label
    if uncovered:
        raise ValueError(
            f"train.trainable={trainable!r}: no rule covers {len(uncovered)} parameter(s), "
            f"e.g. {uncovered[:5]}"
        )
    return labels


def split(params: Mapping, labels: Mapping[str, str], frozen_dtype=None) -> tuple[dict, dict]:
    """(trainable, frozen) trees; each holds only its own leaves.

    `frozen_dtype` (e.g. bfloat16 in bfloat16 training): the frozen floating-point
    leaves are stored in it, half the memory of float32 and no cast in the step,
    while the trained leaves (and so the optimizer state) keep theirs. Leaves may
    be arrays or `jax.ShapeDtypeStruct`s."""
    flat = _flatten(params)
    trainable = {k: v for k, v in flat.items() if labels[k] != FROZEN}
    frozen = {k: _stored_as(v, frozen_dtype) for k, v in flat.items() if labels[k] == FROZEN}
    return _unflatten(trainable), _unflatten(frozen)


def _stored_as(leaf, dtype):
    if dtype is None or leaf.dtype == dtype or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    """The full parameter tree from its two halves."""
    flat = _flatten(frozen)
    flat.update(_flatten(trainable))
    return _unflatten(flat)


def group_labels(trainable: Mapping, labels: Mapping[str, str]) -> dict:
    """The label tree of the trainable half (for `optax.multi_transform`)."""
    return _unflatten({k: labels[k] for k in _flatten(trainable)})


def learning_rate_schedule(config: TrainConfig, peak: float) -> optax.Schedule:
    if config.lr_schedule == "constant":
        return optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    if config.lr_schedule == "warmup_constant":
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [config.warmup_steps])
    decay_steps = max(config.max_steps - config.warmup_steps, 1)
    return optax.join_schedules(
        [warmup, optax.cosine_decay_schedule(peak, decay_steps)], [config.warmup_steps]
    )


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together (what `optax.tree.norm` computes for
    real leaves). The train step's clipping and its `grad_norm` metric both use
    this one expression, so XLA computes the norm once."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` as one multiply per leaf: t * min(1, max_norm / norm).

    optax picks between each gradient and its clipped copy with a `lax.select`
    on the scalar "norm < max_norm"; XLA's CPU backend does not fuse that
    select into the AdamW update that reads it but writes the clipped
    gradients out: one more pass over memory every step, and a second
    gradient-sized buffer where the gradients cannot be overwritten. The
    multiply fuses (figures: docs/benchmarks.md, "The optimizer update on the
    CPU"). Results are optax's: the gradients times
    exactly 1.0 when the norm is within `max_norm` (or zero), scaled by
    max_norm / norm (one rounding apart from optax's (t / norm) * max_norm)
    when not; a NaN or infinite norm gives NaN or zero updates as in optax. The
    state is optax's `EmptyState`, so checkpoints are the same either way.
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / global_norm(updates))
        return jax.tree_util.tree_map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: TrainConfig, label_tree: Mapping) -> optax.GradientTransformation:
    """AdamW per learning-rate group, after optional global-norm clipping.

    Only the trainable leaves are passed in, so no optimizer state exists for
    frozen ones.
    """
    groups = set(jax.tree_util.tree_leaves(label_tree))
    lrs = {
        "controlnet": config.learning_rate,
        "unet": config.learning_rate,
        "decoder": config.decoder_learning_rate or config.learning_rate,
    }
    transforms = {
        g: optax.adamw(
            learning_rate_schedule(config, lrs[g]),
            b1=config.adam_beta1,
            b2=config.adam_beta2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        for g in groups
    }
    tx = optax.multi_transform(transforms, label_tree)
    if config.max_grad_norm is not None:
        tx = optax.chain(clip_by_global_norm(config.max_grad_norm), tx)
    return tx


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and only that)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # trainable leaves only
    opt_state: Any
    ema_params: Any = None  # EMA of `params` when train.ema_decay is set

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, ema: bool) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        )
