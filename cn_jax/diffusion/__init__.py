"""Noise schedules, targets, samplers and guidance (pure functions)."""

from cn_jax.diffusion.schedule import NoiseScheduleConfig

__all__ = ["NoiseScheduleConfig"]
