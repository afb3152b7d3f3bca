#!/usr/bin/env python
"""cn_jax vs diffusers (PyTorch) at the same shapes, timed interleaved.

Tasks (--tasks, comma-separated):
  controlnet  the ControlNet train step. Ours: `cn_jax.bench.TrainBench` (the
              real compiled step on cached latents and text embeddings). Theirs:
              UNet2DConditionModel (requires_grad False) + ControlNetModel,
              DDPM noise, MSE on eps, backward, global-norm clipping as
              `train.max_grad_norm`, torch.optim.AdamW with the config's
              hyperparameters, zero_grad(set_to_none=True). Its parts are
              timed too (`theirs_parts_s`: forward, backward, clip, optimizer);
              ours are one fused program (split them with
              `python -m cn_jax.bench.profile --ops`).
  finetune    the same step training the whole UNet, no ControlNet.
  sample      the sampling loop: `--sample-steps` DDIM steps with CFG (one
              2B batch per step) and `--controlnets` ControlNets. Ours:
              `cn_jax.bench.SampleBench.run_loop` (one lax.scan program).
              Theirs: a manual loop equal to the denoising loop of diffusers'
              StableDiffusionControlNetPipeline (scale_model_input, ControlNets
              and UNet on the CFG pair, guidance, DDIMScheduler.step), without
              its text encoding and VAE decode, under torch.inference_mode().

Both sides get the architecture of `model.architecture` (the diffusers
models are built from the same config dicts: `cn_jax.models.presets` and
`ControlNetConfig.to_dict()`), random weights, the same batch, resolution and
compute dtype (`train.precision`; bfloat16 runs torch under autocast for
training and in bfloat16 weights for sampling). Ratios are ours / theirs.

Modes:
  default     one process: every side is built, then run in turn step by step
              (ours, theirs, ours, theirs, ...). Peak RSS cannot be split per
              side in one process, so none is reported.
  --isolate   alternating subprocesses: each (side, task) runs alone in a
              fresh interpreter (ours imports no torch, theirs no JAX), in
              turn, for --rounds rounds; each reports its step times, its peak
              RSS over the whole process (building and compiling included) and
              its peak RSS during the timed calls only (the kernel's counter
              reset after warm-up). Needed where all sides do not fit in memory
              at once (SD 1.5 shapes on a small machine).

Host memory: our side runs as the `cn-jax` command runs, with glibc's
malloc asking for transparent huge pages where that changes something
(`cn_jax.runtime.hugepage_env`: fewer page faults on the temporaries XLA
allocates at every call); `--hugepages both` gives PyTorch's side the same
environment, `none` neither (`hugepages` in the JSON says what each side had).
In one process (no --isolate) both sides share one setting: ours unless none.

torch uses --threads threads (default: the CPUs this process may run on, as
XLA's CPU client does) and flushes denormals, as XLA does.

  taskset -c 0 .venv/bin/python scripts/bench_vs_diffusers.py \\
      --config configs/bench-small.yaml --steps 5 --json runs/bench/vs_diffusers.json
  taskset -c 0 .venv/bin/python scripts/bench_vs_diffusers.py --config configs/sd15-shape.yaml \\
      --resolution 256 --batch 1 --tasks controlnet,finetune --isolate --steps 3 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("controlnet", "finetune", "sample")
# The parts of a PyTorch training step timed separately (`theirs_parts_s`): noise +
# forward + loss, backward, gradient clipping, AdamW step + zero_grad.
TRAIN_PARTS = ("forward", "backward", "clip", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench-small.yaml"))
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--resolution", type=int, default=None, help="default: data.resolution")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per side (per round)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps per image")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling loops per side")
    p.add_argument("--controlnets", type=int, choices=(1, 2), default=1)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {TASKS}")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--isolate", action="store_true", help="one subprocess per side and task")
    p.add_argument("--rounds", type=int, default=2, help="--isolate: alternations per task")
    p.add_argument("--torch-device", default="cpu")
    p.add_argument(
        "--hugepages", choices=("ours", "both", "none"), default="ours",
        help="which sides run with glibc malloc's huge pages (cn_jax.runtime.hugepage_env)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child: SIDE:TASK
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)  # child (theirs): spec file
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; expected {TASKS}")
    return args


# -- the shared shapes -----------------------------------------------------------


def load(args):
    """Our config: the file + overrides + --batch/--resolution, on cached latents."""
    from cn_jax.config import load_config

    overrides = list(args.overrides)
    if args.batch is not None:
        overrides.append(f"train.batch_size={args.batch}")
    if args.resolution is not None:
        overrides.append(f"data.resolution={args.resolution}")
    # The diffusers step starts from latents and text embeddings: so does ours.
    overrides += ["data.cache_latents=true", "train.trainable=controlnet", "train.grad_accum=1"]
    config = load_config(args.config, overrides)
    if config.model.base is not None:
        raise ValueError("bench_vs_diffusers builds random models: set model.base=null")
    return config


def torch_spec(config) -> dict:
    """Everything the diffusers side needs, as plain JSON (the child imports no cn_jax)."""
    from cn_jax.models.config import UNetConfig
    from cn_jax.models.presets import preset
    from cn_jax.models.vae import AutoencoderKLConfig
    from cn_jax.train.loop import controlnet_config

    cfgs = preset(config.model.architecture)
    unet = UNetConfig.from_dict(cfgs["unet"], config.model.architecture)
    lf = 1 if cfgs["vae"] is None else AutoencoderKLConfig.from_dict(cfgs["vae"]).latent_factor
    cnet = controlnet_config(config, unet, lf)
    if not cnet.is_released:
        raise ValueError("diffusers has only the released condition encoder")
    r, tc = config.data.resolution, config.train
    return {
        "unet": unet.to_dict(),
        "controlnet": cnet.to_dict(),
        "scheduler": cfgs["scheduler"],
        "batch": tc.batch_size,
        "resolution": r,
        "latent": [unet.in_channels, r // lf, r // lf],
        "context": [cfgs["text_encoder"]["max_position_embeddings"], unet.cross_attention_dim],
        "conditioning_channels": config.model.conditioning_channels,
        "precision": tc.precision,
        "seed": tc.seed,
        "optimizer": {
            "lr": tc.learning_rate,
            "betas": [tc.adam_beta1, tc.adam_beta2],
            "eps": tc.adam_eps,
            "weight_decay": tc.weight_decay,
            "max_grad_norm": tc.max_grad_norm,
        },
    }


# -- theirs: diffusers / PyTorch -----------------------------------------------------


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(spec: dict, device: str):
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    b, (c, h, w), (length, dim) = spec["batch"], spec["latent"], spec["context"]
    r, cc = spec["resolution"], spec["conditioning_channels"]
    latents = torch.randn(b, c, h, w, generator=g)
    ctx = torch.randn(b, length, dim, generator=g)
    uctx = torch.randn(b, length, dim, generator=g)
    cond = torch.rand(b, cc, r, r, generator=g)
    return [x.to(device) for x in (latents, ctx, uctx, cond)]


class TorchTrain:
    """One diffusers training step (ControlNet, or the whole UNet with `controlnet=False`)."""

    def __init__(self, spec: dict, controlnet: bool, device: str = "cpu"):
        import torch
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(spec["seed"])
        self.device, self.spec = device, spec
        self.unet = UNet2DConditionModel.from_config(spec["unet"]).to(device).train()
        self.net = None
        if controlnet:
            self.net = ControlNetModel.from_config(spec["controlnet"]).to(device).train()
            self.unet.requires_grad_(False)
            self.params = list(self.net.parameters())
        else:
            self.params = list(self.unet.parameters())
        o = spec["optimizer"]
        self.opt = torch.optim.AdamW(
            self.params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            weight_decay=o["weight_decay"],
        )  # fmt: skip
        self.scheduler = DDPMScheduler.from_config(spec["scheduler"])
        self.latents, self.ctx, _, self.cond = _inputs(spec, device)
        self.loss = None
        self.parts: list[dict[str, float]] = []  # seconds per part, one dict per step

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        marks = [time.perf_counter()]
        b = self.latents.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=self.device)
        noise = torch.randn_like(self.latents)
        noisy = self.scheduler.add_noise(self.latents, noise, t)
        bf16 = self.spec["precision"] == "bfloat16"
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            down = mid = None
            if self.net is not None:
                down, mid = self.net(
                    noisy, t, encoder_hidden_states=self.ctx, controlnet_cond=self.cond,
                    return_dict=False,
                )  # fmt: skip
            pred = self.unet(
                noisy, t, encoder_hidden_states=self.ctx, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False,
            )[0]  # fmt: skip
        loss = F.mse_loss(pred.float(), noise.float())
        self._mark(marks)
        loss.backward()
        self._mark(marks)
        if self.spec["optimizer"]["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec["optimizer"]["max_grad_norm"])
        self._mark(marks)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())  # waits for the step
        self._mark(marks)
        self.parts.append({k: t1 - t0 for k, t0, t1 in zip(TRAIN_PARTS, marks, marks[1:])})
        return marks[-1] - marks[0]

    def _mark(self, marks: list[float]) -> None:
        # On the CPU every part has finished when its call returns; on CUDA the
        # synchronisation between parts costs a little of the step's overlap.
        _sync(self.device)
        marks.append(time.perf_counter())


class TorchSample:
    """The denoising loop of StableDiffusionControlNetPipeline, written out (DDIM, CFG)."""

    def __init__(self, spec: dict, controlnets: int, steps: int, guidance: float, device="cpu"):
        import torch
        from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel

        torch.manual_seed(spec["seed"])
        dtype = torch.bfloat16 if spec["precision"] == "bfloat16" else torch.float32
        self.device, self.dtype, self.steps, self.guidance = device, dtype, steps, guidance
        # (bfloat16: cast after building; `.to(device, float32)` would warn for nothing)
        cast = (lambda m: m.to(dtype)) if dtype != torch.float32 else (lambda m: m)
        self.unet = cast(UNet2DConditionModel.from_config(spec["unet"]).to(device)).eval()
        self.nets = [
            cast(ControlNetModel.from_config(spec["controlnet"]).to(device)).eval()
            for _ in range(controlnets)
        ]
        self.scheduler = DDIMScheduler.from_config(spec["scheduler"])
        latents, ctx, uctx, cond = _inputs(spec, device)
        self.shape = latents.shape
        self.ctx2 = torch.cat([uctx, ctx]).to(dtype)
        self.cond2 = torch.cat([cond, cond]).to(dtype)

    def run_loop(self) -> float:
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            s = self.scheduler
            s.set_timesteps(self.steps, device=self.device)
            g = torch.Generator(device=self.device).manual_seed(0)
            x = torch.randn(self.shape, generator=g, device=self.device) * s.init_noise_sigma
            for t in s.timesteps:
                inp = s.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
                down = mid = None
                for net in self.nets:
                    d, m = net(
                        inp, t, encoder_hidden_states=self.ctx2, controlnet_cond=self.cond2,
                        conditioning_scale=1.0, return_dict=False,
                    )  # fmt: skip
                    down = d if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                out = self.unet(
                    inp, t, encoder_hidden_states=self.ctx2,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False,
                )[0].float()  # fmt: skip
                uncond, cond = out.chunk(2)
                out = uncond + self.guidance * (cond - uncond)
                x = s.step(out, t, x, return_dict=False)[0]
        _sync(self.device)
        return time.perf_counter() - t0


# -- ours: cn_jax ---------------------------------------------------------------------


def ours_runner(config, task: str, args):
    """(callable returning seconds per call, extra info) for our side of `task`."""
    import jax

    from cn_jax.bench import SampleBench, TrainBench, finetune_config

    if task == "sample":
        b = SampleBench(
            config, batch=config.train.batch_size, steps=args.sample_steps,
            controlnets=args.controlnets, sampler="ddim", guidance_scale=args.guidance,
        )  # fmt: skip
        return b.run_loop, {"compile_s": b.compile_s["loop"], "memory": b.memory}
    cfg = config if task == "controlnet" else finetune_config(config)
    b = TrainBench(cfg, devices=jax.devices()[:1])
    info = {"compile_s": b.compile_s, "flops_per_step": b.flops, "memory": b.memory}
    return b.step, info


def theirs_runner(spec: dict, task: str, args):
    if task == "sample":
        s = TorchSample(spec, args.controlnets, args.sample_steps, args.guidance, args.torch_device)
        return s.run_loop, {}
    t = TorchTrain(spec, controlnet=task == "controlnet", device=args.torch_device)
    return t.step, {"parts_s": t.parts}  # filled by each step


def _after_warmup(info: dict) -> None:
    """Forget the per-part times of the warm-up calls (kept: the timed ones)."""
    if "parts_s" in info:
        del info["parts_s"][:]


def _timed_calls(task: str, args) -> int:
    return args.repeats if task == "sample" else args.steps


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so the next reading
    covers only what follows (the timed steps, not model building or compiling)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# -- the two modes --------------------------------------------------------------------


def run_in_process(args, config, spec) -> dict:
    """Build every side, then interleave their calls: {task: {side: [seconds]}}."""
    setup_torch(args.threads)
    times, info = {}, {}
    for task in args.tasks:
        runners = {}
        runners["ours"], info[(task, "ours")] = ours_runner(config, task, args)
        runners["theirs"], info[(task, "theirs")] = theirs_runner(spec, task, args)
        for _ in range(args.warmup):
            for run in runners.values():
                run()
        for side in runners:
            _after_warmup(info[(task, side)])
        times[task] = {k: [] for k in runners}
        for _ in range(_timed_calls(task, args)):
            for side, run in runners.items():
                times[task][side].append(run())
        del runners
    return {"times": times, "info": info, "rss": {}}


def run_child(args) -> None:
    """One side of one task, alone in this process; prints RESULT {json}."""
    side, task = args.only.split(":")
    if side == "theirs":
        setup_torch(args.threads)
        spec = json.loads(Path(args.spec).read_text())
        run, info = theirs_runner(spec, task, args)
    else:
        run, info = ours_runner(load(args), task, args)
    for _ in range(args.warmup):
        run()
    _after_warmup(info)
    setup_peak = _peak_rss()
    reset = _reset_peak_rss()
    times = [run() for _ in range(_timed_calls(task, args))]
    steps_peak = _vm_hwm() if reset else None
    out = {
        "times": times,
        "peak_rss_bytes": max(setup_peak, steps_peak or 0, _peak_rss()),
        "steps_peak_rss_bytes": steps_peak,
        "info": info,
    }
    print("RESULT " + json.dumps(out, default=str), flush=True)


def side_env(args, side: str) -> dict[str, str]:
    """The environment of one side's subprocess (--hugepages)."""
    from cn_jax import runtime

    if args.hugepages == "both" or (args.hugepages == "ours" and side == "ours"):
        return runtime.hugepage_env() or dict(os.environ)
    return dict(os.environ)


def run_isolated(args, spec) -> dict:
    """Alternate one subprocess per (side, task), --rounds times."""
    times, info, rss = {}, {}, {}
    envs = {side: side_env(args, side) for side in ("ours", "theirs")}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        base = [sys.executable, str(Path(__file__).resolve()), *_child_argv(args)]
        for task in args.tasks:
            times[task] = {"ours": [], "theirs": []}
            for _ in range(args.rounds):
                for side in ("ours", "theirs"):
                    cmd = [*base, "--only", f"{side}:{task}", "--spec", str(spec_file)]
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, check=False, env=envs[side]
                    )
                    line = next(
                        (x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None
                    )
                    if proc.returncode or line is None:
                        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                        raise RuntimeError(f"{side}:{task} failed (exit {proc.returncode})")
                    r = json.loads(line[len("RESULT ") :])
                    times[task][side] += r["times"]
                    parts = info.get((task, side), {}).get("parts_s", [])
                    info[(task, side)] = r["info"]
                    if "parts_s" in r["info"]:  # every round's steps
                        r["info"]["parts_s"] = parts + r["info"]["parts_s"]
                    for key in ("peak_rss_bytes", "steps_peak_rss_bytes"):
                        prev = rss.get((task, side, key)) or 0
                        rss[(task, side, key)] = max(prev, r[key] or 0) or None
    return {"times": times, "info": info, "rss": rss, "envs": envs}


def _child_argv(args) -> list[str]:
    out = ["--config", str(args.config), *args.overrides]
    if args.batch is not None:
        out += ["--batch", str(args.batch)]
    if args.resolution is not None:
        out += ["--resolution", str(args.resolution)]
    for flag in ("steps", "sample_steps", "repeats", "controlnets", "guidance", "warmup",
                 "threads", "torch_device"):  # fmt: skip
        out += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return out


# -- results --------------------------------------------------------------------------


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(args, spec: dict, measured: dict) -> dict:
    import diffusers
    import jax
    import torch

    from cn_jax import runtime

    out = {
        "config": str(args.config),
        "overrides": list(args.overrides),
        "architecture": None,
        "batch": spec["batch"],
        "resolution": spec["resolution"],
        "precision": spec["precision"],
        "threads": args.threads,
        "mode": "isolated subprocesses" if args.isolate else "one process",
        "interleaved": True,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },  # fmt: skip
        "hugepages": {
            side: runtime.host_hugepages(measured.get("envs", {}).get(side))
            for side in ("ours", "theirs")
        },
        "sampling_reference": "manual loop equal to StableDiffusionControlNetPipeline's "
        "denoising loop (DDIM, CFG), no text encoding or VAE decode",
    }
    times, rss = measured["times"], measured["rss"]
    for task in args.tasks:
        ours, theirs = (statistics.median(times[task][s]) for s in ("ours", "theirs"))
        r = {
            "ours_s": ours,
            "theirs_s": theirs,
            "time_ratio": _ratio(ours, theirs),
            "ours_times_s": times[task]["ours"],
            "theirs_times_s": times[task]["theirs"],
            "ours_info": measured["info"].get((task, "ours"), {}),
        }
        parts = measured["info"].get((task, "theirs"), {}).get("parts_s")
        if parts:  # training tasks: where PyTorch's step goes
            r["theirs_parts_s"] = {k: statistics.median(x[k] for x in parts) for k in TRAIN_PARTS}
        for key in ("peak_rss_bytes", "steps_peak_rss_bytes"):
            for side in ("ours", "theirs"):
                r[f"{side}_{key}"] = rss.get((task, side, key))
        r["rss_ratio"] = _ratio(r["ours_peak_rss_bytes"], r["theirs_peak_rss_bytes"])
        r["steps_rss_ratio"] = _ratio(
            r["ours_steps_peak_rss_bytes"], r["theirs_steps_peak_rss_bytes"]
        )
        if task == "sample":
            r.update(
                steps=args.sample_steps, controlnets=args.controlnets,
                ours_it_per_s=args.sample_steps / ours, theirs_it_per_s=args.sample_steps / theirs,
            )  # fmt: skip
        out[task] = r
    if "controlnet" in out and "finetune" in out:
        cn, ft = out["controlnet"], out["finetune"]
        out["controlnet_vs_finetune"] = {
            side: {
                "time_ratio": _ratio(cn[f"{side}_s"], ft[f"{side}_s"]),
                "rss_ratio": _ratio(cn[f"{side}_peak_rss_bytes"], ft[f"{side}_peak_rss_bytes"]),
                "steps_rss_ratio": _ratio(
                    cn[f"{side}_steps_peak_rss_bytes"], ft[f"{side}_steps_peak_rss_bytes"]
                ),
            }
            for side in ("ours", "theirs")
        }
    return out


def format_summary(r: dict) -> str:
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    num = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
    lines = [
        f"cn_jax vs diffusers: batch {r['batch']}, {r['resolution']} px, {r['precision']}, "
        f"{r['threads']} thread(s), {r['mode']}, interleaved; huge pages: ours "
        f"{r['hugepages']['ours']}, theirs {r['hugepages']['theirs']}",
        f"{'task':<12}{'ours':>12}{'theirs':>12}{'ours/theirs':>13}{'RSS ours':>12}"
        f"{'RSS theirs':>12}{'RSS ratio':>11}",
    ]
    for task in TASKS:
        if task not in r:
            continue
        t = r[task]
        lines.append(
            f"{task:<12}{t['ours_s']:>11.4g}s{t['theirs_s']:>11.4g}s{num(t['time_ratio']):>13}"
            f"{gib(t['ours_peak_rss_bytes']):>12}{gib(t['theirs_peak_rss_bytes']):>12}"
            f"{num(t['rss_ratio']):>11}"
        )
    if "sample" in r:
        s = r["sample"]
        lines.append(
            f"sampling: {s['steps']} steps, {s['controlnets']} ControlNet(s): ours "
            f"{s['ours_it_per_s']:.4g} it/s, theirs {s['theirs_it_per_s']:.4g} it/s "
            f"({r['sampling_reference']})"
        )
    for task in TASKS:
        if "theirs_parts_s" in r.get(task, {}):
            split = ", ".join(f"{k} {v:.3g}" for k, v in r[task]["theirs_parts_s"].items())
            lines.append(f"PyTorch {task} step, median s per part: {split}")
    if any(r[t]["ours_steps_peak_rss_bytes"] for t in TASKS if t in r):
        lines.append("peak RSS during the timed calls only (after warm-up):")
        for task in TASKS:
            if task in r:
                t = r[task]
                lines.append(
                    f"  {task:<12}ours {gib(t['ours_steps_peak_rss_bytes'])}, theirs "
                    f"{gib(t['theirs_steps_peak_rss_bytes'])}, ratio {num(t['steps_rss_ratio'])}"
                )
    if "controlnet_vs_finetune" in r:
        c = r["controlnet_vs_finetune"]
        lines.append(
            f"ControlNet / fine-tune: time ours {num(c['ours']['time_ratio'])}, theirs "
            f"{num(c['theirs']['time_ratio'])}; RSS ours {num(c['ours']['rss_ratio'])}, "
            f"theirs {num(c['theirs']['rss_ratio'])}; RSS during steps ours "
            f"{num(c['ours']['steps_rss_ratio'])}, theirs {num(c['theirs']['steps_rss_ratio'])}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        run_child(args)
        return 0
    if argv is None and not args.isolate and args.hugepages != "none":
        from cn_jax import runtime

        runtime.reexec_with_hugepages()  # one process (the command): both sides get ours
    config = load(args)
    spec = torch_spec(config)
    measured = run_isolated(args, spec) if args.isolate else run_in_process(args, config, spec)
    result = summarize(args, spec, measured)
    result["architecture"] = config.model.architecture
    print(format_summary(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from cn_jax import runtime

    runtime.configure_host()  # a program: its set-ups may drop JAX's caches
    sys.exit(main())
