"""Spatial transformer: diffusers `Transformer2DModel` / `BasicTransformerBlock`
/ `Attention` / GEGLU `FeedForward`, NHWC in and out.

Attention goes through `jax.nn.dot_product_attention`. Its own default is the
plain XLA path (score matrices in memory); `set_attention_implementation` (the
config key `model.attention`) picks cuDNN's fused flash attention instead:

- "xla": always the XLA path;
- "cudnn": always cuDNN (GPU, bfloat16/float16 only; anything else fails with
  JAX's error naming the constraint);
- "auto" (default): cuDNN where it applies (GPU backend, bfloat16/float16, no
  float32 upcast, head size a multiple of 8 and at most 128, even query and
  key lengths), XLA elsewhere: CPU, float32, SD 1.5's 160-wide heads at the
  lowest resolution, and cross-attention over the 77 text tokens (jax 0.11.2
  on an H200 refused it for training: "Unsupported sequence length Q 4096,
  KV 77").

The choice is read when a function is traced: set it before compiling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.models.layers import Dtype, group_norm, torch_like_kernel_init

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_implementation = "auto"


def set_attention_implementation(name: str) -> None:
    """Choose the attention kernel for functions traced from now on (see module doc)."""
    global _implementation
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {name!r}: expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    _implementation = name


def get_attention_implementation() -> str:
    return _implementation


@contextlib.contextmanager
def attention_implementation(name: str) -> Iterator[None]:
    """`set_attention_implementation` for the duration of a `with` block."""
    previous = _implementation
    set_attention_implementation(name)
    try:
        yield
    finally:
        set_attention_implementation(previous)


def _cudnn_applies(q: jax.Array, k: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and q.shape[1] % 2 == 0
        and k.shape[1] % 2 == 0
    )


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention over [batch, tokens, heads, head_dim] with the chosen kernel."""
    impl = _implementation
    if impl == "auto":
        impl = "cudnn" if _cudnn_applies(q, k) else "xla"
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def _dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str, bias: bool = True):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=torch_like_kernel_init,
        name=name,
    )


def _layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


class Attention(nn.Module):
    """Multi-head (self or cross) attention: to_q/to_k/to_v (no bias), to_out.0."""

    heads: int
    head_dim: int
    upcast: bool = False  # diffusers' upcast_attention: scores and softmax in float32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        context = x if context is None else context
        inner = self.heads * self.head_dim
        b, n, _ = x.shape
        q = _dense(inner, d, p, "to_q", bias=False)(x)
        k = _dense(inner, d, p, "to_k", bias=False)(context)
        v = _dense(inner, d, p, "to_v", bias=False)(context)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim) for t in (q, k, v))
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = out.reshape(b, n, inner).astype(d)
        return _dense(x.shape[-1], d, p, "to_out_0")(out)


class GEGLU(nn.Module):
    """`proj` to twice the width, value * gelu(gate) (exact erf gelu, as torch)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(2 * self.features, self.dtype, self.param_dtype, "proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`ff.net.0` (GEGLU to 4x width) then `ff.net.2` back to the input width."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, self.dtype, self.param_dtype, name="net_0")(x)
        return _dense(dim, self.dtype, self.param_dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm + residual."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        attn = dict(
            heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention, dtype=d,
            param_dtype=p,
        )  # fmt: skip
        h = _layer_norm(d, p, "norm1")(x)
        x = x + Attention(**attn, name="attn1")(h, context if self.only_cross_attention else None)
        h = _layer_norm(d, p, "norm2")(x)
        x = x + Attention(**attn, name="attn2")(h, context)
        h = _layer_norm(d, p, "norm3")(x)
        return x + FeedForward(dtype=d, param_dtype=p, name="ff")(h)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> N transformer blocks over H*W tokens -> proj_out, + input.

    `use_linear_projection` selects Linear projections applied after flattening
    (SD 2.x) instead of 1x1 convolutions applied before (SD 1.x).
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.head_dim
        residual = x
        h = group_norm(self.groups, 1e-6, d, p, "norm")(x)
        if self.use_linear_projection:
            h = _dense(inner, d, p, "proj_in")(h.reshape(b, hgt * wid, ch))
        else:
            h = nn.Conv(
                inner, (1, 1), dtype=d, param_dtype=p, kernel_init=torch_like_kernel_init,
                name="proj_in",
            )(h).reshape(b, hgt * wid, inner)  # fmt: skip
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads,
                self.head_dim,
                self.only_cross_attention,
                self.upcast_attention,
                d,
                p,
                name=f"transformer_blocks_{i}",
            )(h, context)
        if self.use_linear_projection:
            h = _dense(ch, d, p, "proj_out")(h).reshape(b, hgt, wid, ch)
        else:
            h = nn.Conv(
                ch, (1, 1), dtype=d, param_dtype=p, kernel_init=torch_like_kernel_init,
                name="proj_out",
            )(h.reshape(b, hgt, wid, inner))  # fmt: skip
        return h + residual
