"""2-D convolutions (NHWC inputs, HWIO kernels) with a choice of kernel.

`Conv2D` is a drop-in for `flax.linen.Conv` as this project uses it (same
parameter names, shapes and initialisation, so weight conversion and
checkpoints are unchanged); `set_conv_implementation` (the config key
`model.convolution`) picks how it computes:

- "xla": `lax.conv_general_dilated`, XLA's own convolution;
- "im2col": the kernel's taps gathered into one matrix (`kh * kw` shifted
  views of the padded input, side by side) and one matrix product; a 1x1
  convolution is a plain matrix product. The gathered matrix is not kept for
  the backward pass (`jax.checkpoint`): the backward pass regathers it from
  the input, so activation memory is that of the XLA path;
- "auto" (default): "xla" on accelerators (cuDNN); on the CPU backend
  "im2col" for 1x1 convolutions and for convolutions with at most
  `IM2COL_MAX_ROWS` output pixels (batch x height x width), "xla" above.

Why: XLA's CPU convolutions are slow on small images with many channels, the
shape of SD 1.5's lowest resolutions: measured on 2 cores at 8x8 x 1,280
channels, batch 4, forward / input gradient / weight gradient took 74 / 103 /
82 ms through XLA against 40 / 42 / 62 ms as one matrix product; at 4x4,
49 / 78 / 46 against 19 / 15 / 35. At 32x32 x 320 the gather costs more
than it saves (47 / 47 / 59 against 70 / 51 / 67 ms). docs/benchmarks.md has
the table and the step-level effect.

Padding zeros are multiplied like any tap in the im2col product, so XLA's
FLOP count of an im2col program is higher than the convolution's; the
benchmarks count FLOPs on a twin traced with "xla" (`cn_jax.bench.train`).

The choice is read when a function is traced: set it before compiling.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLEMENTATIONS = ("auto", "xla", "im2col")
# Output pixels (batch x height x width) up to which "auto" takes im2col on the
# CPU: it won every direction at 256 and below for SD's 3x3 convolutions with
# 640 to 2,560 channels (scripts/bench_conv.py); at 1,024 it lost the forward
# pass with 640 channels, and the SD 1.5 step with 1,024 was no faster.
IM2COL_MAX_ROWS = 256
_implementation = "auto"

Padding = tuple[tuple[int, int], tuple[int, int]]


def set_conv_implementation(name: str) -> None:
    """Choose the convolution kernel for functions traced from now on (see module doc)."""
    global _implementation
    if name not in CONV_IMPLEMENTATIONS:
        raise ValueError(
            f"convolution implementation {name!r}: expected one of {CONV_IMPLEMENTATIONS}"
        )
    _implementation = name


def get_conv_implementation() -> str:
    return _implementation


@contextlib.contextmanager
def conv_implementation(name: str) -> Iterator[None]:
    """`set_conv_implementation` for the duration of a `with` block."""
    previous = _implementation
    set_conv_implementation(name)
    try:
        yield
    finally:
        set_conv_implementation(previous)


def may_leave_xla() -> bool:
    """Whether the current choice can route a convolution off XLA's on this backend."""
    return _implementation == "im2col" or (
        _implementation == "auto" and jax.default_backend() == "cpu"
    )


def _output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def resolve_conv_implementation(
    x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple[int, int], padding: Padding
) -> str:
    """The kernel `conv2d` runs for these shapes under the current choice."""
    impl = _implementation
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        kh, kw = kernel_shape[:2]
        ho = _output_size(x_shape[1], kh, strides[0], padding[0])
        wo = _output_size(x_shape[2], kw, strides[1], padding[1])
        pointwise = kh == kw == 1 and strides == (1, 1) and padding == ((0, 0), (0, 0))
        impl = "im2col" if pointwise or x_shape[0] * ho * wo <= IM2COL_MAX_ROWS else "xla"
    return impl


def conv2d(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel`, as PyTorch's conv2d."""
    if resolve_conv_implementation(x.shape, kernel.shape, strides, padding) == "im2col":
        return im2col_conv(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """`conv2d` as one matrix product over the gathered taps (see module doc)."""
    kh, kw, _, cout = kernel.shape
    if any(padding[0] + padding[1]):
        x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    sh, sw = strides
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    # Tap (dy, dx) of output pixel (i, j) reads x[sh * i + dy, sw * j + dx]; the
    # taps go side by side in the kernel's own (row, column, channel) order.
    taps = [
        x[:, dy : dy + sh * (ho - 1) + 1 : sh, dx : dx + sw * (wo - 1) + 1 : sw, :]
        for dy in range(kh)
        for dx in range(kw)
    ]
    cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return jnp.dot(cols, kernel.reshape(-1, cout))


class Conv2D(nn.Module):
    """`flax.linen.Conv` for NHWC images through `conv2d` (parameters `kernel`, `bias`)."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: Padding = ((0, 0), (0, 0))
    dtype: jnp.dtype | type = jnp.float32
    param_dtype: jnp.dtype | type = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, (self.strides, self.strides), self.padding)
        return y + bias
