"""Control adherence during training: a fixed held-out fill50k set, sampled
with the current weights and scored by `cn_jax.eval.circles`.

The held-out set is drawn from its own seed (`HELD_OUT_SEED`), so it shares
no sample with a training set made by `cn-jax data fill50k` with another seed;
the initial noise is fixed too, so two evaluations differ only by the weights.
At step 0 a ControlNet's zero convolutions make the result exactly the base
model's: the curve starts at the base's own (chance) IoU.

In a multi-process run every process calls the evaluator (the same program on
the global parameters, the same host inputs) and gets the same scores.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.data.fill50k import fill50k_truth, render_fill50k
from cn_jax.data.transforms import to_uint8
from cn_jax.diffusion.guidance import generation_program, sdxl_time_ids
from cn_jax.diffusion.samplers import make_sampler
from cn_jax.eval.circles import disk_mask, iou, score_batch
from cn_jax.tokenizer import tokenize
from cn_jax.train.sharding import to_host

HELD_OUT_SEED = 999_983  # no `cn-jax data fill50k --seed` default or demo uses it


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Conditions (N, H, W, 3) uint8, prompts, and the seed they came from."""

    conditions: np.ndarray
    targets: np.ndarray
    prompts: list[str]


def held_out_set(num: int, size: int, seed: int = HELD_OUT_SEED) -> HeldOut:
    """The first `num` samples of the fill50k drawn with `seed`, rendered at `size` px."""
    if num < 1:
        raise ValueError(f"the held-out set needs at least one sample, got {num}")
    truths = [fill50k_truth(i, size, seed) for i in range(num)]
    pairs = [render_fill50k(t, size) for t in truths]
    return HeldOut(
        conditions=np.stack([s for s, _ in pairs]),
        targets=np.stack([t for _, t in pairs]),
        prompts=[t.prompt for t in truths],
    )


def chance_iou(num: int, size: int, seed: int = HELD_OUT_SEED) -> float:
    """Mean IoU between the true disks of different held-out samples: what a
    model drawing perfect circles in the wrong places scores. About 0.30 for
    fill50k at 32 px (radii up to 0.4 of the side make big disks overlap)."""
    truths = [fill50k_truth(i, size, seed) for i in range(num)]
    masks = [disk_mask((size, size), t.center, t.radius) for t in truths]
    pairs = [iou(a, b) for i, a in enumerate(masks) for j, b in enumerate(masks) if i != j]
    return float(np.mean(pairs)) if pairs else float("nan")


class ControlEvaluator:
    """Samples the held-out set and scores it; call with the current params.

    Args:
      unet, controlnet, text_encoder, vae: the modules (controlnet None: the base alone).
      tokenizer, schedule: of the base model.
      resolution: image side in pixels.
      num_samples: size of the held-out set.
      sampler_steps, guidance_scale, sampler: how each image is generated.
      seed: of the initial noise (the held-out set has its own fixed seed).
    """

    def __init__(
        self, unet, controlnet, text_encoder, vae, tokenizer, schedule, resolution: int,
        num_samples: int = 32, sampler_steps: int = 20, guidance_scale: float = 7.5,
        sampler: str = "ddim", seed: int = 0, scaling_factor: float = 1.0,
    ):  # fmt: skip
        self.held_out = held_out_set(num_samples, resolution)
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder = text_encoder
        self.scaling_factor = scaling_factor
        max_len = text_encoder.config.max_position_embeddings
        self.ids = tokenize(tokenizer, self.held_out.prompts, max_len)
        self.empty_ids = tokenize(tokenizer, [""] * num_samples, max_len)
        self.guidance_scale = guidance_scale
        self.sampler = make_sampler(sampler, schedule, sampler_steps)
        factor = 1 if vae is None else vae.config.latent_factor
        shape = (num_samples, resolution // factor, resolution // factor, unet.config.in_channels)
        noise = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
        # Host arrays, the same on every process: jit replicates them over the
        # mesh of the (possibly multi-process) parameters.
        self.latents = np.asarray(noise * self.sampler.init_noise_sigma)
        self.cond = self.held_out.conditions.astype(np.float32) / 255.0
        self.time_ids = sdxl_time_ids(unet, num_samples, resolution)

    def images(self, params: dict[str, Any]) -> np.ndarray:
        """uint8 (N, H, W, 3) samples of the held-out set with `params` (a full tree:
        "unet", "text_encoder", optional "controlnet" and "vae"). In a multi-process
        run every process calls it and gets all of them."""
        generate = generation_program(
            self.unet, self.controlnet, self.text_encoder, self.vae, self.scaling_factor
        )
        params = {k: params.get(k) for k in ("unet", "text_encoder", "controlnet", "vae")}
        x = generate(
            params, self.ids, self.empty_ids, self.cond, self.latents, self.sampler,
            self.guidance_scale, self.time_ids,
        )  # fmt: skip
        return to_uint8(to_host(x))

    def __call__(self, params: dict[str, Any]) -> dict[str, float]:
        """Mean iou, roundness, colour_adherence, background_adherence, and seconds."""
        t0 = time.perf_counter()
        images = self.images(params)
        out = score_batch(list(images), list(self.held_out.conditions), self.held_out.prompts)
        out["seconds"] = time.perf_counter() - t0
        return out
