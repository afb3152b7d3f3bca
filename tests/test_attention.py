"""The attention kernel choice (cn_jax.models.attention): names checked, "auto" is
the XLA path off the GPU, and the choice is read at trace time. The cuDNN side is
checked against XLA on a GPU in tests/test_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax.models import attention as attn


def _qkv(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = [(2, 64, 4, 16), (2, 7, 4, 16), (2, 7, 4, 16)]
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype) for s in shapes]


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match=r"'flash'.*auto.*xla.*cudnn"):
        attn.set_attention_implementation("flash")
    assert attn.get_attention_implementation() == "auto"


def test_auto_is_xla_off_gpu_and_matches_softmax():
    q, k, v = _qkv()
    with attn.attention_implementation("auto"):
        auto = attn.dot_product_attention(q, k, v, scale=0.25)
    with attn.attention_implementation("xla"):
        xla = attn.dot_product_attention(q, k, v, scale=0.25)
    assert attn.get_attention_implementation() == "auto"  # restored
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(want), rtol=1e-5, atol=1e-5)
    if jax.default_backend() != "gpu":
        q16 = q.astype(jnp.bfloat16)
        assert not attn._cudnn_applies(q16, q16)  # CPU: XLA even in bfloat16


def test_cudnn_applies_only_where_its_kernel_does(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    bf16 = jnp.bfloat16

    def applies(tokens, kv_tokens, head_dim, dtype=bf16):
        q = jnp.zeros((1, tokens, 8, head_dim), dtype)
        return attn._cudnn_applies(q, jnp.zeros((1, kv_tokens, 8, head_dim), dtype))

    assert applies(4096, 4096, 40)  # SD 1.5 self-attention, 64x64 latent
    assert not applies(4096, 77, 40)  # cross-attention over the 77 text tokens
    assert not applies(64, 64, 160)  # SD 1.5, 8x8 latent
    assert not applies(64, 64, 12)  # not a multiple of 8
    assert not applies(4096, 4096, 40, jnp.float32)  # float32 / upcast


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN exists on a GPU")
def test_forced_cudnn_off_gpu_fails_at_trace():
    q, k, v = _qkv(jnp.bfloat16)
    with attn.attention_implementation("cudnn"), pytest.raises(RuntimeError, match="cuDNN"):
        jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, 0.25)).lower(q, k, v)
