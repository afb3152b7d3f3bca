"""Guess-mode scale options and the residual sizes they are based on."""

import numpy as np
import pytest

from cn_jax.diffusion.guidance import guess_mode_scales, residual_sizes
from cn_jax.models.config import ControlNetConfig


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
