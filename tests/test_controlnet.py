"""ControlNet parity with diffusers, zero-init identity, init from the UNet,
multi-ControlNet composition, the paper's encoder and ControlledBlock."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from cn_jax import (
    ControlledBlock,
    ControlNet,
    ControlNetConfig,
    combine_controlnet_residuals,
    init_controlnet_from_unet,
)

from reference import (
    CONFIGS,
    flax_controlnet_params,
    flax_unet_params,
    inputs,
    jit_apply,
    max_rel_err,
    nchw,
    nhwc,
    randomize_,
    slow_unless,
    state_numpy,
    torch_controlnet,
    torch_unet,
)

TOL = 1e-4


def _torch_cn(model, x, t, ctx, cond, **kw):
    with torch.no_grad():
        down, mid = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), return_dict=False, **kw
        )
    return [nhwc(d) for d in down], nhwc(mid)


def _assert_residuals(ours, ref, label):
    (od, om), (rd, rm) = ours, ref
    assert len(od) == len(rd)
    errs = [max_rel_err(a, b) for a, b in zip(od, rd)] + [max_rel_err(om, rm)]
    print(f"{label} max rel err {max(errs):.2e}")
    assert max(errs) <= TOL


@pytest.mark.parametrize("name", slow_unless(sorted(CONFIGS), fast={"gray"}))
def test_controlnet_and_unet_match_diffusers(name):
    tu, tc = torch_unet(name), torch_controlnet(name)
    unet, up = flax_unet_params(tu)
    cnet, cp = flax_controlnet_params(tc)
    x, t, ctx, cond = inputs(name)
    ours = jit_apply(cnet, {"params": cp}, x, t, ctx, cond, conditioning_scale=0.7)
    ref = _torch_cn(tc, x, t, ctx, cond, conditioning_scale=0.7)
    _assert_residuals(ours, ref, f"ControlNet[{name}]")

    eps = jit_apply(
        unet,
        {"params": up}, x, t, ctx,
        down_block_additional_residuals=ours[0], mid_block_additional_residual=ours[1],
    )  # fmt: skip
    with torch.no_grad():
        ref_eps = tu(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
            down_block_additional_residuals=[nchw(d) for d in ref[0]],
            mid_block_additional_residual=nchw(ref[1]),
        ).sample  # fmt: skip
    err = max_rel_err(eps, nhwc(ref_eps))
    print(f"UNet+ControlNet[{name}] max rel err {err:.2e}")
    assert err <= TOL


def test_guess_mode_matches_diffusers():
    tc = torch_controlnet("sd15")
    cnet, cp = flax_controlnet_params(tc)
    x, t, ctx, cond = inputs("sd15")
    ours = jit_apply(cnet, {"params": cp}, x, t, ctx, cond, conditioning_scale=0.8, guess_mode=True)
    ref = _torch_cn(tc, x, t, ctx, cond, conditioning_scale=0.8, guess_mode=True)
    _assert_residuals(ours, ref, "guess")


def test_global_pool_conditions_match_diffusers():
    tc0 = torch_controlnet("gray")
    tc = ControlNetModel(**{**dict(tc0.config), "global_pool_conditions": True}).eval()
    tc.load_state_dict(tc0.state_dict())
    cnet, cp = flax_controlnet_params(tc)
    assert cnet.config.global_pool_conditions
    x, t, ctx, cond = inputs("gray")
    ours = jit_apply(cnet, {"params": cp}, x, t, ctx, cond)
    assert ours[1].shape[1:3] == (1, 1)
    _assert_residuals(ours, _torch_cn(tc, x, t, ctx, cond), "global_pool")


def test_bgr_order_flips_channels():
    cnet, cp = flax_controlnet_params(torch_controlnet("sd2"))
    x, t, ctx, cond = inputs("sd2")
    bgr = jit_apply(cnet, {"params": cp}, x, t, ctx, cond)
    rgb_cnet = ControlNet(cnet.config.replace(controlnet_conditioning_channel_order="rgb"))
    flipped = jit_apply(rgb_cnet, {"params": cp}, x, t, ctx, cond[..., ::-1])
    np.testing.assert_allclose(bgr[1], flipped[1], rtol=1e-6, atol=1e-6)
    assert (
        np.abs(np.asarray(bgr[1]) - jit_apply(rgb_cnet, {"params": cp}, x, t, ctx, cond)[1]).max()
        > 1e-3
    )


@pytest.mark.parametrize("name", slow_unless(["sd15", "gray"], fast={"gray"}))
def test_fresh_controlnet_is_exact_identity(name):
    unet, up = flax_unet_params(torch_unet(name))
    cfg = ControlNetConfig.from_unet(unet.config, **CONFIGS[name][1])
    cp = init_controlnet_from_unet(up, cfg, jax.random.PRNGKey(5))
    x, t, ctx, cond = inputs(name)
    # Zero convolutions give exact zeros in any program; the two UNet runs below are
    # op by op, so the only difference between them is the added residuals.
    down, mid = jit_apply(ControlNet(cfg), {"params": cp}, x, t, ctx, cond)
    with_res = unet.apply(
        {"params": up}, x, t, ctx, down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    )  # fmt: skip
    plain = unet.apply({"params": up}, x, t, ctx)
    assert np.array_equal(np.asarray(with_res), np.asarray(plain))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_from_unet_matches_diffusers_from_unet(name):
    tu = torch_unet(name)
    ref = ControlNetModel.from_unet(tu, **CONFIGS[name][1])
    unet, up = flax_unet_params(tu)
    cfg = ControlNetConfig.from_unet(unet.config, **CONFIGS[name][1])
    # Same config as diffusers derives.
    assert cfg == ControlNetConfig.from_dict(dict(ref.config))
    ours = init_controlnet_from_unet(up, cfg)
    from cn_jax.weights.keymap import flax_to_torch

    ours_t, ref_t = flax_to_torch(ours), state_numpy(ref)
    assert set(ours_t) == set(ref_t)
    for k, v in ref_t.items():
        new_layer = k.startswith("controlnet_cond_embedding.") and "conv_out" not in k
        if new_layer:
            # Freshly initialised in both (kernels torch-like uniform, biases
            # zero by the Flax convention where torch draws them): same shape,
            # random kernels.
            assert ours_t[k].shape == v.shape, k
            if k.endswith("weight"):
                assert np.abs(ours_t[k]).max() > 0, k
        else:  # copied from the UNet, or a zero conv (zero in both)
            np.testing.assert_array_equal(ours_t[k], v, err_msg=k)
    zero_convs = [k for k in ours_t if k.startswith(("controlnet_down", "controlnet_mid"))]
    assert len(zero_convs) == 2 * (cfg.num_down_residuals + 1)
    assert all(not np.any(ours_t[k]) for k in zero_convs)


def test_init_from_unet_copies_are_fresh_buffers():
    unet, up = flax_unet_params(torch_unet("gray"))
    cp = init_controlnet_from_unet(up, ControlNetConfig.from_unet(unet.config))
    a, b = cp["conv_in"]["kernel"], up["conv_in"]["kernel"]
    np.testing.assert_array_equal(a, b)
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_init_from_unet_reports_mismatch():
    unet, up = flax_unet_params(torch_unet("gray"))
    cfg = ControlNetConfig.from_unet(unet.config).replace(block_out_channels=(16, 48))
    with pytest.raises(ValueError, match="down_blocks_1.*shape"):
        init_controlnet_from_unet(up, cfg)


def test_multi_controlnet_matches_diffusers():
    tc1 = torch_controlnet("sd15")
    tc2 = randomize_(ControlNetModel.from_unet(torch_unet("sd15")), 7)
    (c1, p1), (c2, p2) = flax_controlnet_params(tc1), flax_controlnet_params(tc2)
    x, t, ctx, cond = inputs("sd15")
    cond2 = inputs("sd15", seed=9)[3]
    outs = [c1.apply({"params": p1}, x, t, ctx, cond), c2.apply({"params": p2}, x, t, ctx, cond2)]
    ours = combine_controlnet_residuals(outs, [0.5, 1.3])
    with torch.no_grad():
        down, mid = MultiControlNetModel([tc1, tc2])(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), [nchw(cond), nchw(cond2)],
            conditioning_scale=[0.5, 1.3], return_dict=False,
        )  # fmt: skip
    _assert_residuals(ours, ([nhwc(d) for d in down], nhwc(mid)), "multi")
    with pytest.raises(ValueError, match="scales"):
        combine_controlnet_residuals(outs, [1.0])


def test_wrong_condition_shape_is_named():
    cnet, cp = flax_controlnet_params(torch_controlnet("gray"))
    x, t, ctx, cond = inputs("gray")
    with pytest.raises(ValueError, match=r"controlnet_cond has shape .*expected \(2, 64, 64, 1\)"):
        cnet.apply({"params": cp}, x, t, ctx, cond[:, :32])


@pytest.mark.parametrize("factor", [8, 1])
def test_paper_encoder(factor):
    unet, up = flax_unet_params(torch_unet("gray"))
    cfg = ControlNetConfig.from_unet(
        unet.config, conditioning_embedding_type="paper", conditioning_latent_factor=factor,
        conditioning_channels=1,
    )  # fmt: skip
    assert cfg.conditioning_embedding_out_channels == (16, 32, 64, 128)
    cp = init_controlnet_from_unet(up, cfg, jax.random.PRNGKey(1))
    emb = cp["controlnet_cond_embedding"]
    kernels = [emb[n]["kernel"].shape for n in ("conv_in", "blocks_0", "blocks_1", "blocks_2")]
    assert kernels == [(4, 4, 1, 16), (4, 4, 16, 32), (4, 4, 32, 64), (4, 4, 64, 128)]
    assert emb["conv_out"]["kernel"].shape == (1, 1, 128, 16)  # the zero conv Z(c; z1)
    assert not np.any(emb["conv_out"]["kernel"])
    # Gaussian (He normal) init of the four convs.
    k = np.asarray(emb["blocks_1"]["kernel"]).ravel()
    assert abs(k.std() - np.sqrt(2 / (4 * 4 * 32))) < 0.005  # fan_in of 4x4x32
    x, t, ctx, _ = inputs("gray")
    cond = np.random.default_rng(0).random((2, 8 * factor, 8 * factor, 1), dtype=np.float32)
    down, mid = ControlNet(cfg).apply({"params": cp}, x, t, ctx, cond)
    assert all(not np.any(d) for d in down) and not np.any(mid)
    # With non-zero Z(c), the condition reaches the copy at latent resolution.
    cp["controlnet_cond_embedding"]["conv_out"]["kernel"] += 0.1
    cp["controlnet_mid_block"]["kernel"] += 0.1
    _, mid2 = ControlNet(cfg).apply({"params": cp}, x, t, ctx, cond)
    _, mid3 = ControlNet(cfg).apply({"params": cp}, x, t, ctx, cond * 0.0)
    assert np.abs(np.asarray(mid2) - np.asarray(mid3)).max() > 1e-4


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6)(nn.tanh(nn.Dense(8)(x)))


def test_controlled_block_identity_and_gradients():
    block = ControlledBlock(_Mlp())
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6))
    c = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 2))
    params = block.init(jax.random.PRNGKey(2), x, c)["params"]
    params["copy"] = jax.tree_util.tree_map(jnp.copy, params["locked"])  # the copy starts as F
    plain = _Mlp().apply({"params": params["locked"]}, x)
    assert np.array_equal(np.asarray(block.apply({"params": params}, x, c)), np.asarray(plain))

    def loss(p):
        return jnp.sum(block.apply({"params": p}, x, c) ** 2)

    g0 = jax.grad(loss)(params)
    # At init only zero_out gets a gradient (the paper's first-step argument).
    assert np.abs(g0["zero_out"]["kernel"]).max() > 0
    # After one update of the zero convs, the copy and zero_in learn too.
    params["zero_out"] = jax.tree_util.tree_map(
        lambda a, g: a - 0.1 * g, params["zero_out"], g0["zero_out"]
    )
    params["zero_in"]["kernel"] = params["zero_in"]["kernel"] + 0.1
    g = jax.grad(loss)(params)
    for name in ("copy", "zero_in", "zero_out"):
        assert max(np.abs(v).max() for v in jax.tree_util.tree_leaves(g[name])) > 0, name
    assert all(not np.any(v) for v in jax.tree_util.tree_leaves(g["locked"]))
    assert all(not np.any(v) for v in jax.tree_util.tree_leaves(g0["locked"]))
