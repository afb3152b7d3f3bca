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


def _models(sdxl: bool = False):
    ucfg = UNetConfig(
        block_out_channels=(64, 128, 128, 128),
        norm_num_groups=32,
        cross_attention_dim=64,
        attention_head_dim=4,
    )
    if sdxl:  # SDXL's structure: 3 levels, none attending in the first, 64-wide heads
        ucfg = UNetConfig(
            block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32, cross_attention_dim=64, attention_head_dim=(1, 2, 2),
            transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=32 + 6 * 16,
        )  # fmt: skip
    return ucfg, ControlNetConfig.from_unet(ucfg)


def _run(dtype, device, kernels=Kernels(), sdxl=False):  # noqa: B008 (frozen: a constant)
    ucfg, ccfg = _models(sdxl)
    kernels = kernels.for_platform(device.platform)
    unet = UNet(ucfg, dtype=dtype, kernels=kernels)
    cnet = ControlNet(ccfg, dtype=dtype, kernels=kernels)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    t = np.array([10.0, 900.0], np.float32)
    ctx = rng.standard_normal((2, 77, 64), dtype=np.float32)
    cond = rng.random((2, 256, 256, 3), dtype=np.float32)
    added = None
    if sdxl:
        sizes = np.array([[1024, 768, 0, 0, 1024, 1024], [512, 512, 64, 32, 512, 512]])
        added = {"text_embeds": rng.standard_normal((2, 32), dtype=np.float32),
                 "time_ids": sizes.astype(np.float32)}  # fmt: skip
    with jax.default_device(device):
        up = unet.init(jax.random.PRNGKey(0), x, t, ctx, added_cond_kwargs=added)["params"]
        cp = cnet.init(jax.random.PRNGKey(1), x, t, ctx, cond, added_cond_kwargs=added)["params"]
        # Random zero convs: the residual path must be exercised too.
        cp = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.02 if "controlnet_" in jax.tree_util.keystr(p) else v, cp
        )

        @jax.jit
        def f(up, cp):
            d, m = cnet.apply({"params": cp}, x, t, ctx, cond, added_cond_kwargs=added)
            return unet.apply(
                {"params": up}, x, t, ctx, added_cond_kwargs=added,
                down_block_additional_residuals=d, mid_block_additional_residual=m,
            )  # fmt: skip

        return np.asarray(f(up, cp), np.float32)


@pytest.mark.skipif(not GPUS, reason="no GPU")
@pytest.mark.parametrize(
    "dtype,impl,tol,sdxl",
    [(jnp.float32, "auto", 1e-4, False), (jnp.bfloat16, "xla", 5e-2, False),
     (jnp.bfloat16, "auto", 5e-2, False), (jnp.float32, "auto", 1e-4, True),
     (jnp.bfloat16, "auto", 5e-2, True)],
)  # fmt: skip
def test_gpu_matches_cpu(dtype, impl, tol, sdxl):
    """bfloat16 "auto" runs every attention here (head sizes 16 and 32; SDXL's 64) through
    cuDNN. `sdxl`: the text_time embedding and per-level transformer depths too."""
    ref = _run(jnp.float32, jax.devices("cpu")[0], sdxl=sdxl)
    out = _run(dtype, GPUS[0], Kernels(attention=impl), sdxl=sdxl)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    kind = "SDXL " if sdxl else ""
    print(
        f"GPU {kind}{jnp.dtype(dtype).name} attention={impl} vs CPU float32: max rel err {err:.2e}"
    )
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
