"""`cn-jax` command line: parse, then call the library.

cn-jax info                                   versions and devices
cn-jax convert IN OUT --format diffusers|original [--dtype float16] [--allow-pickle]
                                              a ControlNet from one layout to the other
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("float32", "float16", "bfloat16")


def _info(args: argparse.Namespace) -> int:
    import flax
    import jax

    import cn_jax

    print(f"cn_jax {cn_jax.__version__}, jax {jax.__version__}, flax {flax.__version__}")
    print(f"backend {jax.default_backend()}: {jax.devices()}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    import cn_jax

    cnet, params = cn_jax.load_controlnet(args.input, allow_pickle=args.allow_pickle)
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    cn_jax.save_controlnet(args.output, cnet, params, format=args.format, dtype=dtype)
    print(f"wrote {args.output} ({args.format})")
    return 0


def _init_controlnet(args: argparse.Namespace) -> int:
    from pathlib import Path

    import jax

    import cn_jax

    base = Path(args.base)
    if base.is_file():  # one original checkpoint: its UNet, with a named config
        unet, unet_params = _unet_from_single_file(base, args.config, args.allow_pickle)
    else:
        unet, unet_params = cn_jax.load_unet(base, allow_pickle=args.allow_pickle)
    config = cn_jax.ControlNetConfig.from_unet(
        unet.config,
        conditioning_channels=args.conditioning_channels,
        controlnet_conditioning_channel_order=args.channel_order,
        conditioning_embedding_type=args.encoder,
    )
    params = cn_jax.init_controlnet_from_unet(unet_params, config)
    cn_jax.save_controlnet(args.out, cn_jax.ControlNet(config), params, format="diffusers")
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: ControlNet ({n / 1e6:.1f}M parameters) initialised from {base}")
    return 0


def _unet_from_single_file(path, config, allow_pickle):
    import warnings

    import cn_jax

    if config is None:
        raise ValueError(f"{path} is a single checkpoint: pass --config sd15 or sd21")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer needed here
        sd = cn_jax.load_pipeline(path, config=config, allow_pickle=allow_pickle)
    return sd.unet, sd.unet_params


def _train(args: argparse.Namespace) -> int:
    import logging

    from cn_jax.config import load_config
    from cn_jax.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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

    from cn_jax.pipeline import ControlNetPipeline, save_grid

    t0 = time.perf_counter()
    print(f"[1/3] loading {args.base} + {len(args.controlnet)} ControlNet(s)", flush=True)
    pipe = ControlNetPipeline.from_pretrained(
        args.base, args.controlnet, base_config=args.base_config, tokenizer=args.tokenizer
    )
    if len(args.image) != len(args.controlnet):
        raise ValueError(f"{len(args.image)} --image for {len(args.controlnet)} --controlnet")
    images = args.image if len(args.image) > 1 else args.image[0]
    scale = args.scale if len(args.scale) > 1 else args.scale[0]
    print(f"[2/3] compiling and sampling {args.steps} {args.sampler} steps", flush=True)
    t1 = time.perf_counter()
    out = pipe(
        args.prompt,
        images,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        controlnet_conditioning_scale=scale,
        guess_mode=args.guess_mode,
        scheduler=args.sampler,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
    )
    t2 = time.perf_counter()
    save_grid(out, args.out)
    print(
        f"[3/3] wrote {args.out} ({len(out)} image(s)); load {t1 - t0:.1f}s, "
        f"compile+sample {t2 - t1:.1f}s"
    )
    return 0


def _annotate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from cn_jax.data.annotators import annotate

    try:
        image = np.asarray(Image.open(args.input).convert("RGB"))
    except OSError as e:
        raise ValueError(f"{args.input}: not a readable image ({e})") from None
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cn-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and devices").set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert a ControlNet between file layouts")
    conv.add_argument("input", help="diffusers folder or .safetensors (diffusers or original keys)")
    conv.add_argument("output", help="folder (diffusers) or .safetensors file (original)")
    conv.add_argument("--format", choices=("diffusers", "original"), default="diffusers")
    conv.add_argument("--dtype", choices=DTYPES, default=None, help="cast the saved weights")
    conv.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.ckpt/.pth input (torch.load with weights_only=True)",
    )
    conv.set_defaults(func=_convert)

    tr = sub.add_parser("train", help="train (or resume) a ControlNet")
    tr.add_argument("--config", required=True, help="YAML config (see configs/)")
    tr.add_argument("--workdir", required=True, help="run directory; resumes if it has checkpoints")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tr.set_defaults(func=_train)

    ex = sub.add_parser("export", help="export the trained ControlNet of a run")
    ex.add_argument("--run", required=True, help="the run directory (--workdir of train)")
    ex.add_argument("--out", required=True, help="folder (diffusers) or .safetensors (original)")
    ex.add_argument("--format", choices=("diffusers", "original"), default="diffusers")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights")
    ex.set_defaults(func=_export)

    sm = sub.add_parser("sample", help="generate images with one or more ControlNets")
    sm.add_argument("--base", required=True, help="diffusers pipeline folder or one checkpoint")
    sm.add_argument("--base-config", default=None, help="named config of a single-file base")
    sm.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file bases)")
    sm.add_argument("--controlnet", action="append", required=True, help="repeat for several")
    sm.add_argument("--image", action="append", required=True, help="one per --controlnet")
    sm.add_argument("--prompt", required=True)
    sm.add_argument("--negative-prompt", default=None)
    sm.add_argument("--steps", type=int, default=20)
    sm.add_argument("--guidance", type=float, default=7.5)
    sm.add_argument("--scale", type=float, action="append", default=None, help="per ControlNet")
    sm.add_argument("--guess-mode", action="store_true")
    sm.add_argument("--sampler", default="ddim", help="ddim, euler, euler_a, dpmpp_2m, unipc")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--num-images", type=int, default=1)
    sm.add_argument("--out", required=True, help="PNG (a grid when --num-images > 1)")
    sm.set_defaults(func=_sample)

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
        "--base", required=True, help="diffusers pipeline or unet folder, or one checkpoint"
    )
    init.add_argument("--out", required=True, help="output folder (diffusers format)")
    init.add_argument("--config", default=None, help="named config for a single checkpoint")
    init.add_argument("--conditioning-channels", type=int, default=3)
    init.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb")
    init.add_argument("--encoder", choices=("released", "paper"), default="released")
    init.add_argument("--allow-pickle", action="store_true")
    init.set_defaults(func=_init_controlnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "sample" and args.scale is None:
        args.scale = [1.0]
    from cn_jax.weights.errors import WeightFileError

    try:
        return args.func(args)
    except (WeightFileError, ValueError, FileNotFoundError) as e:
        print(f"cn-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
