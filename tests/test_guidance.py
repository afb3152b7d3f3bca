"""Guess-mode scale options and the residual sizes they are based on; guidance
windows. (The loop itself, `denoise`, is tested end to end against diffusers in
test_pipeline.py, and through `cn-jax bench sample` in test_bench.py.)"""

import numpy as np
import pytest

from cn_jax.diffusion.guidance import control_keep
from cn_jax.models.config import ControlNetConfig
from cn_jax.models.controlnet import guess_mode_scales, residual_sizes


def test_sd15_residual_sizes_and_scales():
    cfg = ControlNetConfig()  # SD 1.5 layout: 12 skips + mid
    sizes = residual_sizes(cfg, (64, 64))
    assert sizes == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8]
    diffusers = guess_mode_scales("diffusers", cfg, (64, 64))
    np.testing.assert_allclose(diffusers, np.logspace(-1, 0, 13), rtol=1e-6)
    orig = guess_mode_scales("original", cfg, (64, 64), strength=0.5)
    np.testing.assert_allclose(orig, [0.5 * 0.825 ** (12 - i) for i in range(13)], rtol=1e-6)
    paper = guess_mode_scales("paper", cfg, (64, 64))  # w_i = 64 / h_i at 512 px
    np.testing.assert_allclose(paper, [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8])
    # Generalised to the actual size: the ratios stay per-block.
    np.testing.assert_allclose(guess_mode_scales("paper", cfg, (96, 96)), paper)
    with pytest.raises(ValueError, match="guess mode scales"):
        guess_mode_scales("bogus", cfg, (64, 64))


def test_control_keep_is_diffusers_controlnet_keep():
    # diffusers: keep at step i iff not (i / n < start or (i + 1) / n > end)
    np.testing.assert_array_equal(control_keep(0.2, 0.7, 10), [0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(control_keep(0.0, 1.0, 4), np.ones(4))
    assert control_keep(0.0, 1.0, 4).dtype == np.float32
