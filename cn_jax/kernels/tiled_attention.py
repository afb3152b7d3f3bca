"""`tiled_attention`: softmax attention a cache-sized tile at a time, for CPUs.

The scores are computed a tile of heads x query rows at a time, sized to stay
in a core's cache (a tile holds whole rows of keys: an exact softmax); the
backward pass recomputes the probabilities from the saved log-sum-exp instead
of keeping the score matrices (flash attention's memory rule), as a custom
VJP. Written in plain XLA ops for CPUs, where JAX's own path writes and
rereads every [batch, heads, queries, keys] tensor from memory; its loops
would serialise on a GPU. Measured against JAX's path and PyTorch's fused CPU
kernel in docs/benchmarks.md ("Attention on the CPU").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A tile's score block (batch x heads x query rows x keys, float32) stays under these
# many elements: 2 MiB in the forward pass, a core's L2 cache; 4 MiB in the backward,
# the fastest of the sizes tried (docs/benchmarks.md, "Attention on the CPU").
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
