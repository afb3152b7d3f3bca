"""Noise schedules, training targets and samplers (pure functions)."""

from cn_jax.diffusion.noise import add_noise, sample_timesteps, training_target, velocity
from cn_jax.diffusion.samplers import SAMPLERS, inference_timesteps, make_sampler
from cn_jax.diffusion.schedule import NoiseScheduleConfig

__all__ = [
    "SAMPLERS",
    "NoiseScheduleConfig",
    "add_noise",
    "inference_timesteps",
    "make_sampler",
    "sample_timesteps",
    "training_target",
    "velocity",
]
