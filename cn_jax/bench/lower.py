"""Lowering the train step and the sampling programs for other platforms, no device needed.

    cn-jax bench lower --config configs/sd15-shape.yaml train.precision=bfloat16 \\
        --platforms cuda,tpu [--json OUT]

For each platform `jax.export` lowers, to StableHLO, the programs a run there
would compile: the train step (`TrainBench`'s `jit(make_train_step(...))`) and
the sampling programs (`ControlNetPipeline.encode`, `denoise`, `decode`, as
`bench sample` compiles them), each with the kernels "auto" settles for that
platform (`Kernels.for_platform`). Nothing is materialised: parameters, batch
and job are `jax.ShapeDtypeStruct`s, and nothing is compiled, so a CPU laptop
finds the programs that would not lower on a GPU or TPU before one is rented.

A kernel that cannot lower without its hardware is replaced, and the result
says so: cuDNN attention is probed once per platform (JAX asks the local
cuDNN for its version while tracing), and where the probe fails the programs
lower with XLA's attention ("cudnn: cannot lower without a GPU (...); lowered
with xla"). Pallas's TPU kernels lower on any host (a Mosaic custom call).

Each (platform, program) row: ok or the error, seconds, the kernels, the
custom calls in the module (`tpu_custom_call` = the Pallas attention,
`__cudnn$fmha...` = cuDNN's), the StableHLO size, and XLA's FLOP count of the
lowered module (the host's cost analysis of the unoptimised module: custom
calls count zero, so with Pallas or cuDNN attention it is low; loops count
once, so the sampling loop's FLOPs are one step's).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.bench import measure
from cn_jax.config import Config
from cn_jax.kernels import Kernels

# jax.export's platform names, and the backend name `Kernels` settles "auto" for.
PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.\-]+)")


def parse_platforms(text: str) -> list[str]:
    """Parse "cuda,tpu" into ["cuda", "tpu"], each a platform `jax.export` knows."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PLATFORMS]
    if unknown or not names:
        raise ValueError(
            f"--platforms {text!r}: expected a comma-separated list of {', '.join(PLATFORMS)}"
        )
    return names


@functools.cache
def cudnn_lowering_error(platform: str) -> str | None:
    """Why cuDNN attention cannot be lowered for `platform` here (None: it can)."""
    q = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    fn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    try:
        jax.export.export(jax.jit(fn), platforms=[platform])(q, q, q)
    except Exception as e:  # JAX raises RuntimeError("cuDNN is not detected.") on CPU hosts
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def kernels_for(config: Config, platform: str) -> tuple[Kernels, list[str]]:
    """The kernels a run of `config` would use on `platform` (a `jax.export` name),
    and notes on any replaced because it cannot lower here."""
    k = Kernels(config.model.attention, config.model.convolution).for_platform(PLATFORMS[platform])
    notes = []
    half = config.train.precision == "bfloat16"
    may_cudnn = k.attention == "cudnn" or (k.attention == "auto" and k.platform == "gpu" and half)
    if may_cudnn:
        error = cudnn_lowering_error(platform)
        if error is not None:
            notes.append(f"cudnn: cannot lower without a GPU ({error}); lowered with xla")
            k = dataclasses.replace(k, attention="xla")
    return k, notes


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def export_row(fn: Callable, args: Sequence[Any], platform: str) -> dict[str, Any]:
    """Lower `fn` (a jitted function) on `args` for `platform` with `jax.export`."""
    t0 = time.perf_counter()
    try:
        exported = jax.export.export(fn, platforms=[platform])(*args)
        text = exported.mlir_module()
    except Exception as e:
        msg = str(e).strip().splitlines()
        return {
            "ok": False,
            "seconds": time.perf_counter() - t0,
            "error": f"{type(e).__name__}: {msg[0] if msg else ''}",
        }
    seconds = time.perf_counter() - t0
    calls = collections.Counter(_CUSTOM_CALL.findall(text))
    return {
        "ok": True,
        "seconds": seconds,
        "stablehlo_bytes": len(text.encode()),
        "serialized_bytes": len(exported.mlir_module_serialized),
        "custom_calls": dict(sorted(calls.items())),
    }


def _with_flops(row: dict[str, Any], fn, args, platform: str) -> dict[str, Any]:
    """`row` plus XLA's FLOPs of `fn` lowered for `platform` (None where unknown)."""
    flops = None
    if row["ok"]:
        try:
            lowered = fn.trace(*args).lower(lowering_platforms=(platform,))
            flops = measure.program_flops(lowered)
        except Exception:  # a JAX without Traced.lower(lowering_platforms=...)
            flops = None
    return {**row, "flops": flops}


def train_programs(config: Config):
    """(step for kernels, abstract arguments) of `config`'s train step: `TrainBench`
    set up from shapes (`run=False`), never lowered or compiled there."""
    from cn_jax.bench.train import TrainBench

    b = TrainBench(config, run=False, compile=False)
    return (lambda k: b.jitted_step(b.models.with_kernels(k))), b.args


def sample_programs(config: Config, batch: int = 1, steps: int = 20, controlnets: int = 1):
    """The sampling programs of `config` as `bench sample` compiles them, on shapes.

    Returns (programs for kernels, abstract arguments per program): "text"
    (`encode`), "loop" (`denoise`, `steps` DDIM steps with CFG and `controlnets`
    ControlNets) and, with a VAE, "decode".
    """
    from cn_jax.bench import sample
    from cn_jax.pipeline import ControlNetPipeline

    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    held = {}

    def params_only():  # the weights exist only as shapes (`jax.eval_shape`)
        sd = sample._load(config, dtype)
        nets = sample._controlnets(config, sd, controlnets, dtype)
        held["sd"], held["nets"] = sd, [n for n, _ in nets]
        return sd.unet_params, sd.vae_params, sd.text_encoder_params, [p for _, p in nets]

    unet_p, vae_p, te_p, net_ps = jax.eval_shape(params_only)
    sd = dataclasses.replace(
        held["sd"], unet_params=unet_p, vae_params=vae_p, text_encoder_params=te_p
    )
    nets = list(zip(held["nets"], net_ps))

    def pipeline(k: Kernels) -> ControlNetPipeline:
        return ControlNetPipeline(sd, nets, dtype, kernels=k)

    pipe = pipeline(held["sd"].unet.kernels)
    rng = np.random.default_rng(0)
    r, lf = config.data.resolution, pipe.latent_factor
    conds = [
        rng.uniform(0, 1, (r, r, n.config.conditioning_channels)).astype(np.float32)
        for n in pipe.controlnets
    ]
    noise = rng.standard_normal((batch, r // lf, r // lf, pipe.unet.config.in_channels))
    cond = conds if controlnets > 1 else conds[0]
    job = pipe.prepare([sample.PROMPT] * batch, cond, num_inference_steps=steps, latents=noise)
    job = _abstract(job)
    params = pipe.params
    contexts = jax.eval_shape(pipe.encode, params, job)
    latents = jax.eval_shape(pipe.denoise, params, job, *contexts)

    def programs(k: Kernels) -> dict[str, Callable]:
        p = pipeline(k)
        out = {"text": jax.jit(p.encode), "loop": jax.jit(p.denoise)}
        if p.vae is not None:
            out["decode"] = jax.jit(p.decode)
        return out

    args = {"text": (params, job), "loop": (params, job, *contexts), "decode": (params, latents)}
    return programs, args


def bench_lower(
    config: Config, platforms: Sequence[str] = ("cuda", "tpu"), flops: bool = True, **sampling
) -> dict[str, Any]:
    """Lower the train step and the sampling programs of `config` for each platform.

    Args:
      platforms: `jax.export` platform names ("cuda", "rocm", "tpu", "cpu").
      flops: also count each lowered module's FLOPs (lowers it a second time).
      sampling: `sample_programs` options (batch, steps, controlnets).
    """
    t0 = time.perf_counter()
    step_for, step_args = train_programs(config)
    sample_for, sample_args = sample_programs(config, **sampling)
    setup_s = time.perf_counter() - t0
    rows, per_platform = [], {}
    for platform in platforms:
        kernels, notes = kernels_for(config, platform)
        per_platform[platform] = {
            "kernels": {"attention": kernels.attention, "convolution": kernels.convolution},
            "notes": notes,
        }
        programs = {"train_step": step_for(kernels)}
        args = {"train_step": step_args}
        for name, fn in sample_for(kernels).items():
            programs[f"sample_{name}"], args[f"sample_{name}"] = fn, sample_args[name]
        for name, fn in programs.items():
            row = export_row(fn, args[name], platform)
            if flops:
                row = _with_flops(row, fn, args[name], platform)
            rows.append({"platform": platform, "program": name, **row})
    c = config.model
    return {
        "bench": "lower",
        "architecture": c.architecture if c.base is None else c.base,
        "attention": c.attention,
        "convolution": c.convolution,
        "trainable": config.train.trainable,
        "precision": config.train.precision,
        "batch_size": config.train.batch_size,
        "resolution": config.data.resolution,
        "cache_latents": config.data.cache_latents,
        "sampling": {"batch": 1, "steps": 20, "controlnets": 1, **sampling},
        "host": jax.default_backend(),
        **measure.environment(),
        "setup_s": setup_s,
        "platforms": per_platform,
        "programs": rows,
        "ok": all(r["ok"] for r in rows),
    }


def _size(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_lower(r: dict[str, Any]) -> str:
    lines = [
        f"bench lower: {r['architecture']}, {r['trainable']}, {r['precision']}, train batch "
        f"{r['batch_size']} @ {r['resolution']} px, cache_latents {r['cache_latents']}; "
        f"sampling batch {r['sampling']['batch']}, {r['sampling']['controlnets']} ControlNet(s) "
        f"(jax {r['jax']}, on {r['host']}, set-up {r['setup_s']:.1f} s)"
    ]
    for platform, p in r["platforms"].items():
        k = p["kernels"]
        lines.append(f"  {platform}: attention {k['attention']}, convolution {k['convolution']}")
        lines += [f"    note: {n}" for n in p["notes"]]
        for row in (x for x in r["programs"] if x["platform"] == platform):
            head = f"    {row['program']:<14} "
            if not row["ok"]:
                lines.append(f"{head}FAILED  {row['seconds']:.1f} s  {row['error']}")
                continue
            calls = ", ".join(f"{n} x{c}" for n, c in row["custom_calls"].items()) or "none"
            flops = row.get("flops")
            lines.append(
                f"{head}ok  {row['seconds']:6.1f} s  StableHLO {_size(row['stablehlo_bytes']):>9}"
                + (f"  {flops / 1e9:.4g} GFLOP" if flops else "")
                + f"  custom calls: {calls}"
            )
    n_ok = sum(x["ok"] for x in r["programs"])
    lines.append(f"  {n_ok} of {len(r['programs'])} programs lowered")
    return "\n".join(lines)
