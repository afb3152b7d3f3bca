"""Spatial transformer: diffusers `Transformer2DModel` / `BasicTransformerBlock`
/ `Attention` / GEGLU `FeedForward`, NHWC in and out.

Attention itself is `cn_jax.kernels.dot_product_attention`, computed by the
kernel the module's `kernels` field names (JAX's XLA path, cuDNN flash
attention, or the tiled CPU kernel; see `cn_jax.kernels`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.kernels import DEFAULT, Kernels, dot_product_attention
from cn_jax.models.layers import Dtype, conv, group_norm, torch_like_kernel_init


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
    kernels: Kernels = DEFAULT

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
        out = dot_product_attention(q, k, v, self.head_dim**-0.5, self.kernels)
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
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        attn = dict(
            heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention, dtype=d,
            param_dtype=p, kernels=self.kernels,
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
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d, p, k = self.dtype, self.param_dtype, self.kernels
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.head_dim
        residual = x
        h = group_norm(self.groups, 1e-6, d, p, "norm")(x)
        if self.use_linear_projection:
            h = _dense(inner, d, p, "proj_in")(h.reshape(b, hgt * wid, ch))
        else:
            h = conv(inner, 1, d, p, "proj_in", padding=0, kernels=k)(h).reshape(
                b, hgt * wid, inner
            )
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads,
                self.head_dim,
                self.only_cross_attention,
                self.upcast_attention,
                d,
                p,
                k,
                name=f"transformer_blocks_{i}",
            )(h, context)
        if self.use_linear_projection:
            h = _dense(ch, d, p, "proj_out")(h).reshape(b, hgt, wid, ch)
        else:
            h = conv(ch, 1, d, p, "proj_out", padding=0, kernels=k)(h.reshape(b, hgt, wid, inner))
        return h + residual
