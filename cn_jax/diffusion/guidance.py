"""The denoising loop with classifier-free guidance and ControlNet residuals,
as one `lax.scan` (one XLA program for all steps, not a Python loop).

Unconditional and conditional halves run as one batch of 2B. ControlNets
see the same 2B batch (their conditions duplicated) and their residuals,
each scaled, are summed before entering the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.models.controlnet import combine_controlnet_residuals


def denoise(
    unet,
    unet_params: Any,
    controlnets: Sequence[tuple[Any, Any, jax.Array, float]],
    context: jax.Array,
    uncond_context: jax.Array | None,
    latents: jax.Array,
    sampler,
    guidance_scale: float = 7.5,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Run `sampler` from `latents` (already scaled by `init_noise_sigma`) to x0.

    Args:
      unet, unet_params: the denoiser.
      controlnets: (module, params, condition NHWC in [0, 1], scale) per ControlNet.
      context: (B, L, D) text embeddings of the prompts.
      uncond_context: (B, L, D) embeddings of the negative/empty prompt, or
        None for no classifier-free guidance.
      latents: (B, h, w, C) initial noise.
      sampler: a `cn_jax.diffusion.samplers` sampler.
      guidance_scale: CFG weight (ignored without `uncond_context`).
      rng: key for stochastic samplers.

    Returns:
      The final latents (B, h, w, C).
    """
    cfg = uncond_context is not None
    ctx = jnp.concatenate([uncond_context, context]) if cfg else context
    conds = [(m, p, jnp.concatenate([c, c]) if cfg else c, s) for m, p, c, s in controlnets]
    state = sampler.init_state(latents, rng)

    def body(carry, i):
        state, x = carry
        inp = sampler.scale_model_input(x, i)
        inp = jnp.concatenate([inp, inp]) if cfg else inp
        t = jnp.full((inp.shape[0],), sampler.model_timestep(i), jnp.float32)
        down = mid = None
        if conds:
            outs = [
                m.apply({"params": p}, inp, t, ctx, c, conditioning_scale=s) for m, p, c, s in conds
            ]
            down, mid = combine_controlnet_residuals(outs)
        out = unet.apply(
            {"params": unet_params}, inp, t, ctx,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )  # fmt: skip
        if cfg:
            uncond, cond = jnp.split(out, 2)
            out = uncond + guidance_scale * (cond - uncond)
        state, x = sampler.step(state, i, out.astype(jnp.float32), x)
        return (state, x), None

    (_, x), _ = jax.lax.scan(body, (state, latents.astype(jnp.float32)), jnp.arange(len(sampler)))
    return x


def residual_sizes(config, latent_hw: tuple[int, int]) -> list[int]:
    """Spatial height of each ControlNet residual (skips in UNet order, then mid)."""
    h = latent_hw[0]
    n = len(config.block_out_channels)
    sizes = [h]
    for b in range(n):
        sizes += [h] * config.layers_per_block
        if b < n - 1:
            h = -(-h // 2)  # stride-2 conv with padding 1: ceil(h / 2)
            sizes.append(h)
    return sizes + [h]


def guess_mode_scales(kind: str, config, latent_hw: tuple[int, int], strength: float = 1.0):
    """Per-residual multipliers for guess mode, shallowest skip first, mid last.

    - "diffusers": logspace(-1, 0, 13) (diffusers' ControlNetModel);
    - "original": strength * 0.825 ** (12 - i) (lllyasviel's gradio apps);
    - "paper": the paper's CFG resolution weighting w_i = 64 / h_i with h_i the
      block's spatial size at 512 px, generalised as (latent height) / h_i.
    """
    sizes = residual_sizes(config, latent_hw)
    n = len(sizes)
    if kind == "diffusers":
        w = np.logspace(-1.0, 0.0, n)
    elif kind == "original":
        w = 0.825 ** (n - 1 - np.arange(n, dtype=np.float64))
    elif kind == "paper":
        w = latent_hw[0] / np.asarray(sizes, np.float64)
    else:
        raise ValueError(f"guess mode scales {kind!r}: expected diffusers, original or paper")
    return (strength * w).astype(np.float32)
