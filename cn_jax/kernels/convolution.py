"""2-D convolution (NHWC input, HWIO kernel) with the kernel a model's `Kernels` names.

- "xla": `lax.conv_general_dilated`, XLA's own convolution (cuDNN on GPUs);
- "im2col": `im2col_conv` (this package), one matrix product over the
  gathered taps;
- "auto": "xla" on accelerators; on a CPU "im2col" for 1x1 convolutions and
  for convolutions with at most `IM2COL_MAX_ROWS` output pixels (batch x
  height x width), "xla" above.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from cn_jax.kernels.choice import Kernels
from cn_jax.kernels.im2col import Padding, im2col_conv

# Output pixels (batch x height x width) up to which "auto" takes im2col on a CPU:
# where it won every direction for SD's 3x3 convolutions with 640 to 2,560 channels
# (scripts/bench_conv.py; docs/benchmarks.md, "Convolutions on the CPU: im2col").
IM2COL_MAX_ROWS = 256


def _output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def resolve_convolution(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding,
    kernels: Kernels,
) -> str:
    """The kernel `conv2d` runs for these shapes under `kernels`."""
    impl = kernels.convolution
    if impl == "auto":
        if kernels.backend() != "cpu":
            return "xla"
        kh, kw = kernel_shape[:2]
        ho = _output_size(x_shape[1], kh, strides[0], padding[0])
        wo = _output_size(x_shape[2], kw, strides[1], padding[1])
        pointwise = kh == kw == 1 and strides == (1, 1) and padding == ((0, 0), (0, 0))
        impl = "im2col" if pointwise or x_shape[0] * ho * wo <= IM2COL_MAX_ROWS else "xla"
    return impl


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    kernels: Kernels,
) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel`, as PyTorch's conv2d."""
    if resolve_convolution(x.shape, kernel.shape, strides, padding, kernels) == "im2col":
        return im2col_conv(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
