#!/usr/bin/env python
"""The attention kernels side by side: JAX's XLA path, our "tiled" kernel and
(where torch is installed) PyTorch's `scaled_dot_product_attention`, forward and
forward + backward, on one shape at a time, timed interleaved.

  taskset -c 0,1 .venv/bin/python scripts/bench_attention.py             # SD 1.5 shapes
  .venv/bin/python scripts/bench_attention.py --shape 4,1024,1024,8,40 --repeats 9

A shape is batch,query_tokens,key_tokens,heads,head_dim. The defaults are SD
1.5's attention at 256 px, batch 4 (1,024-token self-attention at the top
level, cross-attention over 77 text tokens) and at 512 px, batch 1 (4,096
tokens). Each line gives median milliseconds of --repeats calls per kernel
(the kernels alternate call by call), XLA's temporary bytes for our two, and
the tiled kernel's max relative error against JAX's path (output and the
three input gradients).
"""

from __future__ import annotations

import argparse
import json
import sys

from cn_jax.bench import measure

DEFAULT_SHAPES = ("4,1024,1024,8,40", "4,1024,77,8,40", "1,4096,4096,8,40")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="batch,q_tokens,k_tokens,heads,head_dim")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int, int, int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 5 or min(parts) < 1:
        raise ValueError(f"--shape {text!r}: expected batch,q_tokens,k_tokens,heads,head_dim")
    return tuple(parts)


def _jax_kernels(shape, dtype):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cn_jax.kernels.tiled_attention import tiled_attention

    b, nq, nk, h, d = shape
    scale = d**-0.5
    rng = np.random.default_rng(0)
    q, dout = (jnp.asarray(rng.standard_normal((b, nq, h, d), np.float32), dtype) for _ in "qd")
    k, v = (jnp.asarray(rng.standard_normal((b, nk, h, d), np.float32), dtype) for _ in "kv")
    kernels = {
        "xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, implementation="xla"
        ),
        "tiled": lambda q, k, v: tiled_attention(q, k, v, scale),
    }

    def with_grads(fn):
        def run(q, k, v, dout):
            out, pull = jax.vjp(fn, q, k, v)
            return (out, *pull(dout))

        return run

    out = {}
    for name, fn in kernels.items():
        fwd = jax.jit(fn).lower(q, k, v).compile()
        both = jax.jit(with_grads(fn)).lower(q, k, v, dout).compile()
        out[name] = {
            "fwd": lambda c=fwd: jax.block_until_ready(c(q, k, v)),
            "fwd+bwd": lambda c=both: jax.block_until_ready(c(q, k, v, dout)),
            "temp_bytes": both.memory_analysis().temp_size_in_bytes,
            "result": both(q, k, v, dout),
        }
    want, got = out["xla"].pop("result"), out["tiled"].pop("result")
    err = max(
        float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
        / max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))), 1e-30)
        for g, w in zip(got, want)
    )
    return out, err


def _torch_kernels(shape, dtype):
    try:
        import torch
    except ImportError:
        return None
    import os

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_flush_denormal(True)
    b, nq, nk, h, d = shape
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(b, h, nq, d, generator=g, dtype=tdt) for _ in "qd")
    k, v = (torch.randn(b, h, nk, d, generator=g, dtype=tdt) for _ in "kv")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.inference_mode():
            sdpa(q, k, v)

    def both():
        sdpa(qg, kg, vg).backward(dout)

    return {"fwd": fwd, "fwd+bwd": both}


def bench_shape(shape, dtype: str, repeats: int, use_torch: bool) -> dict:
    import jax.numpy as jnp

    kernels, err = _jax_kernels(shape, jnp.dtype(dtype))
    if use_torch:
        theirs = _torch_kernels(shape, dtype)
        if theirs is not None:
            kernels["torch"] = theirs
    row = {"shape": list(shape), "dtype": dtype, "tiled_max_rel_err": err}
    row.update(measure.kernel_times_ms(kernels, ("fwd", "fwd+bwd"), repeats))
    for name, fns in kernels.items():
        if "temp_bytes" in fns:
            row[f"{name}_temp_bytes"] = fns["temp_bytes"]
    return row


def format_row(r: dict) -> str:
    b, nq, nk, h, d = r["shape"]
    names = [n for n in ("xla", "tiled", "torch") if f"{n}_fwd_ms" in r]
    head = f"batch {b}, {nq} x {nk} tokens, {h} heads of {d} ({r['dtype']})"
    lines = [head]
    for part in ("fwd", "fwd+bwd"):
        cells = "  ".join(f"{n} {r[f'{n}_{part}_ms']:8.1f} ms" for n in names)
        ratio = r[f"xla_{part}_ms"] / r[f"tiled_{part}_ms"]
        lines.append(f"  {part:8s} {cells}   xla / tiled {ratio:.2f}")
    lines.append(
        f"  XLA temporaries (fwd+bwd): xla {r['xla_temp_bytes'] / 2**20:.1f} MiB, "
        f"tiled {r['tiled_temp_bytes'] / 2**20:.1f} MiB; "
        f"tiled vs xla max rel err {r['tiled_max_rel_err']:.1e}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shapes = [_shape(s) for s in (args.shape or DEFAULT_SHAPES)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for shape in shapes:
        row = bench_shape(shape, args.dtype, args.repeats, not args.no_torch)
        print(format_row(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    from cn_jax import runtime

    runtime.configure_host()  # a program: XLA's memory-first CPU scheduler, as `cn-jax`
    sys.exit(main())
