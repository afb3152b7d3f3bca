"""Compute kernels, and the choice of which one a model runs.

`models/` describes networks; this package holds how two of their operations
are computed, chosen per model by a `Kernels` value that every module carries
(`UNet(config, kernels=...)`, `module.clone(kernels=...)`):

- `attention.py`: `dot_product_attention`, dispatching to JAX's XLA path,
  cuDNN's fused flash attention (GPU), JAX's Pallas flash attention
  (`pallas_attention.py`, TPU) or `tiled_attention.py`, our CPU kernel;
- `convolution.py`: `conv2d`, dispatching to XLA's convolution or `im2col.py`,
  one matrix product over the gathered taps (CPU, small images).

The choice is part of the module, so it is part of every jit cache key that
holds the module: two models with different kernels live in one process, each
compiled with its own. Nothing here is process state.
"""

from cn_jax.kernels.attention import dot_product_attention, resolve_attention
from cn_jax.kernels.choice import ATTENTION_KERNELS, CONV_KERNELS, DEFAULT, Kernels
from cn_jax.kernels.convolution import conv2d, resolve_convolution

__all__ = [
    "ATTENTION_KERNELS",
    "CONV_KERNELS",
    "DEFAULT",
    "Kernels",
    "conv2d",
    "dot_product_attention",
    "resolve_attention",
    "resolve_convolution",
]
