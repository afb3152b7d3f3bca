"""The pure training step: `train_step(state, frozen, batch, rng) -> (state, metrics)`.

Data flow (docs/design.md): VAE encode (frozen) -> latents * scaling_factor;
CLIP text (frozen) -> context (SDXL: two encoders -> context and pooled embedding, with
the batch's size numbers `time_ids` the added conditioning); t ~ U[0, T), noise ~ N(0, 1),
z_t = add_noise;
ControlNet (trainable) -> residuals -> UNet (frozen) -> prediction; MSE against
the eps (or v) target; gradients for `state.params` only -> optax.

`frozen` is a separate argument that is never differentiated: `jax.grad`
is taken with respect to `state.params` alone, so XLA computes no gradient for
a locked weight (the backward pass still runs through the locked UNet's
activations to reach the ControlNet residuals, as it must).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cn_jax.diffusion.guidance import TextCond
from cn_jax.diffusion.noise import add_noise, sample_timesteps, training_target
from cn_jax.kernels import Kernels
from cn_jax.models.clip_text import CLIPTextModel, SDXLTextEncoders, encode_text
from cn_jax.models.controlnet import ControlNet
from cn_jax.models.unet import UNet
from cn_jax.models.vae import AutoencoderKL
from cn_jax.train.state import TrainState, global_norm, merge


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The modules of a run (static: hashable linen modules and constants)."""

    unet: UNet
    controlnet: ControlNet | None  # None: plain UNet fine-tuning
    vae: AutoencoderKL | None  # None: pixel-space model (latent factor 1)
    text_encoder: CLIPTextModel | SDXLTextEncoders
    prediction_type: str = "epsilon"
    scaling_factor: float = 0.18215

    def with_kernels(self, kernels: Kernels) -> StepModels:
        """The same models computing with `kernels` (`cn_jax.kernels`)."""
        nets = {"unet": self.unet, "controlnet": self.controlnet, "vae": self.vae}
        return dataclasses.replace(
            self, **{k: m if m is None else m.clone(kernels=kernels) for k, m in nets.items()}
        )


def latent_shape(models: StepModels, batch: dict) -> tuple[int, ...]:
    """Shape of the batch's latents (cached, pixel-space, or VAE-encoded)."""
    for key in ("latents", "latent_mean"):
        if key in batch:
            return batch[key].shape
    b, h, w, c = batch["pixel_values"].shape
    if models.vae is None:
        return (b, h, w, c)
    f = models.vae.config.latent_factor
    return (b, h // f, w // f, models.vae.config.latent_channels)


def draw_randomness(models: StepModels, batch: dict, rng: jax.Array, num_timesteps: int) -> dict:
    """Per-sample random draws of one step: timesteps, noise, VAE posterior noise.

    Drawn for the whole batch up front so that splitting it into micro-batches
    (gradient accumulation) changes nothing: sample i gets the same draws.
    """
    k_t, k_noise, k_vae = jax.random.split(rng, 3)
    shape = latent_shape(models, batch)
    return {
        "t": sample_timesteps(k_t, shape[0], num_timesteps),
        "noise": jax.random.normal(k_noise, shape, jnp.float32),
        "vae_noise": jax.random.normal(k_vae, shape, jnp.float32),
    }


def _lookup(table: np.ndarray, x: jax.Array) -> jax.Array:
    return jnp.asarray(table).at[x.astype(jnp.int32)].get(mode="promise_in_bounds")


# What the loader's float formulas give for every transported value, computed by numpy:
# a table lookup in the step is bit-identical to them, where XLA turns a division by a
# constant into a multiplication by its reciprocal (205 of the 256 uint8 values 1 ulp off).
_U8 = np.arange(256, dtype=np.float32)
_U16 = np.arange(65536, dtype=np.float32)
_IMAGE_U8 = _U8 / np.float32(127.5) - 1.0
_IMAGE_U16 = _U16 / np.float32(32767.5) - 1.0
_COND_U8 = _U8 / np.float32(255.0)
_COND_U16 = _U16 / np.float32(65535.0)


def image_to_model_range(x: jax.Array) -> jax.Array:
    """Target pixels as the loader transports them -> float32 in [-1, 1], inside the step.

    uint8 (8-bit sources) is x / 127.5 - 1 and uint16 (deeper sources, on 0..65535)
    x / 32767.5 - 1, by table: bit-identical to a float32 batch made on the host (an 8-bit
    value v sent as v * 257 too), for a quarter (half) of the host-to-device bytes. Float
    input is taken as already in [-1, 1].
    """
    if x.dtype == jnp.uint8:
        return _lookup(_IMAGE_U8, x)
    if x.dtype == jnp.uint16:
        return _lookup(_IMAGE_U16, x)
    return x


def condition_to_model_range(x: jax.Array) -> jax.Array:
    """Conditions as transported -> float32 in [0, 1]: uint8 / 255, uint16 / 65535 (an
    8-bit value v sent as v * 257 gives the same float as v / 255), by table; float as it
    is."""
    if x.dtype == jnp.uint8:
        return _lookup(_COND_U8, x)
    if x.dtype == jnp.uint16:
        return _lookup(_COND_U16, x)
    return x


def encode_batch(models: StepModels, params: dict, batch: dict, vae_noise: jax.Array) -> tuple:
    """Latents and text conditioning (`TextCond`) of a batch (frozen models; or the cached
    ones). SDXL: the pooled embedding and the batch's `time_ids` are the added conditioning."""
    if "latents" in batch:
        latents = batch["latents"]
    elif models.vae is None:
        latents = image_to_model_range(batch["pixel_values"])
    else:
        if "latent_mean" in batch:  # data.cache_latents: the posterior was precomputed
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            mean, logvar = models.vae.apply(
                {"params": params["vae"]},
                image_to_model_range(batch["pixel_values"]),
                method="encode",
            )
        std = jnp.exp(0.5 * logvar.astype(jnp.float32))
        latents = (mean.astype(jnp.float32) + std * vae_noise) * models.scaling_factor
    if "encoder_hidden_states" in batch:
        context, pooled = batch["encoder_hidden_states"], batch.get("text_embeds")
    else:
        context, pooled = encode_text(
            models.text_encoder, params["text_encoder"], batch["input_ids"]
        )
    text = TextCond(context)
    if "time_ids" in batch:  # SDXL (the loader's `time_ids=True`)
        text = TextCond(context, {"text_embeds": pooled, "time_ids": batch["time_ids"]})
    return jax.lax.stop_gradient(latents), jax.lax.stop_gradient(text)


def loss_fn(
    trainable: Any,
    frozen: Any,
    batch: dict,
    draws: dict,
    models: StepModels,
    alphas_cumprod: jax.Array,
) -> tuple[jax.Array, dict]:
    """Mean squared error of the model's prediction against the diffusion target."""
    params = merge(trainable, frozen)
    latents, text = encode_batch(models, params, batch, draws["vae_noise"])
    latents = latents.astype(jnp.float32)
    t, noise = draws["t"], draws["noise"]
    noisy = add_noise(alphas_cumprod, latents, noise, t)
    down = mid = None
    if models.controlnet is not None:
        down, mid = models.controlnet.apply(
            {"params": params["controlnet"]},
            noisy,
            t,
            text.context,
            condition_to_model_range(batch["conditioning_pixel_values"]),
            added_cond_kwargs=text.added,
        )
    pred = models.unet.apply(
        {"params": params["unet"]},
        noisy,
        t,
        text.context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        added_cond_kwargs=text.added,
    )
    target = training_target(models.prediction_type, latents, noise, alphas_cumprod, t)
    loss = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return loss, {"loss": loss}


def ema_decay_at(step: jax.Array | int, decay: float) -> jax.Array:
    """The EMA decay used after optimizer step `step` (1-based), as diffusers'
    `EMAModel` (no power warmup): 0 at step 1 (the EMA starts at the trained
    weights, not the initial ones), then min(decay, (1 + s) / (10 + s)) with
    s = step - 1. A fixed decay from step 1 would keep decay**n of the initial
    weights in the average (37% after 1,000 steps at 0.999)."""
    s = jnp.asarray(step, jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1.0 + s) / (10.0 + s)))


def make_train_step(
    models: StepModels,
    alphas_cumprod: np.ndarray,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    ema_decay: float | None = None,
) -> Callable:
    """Build `train_step(state, frozen, batch, rng) -> (state, metrics)`.

    `rng` is the run's base key; the step folds in `state.step`, so the noise
    of step n is the same however the run was interrupted and resumed.
    With `grad_accum=k` the batch is split into k equal micro-batches whose
    gradients are averaged: the update equals one step on the whole batch.
    """
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        draws = draw_randomness(models, batch, step_rng, ac.shape[0])
        if grad_accum == 1:
            (loss, _), grads = grad_fn(state.params, frozen, batch, draws, models, ac)
        else:

            def split(x):
                return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

            micro = jax.tree_util.tree_map(split, (batch, draws))

            def body(acc, xs):
                (l_mb, _), g = grad_fn(state.params, frozen, *xs, models, ac)
                return jax.tree_util.tree_map(jnp.add, acc, (l_mb, g)), None

            zeros = jax.tree_util.tree_map(
                jnp.zeros_like, (jnp.zeros((), jnp.float32), state.params)
            )
            (loss, grads), _ = jax.lax.scan(body, zeros, micro)
            # Equal micro-batches: the mean of their means is the batch mean.
            loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None:
            d = ema_decay_at(state.step + 1, ema_decay)
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        metrics = {"loss": loss, "grad_norm": global_norm(grads)}
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
        )
        return new_state, metrics

    return train_step
