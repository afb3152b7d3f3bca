"""Measuring compiled programs: XLA's FLOP and memory counts, wall time, device peaks.

Everything here reads what XLA already knows about an ahead-of-time compiled
program (`jit(f).lower(...).compile()`): `cost_analysis()` gives the FLOPs of
the per-device program and `memory_analysis()` the sizes of its buffers, both
without running anything. Wall time is measured per call with the result
blocked on, so a timed call includes everything the device does for it.

Caveats (written here once, quoted by the reports):
- XLA counts a loop body (`lax.scan` / `while`) once, not once per trip: a
  program with `train.grad_accum > 1` or a sampling loop is undercounted.
- With several devices the compiled program is the per-device (SPMD) one, so
  its FLOPs and bytes are per device; a *lowered* program (the FLOP-count twin)
  is the global one, whose count `per_device` divides by the devices.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from cn_jax import runtime
from cn_jax.kernels.choice import COUNTING, Kernels

# Dense (no sparsity) peak TFLOP/s by compute dtype, keyed by a substring of
# `device.device_kind`; the first matching row wins, so specific names (PCIe,
# NVL) come before the family name. float32 is left unknown on purpose: XLA
# may run float32 matmuls as TF32 (GPU) or bf16 passes (TPU) depending on the
# matmul precision, so there is no single float32 peak to divide by.
PEAK_TFLOPS: tuple[tuple[str, Mapping[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0}),
    ("H100 NVL", {}),  # not in the table: unknown
    ("H100", {"bfloat16": 989.0}),  # SXM
    ("H200", {"bfloat16": 989.0}),
    ("A100", {"bfloat16": 312.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),  # v5e
    ("TPU v5", {"bfloat16": 459.0}),  # v5p
    ("TPU v6 lite", {"bfloat16": 918.0}),  # v6e
)


def peak_tflops(device_kind: str, precision: str) -> float | None:
    """The device's dense peak TFLOP/s at `precision` ("bfloat16", "float32"), or None."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(precision)
    return None


def program_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program (per device), by XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def per_device(flops: float | None, devices: int) -> float | None:
    """A global program's FLOPs (a lowered, not yet partitioned module) per device of an
    SPMD program over `devices` that splits the work evenly."""
    return None if flops is None else flops / max(devices, 1)


def counts_on_twin(kernels: Kernels) -> bool:
    """Whether a program computing with `kernels` has its FLOPs counted on a twin
    traced with XLA's kernels (`cn_jax.kernels.choice.COUNTING`) instead of itself.

    Any kernel but XLA's may be miscounted: the tiled attention kernel's tile loops
    are counted once, im2col multiplies its padding zeros, and a cuDNN or Pallas
    attention is one custom call that XLA may count as zero FLOPs (MFU would read
    low). "auto" may choose any of these, so only XLA's own kernels count as they
    are.
    """
    return (kernels.attention, kernels.convolution) != (COUNTING.attention, COUNTING.convolution)


def attention_loops(compiled) -> bool:
    """Whether the compiled program runs attention in XLA loops (the "tiled" kernel on
    large inputs), whose FLOPs `cost_analysis` counts once per loop, not per trip."""
    try:
        text = compiled.as_text()
    except Exception:
        return False
    return any(" while(" in line and "/attn" in line for line in text.splitlines())


def program_memory(compiled) -> dict[str, int | None]:
    """Buffer sizes of a compiled program (per device) and an estimate of its peak.

    `peak_estimate_bytes` = arguments + outputs - aliased (donated) +
    temporaries + generated code. The temporaries are one allocation already
    packed by live range, so this is the program's peak, slightly high where
    an output is not live for the whole call. `xla_peak_bytes` is what the
    backend calls its peak (on CPU it leaves the temporaries out: informative
    only).
    """
    try:
        m = compiled.memory_analysis()
    except Exception:
        m = None
    if m is None:
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    peak = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    xla_peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["xla_peak_bytes"] = xla_peak or None
    out["peak_estimate_bytes"] = peak
    return out


def device_peak_bytes(devices) -> int | None:
    """Largest `peak_bytes_in_use` over `devices` since the process started (GPU, TPU).

    None where the backend keeps no statistics (CPU). The counter never resets,
    so it covers everything the process ran, not one program.
    """
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, waiting until the result is computed."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def interleave(runners: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each runner once per round, in turn (A, B, A, B, ...); seconds per call.

    Interleaving spreads slow phases of a shared machine (another job, clock
    changes, thermal limits) over every side instead of one.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(float(run()))
    return times


def kernel_times_ms(
    kernels: Mapping[str, Mapping[str, Callable[[], Any]]], parts: Sequence[str], repeats: int
) -> dict[str, float]:
    """`{"<kernel>_<part>_ms": median}` for kernels that each run the same parts (e.g.
    forward, backward): per part, every kernel called once to warm up, then `repeats`
    rounds of `interleave` (the kernels alternate call by call)."""
    row: dict[str, float] = {}
    for part in parts:
        runners = {name: (lambda fn=fns[part]: timed(fn)[0]) for name, fns in kernels.items()}
        interleave(runners, 1)  # warm-up
        for name, ts in interleave(runners, repeats).items():
            row[f"{name}_{part}_ms"] = 1e3 * median(ts)
    return row


def median(xs) -> float | None:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else None


def ratio(a, b) -> float | None:
    """a / b, or None when either is unknown (or b is 0)."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


# Environment variables that change what a benchmark measures: XLA's flags, and how
# much device memory JAX's allocator takes (fraction, up front or on demand).
ENV_FLAGS = (
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
    "LIBTPU_INIT_ARGS",
)


def environment() -> dict[str, Any]:
    """JAX and jaxlib versions and the `ENV_FLAGS` as set (None: unset), for every
    bench result: two runs are comparable only with the same ones."""
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "env": {name: os.environ.get(name) for name in ENV_FLAGS},
    }


def device_info(devices) -> dict[str, Any]:
    """Platform, device kind and count, the persistent compilation cache in use
    (compile times read from it are cache hits, not compilations), on CPU XLA's
    scheduler (cn_jax.runtime: "memory-first" unless JAX started before cn_jax) and
    whether host memory comes in transparent huge pages (`runtime.host_hugepages`),
    and the `environment()` (versions, XLA flags, memory fraction)."""
    d = devices[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "devices": len(devices),
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "xla_cpu_scheduler": runtime.cpu_scheduler() if d.platform == "cpu" else None,
        "host_hugepages": runtime.host_hugepages() if d.platform == "cpu" else None,
        **environment(),
    }
