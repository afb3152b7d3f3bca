"""Printing benchmark results, and the `cn-jax bench` commands.

`python -m cn_jax.bench.report A.json B.json ...` prints one summary table of
result files written with `--json` (what `scripts/bench_gpu.sh` shows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _num(x, fmt: str = "{:.3g}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _flops(f) -> str:
    if f is None:
        return "-"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= size:
            return f"{f / size:.3g} {unit}"
    return f"{f:.3g} FLOP"


def _forced_attention(r: dict) -> str | None:
    """The attention kernel a result was forced to (`model.attention`), None for auto."""
    return None if r.get("attention", "auto") == "auto" else r["attention"]


def _header(r: dict) -> str:
    what = f"{r['architecture']}, {r['precision']}, {r['resolution']} px"
    if _forced_attention(r):
        what += f", attention {r['attention']}"
    if r.get("xla_cpu_scheduler") == "concurrency":  # not cn_jax's memory-first default
        what += ", XLA CPU scheduler concurrency"
    return f"{what}, {r['device_kind']} x{r['devices']}"


def _memory_line(m: dict) -> str:
    if not m:
        return "-"
    return (
        f"{_bytes(m['peak_estimate_bytes'])} (arguments {_bytes(m['argument_bytes'])}, "
        f"temporaries {_bytes(m['temp_bytes'])}, outputs {_bytes(m['output_bytes'])}, "
        f"donated {_bytes(m['alias_bytes'])})"
    )


def format_train(r: dict) -> str:
    lines = [
        f"bench train: {_header(r)}",
        f"  trainable {r['trainable']}, batch {r['batch_size']}, grad_accum {r['grad_accum']}, "
        f"remat {r['remat']}, cache_latents {r['cache_latents']}",
        f"  parameters       {r['params_trainable'] / 1e6:.1f}M trained, "
        f"{r['params_frozen'] / 1e6:.1f}M frozen",
        f"  compile          {r['compile_s']:.1f} s (lower {r['lower_s']:.1f} s)"
        + ("; persistent compilation cache on" if r.get("compilation_cache") else ""),
        f"  FLOPs / step     {_flops(r['flops_per_step'])} (XLA, per device)",
        f"  memory (XLA)     {_memory_line(r['memory'])}",
    ]
    if "step_time_s" in r:
        peak = r["peak_tflops"]
        frac = r["fraction_of_peak"]
        lines += [
            f"  step time        {r['step_time_s']:.4g} s (median of {r['steps']})",
            f"  samples / s      {r['samples_per_s']:.4g}",
            f"  achieved         {_num(r['tflops_per_s'])} TFLOP/s per device; "
            + (
                f"{frac:.1%} of the {peak:g} TFLOP/s peak"
                if frac is not None
                else "peak unknown for this device and precision"
            ),
            f"  device peak      {_bytes(r['device_peak_bytes_in_use'])}",
            f"  loss             {_num(r['loss'], '{:.4f}')}",
        ]
    if r.get("flops_note"):
        lines.append(f"  note: {r['flops_note']}")
    return "\n".join(lines)


def format_compare(r: dict) -> str:
    cn, ft = r["controlnet"], r["finetune"]
    pt = r["pytorch_cpu_reference"]
    mem = lambda s: s["memory"].get("peak_estimate_bytes")  # noqa: E731
    rows = [
        ("FLOPs / step", _flops(cn["flops_per_step"]), _flops(ft["flops_per_step"]),
         r["flops_ratio"], "-", "-"),
        ("memory (XLA est.)", _bytes(mem(cn)), _bytes(mem(ft)), r["memory_ratio"],
         r["paper"]["memory_ratio"], f"{pt['batch_1']['memory_ratio']} / "
         f"{pt['batch_4']['memory_ratio']}"),
        ("step time (median)", _num(cn.get("step_time_s"), "{:.4g} s"),
         _num(ft.get("step_time_s"), "{:.4g} s"), r["time_ratio"], r["paper"]["time_ratio"],
         f"{pt['batch_1']['time_ratio']} / {pt['batch_4']['time_ratio']}"),
        ("compile", f"{cn['compile_s']:.1f} s", f"{ft['compile_s']:.1f} s", None, "-", "-"),
    ]  # fmt: skip
    head = ("", "controlnet", "fine-tune", "ratio", "paper A100", "PyTorch CPU b1 / b4")
    widths = [20, 14, 14, 7, 11, 20]
    fmt_row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    mode = "interleaved runs" if r["interleaved"] else "compile only (--no-run)"
    lines = [
        f"bench compare: {_header(cn)}, batch {cn['batch_size']}: ControlNet vs fine-tuning "
        f"the UNet ({mode})",
        fmt_row(head),
    ]
    for name, a, b, ratio, paper, pytorch in rows:
        lines.append(fmt_row((name, a, b, _num(ratio, "{:.3f}"), paper, pytorch)))
    lines.append("ratios are ControlNet / fine-tune; the issue's target: FLOPs ratio <= 0.96")
    return "\n".join(lines)


def format_sample(r: dict) -> str:
    c = r["compile_s"]
    return "\n".join(
        [
            f"bench sample: {_header(r)}",
            f"  batch {r['batch']}, {r['steps']} {r['sampler']} steps, CFG {r['guidance_scale']}, "
            f"{r['controlnets']} ControlNet(s)",
            f"  compile          text {_num(c['text'], '{:.1f} s')}, loop "
            f"{_num(c['loop'], '{:.1f} s')}, decode {_num(c['decode'], '{:.1f} s')}",
            f"  loop             {r['loop_s']:.4g} s (median of {r['repeats']}) -> "
            f"{r['it_per_s']:.4g} it/s",
            f"  text + decode    {r['text_s']:.3g} s + {r['decode_s']:.3g} s -> "
            f"{r['images_per_s']:.4g} images/s",
            f"  memory (XLA)     loop: {_memory_line(r['memory'])}",
            f"  device peak      {_bytes(r['device_peak_bytes_in_use'])}",
        ]
    )


def format_result(r: dict) -> str:
    from cn_jax.bench.data import format_data
    from cn_jax.bench.lower import format_lower

    formats = {
        "train": format_train, "compare": format_compare, "sample": format_sample,
        "lower": format_lower, "data": format_data,
    }  # fmt: skip
    return formats[r["bench"]](r)


def summary_table(results: list[dict]) -> str:
    """One line per result (train, compare or sample), for a set of `--json` files."""
    head = ("bench", "batch", "prec", "px", "time", "rate", "TFLOP/s", "peak %", "memory est",
            "compile")  # fmt: skip
    widths = (22, 5, 9, 4, 10, 18, 8, 7, 11, 8)
    row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    first = results[0] if results else {}
    first = first.get("controlnet", first)  # compare: the device is in each side
    lines = [
        f"device: {first.get('device_kind', '?')} x{first.get('devices', '?')} "
        f"({first.get('platform', '?')})",
        row(head),
    ]
    for r in results:
        kind = r.get("bench")
        attn = f" ({r['attention']})" if _forced_attention(r) else ""
        if kind == "train":
            lines.append(row((
                f"train {r['trainable']}{attn}", r["batch_size"], r["precision"], r["resolution"],
                _num(r.get("step_time_s"), "{:.4g} s"),
                _num(r.get("samples_per_s"), "{:.4g} samples/s"),
                _num(r.get("tflops_per_s"), "{:.3g}"), _num(r.get("fraction_of_peak"), "{:.1%}"),
                _bytes(r["memory"].get("peak_estimate_bytes")), f"{r['compile_s']:.0f} s",
            )))  # fmt: skip
        elif kind == "compare":
            cn = r["controlnet"]
            lines.append(row((
                "compare cn/ft", cn["batch_size"], cn["precision"], cn["resolution"],
                _num(r["time_ratio"], "x{:.3f}"), f"FLOPs x{_num(r['flops_ratio'], '{:.3f}')}",
                "-", "-", f"x{_num(r['memory_ratio'], '{:.3f}')}",
                f"{cn['compile_s'] + r['finetune']['compile_s']:.0f} s",
            )))  # fmt: skip
        elif kind == "sample":
            lines.append(row((
                f"sample {r['controlnets']} cn, {r['steps']} steps{attn}", r["batch"],
                r["precision"], r["resolution"], f"{r['loop_s']:.4g} s",
                f"{r['it_per_s']:.4g} it/s {r['images_per_s']:.3g} img/s", "-", "-",
                _bytes(r["memory"].get("peak_estimate_bytes")), f"{r['compile_total_s']:.0f} s",
            )))  # fmt: skip
    return "\n".join(lines)


# -- the `cn-jax bench` commands ------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """`cn-jax bench train|compare|sample|lower|data`: run, print, optionally write `--json`.
    Exits 1 where `lower` could not lower every program."""
    from cn_jax.bench.sample import bench_sample
    from cn_jax.bench.train import bench_compare, bench_train, devices_for
    from cn_jax.config import load_config

    config = load_config(args.config, args.overrides)
    if args.bench_command == "data":
        from cn_jax.bench.data import bench_data

        workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
        result = bench_data(
            config, workers=workers, data_dir=args.data, samples=args.samples, size=args.size,
            batch=args.batch, gpu_samples_per_s=args.gpu_rate,
        )  # fmt: skip
    elif args.bench_command == "lower":
        from cn_jax.bench.lower import bench_lower, parse_platforms

        platforms = parse_platforms(args.platforms)
        result = bench_lower(config, platforms, flops=not args.no_flops)
    elif args.bench_command == "sample":
        result = bench_sample(
            config, steps=args.steps, batch=args.batch, controlnets=args.controlnets,
            sampler=args.sampler, guidance_scale=args.guidance, repeats=args.repeats,
            warmup=args.warmup,
        )  # fmt: skip
    else:
        fn = bench_train if args.bench_command == "train" else bench_compare
        result = fn(
            config, steps=args.steps, warmup=args.warmup, devices=devices_for(args.devices),
            run=not args.no_run,
        )  # fmt: skip
    result["config"] = str(args.config)
    result["overrides"] = list(args.overrides)
    print(format_result(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if result.get("ok", True) else 1


def write_json(result: dict[str, Any], path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="summary table of cn-jax bench --json files")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    results = []
    for f in args.files:
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
