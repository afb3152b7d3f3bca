"""`im2col_conv`: a 2-D convolution as one matrix product over the gathered taps.

The kernel's taps are gathered into one matrix (`kh * kw` shifted views of
the padded input, side by side) and multiplied once; a 1x1 convolution is a
plain matrix product. The gathered matrix is not kept for the backward pass
(`jax.checkpoint`): the backward pass regathers it from the input, so
activation memory is that of XLA's convolution.

Why: XLA's CPU convolutions are slow on small images with many channels, the
shape of SD 1.5's lowest resolutions, where the same arithmetic as one matrix
product runs at up to 5x the speed; on larger images the gather costs more
than it saves (docs/benchmarks.md, "Convolutions on the CPU: im2col").
Padding zeros are multiplied like any tap, so XLA's FLOP count of an im2col
program is higher than the convolution's (benchmarks count a twin traced with
XLA's convolution).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel` as one matrix product."""
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
