"""SDXL UNet and ControlNet parity with diffusers (random weights in every parameter):
the text_time added embedding, per-block transformer depths, no attention in the first
block, and everything SD 1.x/2.x already check."""

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from cn_jax import ControlNet, ControlNetConfig, init_controlnet_from_unet
from cn_jax.models.config import UNetConfig

from reference import (
    SDXL_CONFIGS,
    added_inputs,
    flax_controlnet_params,
    flax_unet_params,
    inputs,
    jit_apply,
    max_rel_err,
    nchw,
    nhwc,
    state_numpy,
    torch_added,
    torch_controlnet,
    torch_unet,
)

TOL = 1e-4  # float32 max relative error


def _torch_inputs(x, t, ctx):
    return nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)


def test_sdxl_unet_matches_diffusers():
    ref_model = torch_unet("sdxl")
    unet, params = flax_unet_params(ref_model)
    assert unet.config.has_text_time and "add_embedding" in params
    x, t, ctx, _ = inputs("sdxl")
    added = added_inputs()
    ours = jit_apply(unet, {"params": params}, x, t, ctx, added_cond_kwargs=added)
    with torch.no_grad():
        ref = ref_model(*_torch_inputs(x, t, ctx), added_cond_kwargs=torch_added(added)).sample
    err = max_rel_err(ours, nhwc(ref))
    print(f"UNet[sdxl] max rel err {err:.2e}")
    assert err <= TOL
    # The added conditioning matters: other size numbers give another prediction.
    other = {**added, "time_ids": added["time_ids"][::-1].copy()}
    moved = jit_apply(unet, {"params": params}, x, t, ctx, added_cond_kwargs=other)
    assert np.abs(np.asarray(moved) - np.asarray(ours)).max() > 1e-3


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_controlnet_and_unet_match_diffusers(guess_mode):
    tu, tc = torch_unet("sdxl"), torch_controlnet("sdxl")
    unet, up = flax_unet_params(tu)
    cnet, cp = flax_controlnet_params(tc)
    assert "add_embedding" in cp
    x, t, ctx, cond = inputs("sdxl")
    added = added_inputs()
    ours = jit_apply(
        cnet, {"params": cp}, x, t, ctx, cond, conditioning_scale=0.7, guess_mode=guess_mode,
        added_cond_kwargs=added,
    )  # fmt: skip
    with torch.no_grad():
        rd, rm = tc(
            *_torch_inputs(x, t, ctx), nchw(cond), conditioning_scale=0.7, guess_mode=guess_mode,
            added_cond_kwargs=torch_added(added), return_dict=False,
        )  # fmt: skip
    errs = [max_rel_err(a, nhwc(b)) for a, b in zip(ours[0], rd, strict=True)]
    errs.append(max_rel_err(ours[1], nhwc(rm)))
    print(f"ControlNet[sdxl, guess {guess_mode}] max rel err {max(errs):.2e}")
    assert len(ours[0]) == 9 and max(errs) <= TOL
    eps = jit_apply(
        unet, {"params": up}, x, t, ctx, down_block_additional_residuals=ours[0],
        mid_block_additional_residual=ours[1], added_cond_kwargs=added,
    )  # fmt: skip
    with torch.no_grad():
        ref_eps = tu(
            *_torch_inputs(x, t, ctx), added_cond_kwargs=torch_added(added),
            down_block_additional_residuals=list(rd), mid_block_additional_residual=rm,
        ).sample  # fmt: skip
    err = max_rel_err(eps, nhwc(ref_eps))
    print(f"UNet+ControlNet[sdxl] max rel err {err:.2e}")
    assert err <= TOL


def test_sdxl_init_from_unet_matches_diffusers_from_unet():
    """The add_embedding is copied with the encoder, as diffusers' from_unet copies it."""
    tu = torch_unet("sdxl")
    ref = ControlNetModel.from_unet(tu, **SDXL_CONFIGS["sdxl"][1])
    unet, up = flax_unet_params(tu)
    cfg = ControlNetConfig.from_unet(unet.config, **SDXL_CONFIGS["sdxl"][1])
    assert cfg.to_dict()["addition_embed_type"] == "text_time"
    assert ControlNetConfig.from_dict(dict(ref.config)) == cfg
    cp = init_controlnet_from_unet(up, cfg, jax.random.PRNGKey(0))
    _, ref_params = flax_controlnet_params(ref)
    for name in ("add_embedding", "time_embedding", "down_blocks_2", "mid_block"):
        for a, b in zip(jax.tree.leaves(cp[name]), jax.tree.leaves(ref_params[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A fresh ControlNet leaves the SDXL UNet's output exactly as it was.
    x, t, ctx, cond = inputs("sdxl")
    added = added_inputs()
    down, mid = jit_apply(ControlNet(cfg), {"params": cp}, x, t, ctx, cond, added_cond_kwargs=added)
    assert all(not np.asarray(r).any() for r in [*down, mid])
    assert set(state_numpy(ref)) >= {"add_embedding.linear_1.weight"}


def test_sdxl_needs_added_cond_and_refuses_other_addition_types():
    unet, params = flax_unet_params(torch_unet("sdxl"))
    x, t, ctx, _ = inputs("sdxl")
    with pytest.raises(ValueError, match="needs added_cond_kwargs"):
        unet.apply({"params": params}, x, t, ctx)
    bad = {**added_inputs(), "text_embeds": np.zeros((2, 15), np.float32)}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim 64"):
        unet.apply({"params": params}, x, t, ctx, added_cond_kwargs=bad)
    cfg = dict(torch_unet("sdxl").config)
    assert UNetConfig.from_dict(cfg).upcast_attention is False  # null in SDXL files
    for kind in ("text", "image", "text_image"):
        with pytest.raises(ValueError, match=f"addition_embed_type='{kind}' is not supported"):
            UNetConfig.from_dict({**cfg, "addition_embed_type": kind})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig.from_dict({**cfg, "addition_time_embed_dim": None})
    sd15 = dict(torch_unet("gray").config)
    with pytest.raises(ValueError, match="is not 'text_time'"):
        UNetConfig.from_dict({**sd15, "projection_class_embeddings_input_dim": 64})
    plain_unet, plain_params = flax_unet_params(torch_unet("gray"))
    xg, tg, cg, _ = inputs("gray")
    with pytest.raises(ValueError, match="no addition_embed_type"):
        plain_unet.apply({"params": plain_params}, xg, tg, cg, added_cond_kwargs=added_inputs())
