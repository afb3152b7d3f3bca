"""Convolution kernels (cn_jax.kernels.convolution, cn_jax.kernels.im2col) and
`Conv2D` (cn_jax.models.layers): names checked, `Conv2D` is `flax.linen.Conv` (same
parameters, same outputs and gradients) under every kernel, "auto" picks im2col
only where it is faster on the CPU, and im2col keeps no gathered matrix for the
backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax.kernels import CONV_KERNELS, Kernels
from cn_jax.kernels import convolution as cv
from cn_jax.kernels.im2col import im2col_conv
from cn_jax.models.layers import conv, torch_like_kernel_init

CASES = [  # kernel, stride, padding: the SD convs (3x3, stride-2 3x3 both paddings, 1x1)
    (3, 1, 1),
    (3, 2, 1),
    (3, 2, ((0, 1), (0, 1))),
    (1, 1, 0),
]


def _close(got, want):
    """Within 2e-5 of the largest magnitude: summation order is all that differs."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match=r"'winograd'.*auto.*xla.*im2col"):
        Kernels(convolution="winograd")


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_conv2d_is_flax_conv_under_every_implementation(kernel, stride, padding):
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 5))  # odd height: stride-2 edges

    def ours_with(impl):
        kernels = Kernels(convolution=impl)
        f32 = jnp.float32
        return conv(8, kernel, f32, f32, "c", stride=stride, padding=padding, kernels=kernels)

    ours = ours_with("auto")
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    flax_conv = nn.Conv(
        8, (kernel, kernel), strides=(stride, stride), padding=pad,
        kernel_init=torch_like_kernel_init,
    )  # fmt: skip
    params = flax_conv.init(jax.random.key(0), x)
    # Same names, shapes and initial values: checkpoints and converters see no change.
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(mine) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Random values in every parameter, the bias included.
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(3), a.shape), params)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    want = (flax_conv.apply(params, x), jax.grad(loss(flax_conv), argnums=(0, 1))(params, x))
    for impl in CONV_KERNELS:
        m = ours_with(impl)
        got = (m.apply(params, x), jax.grad(loss(m), argnums=(0, 1))(params, x))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape == w.shape
            _close(g, w)


def test_bfloat16_compute_through_im2col():
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))

    def m(impl):
        return conv(6, 3, jnp.bfloat16, jnp.float32, "c", kernels=Kernels(convolution=impl))

    params = m("xla").init(jax.random.key(0), x)
    ref = m("xla").apply(params, x)
    got = m("im2col").apply(params, x)
    assert got.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=3e-2, atol=3e-2)  # fmt: skip


def test_auto_takes_im2col_for_pointwise_and_small_images_on_cpu():
    same, none = ((1, 1), (1, 1)), ((0, 0), (0, 0))
    k3, k1 = (3, 3, 1280, 1280), (1, 1, 320, 320)
    auto = Kernels()
    small = cv.resolve_convolution((4, 8, 8, 1280), k3, (1, 1), same, auto)
    strided = cv.resolve_convolution((4, 16, 16, 640), k3, (2, 2), same, auto)
    large = cv.resolve_convolution((4, 32, 32, 320), k3, (1, 1), same, auto)
    pointwise = cv.resolve_convolution((4, 64, 64, 320), k1, (1, 1), none, auto)
    if jax.default_backend() == "cpu":
        # 4 x 8 x 8 = 256 output pixels: at the limit; stride 2 counts the output.
        assert cv.IM2COL_MAX_ROWS == 256
        assert (small, strided, large, pointwise) == ("im2col", "im2col", "xla", "im2col")
    else:
        assert {small, strided, large, pointwise} == {"xla"}
    for impl in ("xla", "im2col"):
        chosen = cv.resolve_convolution((4, 32, 32, 320), k3, (1, 1), same, Kernels("auto", impl))
        assert chosen == impl


def test_im2col_keeps_only_its_inputs_for_the_backward_pass():
    """The gathered (..., 9 x channels) matrix is rebuilt in the backward pass, so
    activation memory is what XLA's convolution keeps."""
    x = jnp.ones((2, 8, 8, 6))
    k = jnp.ones((3, 3, 6, 4))

    def saved(fn):  # the residuals a vjp closes over
        _, vjp = jax.vjp(lambda x, k: fn(x, k, (1, 1), ((1, 1), (1, 1))), x, k)
        return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(vjp))

    assert saved(im2col_conv) == [(2, 8, 8, 6), (3, 3, 6, 4)]
    # Without the checkpoint the product would keep the gathered matrix.
    assert (2, 8, 8, 54) in saved(im2col_conv.__wrapped__)


def test_the_choice_decides_the_program():
    x = jnp.ones((1, 4, 4, 3))
    k = jnp.ones((3, 3, 3, 2))
    same = ((1, 1), (1, 1))

    def hlo(impl):
        kernels = Kernels(convolution=impl)
        return jax.jit(lambda x, k: cv.conv2d(x, k, (1, 1), same, kernels)).lower(x, k).as_text()

    assert "convolution" in hlo("xla")
    assert "convolution" not in hlo("im2col") and "dot_general" in hlo("im2col")
