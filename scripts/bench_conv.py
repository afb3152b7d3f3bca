#!/usr/bin/env python
"""The convolution kernels side by side: XLA's convolution, our "im2col" (one
matrix product over the gathered taps) and (where torch is installed) PyTorch's
conv2d: forward, input gradient and weight gradient, timed interleaved.

  taskset -c 0,1 .venv/bin/python scripts/bench_conv.py            # SD 1.5 shapes
  .venv/bin/python scripts/bench_conv.py --shape 4,8,1280,1280,3,1 --repeats 9

A shape is batch,size,in_channels,out_channels,kernel,stride (square images,
padding kernel // 2, as SD's convolutions). The defaults are SD 1.5's
convolutions at 256 px, batch 4 (latents 32 down to 4 pixels) and a few at
batch 1. Each line gives median milliseconds of --repeats calls per kernel (the
kernels alternate call by call), what `model.convolution: auto` picks for the
shape on this backend, and im2col's max relative error against XLA's
convolution (output and both gradients).
"""

from __future__ import annotations

import argparse
import json
import sys

from cn_jax.bench import measure

DEFAULT_SHAPES = (
    "4,32,320,320,3,1",
    "4,16,640,640,3,1",
    "4,16,1280,1280,3,1",
    "4,8,1280,1280,3,1",
    "4,8,2560,1280,3,1",
    "4,4,1280,1280,3,1",
    "4,16,640,640,3,2",
    "4,32,320,320,1,1",
    "1,16,1280,1280,3,1",
    "1,8,1280,1280,3,1",
)
PARTS = ("fwd", "dx", "dw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="batch,size,in,out,kernel,stride")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, ...]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 6 or min(parts) < 1:
        raise ValueError(f"--shape {text!r}: expected batch,size,in,out,kernel,stride")
    return tuple(parts)


def _jax_kernels(shape):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cn_jax.kernels import Kernels, conv2d, resolve_convolution

    b, n, cin, cout, k, s = shape
    pad = ((k // 2, k // 2),) * 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, n, n, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / (k * k * cin) ** 0.5)
    no = (n + 2 * (k // 2) - k) // s + 1
    g = jnp.asarray(rng.standard_normal((b, no, no, cout), np.float32))
    auto = resolve_convolution(x.shape, w.shape, (s, s), pad, Kernels().for_platform())
    out, results = {}, {}
    for name in ("xla", "im2col"):

        def f(x, w, name=name):
            return conv2d(x, w, (s, s), pad, Kernels(convolution=name))

        fns = {
            "fwd": jax.jit(f),
            "dx": jax.jit(lambda x, w, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
            "dw": jax.jit(lambda x, w, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0]),
        }
        compiled = {part: fn.lower(x, w).compile() for part, fn in fns.items()}
        out[name] = {
            part: (lambda c=c: jax.block_until_ready(c(x, w))) for part, c in compiled.items()
        }
        results[name] = [c(x, w) for c in compiled.values()]
    err = max(
        float(jnp.max(jnp.abs(a - r))) / max(float(jnp.max(jnp.abs(r))), 1e-30)
        for a, r in zip(results["im2col"], results["xla"])
    )
    return out, err, auto


def _torch_kernels(shape):
    try:
        import torch
    except ImportError:
        return None
    import os

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_flush_denormal(True)
    b, n, cin, cout, k, s = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, n, n, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) / (k * k * cin) ** 0.5
    no = (n + 2 * (k // 2) - k) // s + 1
    g = torch.randn(b, cout, no, no, generator=gen)
    conv2d, grad = torch.nn.functional.conv2d, torch.nn.grad

    def fwd():
        with torch.inference_mode():
            conv2d(x, w, stride=s, padding=k // 2)

    def dx():
        grad.conv2d_input(x.shape, w, g, stride=s, padding=k // 2)

    def dw():
        grad.conv2d_weight(x, w.shape, g, stride=s, padding=k // 2)

    return {"fwd": fwd, "dx": dx, "dw": dw}


def bench_shape(shape, repeats: int, use_torch: bool) -> dict:
    kernels, err, auto = _jax_kernels(shape)
    if use_torch:
        theirs = _torch_kernels(shape)
        if theirs is not None:
            kernels["torch"] = theirs
    row = {"shape": list(shape), "auto": auto, "im2col_max_rel_err": err}
    row.update(measure.kernel_times_ms(kernels, PARTS, repeats))
    return row


def format_row(r: dict) -> str:
    b, n, cin, cout, k, s = r["shape"]
    names = [name for name in ("xla", "im2col", "torch") if f"{name}_fwd_ms" in r]
    lines = [f"batch {b}, {n}x{n}, {cin} -> {cout}, {k}x{k} stride {s}: auto = {r['auto']}"]
    for part in PARTS:
        cells = "  ".join(f"{name} {r[f'{name}_{part}_ms']:8.1f} ms" for name in names)
        ratio = r[f"im2col_{part}_ms"] / r[f"xla_{part}_ms"]
        lines.append(f"  {part:4s} {cells}   im2col / xla {ratio:.2f}")
    lines.append(f"  im2col vs xla max rel err {r['im2col_max_rel_err']:.1e}")
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
        row = bench_shape(shape, args.repeats, not args.no_torch)
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
