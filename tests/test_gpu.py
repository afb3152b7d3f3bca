"""GPU checks (run by scripts/gpu_check.sh; skipped without a GPU): the GPU's own
kernels (cuDNN attention, convolutions) against the CPU float32 result, which the
parity tests tie to diffusers. float32 must agree to 1e-4, bfloat16 compute to 5e-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cn_jax import ControlNet, ControlNetConfig, UNet, UNetConfig

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


def _run(dtype, device):
    ucfg, ccfg = _models()
    unet, cnet = UNet(ucfg, dtype=dtype), ControlNet(ccfg, dtype=dtype)
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
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_gpu_matches_cpu(dtype, tol):
    ref = _run(jnp.float32, jax.devices("cpu")[0])
    out = _run(dtype, GPUS[0])
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"GPU {jnp.dtype(dtype).name} vs CPU float32: max rel err {err:.2e}")
    assert err <= tol
