"""The forward process used by training: noised latents, targets, timesteps.

Pure `jnp` functions, jit- and vmap-friendly. Arithmetic is float32 whatever
the input dtype (a bf16 latent noised in bf16 would lose the small
`sqrt(1 - alpha_bar)` of early timesteps), and results come back in the input
dtype. Each equals its diffusers counterpart (`DDPMScheduler.add_noise`,
`get_velocity`) on float32 inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cn_jax.diffusion.schedule import PREDICTION_TYPES


def _coefficients(alphas_cumprod, t, ndim: int):
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped (B, 1, ..., 1)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
    ac = ac.reshape(ac.shape + (1,) * (ndim - ac.ndim))
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def add_noise(alphas_cumprod, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

    Args:
      alphas_cumprod: (T,) cumulative alphas (`NoiseScheduleConfig.alphas_cumprod()`).
      x0: clean samples, (B, ...) (NHWC latents).
      noise: same shape as `x0`.
      t: (B,) integer timesteps in [0, T).

    Returns:
      The noised samples, in `x0`'s dtype.
    """
    a, s = _coefficients(alphas_cumprod, t, x0.ndim)
    out = a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)
    return out.astype(x0.dtype)


def velocity(alphas_cumprod, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v_t = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho, 2022).

    Same arguments as `add_noise`; the result has `x0`'s dtype.
    """
    a, s = _coefficients(alphas_cumprod, t, x0.ndim)
    out = a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)
    return out.astype(x0.dtype)


def training_target(
    prediction_type: str, x0: jax.Array, noise: jax.Array, alphas_cumprod, t: jax.Array
) -> jax.Array:
    """What the denoiser is regressed on: the noise ("epsilon"), the velocity
    ("v_prediction") or the clean sample ("sample"), in `x0`'s dtype.

    Raises:
      ValueError: naming an unknown `prediction_type`.
    """
    if prediction_type == "epsilon":
        return noise.astype(x0.dtype)
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
    """(batch,) int32 timesteps drawn uniformly from [0, num_train_timesteps)."""
    return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
