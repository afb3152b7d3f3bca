"""Noise schedule vs diffusers' schedulers."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from cn_jax.diffusion import NoiseScheduleConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="scaled_linear"),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
    ],
)
def test_alphas_cumprod_match_diffusers(kwargs):
    ref = DDIMScheduler(**kwargs)
    ours = NoiseScheduleConfig.from_dict(dict(ref.config))
    # betas = 1 - alpha with alpha near 1: compared to two ulps of 1.0. The
    # zero-SNR rescale derives betas from ratios of shifted cumulative products,
    # which amplifies the one-ulp differences of torch.linspace's float32
    # rounding to a few 1e-6 there; alphas_cumprod (what training uses) agrees.
    atol = 5e-6 if kwargs.get("rescale_betas_zero_snr") else 2.5e-7
    np.testing.assert_allclose(ours.betas(), ref.betas.numpy(), rtol=1e-6, atol=atol)
    np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.numpy(), rtol=1e-5)


def test_reads_any_sd_scheduler_config():
    for cls in (PNDMScheduler, DPMSolverMultistepScheduler, DDIMScheduler):
        cfg = NoiseScheduleConfig.from_dict(dict(cls(prediction_type="v_prediction").config))
        assert cfg.prediction_type == "v_prediction" and cfg.num_train_timesteps == 1000
    assert (
        NoiseScheduleConfig.from_dict(dict(PNDMScheduler().config)).sampler_options[
            "skip_prk_steps"
        ]
        is False
    )


def test_rejects_unknown_field_and_value():
    with pytest.raises(ValueError, match="unknown scheduler config field.*bogus"):
        NoiseScheduleConfig.from_dict({"bogus": 1}, source="scheduler/scheduler_config.json")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseScheduleConfig.from_dict({"prediction_type": "flow"})
