"""Validation during training: a labelled PNG grid (condition | sample, a row per
prompt) from the current weights on the first `train.validation_samples` rows
of the dataset, sampled with DDIM and classifier-free guidance by the project's
one generation loop (`cn_jax.diffusion.guidance`).

Every process samples (the parameters may be split over all of them: one
process alone would wait forever on the others' shards); process 0 writes."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from cn_jax.data.transforms import preprocess_pair, to_uint8
from cn_jax.diffusion.guidance import generation_program, sdxl_time_ids
from cn_jax.diffusion.samplers import make_sampler
from cn_jax.grid import labelled_grid
from cn_jax.tokenizer import tokenize
from cn_jax.train.sharding import to_host
from cn_jax.train.state import merge

GUIDANCE_SCALE = 7.5


def validation_grid(config, models, state, frozen, sd, dataset, path: Path) -> None:
    """Sample the first rows of `dataset` with the current weights; write `path`.

    Every process of a multi-process run calls it (the same program on the
    global parameters, the same host inputs); process 0 writes the PNG."""
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
    max_len = sd.text_encoder.config.max_position_embeddings
    factor = 1 if models.vae is None else models.vae.config.latent_factor
    channels = models.unet.config.in_channels
    sampler = make_sampler("ddim", sd.schedule, config.train.validation_steps)
    key = jax.random.PRNGKey(config.train.seed + 1)
    # Host arrays: the same on every process, replicated by the jitted program.
    latents = np.asarray(jax.random.normal(key, (n, res // factor, res // factor, channels)))
    generate = generation_program(
        models.unet, models.controlnet, models.text_encoder, models.vae, models.scaling_factor
    )
    params = merge(state.params, frozen)
    params = {k: params.get(k) for k in ("unet", "text_encoder", "controlnet", "vae")}
    x = generate(
        params, tokenize(sd.tokenizer, prompts, max_len), tokenize(sd.tokenizer, [""] * n, max_len),
        np.stack(conds), latents * sampler.init_noise_sigma, sampler, GUIDANCE_SCALE,
        sdxl_time_ids(models.unet, n, res),
    )  # fmt: skip
    images = to_uint8(to_host(x))
    if jax.process_index() != 0:
        return
    sample = "sample" if models.controlnet is None else "with the ControlNet"
    rows = [[to_uint8(c, low=0.0), img] for c, img in zip(conds, images)]
    labelled_grid(rows, ["condition", sample], prompts).save(path)
