"""Spatial transformer: diffusers `Transformer2DModel` / `BasicTransformerBlock`
/ `Attention` / GEGLU `FeedForward`, NHWC in and out.

Attention goes through `jax.nn.dot_product_attention`. Its own default is the
plain XLA path (score matrices in memory); `set_attention_implementation` (the
config key `model.attention`) picks cuDNN's fused flash attention instead:

- "xla": always JAX's XLA path (`jax.nn.dot_product_attention`);
- "cudnn": always cuDNN (GPU, bfloat16/float16 only; anything else fails with
  JAX's error naming the constraint);
- "tiled": our own kernel in plain XLA ops (`tiled_attention`): the scores
  are computed a tile of heads x query rows at a time, sized to stay in a
  core's cache (a tile holds whole rows of keys: an exact softmax); the backward
  pass recomputes the probabilities from the saved log-sum-exp instead of
  keeping the score matrices (flash attention's memory rule). Built for CPUs,
  where JAX's path writes and rereads every [batch, heads, queries, keys]
  tensor from memory (4.3x slower than PyTorch's fused CPU kernel, forward +
  backward, at SD 1.5's 1,024-token self-attention; see docs/benchmarks.md);
  its loops would serialise on a GPU;
- "auto" (default): cuDNN where it applies (GPU backend, bfloat16/float16, no
  float32 upcast, head size a multiple of 8 and at most 128, even query and
  key lengths), "tiled" on the CPU backend, XLA elsewhere: GPU float32, SD
  1.5's 160-wide heads at the lowest resolution, and cross-attention over the
  77 text tokens (jax 0.11.2 on an H200 refused it for training: "Unsupported
  sequence length Q 4096, KV 77").

The choice is read when a function is traced: set it before compiling.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.models.layers import Dtype, conv, group_norm, torch_like_kernel_init

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tiled")
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


def resolve_implementation(q: jax.Array, k: jax.Array) -> str:
    """The kernel `dot_product_attention` runs for these inputs under the current choice."""
    impl = _implementation
    if impl == "auto":
        if _cudnn_applies(q, k):
            impl = "cudnn"
        else:
            impl = "tiled" if jax.default_backend() == "cpu" else "xla"
    return impl


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention over [batch, tokens, heads, head_dim] with the chosen kernel."""
    impl = resolve_implementation(q, k)
    if impl == "tiled":
        return tiled_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


# -- "tiled": scores a cache-sized tile at a time, probabilities recomputed for the backward

# A tile's score block (batch x heads x query rows x keys, float32) stays under these
# many elements: 2 MiB in the forward pass (a core's L2 on the machine we measured),
# 4 MiB in the backward (2 / 4 / 16 MiB tiles took 299 / 288 / 385 ms forward +
# backward at SD 1.5's 1,024-token self-attention, batch 4; docs/benchmarks.md).
FORWARD_TILE = 1 << 19
BACKWARD_TILE = 1 << 20


def _divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is at most cap (at least 1)."""
    cap = max(1, min(n, cap))
    return next(c for c in range(cap, 0, -1) if n % c == 0)


def _tiling(b: int, nq: int, h: int, nk: int, budget: int) -> tuple[int, int]:
    """(heads per tile, query rows per tile) for a score tile under `budget` elements."""
    rows = _divisor_at_most(nq, budget // (b * nk))
    heads = _divisor_at_most(h, budget // (b * rows * nk))
    return heads, rows


def _grouped(x: jax.Array, heads: int) -> jax.Array:
    """[b, n, h, d] -> [h // heads, heads, b, n, d]: head groups first, the batch
    inside every tile (the loops run over heads and rows, never over the batch,
    which may be sharded across devices)."""
    b, n, h, d = x.shape
    return x.transpose(2, 0, 1, 3).reshape(h // heads, heads, b, n, d)


def _ungrouped(x: jax.Array) -> jax.Array:
    """Inverse of `_grouped`."""
    g, heads, b, n, d = x.shape
    return x.reshape(g * heads, b, n, d).transpose(1, 2, 0, 3)


def _split_rows(x: jax.Array, rows: int) -> jax.Array:
    """[heads, b, n, ...] -> [n // rows, heads, b, rows, ...]: query-row chunks first."""
    heads, b, n, *rest = x.shape
    return jnp.moveaxis(x.reshape(heads, b, n // rows, rows, *rest), 2, 0)


def _join_rows(y: jax.Array) -> jax.Array:
    """Inverse of `_split_rows`."""
    y = jnp.moveaxis(y, 0, 2)
    return y.reshape(*y.shape[:2], y.shape[2] * y.shape[3], *y.shape[4:])


def _over_rows(fn, rows: int, *xs: jax.Array):
    """`fn` on query-row chunks of `xs` ([heads, b, n, ...] each), outputs re-joined."""
    if rows == xs[0].shape[2]:
        return fn(*xs)
    out = jax.lax.map(lambda a: fn(*a), tuple(_split_rows(x, rows) for x in xs))
    return jax.tree.map(_join_rows, out)


def _over_groups(fn, *xs: jax.Array):
    """`fn` on each head group (leading axis) of `xs`; no loop for a single group."""
    if xs[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(*(x[0] for x in xs)))
    return jax.lax.map(lambda a: fn(*a), xs)


def _scores(qc: jax.Array, kt: jax.Array, scale: float) -> jax.Array:
    """A tile's scaled scores in float32: the forward's softmax input, and the backward's
    to recompute the probabilities from the saved log-sum-exp (they must match)."""
    return jnp.matmul(qc, kt, preferred_element_type=jnp.float32) * scale


def _tiled_forward(q, k, v, scale):
    """(out [b, nq, h, d], log-sum-exp [b, nq, h, 1] in float32)."""
    b, nq, h, _ = q.shape
    heads, rows = _tiling(b, nq, h, k.shape[1], FORWARD_TILE)
    f32 = jnp.float32

    def group(qg, kg, vg):  # [heads, b, n, d]
        kt = kg.swapaxes(-1, -2)

        def chunk(qc):
            s = _scores(qc, kt, scale)
            m = jnp.max(s, axis=-1, keepdims=True)
            p = jnp.exp(s - m)
            total = jnp.sum(p, axis=-1, keepdims=True)
            o = jnp.matmul(p.astype(vg.dtype), vg, preferred_element_type=f32) / total
            return o.astype(q.dtype), m + jnp.log(total)

        return _over_rows(chunk, rows, qg)

    out, lse = _over_groups(group, _grouped(q, heads), _grouped(k, heads), _grouped(v, heads))
    return _ungrouped(out), _ungrouped(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention over [batch, tokens, heads, head_dim], tile by tile ("tiled").

    Same result as `jax.nn.dot_product_attention` (float32 scores and softmax,
    matmul inputs in the input dtype); saves q, k, v, the output and one
    log-sum-exp per query row for the backward pass, never the probabilities.
    """
    return _tiled_forward(q, k, v, scale)[0]


def _tiled_fwd(q, k, v, scale):
    out, lse = _tiled_forward(q, k, v, scale)
    return out, (q, k, v, out, lse)


def _tiled_bwd(scale, res, dout):
    q, k, v, out, lse = res
    b, nq, h, _ = q.shape
    f32 = jnp.float32
    # delta = rowsum(dout * out): the softmax backward's per-row correction.
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    heads, rows = _tiling(b, nq, h, k.shape[1], BACKWARD_TILE)

    def group(qg, kg, vg, dog, lseg, dg):  # [heads, b, n, d] (lse, delta: [..., 1])
        kt, vt = kg.swapaxes(-1, -2), vg.swapaxes(-1, -2)

        def chunk(qc, doc, lsec, dc):
            p = jnp.exp(_scores(qc, kt, scale) - lsec)
            dv = jnp.matmul(p.swapaxes(-1, -2).astype(vg.dtype), doc, preferred_element_type=f32)
            dp = jnp.matmul(doc, vt, preferred_element_type=f32)
            ds = (p * (dp - dc) * scale).astype(q.dtype)
            dq = jnp.matmul(ds, kg, preferred_element_type=f32)
            dk = jnp.matmul(ds.swapaxes(-1, -2), qc, preferred_element_type=f32)
            return dq.astype(q.dtype), dk, dv

        if rows == qg.shape[2]:
            dq, dk, dv = chunk(qg, dog, lseg, dg)
        else:  # dk and dv sum over the row chunks: a scan carries them

            def body(carry, xs):
                dq, dk, dv = chunk(*xs)
                return (carry[0] + dk, carry[1] + dv), dq

            zeros = jnp.zeros(kg.shape, f32)
            xs = tuple(_split_rows(x, rows) for x in (qg, dog, lseg, dg))
            (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
            dq = _join_rows(dq)
        return dq, dk.astype(k.dtype), dv.astype(v.dtype)

    grouped = (_grouped(x, heads) for x in (q, k, v, dout, lse, delta))
    dq, dk, dv = _over_groups(group, *grouped)
    return _ungrouped(dq), _ungrouped(dk), _ungrouped(dv)


tiled_attention.defvjp(_tiled_fwd, _tiled_bwd)


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
            h = conv(inner, 1, d, p, "proj_in", padding=0)(h).reshape(b, hgt * wid, inner)
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
            h = conv(ch, 1, d, p, "proj_out", padding=0)(h.reshape(b, hgt, wid, inner))
        return h + residual
