"""Validation during training: a PNG grid (condition | sample) from the current
ControlNet on the first `train.validation_samples` rows of the dataset, sampled
with DDIM and classifier-free guidance."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cn_jax.data.transforms import preprocess_pair, to_uint8
from cn_jax.diffusion.guidance import denoise
from cn_jax.diffusion.samplers import make_sampler
from cn_jax.tokenizer import tokenize
from cn_jax.train.state import merge

GUIDANCE_SCALE = 7.5


def grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """Rows of equally sized uint8 HWC images -> one image, 2 px gaps."""
    h, w = rows[0][0].shape[:2]
    gap = 2
    out = np.full((len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img
    return Image.fromarray(out)


@functools.cache
def _jitted_denoise(models):
    def run(unet_params, cnet_params, cond, ctx, uncond, latents, sampler):
        controlnets = [(models.controlnet, cnet_params, cond, 1.0)] if models.controlnet else []
        return denoise(
            models.unet, unet_params, controlnets, ctx, uncond, latents, sampler, GUIDANCE_SCALE
        )

    return jax.jit(run)


def validation_grid(config, models, state, frozen, sd, dataset, path: Path) -> None:
    """Sample the first rows of `dataset` with the current weights; write `path`."""
    n = min(config.train.validation_samples, len(dataset))
    res = config.data.resolution
    conds, prompts = [], []
    for i in range(n):
        row = dataset[i]
        _, cond = preprocess_pair(
            row["image"], row["conditioning_image"], res,
            conditioning_channels=config.model.conditioning_channels, row=i,
        )  # fmt: skip
        conds.append(cond)
        cap = row["caption"]
        prompts.append(cap if isinstance(cap, str) else cap[0])
    cond = jnp.asarray(np.stack(conds))
    params = merge(state.params, frozen)
    max_len = sd.text_encoder.config.max_position_embeddings
    te = functools.partial(sd.text_encoder.apply, {"params": params["text_encoder"]})
    ctx = te(tokenize(sd.tokenizer, prompts, max_len))[0]
    uncond = te(tokenize(sd.tokenizer, [""] * n, max_len))[0]
    factor = 1 if models.vae is None else models.vae.config.latent_factor
    channels = models.unet.config.in_channels
    sampler = make_sampler("ddim", sd.schedule, config.train.validation_steps)
    key = jax.random.PRNGKey(config.train.seed + 1)
    latents = jax.random.normal(key, (n, res // factor, res // factor, channels))
    latents = latents * sampler.init_noise_sigma
    x = _jitted_denoise(models)(
        params["unet"], params.get("controlnet"), cond, ctx, uncond, latents, sampler
    )
    if models.vae is not None:
        x = models.vae.apply({"params": params["vae"]}, x / models.scaling_factor, method="decode")
    images = to_uint8(np.asarray(x))
    grid([[to_uint8(c, low=0.0), img] for c, img in zip(conds, images)]).save(path)
