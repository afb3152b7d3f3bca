"""Softmax attention with the kernel a model's `Kernels` names.

- "xla": JAX's `jax.nn.dot_product_attention` on its XLA path (score
  matrices in memory);
- "cudnn": cuDNN's fused flash attention (GPU, bfloat16/float16 only; anything
  else fails with JAX's error naming the constraint);
- "pallas": JAX's Pallas flash-attention kernel for TPUs
  (`pallas_attention`, this package; any shape, padded to its tiles);
- "tiled": `tiled_attention` (this package), cache-sized tiles with the
  probabilities recomputed in the backward pass, for CPUs;
- "auto": on a GPU cuDNN where it applies (bfloat16/float16, no float32
  upcast, head size a multiple of 8 and at most 128, even query and key
  lengths); on a TPU Pallas where its tiles fit without padding (query and key
  lengths multiples of 128, head size at most 128 or a multiple of 128);
  "tiled" on a CPU; XLA elsewhere: GPU float32, SD 1.5's 160-wide heads at the
  lowest resolution, and cross-attention over the 77 text tokens (cuDNN
  refused it for training on an H200: "Unsupported sequence length Q 4096,
  KV 77"; on a TPU its 4,096 x 77 scores are small, and padding the keys to
  128 would compute 66% more). `jax.nn.dot_product_attention` has no TPU
  implementation of its own (only "xla" and "cudnn"), hence Pallas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cn_jax.kernels import pallas_attention as pallas
from cn_jax.kernels.choice import Kernels
from cn_jax.kernels.tiled_attention import tiled_attention


def _cudnn_applies(q: jax.Array, k: jax.Array, platform: str) -> bool:
    head_dim = q.shape[-1]
    return (
        platform == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and q.shape[1] % 2 == 0
        and k.shape[1] % 2 == 0
    )


def _pallas_applies(q: jax.Array, k: jax.Array, platform: str) -> bool:
    return (
        platform == "tpu"
        and pallas.available()
        and pallas.fits(q.shape[1], k.shape[1], q.shape[-1])
    )


def resolve_attention(q: jax.Array, k: jax.Array, kernels: Kernels) -> str:
    """The kernel `dot_product_attention` runs for these inputs under `kernels`."""
    impl = kernels.attention
    if impl == "auto":
        platform = kernels.backend()
        if _cudnn_applies(q, k, platform):
            return "cudnn"
        if _pallas_applies(q, k, platform):
            return "pallas"
        return "tiled" if platform == "cpu" else "xla"
    return impl


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, kernels: Kernels
) -> jax.Array:
    """Softmax attention over [batch, tokens, heads, head_dim] with the chosen kernel."""
    impl = resolve_attention(q, k, kernels)
    if impl == "tiled":
        return tiled_attention(q, k, v, scale)
    if impl == "pallas":
        return pallas.pallas_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
