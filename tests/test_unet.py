"""UNet parity with diffusers' UNet2DConditionModel (random weights everywhere)."""

import jax
import numpy as np
import pytest
import torch

from cn_jax.models.config import UNetConfig

from reference import (
    CONFIGS,
    flax_unet_params,
    inputs,
    jit_apply,
    max_rel_err,
    nchw,
    nhwc,
    slow_unless,
    torch_controlnet,
    torch_unet,
)

TOL = 1e-4  # float32 max relative error


@pytest.mark.parametrize("name", slow_unless(sorted(CONFIGS), fast={"gray", "sd2"}))
def test_unet_matches_diffusers(name):
    ref_model = torch_unet(name)
    unet, params = flax_unet_params(ref_model)
    x, t, ctx, _ = inputs(name)
    ours = jit_apply(unet, {"params": params}, x, t, ctx)
    with torch.no_grad():
        ref = nhwc(ref_model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    err = max_rel_err(ours, ref)
    print(f"UNet[{name}] max rel err {err:.2e}")
    assert err <= TOL


def test_unet_residuals_match_diffusers():
    """Residuals are added exactly where diffusers adds them (random residuals)."""
    ref_model = torch_unet("sd15")
    unet, params = flax_unet_params(ref_model)
    x, t, ctx, _ = inputs("sd15")
    rng = np.random.default_rng(3)
    # The skip shapes, taken from diffusers' own ControlNet outputs.
    with torch.no_grad():
        ref_down, ref_mid = torch_controlnet("sd15")(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(inputs("sd15")[3]),
            return_dict=False,
        )  # fmt: skip
    down = [rng.standard_normal(nhwc(r).shape, dtype=np.float32) for r in ref_down]
    mid = rng.standard_normal(nhwc(ref_mid).shape, dtype=np.float32)
    assert len(down) == 12
    ours = jit_apply(
        unet, {"params": params}, x, t, ctx,
        down_block_additional_residuals=down, mid_block_additional_residual=mid,
    )  # fmt: skip
    with torch.no_grad():
        ref = ref_model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
            down_block_additional_residuals=[nchw(d) for d in down],
            mid_block_additional_residual=nchw(mid),
        ).sample  # fmt: skip
    plain = jit_apply(unet, {"params": params}, x, t, ctx)
    assert max_rel_err(ours, nhwc(ref)) <= TOL
    assert np.abs(np.asarray(ours) - np.asarray(plain)).max() > 1e-2  # residuals matter


def test_unet_rejects_wrong_residual_count():
    unet, params = flax_unet_params(torch_unet("gray"))
    x, t, ctx, _ = inputs("gray")
    with pytest.raises(ValueError, match="skip connections"):
        jit_apply(unet, {"params": params}, x, t, ctx, down_block_additional_residuals=[x])


def test_scalar_timestep_broadcasts():
    unet, params = flax_unet_params(torch_unet("gray"))
    x, _, ctx, _ = inputs("gray")
    a = unet.apply({"params": params}, x, 250.0, ctx)
    b = unet.apply({"params": params}, x, np.full((2,), 250.0, np.float32), ctx)
    np.testing.assert_array_equal(a, b)


def test_config_rejects_unknown_and_unsupported_fields():
    cfg = dict(torch_unet("gray").config)
    UNetConfig.from_dict(cfg)  # the real diffusers config is accepted
    with pytest.raises(ValueError, match="unknown config field.*frobnicate"):
        UNetConfig.from_dict({**cfg, "frobnicate": 1}, source="x/config.json")
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_dict({**cfg, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="down_block_types"):
        UNetConfig.from_dict({**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 2})


@pytest.mark.slow  # a second UNet compile; parity runs in the fast tier
def test_bfloat16_compute_runs_close():
    """bf16 compute with f32 params stays near the f32 result (sanity, not parity)."""
    from cn_jax.models.unet import UNet

    unet32, params = flax_unet_params(torch_unet("sd2"))
    unet16 = UNet(unet32.config, dtype=jax.numpy.bfloat16)
    x, t, ctx, _ = inputs("sd2")
    a = np.asarray(jit_apply(unet32, {"params": params}, x, t, ctx))
    b = np.asarray(jit_apply(unet16, {"params": params}, x, t, ctx), np.float32)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert max_rel_err(b, a) < 0.1
