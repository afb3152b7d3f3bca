"""Flash attention on TPUs: JAX's Pallas kernel (`jax.experimental.pallas.ops.tpu`).

Scores are computed tile by tile in the TPU's vector memory with an online
softmax, so no `[batch, heads, queries, keys]` score matrix is stored (at
512 px SD's first self-attention would hold 4,096 x 4,096 per head); the
kernel has its own backward pass (custom VJP, probabilities recomputed from
the saved row maximum and sum).

The kernel's layout is `[batch, heads, tokens, head_dim]` (ours is
`[batch, tokens, heads, head_dim]`: transposed in and out) and its tiles
constrain the shapes: the key length must be a multiple of its key tile (a
multiple of 128), and a head size above 128 a multiple of 128. Any other shape
is padded here: queries and keys to a multiple of 128 tokens, the padded keys
masked out with the kernel's segment ids (query segment 1, padded key segment
0), and a wide head with zero columns (zeros add nothing to `q . k`; the zero
columns of `v` give zero outputs, cut off). `fits` says when no padding is
needed, which is where "auto" takes this kernel (`cn_jax.kernels.attention`).

Tile sizes are the largest of 512, 256, 128 tokens dividing each padded
length: fewer grid steps than the kernel's 128 default, and a 512 x 512
float32 score tile is 1 MiB, far inside the vector memory. Not tuned on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

TILE = 128  # the kernel's lane width: key tiles and wide heads come in multiples of it
TILE_CHOICES = (512, 256, 128)


@functools.cache
def available() -> bool:
    """Whether this JAX ships the Pallas TPU flash-attention kernel."""
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def fits(q_len: int, kv_len: int, head_dim: int) -> bool:
    """Whether the kernel takes these shapes without padding."""
    return q_len % TILE == 0 and kv_len % TILE == 0 and (head_dim <= TILE or head_dim % TILE == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(n: int) -> int:
    return next(t for t in TILE_CHOICES if n % t == 0)


def block_sizes(q_len: int, kv_len: int):
    """The kernel's tile sizes for padded lengths (multiples of 128)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes

    bq, bk = _tile(q_len), _tile(kv_len)
    return BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )  # fmt: skip


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention over [batch, tokens, heads, head_dim] with the Pallas TPU kernel.

    Lowers for TPUs only (a Mosaic custom call); on a CPU it runs in Pallas's
    TPU interpret mode (`jax.experimental.pallas.tpu.force_tpu_interpret_mode`),
    which the tests use to check it against XLA's attention.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad = _round_up(q_len, TILE), _round_up(kv_len, TILE)
    d_pad = head_dim if head_dim <= TILE else _round_up(head_dim, TILE)

    def layout(x, length):  # [b, t, h, d] -> [b, h, t_padded, d_padded]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
        return x.transpose(0, 2, 1, 3)

    segment_ids = None
    if kv_pad != kv_len:
        kv_ids = (jnp.arange(kv_pad) < kv_len).astype(jnp.int32)
        segment_ids = fa.SegmentIds(
            q=jnp.ones((b, q_pad), jnp.int32), kv=jnp.broadcast_to(kv_ids, (b, kv_pad))
        )
    out = fa.flash_attention(
        layout(q, q_pad), layout(k, kv_pad), layout(v, kv_pad), segment_ids=segment_ids,
        sm_scale=float(scale), block_sizes=block_sizes(q_pad, kv_pad),
    )  # fmt: skip
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]
