"""The kernel choice as a model field (cn_jax.kernels.Kernels): settled per platform,
passed to every attention and convolution of the UNet, ControlNet and VAE, and part
of every compiled program's identity, so two models with different kernels live in
one process, each compiled with its own."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax import ControlNet, ControlNetConfig, Kernels, UNet, UNetConfig
from cn_jax.models import unet as unet_mod
from cn_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from cn_jax.models.vae import example_inputs as vae_inputs

UCFG = UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=4,
)
CCFG = ControlNetConfig.from_unet(UCFG, conditioning_embedding_out_channels=(8, 16))
VCFG = AutoencoderKLConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=4,
    latent_channels=4,
)
XLA, OURS = Kernels("xla", "xla"), Kernels("tiled", "im2col")


def test_for_platform_settles_what_the_platform_decides():
    assert Kernels().for_platform("cpu") == Kernels("tiled", "auto", "cpu")
    assert Kernels().for_platform("gpu") == Kernels("auto", "xla", "gpu")
    # On a TPU "auto" stays: Pallas flash attention where its tiles fit (per operation).
    assert Kernels().for_platform("tpu") == Kernels("auto", "xla", "tpu")
    assert Kernels("pallas").for_platform("tpu") == Kernels("pallas", "xla", "tpu")
    assert Kernels("xla", "im2col").for_platform("gpu") == Kernels("xla", "im2col", "gpu")
    assert Kernels().for_platform().platform == jax.default_backend()
    with pytest.raises(ValueError, match="'flash'"):
        Kernels(attention="flash")


def _primitives(jaxpr, counts=None) -> dict[str, int]:
    """How many times each primitive occurs in `jaxpr`, sub-jaxprs included."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, counts)
    return counts


def _model_inputs(name):
    x = jnp.zeros((1, 8, 8, 4))
    t, ctx = jnp.zeros((1,)), jnp.zeros((1, 3, 16))
    if name == "unet":
        return (x, t, ctx)
    if name == "controlnet":
        f = CCFG.latent_factor
        return (x, t, ctx, jnp.zeros((1, 8 * f, 8 * f, 3)))
    return vae_inputs(VCFG)


def _model(name, kernels):
    if name == "unet":
        return UNet(UCFG, kernels=kernels)
    if name == "controlnet":
        return ControlNet(CCFG, kernels=kernels)
    return AutoencoderKL(VCFG, kernels=kernels)


@pytest.mark.parametrize("name", ["unet", "controlnet", "vae"])
def test_every_operation_runs_the_models_kernels(name):
    """The choice reaches every convolution and every attention of the tree: with
    XLA's kernels each Conv2D is one `conv_general_dilated` and no attention is
    tiled; with ours no XLA convolution is left and every transformer attention is
    the tiled kernel (a custom VJP)."""
    inputs = _model_inputs(name)
    params = jax.eval_shape(_model(name, XLA).init, jax.random.key(0), *inputs)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    convs = sum(1 for p, v in leaves if p[-1].key == "kernel" and v.ndim == 4)
    attentions = sum(1 for p, _ in leaves if p[-2].key == "to_q" and p[-1].key == "kernel")
    if name == "vae":
        attentions = 0  # the VAE's one-head mid-block attention is XLA's in every case
    counted = {}
    for kernels in (XLA, OURS):
        model = _model(name, kernels)
        jaxpr = jax.make_jaxpr(lambda p, *a, m=model: m.apply(p, *a))(params, *inputs)
        counted[kernels] = _primitives(jaxpr.jaxpr)
    assert convs > 5 and (attentions > 0 or name == "vae")  # the check can fail
    assert counted[XLA].get("conv_general_dilated", 0) == convs
    assert counted[XLA].get("custom_vjp_call", 0) == 0
    assert counted[OURS].get("conv_general_dilated", 0) == 0
    assert counted[OURS].get("custom_vjp_call", 0) == attentions


def test_two_models_with_different_kernels_compile_their_own_programs():
    """One jitted function, two UNets that differ only in their kernels, in one
    process: each call compiles its model's own program (no reset between them, no
    process state), and both compute the same function."""
    inputs = _model_inputs("unet")
    xla_unet, our_unet = UNet(UCFG, kernels=XLA), UNet(UCFG, kernels=OURS)
    params = xla_unet.init(jax.random.key(0), *inputs)
    params = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params
    )
    x = jax.random.normal(jax.random.key(2), inputs[0].shape)
    ctx = jax.random.normal(jax.random.key(3), inputs[2].shape)
    args = (params, x, jnp.array([500.0]), ctx)

    @jax.jit
    def denoise(model, params, x, t, ctx):
        return model.apply(params, x, t, ctx)

    denoise = jax.jit(denoise.__wrapped__, static_argnums=0)
    hlo = {k: denoise.lower(m, *args).as_text() for k, m in (("xla", xla_unet), ("ours", our_unet))}
    assert "convolution" in hlo["xla"] and "convolution" not in hlo["ours"]
    # Interleaved calls: each model keeps its own compiled program.
    out = [denoise(m, *args) for m in (xla_unet, our_unet, xla_unet, our_unet)]
    assert denoise._cache_size() == 2
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[2]))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(out[3]))
    err = float(jnp.max(jnp.abs(out[1] - out[0])) / jnp.max(jnp.abs(out[0])))
    assert err < 1e-5, err


def test_make_encoder_needs_the_kernels():
    """The encoder half shared by UNet and ControlNet takes the kernels explicitly:
    a caller cannot silently build it with the default."""
    with pytest.raises(TypeError, match="kernels"):
        unet_mod.make_encoder(UCFG, jnp.float32, jnp.float32, False)


def test_random_init_lowers_on_the_host_whatever_the_models_kernels():
    """Issue 22: random weights are initialised by a program compiled for the host CPU
    (weights.sd._init), also on a GPU box, where a bfloat16 model's kernels are cuDNN's.
    cuDNN attention has no CPU lowering: the init runs with XLA's kernels (the values
    do not depend on them)."""
    from cn_jax.weights.sd import _init

    inputs = _model_inputs("unet")
    cudnn = UNet(UCFG, dtype=jnp.bfloat16, kernels=Kernels("cudnn", "xla", "gpu"))
    with pytest.raises(Exception, match="(?i)cudnn|gpu|platform"):  # the check can fail
        jax.jit(cudnn.init)(jax.random.key(0), *inputs)
    params = _init(cudnn, jax.random.key(0), inputs)
    want = UNet(UCFG, dtype=jnp.bfloat16).init(jax.random.key(0), *inputs)["params"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
