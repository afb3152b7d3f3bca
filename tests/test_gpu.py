"""GPU checks (run by scripts/gpu_check.sh; skipped without a GPU): the GPU's own
kernels (cuDNN attention, convolutions) against the CPU float32 result, which the
parity tests tie to diffusers. float32 must agree to 1e-4, bfloat16 compute to 5e-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax import ControlNet, ControlNetConfig, Kernels, UNet, UNetConfig
from cn_jax.kernels import dot_product_attention

pytestmark = pytest.mark.gpu

GPUS = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []


def _models():
    ucfg = UNetConfig(
        block_out_channels=(64, 128, 128, 128),
        norm_num_groups=32,
        cross_attention_dim=64,
        attention_head_dim=4,
    )
    return ucfg, ControlNetConfig.from_unet(ucfg)


def _run(dtype, device, kernels=Kernels()):  # noqa: B008 (frozen: a constant)
    ucfg, ccfg = _models()
    kernels = kernels.for_platform(device.platform)
    unet = UNet(ucfg, dtype=dtype, kernels=kernels)
    cnet = ControlNet(ccfg, dtype=dtype, kernels=kernels)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    t = np.array([10.0, 900.0], np.float32)
    ctx = rng.standard_normal((2, 77, 64), dtype=np.float32)
    cond = rng.random((2, 256, 256, 3), dtype=np.float32)
    with jax.default_device(device):
        up = unet.init(jax.random.PRNGKey(0), x, t, ctx)["params"]
        cp = cnet.init(jax.random.PRNGKey(1), x, t, ctx, cond)["params"]
        # Random zero convs: the residual path must be exercised too.
        cp = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.02 if "controlnet_" in jax.tree_util.keystr(p) else v, cp
        )

        @jax.jit
        def f(up, cp):
            d, m = cnet.apply({"params": cp}, x, t, ctx, cond)
            return unet.apply(
                {"params": up}, x, t, ctx,
                down_block_additional_residuals=d, mid_block_additional_residual=m,
            )  # fmt: skip

        return np.asarray(f(up, cp), np.float32)


@pytest.mark.skipif(not GPUS, reason="no GPU")
@pytest.mark.parametrize(
    "dtype,impl,tol",
    [(jnp.float32, "auto", 1e-4), (jnp.bfloat16, "xla", 5e-2), (jnp.bfloat16, "auto", 5e-2)],
)
def test_gpu_matches_cpu(dtype, impl, tol):
    """bfloat16 "auto" runs every attention here (head sizes 16 and 32) through cuDNN."""
    ref = _run(jnp.float32, jax.devices("cpu")[0])
    out = _run(dtype, GPUS[0], Kernels(attention=impl))
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"GPU {jnp.dtype(dtype).name} attention={impl} vs CPU float32: max rel err {err:.2e}")
    assert err <= tol


@pytest.mark.skipif(not GPUS, reason="no GPU")
@pytest.mark.parametrize(
    "tokens,kv_tokens,head_dim,chosen",
    [(4096, 4096, 40, "cudnn"), (1024, 1024, 80, "cudnn"), (4096, 77, 40, "auto")],
)
def test_cudnn_attention_matches_xla(tokens, kv_tokens, head_dim, chosen):
    """SD 1.5's attention shapes at 512 px, forward and gradients, in bfloat16 against
    float32: cuDNN flash attention for self-attention; "auto" (XLA) for the 77-token
    cross-attention, which cuDNN refused for training in jax 0.11.2."""
    rng = np.random.default_rng(0)
    q, k, v = (
        rng.standard_normal((2, n, 8, head_dim), dtype=np.float32)
        for n in (tokens, kv_tokens, kv_tokens)
    )
    w = rng.standard_normal((2, tokens, 8, head_dim), dtype=np.float32)

    def run(impl, dtype):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, head_dim**-0.5, Kernels(attention=impl))
            return jnp.sum(out.astype(jnp.float32) * w), out

        args = [jnp.asarray(a, dtype) for a in (q, k, v)]
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
        return [np.asarray(a, np.float32) for a in (out, *grads)]

    ref = run("xla", jnp.float32)
    for impl in ("xla", chosen):
        got = run(impl, jnp.bfloat16)
        errs = [float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref)]
        print(
            f"attention {impl} bf16 {tokens}x{kv_tokens} d{head_dim}: out/dq/dk/dv rel err "
            + " ".join(f"{e:.1e}" for e in errs)
        )
        assert max(errs) <= 5e-2
