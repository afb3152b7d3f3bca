"""`cn-jax` command line: parse, then call the library.

cn-jax info                                   versions and devices
cn-jax convert IN OUT --format diffusers|original [--dtype float16] [--allow-pickle]
                                              a ControlNet from one layout to the other
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = ("float32", "float16", "bfloat16")


def _info(args: argparse.Namespace) -> int:
    import flax
    import jax

    import cn_jax

    print(f"cn_jax {cn_jax.__version__}, jax {jax.__version__}, flax {flax.__version__}")
    print(f"backend {jax.default_backend()}: {jax.devices()}")
    from cn_jax import runtime

    pages = "transparent huge pages" if runtime.host_hugepages() else "4 KiB pages"
    print(f"host memory: {pages} (kernel THP: {runtime.thp_mode()}); "
          f"XLA CPU scheduler: {runtime.cpu_scheduler()}")  # fmt: skip
    return 0


def _convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    import cn_jax

    cnet, params = cn_jax.load_controlnet(
        args.input, allow_pickle=args.allow_pickle, revision=args.revision
    )
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    cn_jax.save_controlnet(args.output, cnet, params, format=args.format, dtype=dtype)
    print(f"wrote {args.output} ({args.format})")
    return 0


def _init_controlnet(args: argparse.Namespace) -> int:
    import jax

    import cn_jax
    from cn_jax.weights.sd import base_latent_factor, resolve_path

    # A folder, one checkpoint, "bundled:tiny", or a Hub repo id (its UNet's files and
    # the configs that give the latent factor are fetched).
    base = resolve_path(
        args.base, "unet", revision=args.revision, variant=args.variant,
        allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if base.is_file():  # one original checkpoint: its UNet, with a named config
        unet, unet_params = _unet_from_single_file(base, args.config, args.allow_pickle)
    else:
        unet, unet_params = cn_jax.load_unet(
            base, variant=args.variant, allow_pickle=args.allow_pickle
        )
    factor = base_latent_factor(base, args.config)
    try:  # the condition encoder must downsample to the base's latents
        config = cn_jax.ControlNetConfig.from_unet(
            unet.config,
            conditioning_channels=args.conditioning_channels,
            controlnet_conditioning_channel_order=args.channel_order,
            conditioning_embedding_type=args.encoder,
            latent_factor=factor,
        )
    except ValueError as e:
        raise ValueError(f"{args.base}: no ControlNet for this base: {e}") from None
    params = cn_jax.init_controlnet_from_unet(unet_params, config)
    cn_jax.save_controlnet(args.out, cn_jax.ControlNet(config), params, format="diffusers")
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(
        f"wrote {args.out}: ControlNet ({n / 1e6:.1f}M parameters, conditions at {factor}x the "
        f"latent size) initialised from {args.base}"
    )
    return 0


def _unet_from_single_file(path, config, allow_pickle):
    import warnings

    import cn_jax

    if config is None:
        raise ValueError(f"{path} is a single checkpoint: pass --config sd15, sd21 or sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer needed here
        sd = cn_jax.load_pipeline(path, config=config, allow_pickle=allow_pickle)
    return sd.unet, sd.unet_params


def _train(args: argparse.Namespace) -> int:
    import logging

    # Before the library's imports, one of which (absl, via orbax) would otherwise
    # install its own root handler first; INFO for cn_jax's lines only.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("cn_jax").setLevel(logging.INFO)
    from cn_jax.config import load_config
    from cn_jax.train.loop import train

    config = load_config(args.config, args.overrides)
    last = train(config, args.workdir)
    if last:
        print(json.dumps(last))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cn_jax.train.export import export_run

    step = export_run(args.run, args.out, format=args.format, step=args.step, ema=args.ema)
    print(f"wrote {args.out} ({args.format}) from step {step} of {args.run}")
    return 0


def _data_fill50k(args: argparse.Namespace) -> int:
    from cn_jax.data.fill50k import make_fill50k

    out = make_fill50k(args.out, num=args.num, size=args.size, seed=args.seed)
    print(f"wrote {args.num} samples to {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import time

    import jax.numpy as jnp

    from cn_jax.pipeline import ControlNetPipeline

    nets = args.controlnet or []
    if args.dataset is None:
        if args.prompt is None:
            raise ValueError("give --prompt (or --dataset to take prompts and conditions from)")
        if len(args.image or []) != len(nets):
            raise ValueError(f"{len(args.image or [])} --image for {len(nets)} --controlnet")
    elif len(nets) != 1:
        raise ValueError("--dataset takes its conditions for exactly one --controlnet")
    if args.compare_base and not nets:
        raise ValueError("--compare-base needs a --controlnet to compare with")
    t0 = time.perf_counter()
    print(f"[1/3] loading {args.base} + {len(nets)} ControlNet(s)", flush=True)
    pipe = ControlNetPipeline.from_pretrained(
        args.base, nets, base_config=args.base_config, tokenizer=args.tokenizer,
        revision=args.revision, variant=args.variant, dtype=jnp.dtype(args.precision),
    )  # fmt: skip
    base = ControlNetPipeline(pipe.sd, []) if args.compare_base else None
    scales = args.scale or [1.0]
    options = dict(
        negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance, controlnet_conditioning_scale=scales[0] if len(scales) == 1
        else scales, guess_mode=args.guess_mode, scheduler=args.sampler, seed=args.seed,
        num_images_per_prompt=args.num_images,
    )  # fmt: skip
    if args.dataset is not None:
        jobs = _dataset_rows(args.dataset, args.rows)
    else:
        images = args.image if len(nets) > 1 else (args.image[0] if nets else None)
        jobs = [(args.prompt, images)]
    print(f"[2/3] compiling and sampling {args.steps} {args.sampler} steps", flush=True)
    t1 = time.perf_counter()
    rows = []
    from tqdm.auto import tqdm

    for row, (prompt, cond) in enumerate(
        tqdm(jobs, desc="sample", unit="row", disable=len(jobs) < 2)
    ):
        options["seed"] = args.seed + row  # each row its own noise, shared by its columns
        out = pipe(prompt, cond, **options)
        if base is not None:
            size = out[0].size
            condition = cond if not isinstance(cond, list) else cond[0]
            alone = base(prompt, None, **options, height=size[1], width=size[0])
            out = [_as_pil(condition, size), *alone, *out]
        rows.append(out)
    t2 = time.perf_counter()
    _save_rows(rows, [prompt for prompt, _ in jobs], args)
    n = sum(len(r) for r in rows)
    print(
        f"[3/3] wrote {args.out} ({len(rows)} row(s), {n} image(s)); load {t1 - t0:.1f}s, "
        f"compile+sample {t2 - t1:.1f}s"
    )
    return 0


def _dataset_rows(path: str, rows: int) -> list:
    """(prompt, condition image) of the first `rows` rows of a dataset folder."""
    from cn_jax.data import open_dataset

    ds = open_dataset(path)
    out = []
    for i in range(min(rows, len(ds))):
        row = ds[i]
        cap = row["caption"]
        out.append((cap if isinstance(cap, str) else cap[0], row["conditioning_image"]))
    return out


def _as_pil(image, size):
    """A condition as the figure shows it: 8-bit RGB at `size`, from any depth."""
    import numpy as np
    from PIL import Image

    from cn_jax.data.transforms import image_to_float

    u8 = np.rint(image_to_float(image, 3, source="condition") * 255).astype(np.uint8)
    return Image.fromarray(u8).resize(size)


def _save_rows(rows: list, prompts: list[str], args: argparse.Namespace) -> None:
    """One PNG, a row per prompt. A figure (--compare-base or --dataset) is
    labelled (columns, prompts) with small images scaled up; the images of one
    --prompt are tiled as they are."""
    from pathlib import Path

    from cn_jax.grid import labelled_grid

    columns = None
    if args.compare_base:
        k = args.num_images
        columns = ["condition", *["base alone"] * k, *["with the ControlNet"] * k]
    if args.compare_base or args.dataset is not None:
        grid = labelled_grid(rows, columns, prompts)
    else:
        grid = labelled_grid(rows, min_cell=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)


def _report(args: argparse.Namespace) -> int:
    from cn_jax.eval.report import check_targets, run_metrics, save_report

    m = run_metrics(args.run)
    checks = check_targets(m, args.min_iou, args.min_gain, args.min_colour)
    m["targets"] = checks
    if args.seconds is not None:
        m["train_seconds"] = args.seconds
    save_report(m, args.out)
    jump = m["sudden_convergence"]
    print(
        f"held-out IoU {m['iou_initial']:.3f} (step {m['initial_step']}) -> "
        f"{m['iou_final']:.3f} (step {m['final_step']}); colour kept "
        f"{100 * m['colour_adherence']:.0f}%"
    )
    if "iou_chance" in m:
        print(f"chance level (perfect circles in random places): IoU {m['iou_chance']:.3f}")
    if jump is not None:
        print(
            f"largest jump: IoU {jump['iou_before']:.3f} -> {jump['iou_after']:.3f} between "
            f"steps {jump['from_step']} and {jump['to_step']}"
        )
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"wrote {args.out}/metrics.json and {args.out}/control_curve.png")
    return 0 if all(checks.values()) or not args.strict else 1


def _annotate(args: argparse.Namespace) -> int:
    from PIL import Image

    from cn_jax.data.annotators import annotate

    image = args.input  # annotate reads it, any depth (16-bit by its own range)
    options = {}
    if args.name == "canny":
        options = {"low_threshold": args.low, "high_threshold": args.high}
    elif args.name == "tile":
        options = {"factor": args.factor}
    elif args.name == "shuffle":
        options = {"seed": args.seed}
    Image.fromarray(annotate(args.name, image, **options)).save(args.output)
    print(f"wrote {args.output} ({args.name})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cn_jax.bench.report import run_command

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cn-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and devices").set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert a ControlNet between file layouts")
    conv.add_argument(
        "input",
        help="diffusers folder or .safetensors (diffusers or original keys), or a Hub repo id",
    )
    conv.add_argument("--revision", default=None, help="Hub branch, tag or commit of the input")
    conv.add_argument("output", help="folder (diffusers) or .safetensors file (original)")
    conv.add_argument("--format", choices=("diffusers", "original"), default="diffusers")
    conv.add_argument("--dtype", choices=DTYPES, default=None, help="cast the saved weights")
    conv.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.ckpt/.pth input (torch.load with weights_only=True)",
    )
    conv.set_defaults(func=_convert)

    tr = sub.add_parser("train", help="train (or resume) a ControlNet, or a base UNet")
    tr.add_argument("--config", required=True, help="YAML config (see configs/)")
    tr.add_argument("--workdir", required=True, help="run directory; resumes if it has checkpoints")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tr.set_defaults(func=_train)

    ex = sub.add_parser(
        "export", help="export a run's ControlNet (or its trained base: a pipeline folder)"
    )
    ex.add_argument("--run", required=True, help="the run directory (--workdir of train)")
    ex.add_argument("--out", required=True, help="folder (diffusers) or .safetensors (original)")
    ex.add_argument("--format", choices=("diffusers", "original"), default="diffusers")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights")
    ex.set_defaults(func=_export)

    sm = sub.add_parser("sample", help="generate images with one or more ControlNets")
    sm.add_argument(
        "--base", required=True,
        help="diffusers pipeline folder, one checkpoint, or a Hub repo id (org/name)",
    )  # fmt: skip
    sm.add_argument("--revision", default=None, help="Hub branch, tag or commit of --base")
    sm.add_argument("--variant", default=None, help="weight variant of --base, e.g. fp16")
    sm.add_argument("--base-config", default=None, help="named config of a single-file base")
    sm.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file bases)")
    sm.add_argument(
        "--controlnet", action="append",
        help="folder, file or Hub repo id; repeat for several; none: base alone",
    )  # fmt: skip
    sm.add_argument("--image", action="append", help="one per --controlnet")
    sm.add_argument("--prompt", default=None)
    sm.add_argument(
        "--dataset", default=None, help="take prompts and conditions from this dataset folder"
    )
    sm.add_argument("--rows", type=int, default=8, help="dataset rows to sample (--dataset)")
    sm.add_argument(
        "--compare-base", action="store_true",
        help="rows of condition | base alone | with the ControlNet (same noise), labelled",
    )  # fmt: skip
    sm.add_argument("--negative-prompt", default=None)
    sm.add_argument("--steps", type=int, default=20)
    sm.add_argument(
        "--precision", choices=DTYPES, default="float32",
        help="weights and compute (bfloat16 on GPUs/TPUs: half the memory, faster)",
    )  # fmt: skip
    sm.add_argument("--guidance", type=float, default=7.5)
    sm.add_argument("--scale", type=float, action="append", default=None, help="per ControlNet")
    sm.add_argument("--guess-mode", action="store_true")
    sm.add_argument("--sampler", default="ddim", help="ddim, euler, euler_a, dpmpp_2m, unipc")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--num-images", type=int, default=1)
    sm.add_argument("--out", required=True, help="PNG (a grid when --num-images > 1)")
    sm.set_defaults(func=_sample)

    rp = sub.add_parser(
        "report", help="metrics.json + control_curve.png from a run's held-out evaluation"
    )
    rp.add_argument("--run", required=True, help="a run trained with eval.every set")
    rp.add_argument("--out", required=True, help="folder for metrics.json and control_curve.png")
    rp.add_argument("--min-iou", type=float, help="target: final IoU (default 0.65)")
    rp.add_argument("--min-gain", type=float, help="target: final - step-0 IoU (default 0.2)")
    rp.add_argument("--min-colour", type=float, help="target: colour adherence (default 0.9)")
    rp.add_argument("--seconds", type=float, default=None, help="training time to record")
    rp.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    rp.set_defaults(func=_report)

    an = sub.add_parser("annotate", help="make a condition image from a photo")
    an.add_argument("name", choices=("canny", "scribble", "shuffle", "tile", "grayscale"))
    an.add_argument("input")
    an.add_argument("output")
    an.add_argument("--low", type=float, default=100, help="canny low threshold")
    an.add_argument("--high", type=float, default=200, help="canny high threshold")
    an.add_argument("--factor", type=float, default=4.0, help="tile down-sampling factor")
    an.add_argument("--seed", type=int, default=0, help="shuffle seed")
    an.set_defaults(func=_annotate)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    f50 = data_sub.add_parser("fill50k", help="synthetic circles in the fill50k layout")
    f50.add_argument("--out", required=True)
    f50.add_argument("--num", type=int, default=1000)
    f50.add_argument("--size", type=int, default=64)
    f50.add_argument("--seed", type=int, default=0)
    f50.set_defaults(func=_data_fill50k)

    init = sub.add_parser(
        "init-controlnet", help="a new ControlNet initialised from a base model's UNet"
    )
    init.add_argument(
        "--base",
        required=True,
        help="diffusers pipeline or unet folder, one checkpoint, bundled:tiny, or a Hub repo id",
    )
    init.add_argument("--revision", default=None, help="Hub branch, tag or commit of --base")
    init.add_argument("--variant", default=None, help="weight variant of --base, e.g. fp16")
    init.add_argument("--out", required=True, help="output folder (diffusers format)")
    init.add_argument("--config", default=None, help="named config for a single checkpoint")
    init.add_argument("--conditioning-channels", type=int, default=3)
    init.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb")
    init.add_argument("--encoder", choices=("released", "paper"), default="released")
    init.add_argument("--allow-pickle", action="store_true")
    init.set_defaults(func=_init_controlnet)

    bench = sub.add_parser(
        "bench", help="benchmarks: train step, ControlNet vs fine-tuning, sampling"
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_help = {
        "train": "the train step of a config on a synthetic batch: time, FLOPs, memory",
        "compare": "the ControlNet step vs fine-tuning the UNet, interleaved: ratios",
        "sample": "sampler steps/s and images/s with CFG and 1 or 2 ControlNets",
    }

    def bench_command(name: str, help_: str) -> argparse.ArgumentParser:
        """A `cn-jax bench NAME` parser with what every benchmark takes."""
        b = bench_sub.add_parser(name, help=help_)
        b.add_argument("--config", required=True, help="YAML config (e.g. configs/sd15-shape.yaml)")
        b.add_argument("overrides", nargs="*", help="section.key=value overrides")
        b.add_argument("--json", default=None, help="write the result as JSON here")
        b.set_defaults(func=_bench)
        return b

    for name, help_ in bench_help.items():
        b = bench_command(name, help_)
        b.add_argument(
            "--steps", type=int, default=20 if name == "sample" else 10,
            help="sampler steps per image" if name == "sample" else "timed train steps",
        )  # fmt: skip
        b.add_argument("--warmup", type=int, default=1, help="untimed runs first")
        if name == "sample":
            b.add_argument("--batch", type=int, default=1, help="images per run")
            b.add_argument("--controlnets", type=int, choices=(1, 2), default=1)
            b.add_argument("--sampler", default="ddim", help="ddim, euler, euler_a, dpmpp_2m...")
            b.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1)")
            b.add_argument("--repeats", type=int, default=3, help="timed sampling runs")
        else:
            b.add_argument(
                "--devices", type=int, default=1, help="devices to use (0: all); default 1"
            )
            b.add_argument(
                "--no-run", action="store_true",
                help="compile only: FLOPs and memory without running (no weights materialised)",
            )  # fmt: skip
    low = bench_command(
        "lower", "lower the train step and sampling for other platforms (jax.export)"
    )
    low.add_argument("--platforms", default="cuda,tpu", help="jax.export names: cuda,rocm,tpu,cpu")
    low.add_argument("--no-flops", action="store_true", help="skip counting each module's FLOPs")
    dat = bench_command(
        "data", "samples/s of the input pipeline vs a bare decode loop, on generated PNGs"
    )
    dat.add_argument("--workers", default="1,2", help="loader worker counts, e.g. 1,2,4")
    dat.add_argument("--data", default=None, help="folder for the generated set (default: temp)")
    dat.add_argument("--samples", type=int, default=256, help="rows of the generated set")
    dat.add_argument("--size", type=int, default=512, help="side of the generated PNGs (px)")
    dat.add_argument("--batch", type=int, default=None, help="default train.batch_size")
    dat.add_argument(
        "--gpu-rate", type=float, default=40.0, help="samples/s one GPU trains (cores per GPU)"
    )
    return parser


# The user's errors: what they gave is wrong (a file, a key, a value, a field) or the
# file system refused. Every cn_jax error for bad input is a ValueError subclass
# (ConfigError, WeightFileError, DatasetError, NonFiniteLossError, ...). Anything
# else is our bug and keeps its stack trace.
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """The `cn-jax` command (argv None: this process's command line) or one call of it.

    Errors that are the user's end in one line, `cn-jax COMMAND: error: ...`, and
    exit code 2 (`CN_JAX_TRACEBACK=1` shows the stack trace too); an interrupt
    exits with 130; anything else is a bug and raises with its trace.
    """
    if argv is None:  # the command itself: start over with huge pages where they help
        from cn_jax import runtime

        runtime.reexec_with_hugepages()
        runtime.configure_host()  # the program owns the process: its caches may be dropped
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may sit anywhere among the options.
    if extra and hasattr(args, "overrides") and all(_is_override(e) for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "command", None) == "sample" and args.scale is None:
        args.scale = [1.0]
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("CN_JAX_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"cn-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cn-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and "=" in arg


def _one_line(e: BaseException) -> str:
    """The error's message (its own lines kept: a listing of bad keys), or its type
    where it has none; OS errors as 'path: reason'."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
