"""VAE parity with diffusers' AutoencoderKL (random weights in every parameter)."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from cn_jax.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    example_inputs,
    sample_latents,
)
from cn_jax.weights.keymap import flax_to_torch, torch_to_flax

from reference import max_rel_err, nchw, nhwc, randomize_

TOL = 1e-4  # float32 max relative error
BF16_TOL = 0.1

# name -> (diffusers AutoencoderKL kwargs, image (H, W)). Small shapes of the
# real architecture, each exercising a different part of the config.
CONFIGS = {
    # Two blocks, one resnet per encoder block, square image.
    "two": (
        dict(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
        ),
        (32, 32),
    ),
    # Three blocks (two downsamplers), two resnets per block, no quant_conv,
    # 3 latent channels (so mean/logvar are split at an odd offset) and a
    # non-square image (an H/W mix-up cannot cancel out).
    "three": (
        dict(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=2,
            norm_num_groups=4,
            latent_channels=3,
            use_quant_conv=False,
        ),
        (24, 32),
    ),
    # Mid blocks without attention, no post_quant_conv, one-channel input,
    # two-channel output.
    "noattn": (
        dict(
            in_channels=1,
            out_channels=2,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            mid_block_add_attention=False,
            use_post_quant_conv=False,
        ),
        (16, 16),
    ),
}


@functools.cache
def torch_vae(name: str, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    return randomize_(TorchAutoencoderKL(**CONFIGS[name][0]), seed)


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def convert(ref: TorchAutoencoderKL, dtype=jnp.float32):
    """Our model, its params (converted from `ref`) and jitted encode/decode/call."""
    cfg = AutoencoderKLConfig.from_dict(dict(ref.config))
    model = AutoencoderKL(cfg, dtype=dtype)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs(cfg))
    params = torch_to_flax(state_numpy(ref), abstract["params"])
    fns = dict(
        encode=jax.jit(functools.partial(model.apply, method="encode")),
        decode=jax.jit(functools.partial(model.apply, method="decode")),
        call=jax.jit(model.apply, static_argnames="sample_posterior"),
    )
    return model, params, fns


@functools.cache
def flax_vae(name: str, dtype=jnp.float32):
    return convert(torch_vae(name), dtype)


def images(name: str, batch: int = 2, seed: int = 0) -> np.ndarray:
    kwargs, (h, w) = CONFIGS[name]
    rng = np.random.default_rng(seed)
    shape = (batch, h, w, kwargs.get("in_channels", 3))
    return rng.uniform(-1, 1, shape).astype(np.float32)


def latents(name: str, batch: int = 2, seed: int = 1) -> np.ndarray:
    kwargs, (h, w) = CONFIGS[name]
    f = 2 ** (len(kwargs["block_out_channels"]) - 1)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, h // f, w // f, kwargs["latent_channels"]), np.float32)


def torch_posterior(ref: TorchAutoencoderKL, x: np.ndarray):
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
    return nhwc(dist.mean), nhwc(dist.logvar)


# -- float32 parity ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_diffusers(name):
    _, params, fns = flax_vae(name)
    x = images(name)
    mean, logvar = fns["encode"]({"params": params}, x)
    ref_mean, ref_logvar = torch_posterior(torch_vae(name), x)
    e_mean, e_logvar = max_rel_err(mean, ref_mean), max_rel_err(logvar, ref_logvar)
    print(f"VAE[{name}] encode max rel err: mean {e_mean:.2e}, logvar {e_logvar:.2e}")
    assert e_mean <= TOL and e_logvar <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_diffusers(name):
    _, params, fns = flax_vae(name)
    z = latents(name)
    ours = fns["decode"]({"params": params}, z)
    with torch.no_grad():
        ref = nhwc(torch_vae(name).decode(nchw(z)).sample)
    err = max_rel_err(ours, ref)
    print(f"VAE[{name}] decode max rel err {err:.2e}")
    assert ours.shape == ref.shape
    assert err <= TOL


def test_call_matches_diffusers_forward():
    """`__call__` decodes the posterior mean (diffusers' default) or a sample."""
    name = "noattn"  # the smallest graph: two compilations of encoder + decoder
    _, params, fns = flax_vae(name)
    x = images(name)
    ours = fns["call"]({"params": params}, x)
    with torch.no_grad():
        ref = nhwc(torch_vae(name)(nchw(x)).sample)
    err = max_rel_err(ours, ref)
    print(f"VAE[{name}] forward max rel err {err:.2e}")
    assert err <= TOL

    key = jax.random.PRNGKey(7)
    sampled = fns["call"]({"params": params}, x, key, sample_posterior=True)
    mean, logvar = fns["encode"]({"params": params}, x)
    expected = fns["decode"]({"params": params}, sample_latents(mean, logvar, key))
    np.testing.assert_allclose(sampled, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(sampled) - np.asarray(ours)).max() > 1e-3  # noise matters
    model = flax_vae(name)[0]
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params}, x, sample_posterior=True)


def test_logvar_is_clipped_like_diffusers():
    """A log-variance far outside [-30, 20] comes out clamped, as diffusers'."""
    ref = copy.deepcopy(torch_vae("two"))
    lc = ref.config.latent_channels
    with torch.no_grad():
        ref.quant_conv.bias[lc] += 1e3  # logvar channel 0 -> +20
        ref.quant_conv.bias[lc + 1] -= 1e3  # logvar channel 1 -> -30
    _, params, fns = convert(ref)
    x = images("two")
    _, logvar = fns["encode"]({"params": params}, x)
    _, ref_logvar = torch_posterior(ref, x)
    logvar = np.asarray(logvar)
    assert (logvar[..., 0] == 20.0).all() and (logvar[..., 1] == -30.0).all()
    assert -30.0 < logvar[..., 2:].min() and logvar[..., 2:].max() < 20.0
    assert max_rel_err(logvar, ref_logvar) <= TOL


def test_norm_epsilon_matches_diffusers():
    """Activations with variance ~1e-6 reach the first GroupNorm, so the VAE's
    eps (1e-6, not the UNet's 1e-5) decides the output."""
    ref = copy.deepcopy(torch_vae("two"))
    with torch.no_grad():
        ref.encoder.conv_in.weight.mul_(1e-3)
        ref.encoder.conv_in.bias.mul_(1e-3)
    _, params, fns = convert(ref)
    x = images("two")
    mean, _ = fns["encode"]({"params": params}, x)
    ref_mean, _ = torch_posterior(ref, x)
    assert max_rel_err(mean, ref_mean) <= TOL


# -- weights and config --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weights_round_trip(name):
    """flax_to_torch(torch_to_flax(state)) is diffusers' exact state dict."""
    _, params, _ = flax_vae(name)
    ref_state = state_numpy(torch_vae(name))
    back = flax_to_torch(params)
    assert set(back) == set(ref_state)
    for k, v in ref_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_config_from_real_diffusers_config():
    ref = torch_vae("three")
    data = dict(ref.config)  # diffusers' FrozenDict, with its "_..." bookkeeping keys
    cfg = AutoencoderKLConfig.from_dict(data)
    assert cfg.block_out_channels == (16, 32, 32)
    assert cfg.down_block_types == ("DownEncoderBlock2D",) * 3
    assert cfg.latent_channels == 3 and cfg.layers_per_block == 2
    assert cfg.use_quant_conv is False and cfg.use_post_quant_conv is True
    assert cfg.scaling_factor == pytest.approx(0.18215)
    assert cfg.latent_factor == 4
    # JSON lists become tuples; to_dict round-trips and diffusers accepts it.
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    assert AutoencoderKLConfig.from_dict(as_json) == cfg
    out = cfg.to_dict()
    assert out["_class_name"] == "AutoencoderKL"
    assert isinstance(out["block_out_channels"], list)
    assert AutoencoderKLConfig.from_dict(out) == cfg
    rebuilt = TorchAutoencoderKL.from_config(out)
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize(
    "field, value",
    [
        ("not_a_vae_field", 1),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("block_out_channels", [32, 60]),  # 60 not divisible by 8 groups
    ],
)
def test_config_rejects_unsupported(field, value):
    data = {**dict(torch_vae("two").config), field: value}
    with pytest.raises(ValueError, match=field) as info:
        AutoencoderKLConfig.from_dict(data, source="vae/config.json")
    assert "vae/config.json" in str(info.value)


def test_example_inputs_build_every_parameter():
    cfg = AutoencoderKLConfig.from_dict(dict(torch_vae("three").config))
    (x,) = example_inputs(cfg, batch=2)
    assert x.shape == (2, 4, 4, 3)
    model = AutoencoderKL(cfg)
    # A real init, not eval_shape; the rbg key compiles ~5x faster than threefry.
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
    assert set(flax_to_torch(params)) == set(torch_vae("three").state_dict())
    out = jax.eval_shape(model.apply, {"params": params}, x)
    assert out.shape == (2, 4, 4, cfg.out_channels)


# -- sampling and reduced precision --------------------------------------------


def test_sample_latents_statistics():
    n = 200_000
    mu = np.array([-1.0, 0.0, 0.5, 3.0], np.float32)
    std = np.array([0.5, 1.0, 2.0, 0.1], np.float32)
    mean = np.broadcast_to(mu, (n, 4))
    logvar = np.broadcast_to(np.log(std**2), (n, 4))
    key = jax.random.PRNGKey(0)
    z = np.asarray(sample_latents(mean, logvar, key))
    assert z.shape == (n, 4) and z.dtype == np.float32
    # 6 standard errors: a wrong mean/scale (e.g. exp(logvar) for the std) fails.
    np.testing.assert_array_less(np.abs(z.mean(0) - mu), 6 * std / np.sqrt(n))
    np.testing.assert_array_less(np.abs(z.std(0) / std - 1.0), 6 / np.sqrt(2 * n))
    # Same key, same draw; another key, another draw.
    np.testing.assert_array_equal(z, sample_latents(mean, logvar, key))
    assert not np.allclose(z, sample_latents(mean, logvar, jax.random.PRNGKey(1)))
    # bfloat16 posteriors are sampled in float32.
    zb = sample_latents(jnp.asarray(mean[:8], jnp.bfloat16), logvar[:8], key)
    assert zb.dtype == jnp.float32


def test_bfloat16_compute_stays_close():
    name = "two"
    model, params, fns = flax_vae(name, jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # storage stays float32
    x, z = images(name), latents(name)
    mean, logvar = fns["encode"]({"params": params}, x)
    decoded = fns["decode"]({"params": params}, z)
    assert mean.dtype == jnp.bfloat16 and decoded.dtype == jnp.bfloat16
    ref_mean, ref_logvar = torch_posterior(torch_vae(name), x)
    with torch.no_grad():
        ref_dec = nhwc(torch_vae(name).decode(nchw(z)).sample)
    errs = dict(
        mean=max_rel_err(mean, ref_mean),
        logvar=max_rel_err(logvar, ref_logvar),
        decode=max_rel_err(decoded, ref_dec),
    )
    print("VAE[two] bfloat16 max rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(np.isfinite(v) and v < BF16_TOL for v in errs.values()), errs
