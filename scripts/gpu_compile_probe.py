"""How long XLA takes to compile on this device, under XLA_FLAGS variants.

The device check (scripts/gpu_check.sh) found the GPU compiler very slow on an
H200 (jax 0.11.2): the small UNet + ControlNet of tests/test_gpu.py did not
compile in 100 s. This times one such compile (bfloat16 forward, 32x32 latent)
per variant, each in a fresh subprocess with no compilation cache, and prints
one line per variant:

    python scripts/gpu_compile_probe.py [--timeout S] --variant= \
        --variant=--xla_gpu_autotune_level=0

Each --variant=FLAGS is one XLA_FLAGS string to try ("": the defaults; write it
with "=" so a leading "--" is not read as an option). The last line names the
fastest one that finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the child imports cn_jax and tests/ from here

CHILD = r"""
import sys, time
import jax, jax.numpy as jnp
from cn_jax import ControlNet, UNet
sys.path.insert(0, "tests")
from test_gpu import _models  # the GPU tests' model, so both time the same program
ucfg, ccfg = _models()
unet, cnet = UNet(ucfg, dtype=jnp.bfloat16), ControlNet(ccfg, dtype=jnp.bfloat16)
x = jnp.zeros((2, 32, 32, 4)); t = jnp.array([10.0, 900.0]); ctx = jnp.zeros((2, 77, 64))
cond = jnp.zeros((2, 256, 256, 3))
up = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, t, ctx)["params"])
cp = jax.eval_shape(lambda: cnet.init(jax.random.PRNGKey(1), x, t, ctx, cond)["params"])
def f(up, cp):
    d, m = cnet.apply({"params": cp}, x, t, ctx, cond)
    return unet.apply({"params": up}, x, t, ctx, down_block_additional_residuals=d,
                      mid_block_additional_residual=m)
t0 = time.perf_counter(); lowered = jax.jit(f).lower(up, cp); t1 = time.perf_counter()
lowered.compile(); t2 = time.perf_counter()
print(f"RESULT lower {t1 - t0:.1f} s compile {t2 - t1:.1f} s on {jax.devices()[0].device_kind}")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", dest="flags", metavar="FLAGS")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    best = None
    for flags in args.flags or [""]:
        env = dict(os.environ, XLA_FLAGS=flags)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        t0 = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True,
                text=True, timeout=args.timeout,
            )  # fmt: skip
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
            result = lines[-1][7:] if lines else f"failed: {out.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            result = f"not compiled within {args.timeout:.0f} s"
        wall = time.perf_counter() - t0
        print(f"XLA_FLAGS={flags!r}: {result} ({wall:.0f} s with start-up)", flush=True)
        if result.startswith("lower") and (best is None or wall < best[1]):
            best = (flags, wall)
    print(f"fastest: XLA_FLAGS={best[0]!r}" if best else "fastest: none finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
