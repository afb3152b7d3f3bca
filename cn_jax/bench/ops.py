"""Where a compiled step's time goes, per XLA operation, from a profiler trace.

`op_breakdown` runs a function under `jax.profiler.trace` (with a Perfetto
trace), matches the trace's events to the top-level instructions of the
compiled program (XLA names each executed operation after its instruction:
on the CPU every thunk, e.g. `ynn_fusion.428`, `while.12`) and adds up their
durations three ways:

- kind: what the operation computes (convolution, matmul, loop, copy /
  transpose, other: elementwise and reductions), from the instruction and the
  computation it fuses;
- layer: the model code that emitted it, from XLA's `op_name` metadata
  (self-attention `attn1`, cross-attention `attn2`, feed-forward `ff`, the
  ControlNet's condition encoder, normalisation, convolution layers; no
  metadata: XLA-made operations such as weight-gradient convolutions);
- stage: forward (`jvp(`), backward (`transpose(jvp(`), other (loss,
  noise, optimizer), no metadata.

Only top-level instructions count: a loop's event covers its body, so the
body's own events would count twice. Operations may overlap in time (XLA runs
independent ones concurrently), so shares are of the summed time, reported
next to the wall time. Events that match no instruction (runtime, Python)
are not counted; `coverage` says how much of the wall time the matched ones
add up to.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')

# (layer, test on the op_name) in order: the first match names the layer.
LAYERS = (
    ("self-attention", lambda n: "/attn1/" in n),
    ("cross-attention", lambda n: "/attn2/" in n),
    ("feed-forward", lambda n: "/ff/" in n),
    ("condition encoder", lambda n: "cond_embedding" in n),
    ("normalisation", lambda n: "norm" in n),
    ("convolution layers", lambda n: "conv" in n or "samplers_" in n),
    ("no metadata (XLA-made)", lambda n: n == ""),
)


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[tuple[str, list[str]]]]]:
    """(ENTRY instructions: name -> {opcode, op_name, calls}, computations: name ->
    [(opcode, called computations)]) from a compiled module's text."""
    entry: dict[str, dict] = {}
    computations: dict[str, list[tuple[str, list[str]]]] = {}
    current, in_entry = None, False
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            m = _COMPUTATION.match(line)
            if m:
                current, in_entry = m.group(1), line.startswith("ENTRY")
                computations[current] = []
            continue
        m = _INSTRUCTION.match(line)
        if not (m and current):
            continue
        name, opcode = m.groups()
        calls = _CALLS.findall(line)
        computations[current].append((opcode, calls))
        if in_entry:
            op = _OP_NAME.search(line)
            entry[name] = {"opcode": opcode, "op_name": op.group(1) if op else "", "calls": calls}
    return entry, computations


def _opcodes(computations, names, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    out: set[str] = set()
    for c in names:
        if c in seen:
            continue
        seen.add(c)
        for opcode, calls in computations.get(c, []):
            out.add(opcode)
            out |= _opcodes(computations, calls, seen)
    return out


def kind_of(instruction: dict, computations) -> str:
    opcode = instruction["opcode"]
    if opcode in ("while", "call", "conditional"):
        return "loop / call"
    ops = {opcode} | _opcodes(computations, instruction["calls"])
    if "convolution" in ops:
        return "convolution"
    if "dot" in ops:
        return "matmul"
    if ops <= {"fusion", "copy", "transpose", "bitcast", "parameter", "tuple", "reshape"}:
        return "copy / transpose"
    return "other (elementwise, reduce)"


def layer_of(op_name: str) -> str:
    return next((layer for layer, test in LAYERS if test(op_name)), "other")


def stage_of(op_name: str) -> str:
    if op_name == "":
        return "no metadata (XLA-made)"
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "other (loss, noise, optimizer)"


def event_durations(trace_dir: str) -> dict[str, float]:
    """Seconds per event name, summed, from the newest Perfetto trace under trace_dir."""
    pattern = os.path.join(trace_dir, "**", "perfetto_trace.json.gz")
    files = sorted(glob.glob(pattern, recursive=True))  # run directories are timestamps
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            out[e["name"]] += e["dur"] * 1e-6
    return dict(out)


def breakdown(hlo_text: str, durations: dict[str, float], wall_s: float, runs: int = 1) -> dict:
    """Seconds per kind, layer and stage (per run), the top operations, and coverage."""
    entry, computations = parse_hlo(hlo_text)
    by: dict[str, dict[str, float]] = {"kind": {}, "layer": {}, "stage": {}}
    top = []
    total = 0.0
    for name, seconds in durations.items():
        ins = entry.get(name)
        if ins is None:
            continue
        seconds /= runs
        total += seconds
        keys = {
            "kind": kind_of(ins, computations),
            "layer": layer_of(ins["op_name"]),
            "stage": stage_of(ins["op_name"]),
        }
        for axis, key in keys.items():
            by[axis][key] = by[axis].get(key, 0.0) + seconds
        top.append({"name": name, "seconds": seconds, **keys, "op_name": ins["op_name"]})
    top.sort(key=lambda r: -r["seconds"])
    for axis in by:
        by[axis] = dict(sorted(by[axis].items(), key=lambda kv: -kv[1]))
    return {
        "ops_seconds": total,
        "wall_seconds": wall_s,
        "coverage": total / wall_s if wall_s else None,
        **{f"by_{axis}": values for axis, values in by.items()},
        "top": top[:15],
    }


def op_breakdown(compiled, run: Callable[[], Any], runs: int = 1, trace_dir: str | None = None):
    """Trace `runs` calls of `run` (which calls `compiled` and waits for it) and break
    the time down by operation (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = trace_dir or tmp
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(runs):
                run()
            wall = (time.perf_counter() - t0) / runs
        durations = event_durations(d)
    return breakdown(compiled.as_text(), durations, wall, runs)


def format_breakdown(r: dict) -> str:
    lines = [
        f"per operation (trace): {r['ops_seconds']:.4g} s of XLA operations in a "
        f"{r['wall_seconds']:.4g} s step (coverage {r['coverage']:.0%})"
    ]
    for axis in ("kind", "layer", "stage"):
        lines.append(f"  by {axis}:")
        for key, s in r[f"by_{axis}"].items():
            lines.append(f"    {key:<30} {s:8.4g} s  {s / r['ops_seconds']:6.1%}")
    lines.append("  slowest operations:")
    for t in r["top"][:8]:
        lines.append(
            f"    {t['seconds']:8.4g} s  {t['kind']:<14.14} {t['layer']:<18.18} "
            f"{t['stage']:<8.8} {t['op_name'][-60:]}"
        )
    return "\n".join(lines)
