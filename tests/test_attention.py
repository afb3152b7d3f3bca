"""Attention kernels (cn_jax.kernels.attention, cn_jax.kernels.tiled_attention): names
checked, "auto" is the tiled kernel on the CPU, the tiled kernel matches JAX's XLA path
(outputs and gradients, every tiling). The cuDNN side is checked against XLA on a GPU
in tests/test_gpu.py; the choice as a model field in tests/test_kernels.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax.kernels import Kernels
from cn_jax.kernels import attention as attn
from cn_jax.kernels import tiled_attention as tiled


def _qkv(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = [(2, 64, 4, 16), (2, 7, 4, 16), (2, 7, 4, 16)]
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype) for s in shapes]


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match=r"'flash'.*auto.*xla.*cudnn.*tiled"):
        Kernels(attention="flash")


def test_auto_off_gpu_is_tiled_and_matches_softmax():
    q, k, v = _qkv()
    auto = attn.dot_product_attention(q, k, v, 0.25, Kernels())
    chosen = attn.resolve_attention(q, k, Kernels())
    xla = attn.dot_product_attention(q, k, v, 0.25, Kernels(attention="xla"))
    assert attn.resolve_attention(q, k, Kernels(attention="xla")) == "xla"
    assert chosen == ("tiled" if jax.default_backend() == "cpu" else "xla")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    for got in (auto, xla):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if jax.default_backend() != "gpu":
        q16 = q.astype(jnp.bfloat16)
        # The CPU never gets cuDNN, even in bfloat16.
        assert not attn._cudnn_applies(q16, q16, jax.default_backend())


def test_tiling_divides_and_stays_in_budget():
    assert tiled._divisor_at_most(1024, 300) == 256
    assert tiled._divisor_at_most(7, 6) == 1  # a prime row count: one row a tile
    assert tiled._divisor_at_most(64, 0) == 1
    # SD 1.5 self-attention, 256 px, batch 4: 1,024 tokens, 8 heads.
    heads, rows = tiled._tiling(4, 1024, 8, 1024, tiled.FORWARD_TILE)
    assert (heads, rows) == (1, 128) and 4 * heads * rows * 1024 <= tiled.FORWARD_TILE
    # A small problem is one tile: no loop at all.
    assert tiled._tiling(2, 64, 4, 77, tiled.FORWARD_TILE) == (4, 64)


def _grads(fn, q, k, v, dout):
    out, pull = jax.vjp(fn, q, k, v)
    return (out, *pull(dout))


# (forward tile, backward tile) in elements: one tile; rows split (scan in the
# backward); rows and head groups split; one row a tile (the 7-token case).
TILES = [(1 << 30, 1 << 30), (2 * 64 * 7, 2 * 64 * 7), (2 * 16 * 7, 2 * 8 * 7), (1, 1)]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("tokens,kv_tokens", [(64, 64), (64, 7), (7, 64)])
def test_tiled_matches_xla_with_gradients(monkeypatch, tiles, tokens, kv_tokens):
    monkeypatch.setattr(tiled, "FORWARD_TILE", tiles[0])
    monkeypatch.setattr(tiled, "BACKWARD_TILE", tiles[1])
    rng = np.random.default_rng(1)
    q, dout = (jnp.asarray(rng.standard_normal((2, tokens, 4, 16), np.float32)) for _ in "qd")
    k, v = (jnp.asarray(rng.standard_normal((2, kv_tokens, 4, 16), np.float32)) for _ in "kv")

    def kernel(impl):
        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation="xla")

        return fn if impl == "xla" else lambda q, k, v: tiled.tiled_attention(q, k, v, 0.25)

    want = _grads(kernel("xla"), q, k, v, dout)
    got = jax.jit(lambda *a: _grads(kernel("tiled"), *a))(q, k, v, dout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 2e-6, (name, err)


def test_tiled_bfloat16_matches_float32():
    q, k, v = _qkv()
    dout = jnp.ones_like(q)
    f32 = _grads(lambda q, k, v: tiled.tiled_attention(q, k, v, 0.25), q, k, v, dout)
    b16 = [x.astype(jnp.bfloat16) for x in (q, k, v, dout)]
    got = _grads(lambda q, k, v: tiled.tiled_attention(q, k, v, 0.25), *b16)
    for g, w in zip(got, f32):
        assert g.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
        assert err < 3e-2, err


def test_tiled_backward_keeps_no_score_matrices():
    """The flash-attention memory rule: what the forward pass keeps for the backward
    (the leaves of `jax.vjp`'s pullback). JAX's XLA path keeps [batch, heads, queries,
    keys] probabilities; the tiled kernel only q, k, v, the output and a log-sum-exp
    per query row."""
    x = jnp.ones((1, 256, 4, 16))
    scores = 4 * 256 * 256

    def saved(fn):
        return [leaf.size for leaf in jax.tree.leaves(jax.vjp(fn, x, x, x)[1])]

    xla = saved(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    ours = saved(lambda q, k, v: tiled.tiled_attention(q, k, v, 0.25))
    assert max(xla) >= scores  # the check can fail: JAX's path does keep them
    assert sorted(ours) == [256 * 4] + [x.size] * 4, ours


@pytest.mark.devices(8)
def test_tiled_with_a_sharded_batch_matches_one_device(monkeypatch):
    """The tiled kernel on a batch sharded over the test's CPU devices (loops over
    heads and rows, the batch inside every tile) gives one device's outputs and
    gradients."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 2:
        pytest.fail("needs several devices: marked devices(8)")
    n = len(devices)
    monkeypatch.setattr(tiled, "FORWARD_TILE", n * 64 * 7)  # rows and heads both split
    monkeypatch.setattr(tiled, "BACKWARD_TILE", n * 64 * 7)
    rng = np.random.default_rng(2)
    q, dout = (jnp.asarray(rng.standard_normal((n, 64, 4, 16), np.float32)) for _ in "qd")
    k, v = (jnp.asarray(rng.standard_normal((n, 64, 4, 16), np.float32)) for _ in "kv")

    def run(q, k, v, dout):
        return _grads(lambda q, k, v: tiled.tiled_attention(q, k, v, 0.25), q, k, v, dout)

    want = jax.jit(run)(q, k, v, dout)
    batch = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    got = jax.jit(run)(*(jax.device_put(x, batch) for x in (q, k, v, dout)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 1e-6, (name, err)


# -- TPU: the Pallas flash-attention kernel ---------------------------------------------

S = jax.ShapeDtypeStruct


def test_auto_on_a_tpu_takes_pallas_where_its_tiles_fit():
    """SD 1.5 at 512 px on a TPU: self-attention over 4,096, 1,024 and 256 tokens
    (heads of 40 and 80) runs the Pallas kernel; cross-attention over the 77 text
    tokens, the 64-token level and its 160-wide heads stay on XLA (small scores)."""
    tpu = Kernels().for_platform("tpu")
    b16 = jnp.bfloat16
    for tokens, head_dim in ((4096, 40), (1024, 80), (256, 64), (1024, 256)):
        x = S((2, tokens, 8, head_dim), b16)
        assert attn.resolve_attention(x, x, tpu) == "pallas", (tokens, head_dim)
        assert attn.resolve_attention(x, x, Kernels().for_platform("gpu")) != "pallas"
        assert attn.resolve_attention(x, x, Kernels().for_platform("cpu")) == "tiled"
    text = S((2, 77, 8, 40), b16)
    assert attn.resolve_attention(S((2, 4096, 8, 40), b16), text, tpu) == "xla"
    assert attn.resolve_attention(S((2, 64, 8, 160), b16), S((2, 64, 8, 160), b16), tpu) == "xla"
    assert attn.resolve_attention(S((2, 256, 8, 160), b16), S((2, 256, 8, 160), b16), tpu) == "xla"
    # Forced, it is Pallas whatever the shapes (padded to its tiles).
    assert attn.resolve_attention(text, text, Kernels("pallas", platform="tpu")) == "pallas"


def _export_tpu(fn, *args) -> str:
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def test_pallas_attention_lowers_for_a_tpu_without_one():
    """`jax.export` lowers the Pallas kernel (forward and its backward) for a TPU on
    this host: each is a Mosaic `tpu_custom_call`. "auto" routes 77-token
    cross-attention to XLA (no custom call); forced "pallas" pads it."""
    x, text = S((1, 1024, 8, 40), jnp.bfloat16), S((1, 77, 8, 40), jnp.bfloat16)

    def loss(kernels):
        def fn(q, k, v):
            return attn.dot_product_attention(q, k, v, 0.25, kernels).astype(jnp.float32).sum()

        return jax.grad(fn, argnums=(0, 1, 2))

    auto = Kernels().for_platform("tpu")
    assert _export_tpu(loss(auto), x, x, x).count("tpu_custom_call") == 3  # fwd, dkv, dq
    assert "tpu_custom_call" not in _export_tpu(loss(auto), x, text, text)
    forced = Kernels("pallas", platform="tpu")
    assert _export_tpu(loss(forced), x, text, text).count("tpu_custom_call") == 3


def _interpret():
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    if not hasattr(pltpu, "force_tpu_interpret_mode"):
        pytest.skip("this JAX has no Pallas TPU interpret mode")
    return pltpu.force_tpu_interpret_mode()


@pytest.mark.parametrize(
    "tokens,kv_tokens,head_dim",
    [(256, 128, 40), (130, 77, 160)],  # tiles fit; everything padded (tokens, keys, head)
)
def test_pallas_matches_xla_in_interpret_mode(tokens, kv_tokens, head_dim):
    """The Pallas kernel, run by Pallas's TPU interpreter on this CPU, against XLA's
    attention: outputs and gradients, also where queries, keys (masked by segment
    ids) and a 160-wide head are padded to its tiles."""
    from cn_jax.kernels.pallas_attention import pallas_attention

    rng = np.random.default_rng(3)
    q, dout = (jnp.asarray(rng.standard_normal((1, tokens, 2, head_dim), np.float32)) for _ in "qd")
    k, v = (jnp.asarray(rng.standard_normal((1, kv_tokens, 2, head_dim), np.float32)) for _ in "kv")
    scale = head_dim**-0.5
    want = _grads(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla"),
        q, k, v, dout,
    )  # fmt: skip
    with _interpret():
        got = _grads(lambda q, k, v: pallas_attention(q, k, v, scale), q, k, v, dout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 1e-5, (name, err)
