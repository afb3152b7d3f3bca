"""Generation with classifier-free guidance and ControlNets: `denoise`, the one
denoising loop of the project (`ControlNetPipeline`, `cn-jax sample`, the
held-out evaluation, the training run's validation grids and `cn-jax bench
sample` all run it), and the two steps around it, `encode_prompts` and
`decode_latents`; `generation_program` puts the three in one jitted program
for one ControlNet (what the evaluation and the validation grids sample with).

The loop is one `lax.scan` (one XLA program for all steps, not a Python loop).
Semantics follow diffusers' `StableDiffusionControlNetPipeline`: the
unconditional and conditional halves run as one batch of 2B; each ControlNet
sees the same 2B batch (its condition duplicated) and its residuals, scaled by
its conditioning scale, are summed before entering the UNet. A ControlNet acts
only inside its guidance window (`control_keep`). In guess mode the ControlNets
see only the conditional half, the unconditional half gets no residual, and the
residuals are scaled per resolution (`models.controlnet.guess_mode_scales`,
which the ControlNet's own guess mode uses too).

SDXL (`StableDiffusionXLControlNetPipeline`): a prompt's conditioning is a `TextCond`,
the context plus the added conditioning (`text_embeds`, the pooled embedding of the second
text encoder, and `time_ids`, the six size numbers); the unconditional half has its own
(negative sizes, and zeros for a `None` negative prompt where the model asks for it), and
in guess mode the ControlNets read the conditional half's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.models.clip_text import SDXLTextEncoders, encode_text
from cn_jax.models.controlnet import combine_controlnet_residuals, guess_mode_scales


class TextCond(NamedTuple):
    """What the denoiser reads of a batch of prompts.

    Attributes:
      context: (B, L, D) text embeddings (cross-attention context).
      added: SDXL's `added_cond_kwargs`, {"text_embeds": (B, P), "time_ids": (B, 6)};
        None for SD 1.x/2.x.
    """

    context: jax.Array
    added: dict | None = None


def size_time_ids(
    batch: int,
    original_size: Sequence[int],
    crops_coords_top_left: Sequence[int] = (0, 0),
    target_size: Sequence[int] | None = None,
) -> np.ndarray:
    """SDXL's six size numbers per image, float32 (batch, 6): original (height, width),
    crop (top, left), target (height, width; default the original), diffusers'
    `_get_add_time_ids`."""
    target = original_size if target_size is None else target_size
    ids = [*original_size, *crops_coords_top_left, *target]
    if len(ids) != 6:
        raise ValueError(
            f"size numbers {original_size!r}, {crops_coords_top_left!r}, {target!r}: expected "
            "(height, width), (top, left) and (height, width)"
        )
    return np.tile(np.asarray(ids, np.float32), (batch, 1))


def sdxl_time_ids(unet, batch: int, resolution: int) -> np.ndarray | None:
    """The size numbers of square `resolution` images, uncropped, for an SDXL `unet`
    (what validation and evaluation sample with); None for SD 1.x/2.x."""
    if not unet.config.has_text_time:
        return None
    return size_time_ids(batch, (resolution, resolution))


class Control(NamedTuple):
    """One ControlNet's part in `denoise`.

    Attributes:
      net: the `ControlNet` module.
      params: its parameters.
      cond: NHWC condition in [0, 1] at pixel size, one per image of the batch.
      scale: conditioning scale (control strength).
      keep: (steps,) 1 at the steps where the net acts, 0 elsewhere
        (`control_keep`); None: every step.
    """

    net: Any
    params: Any
    cond: jax.Array
    scale: float | jax.Array = 1.0
    keep: jax.Array | None = None


def encode_prompts(
    text_encoder,
    params: Any,
    ids: jax.Array,
    neg_ids: jax.Array | None = None,
    time_ids: jax.Array | None = None,
    neg_time_ids: jax.Array | None = None,
    zero_negative: bool = False,
) -> tuple[TextCond, TextCond | None]:
    """Token ids -> (conditioning, unconditional conditioning) `TextCond`s.

    Args:
      ids, neg_ids: (B, L) token ids, SDXL (B, 2, L) (one row per tokenizer); `neg_ids`
        None (no classifier-free guidance): the second result is None.
      time_ids, neg_time_ids: SDXL only: (B, 6) size numbers (`size_time_ids`) of the
        prompts and of the negative prompts (default: the prompts').
      zero_negative: SDXL's `force_zeros_for_empty_prompt` with no negative prompt: the
        unconditional context and pooled embedding are zeros, not the encoding of "".
    """

    def encode(x, sizes):
        context, pooled = encode_text(text_encoder, params, x)
        if not isinstance(text_encoder, SDXLTextEncoders):
            return TextCond(context)
        if sizes is None:
            raise ValueError("an SDXL model needs time_ids (size_time_ids) to encode prompts")
        return TextCond(context, {"text_embeds": pooled, "time_ids": jnp.asarray(sizes)})

    cond = encode(ids, time_ids)
    if neg_ids is None:
        return cond, None
    neg_sizes = time_ids if neg_time_ids is None else neg_time_ids
    if not zero_negative:
        return cond, encode(neg_ids, neg_sizes)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, cond)
    if zeros.added is not None:  # the size numbers stay: they are not the prompt's
        zeros = zeros._replace(added={**zeros.added, "time_ids": jnp.asarray(neg_sizes)})
    return cond, zeros


def denoise(
    unet,
    unet_params: Any,
    controls: Sequence[Control],
    context: TextCond | jax.Array,
    uncond_context: TextCond | jax.Array | None,
    latents: jax.Array,
    sampler,
    guidance_scale: float | jax.Array = 7.5,
    rng: jax.Array | None = None,
    guess_mode: str | None = None,
) -> jax.Array:
    """Run `sampler` from `latents` (already scaled by `init_noise_sigma`) to x0.

    Args:
      unet, unet_params: the denoiser.
      controls: one `Control` per ControlNet (none: the base model alone).
      context: the prompts' `TextCond` (or their (B, L, D) context alone, SD 1.x/2.x).
      uncond_context: the same of the negative / empty prompts, or None for no
        classifier-free guidance.
      latents: (B, h, w, C) initial noise.
      sampler: a `cn_jax.diffusion.samplers` sampler.
      guidance_scale: CFG weight (ignored without `uncond_context`).
      rng: key for stochastic samplers.
      guess_mode: None, or guess mode with the per-resolution scales of this
        kind (`guess_mode_scales`: "diffusers", "original" or "paper").

    Returns:
      The final latents (B, h, w, C), float32.
    """
    cfg = uncond_context is not None
    context = context if isinstance(context, TextCond) else TextCond(context)
    if cfg and not isinstance(uncond_context, TextCond):
        uncond_context = TextCond(uncond_context)
    ctx = _stack(uncond_context, context) if cfg else context
    # In guess mode the ControlNets see only the conditional half.
    net_ctx = context if guess_mode else ctx
    duplicate = cfg and not guess_mode
    net_conds = [jnp.concatenate([c.cond, c.cond]) if duplicate else c.cond for c in controls]
    weights = [
        guess_mode_scales(guess_mode, c.net.config, latents.shape[1:3]) if guess_mode else None
        for c in controls
    ]

    def residuals(x, t, i):
        """The ControlNets' summed residuals at step i (None without ControlNets)."""
        outs = []
        for c, cond, w in zip(controls, net_conds, weights):
            scale = c.scale if c.keep is None else c.scale * c.keep[i]
            tt = jnp.full((x.shape[0],), t, jnp.float32)
            # Scaled here, not by the net's conditioning_scale: one path for plain and
            # guess-mode scales, each residual kept in its dtype.
            down, mid = c.net.apply(
                {"params": c.params}, x, tt, net_ctx.context, cond,
                added_cond_kwargs=net_ctx.added,
            )  # fmt: skip
            outs.append(_scaled(down, mid, scale, w))
        if not outs:
            return None, None
        down, mid = combine_controlnet_residuals(outs)
        if guess_mode and cfg:  # the unconditional half gets none
            down = [jnp.concatenate([jnp.zeros_like(r), r]) for r in down]
            mid = jnp.concatenate([jnp.zeros_like(mid), mid])
        return down, mid

    def step(carry, i):
        state, x = carry
        scaled = sampler.scale_model_input(x, i)
        inp = jnp.concatenate([scaled, scaled]) if cfg else scaled
        t = sampler.model_timestep(i)
        down, mid = residuals(scaled if guess_mode else inp, t, i)
        out = unet.apply(
            {"params": unet_params}, inp, jnp.full((inp.shape[0],), t, jnp.float32), ctx.context,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
            added_cond_kwargs=ctx.added,
        ).astype(jnp.float32)  # fmt: skip
        if cfg:
            uncond, cond = jnp.split(out, 2)
            out = uncond + guidance_scale * (cond - uncond)
        return sampler.step(state, i, out, x), None

    x = latents.astype(jnp.float32)
    (_, x), _ = jax.lax.scan(step, (sampler.init_state(x, rng), x), jnp.arange(len(sampler)))
    return x


def _stack(first: TextCond, second: TextCond) -> TextCond:
    """[first; second] along the batch, every part of the conditioning."""
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), first, second)


def _scaled(down, mid, scale, weights):
    """Residuals times `scale` (in guess mode times `scale * weights[j]`), in their dtype."""

    def by(r, j):
        s = scale if weights is None else scale * weights[j]
        return r * jnp.asarray(s, jnp.float32).astype(r.dtype)

    return [by(r, j) for j, r in enumerate(down)], by(mid, len(down))


def decode_latents(vae, params: Any, latents: jax.Array, scaling_factor: float) -> jax.Array:
    """Final latents -> images in [-1, 1] (a pixel-space model, `vae` None: as they are)."""
    if vae is None:
        return latents
    return vae.apply({"params": params}, latents / scaling_factor, method="decode")


@functools.cache
def generation_program(unet, controlnet, text_encoder, vae=None, scaling_factor: float = 1.0):
    """Prompts and conditions -> images with one ControlNet (None: the base alone).

    Returns `jit(generate)`, one per set of modules (compiled per shapes), with
    `generate(params, ids, neg_ids, cond, latents, sampler, guidance_scale, time_ids=None)`:
    `params` a run's tree ("unet", "text_encoder", "controlnet", "vae"), token
    ids (B, L) (SDXL: (B, 2, L)) of the prompts and of the negative prompts, the
    conditions (B, H, W, C) in [0, 1], the initial latents (already scaled by the
    sampler's `init_noise_sigma`), SDXL's size numbers (B, 6) (`size_time_ids`) for
    both halves; images (B, H, W, C) in [-1, 1].
    """

    def generate(params, ids, neg_ids, cond, latents, sampler, guidance_scale, time_ids=None):
        context, uncond = encode_prompts(
            text_encoder, params["text_encoder"], ids, neg_ids, time_ids
        )
        controls = [] if controlnet is None else [Control(controlnet, params["controlnet"], cond)]
        x = denoise(
            unet, params["unet"], controls, context, uncond, latents, sampler, guidance_scale
        )
        return decode_latents(vae, params.get("vae"), x, scaling_factor)

    return jax.jit(generate)


def control_keep(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) float32: 1 where a ControlNet with this guidance window acts.

    diffusers' `controlnet_keep`: at step i iff i / steps >= start and
    (i + 1) / steps <= end."""
    i = np.arange(steps)
    return (1.0 - ((i / steps < start) | ((i + 1) / steps > end))).astype(np.float32)
