"""The real train step on a synthetic batch: time, FLOPs, memory; ControlNet vs fine-tuning.

`TrainBench(config)` sets up exactly what `cn_jax.train.loop.train` runs (the
same `build`, trainable/frozen split, optimizer, shardings and
`jit(make_train_step(...), donate_argnums=0)`), compiles it ahead of time and
feeds it a batch of random arrays with the keys, shapes and dtypes the step
expects, so no dataset is needed. With `run=False` nothing is materialised:
the parameters exist only as shapes (`jax.eval_shape`) and the step is only
lowered and compiled, which gives XLA's FLOP and memory counts of an SD 1.5
shaped step on a machine that could not run it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.bench import measure
from cn_jax.config import Config
from cn_jax.kernels.choice import COUNTING
from cn_jax.models.clip_text import encode_text
from cn_jax.runtime import release_after_setup
from cn_jax.train import sharding as shd
from cn_jax.train.loop import build, compute_dtype
from cn_jax.train.state import TrainState, group_labels, labels_for, make_optimizer, split
from cn_jax.train.step import StepModels, make_train_step

# The anchors, quoted next to measured ratios (ControlNet / fine-tuning).
PAPER_RATIOS = {"memory_ratio": 1.23, "time_ratio": 1.34}  # ControlNet paper, 1x A100 40GB
PYTORCH_CPU_RATIOS = {  # diffusers 0.42 / torch 2.13 on 2 CPU cores, SD 1.5 UNet, 256 px
    "batch_1": {"time_ratio": 0.57, "memory_ratio": 0.63},
    "batch_4": {"time_ratio": 0.67, "memory_ratio": 0.66},
}


def devices_for(n: int | None):
    """The first `n` devices (None or 0: all of them)."""
    devices = jax.devices()
    if n:
        if n > len(devices):
            raise ValueError(f"--devices {n}: only {len(devices)} device(s) available")
        devices = devices[:n]
    return devices


def abstract_build(config: Config):
    """`loop.build` without materialising any weight: (models, parameter shapes, sd).

    The returned `sd` bundle has its parameter fields cleared (they would be
    tracers of the shape evaluation).
    """
    held = {}

    def params_only():
        models, params, sd = build(config)
        held["models"], held["sd"] = models, sd
        return params

    params = jax.eval_shape(params_only)
    sd = dataclasses.replace(
        held["sd"], unet_params=None, vae_params=None, text_encoder_params=None
    )
    return held["models"], params, sd


def batch_spec(config: Config, models: StepModels, params: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """Keys, shapes and dtypes of one global batch, as the loader (and cache) give them.

    Without `data.cache_latents`: uint8 pixels and conditions (the loader's
    transport of 8-bit data; the step maps them to [-1, 1] and [0, 1]), token
    ids (SDXL: (B, 2, L), and the size numbers `time_ids`). With it: the cached
    text embeddings (`encoder_hidden_states`; SDXL's pooled `text_embeds`) and VAE
    posteriors (`latent_mean`, `latent_logvar`), or the pixels of a
    pixel-space model; dtypes as the frozen encoders produce them.
    """
    b, r = config.train.batch_size, config.data.resolution
    te_cfg = models.text_encoder.config
    sdxl = models.unet.config.has_text_time
    ids = (b, 2, te_cfg.max_position_embeddings) if sdxl else (b, te_cfg.max_position_embeddings)
    pixel_channels = models.vae.config.in_channels if models.vae else models.unet.config.in_channels
    spec = {
        "pixel_values": jax.ShapeDtypeStruct((b, r, r, pixel_channels), jnp.uint8),
        "conditioning_pixel_values": jax.ShapeDtypeStruct(
            (b, r, r, config.model.conditioning_channels), jnp.uint8
        ),
        "input_ids": jax.ShapeDtypeStruct(ids, jnp.int32),
    }
    if sdxl:
        spec["time_ids"] = jax.ShapeDtypeStruct((b, 6), jnp.float32)
    if not config.data.cache_latents:
        return spec
    del spec["input_ids"]
    context, pooled = jax.eval_shape(
        lambda p, ids: encode_text(models.text_encoder, p, ids),
        params["text_encoder"],
        jax.ShapeDtypeStruct(ids, jnp.int32),
    )
    spec["encoder_hidden_states"] = context
    if sdxl:
        spec["text_embeds"] = pooled
    if models.vae is not None:
        mean, logvar = jax.eval_shape(
            lambda p, x: models.vae.apply({"params": p}, x, method="encode"),
            params["vae"],
            jax.ShapeDtypeStruct(spec.pop("pixel_values").shape, jnp.float32),
        )
        spec["latent_mean"], spec["latent_logvar"] = mean, logvar
    return spec


def synthetic_batch(
    spec: dict[str, jax.ShapeDtypeStruct], vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random host arrays for `spec`, each in the range its key has in real data."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, s in spec.items():
        if key == "input_ids":
            x = rng.integers(0, vocab_size, s.shape)
        elif key in ("pixel_values", "conditioning_pixel_values"):
            if np.issubdtype(s.dtype, np.integer):  # transported pixels: the dtype's range
                x = rng.integers(0, np.iinfo(s.dtype).max, s.shape, endpoint=True)
            elif key == "pixel_values":
                x = rng.uniform(-1.0, 1.0, s.shape)
            else:
                x = rng.uniform(0.0, 1.0, s.shape)
        elif key == "latent_logvar":
            x = rng.normal(-2.0, 0.1, s.shape)  # std about 0.37
        elif key == "time_ids":  # SDXL's size numbers: a 1024 px crop of a larger image
            x = np.tile(np.asarray([1280, 1024, 128, 0, 1024, 1024]), (s.shape[0], 1))
        else:  # latent_mean, encoder_hidden_states, text_embeds
            x = rng.normal(0.0, 1.0, s.shape)
        out[key] = np.asarray(x).astype(s.dtype)
    return out


def _count(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


class TrainBench:
    """The compiled train step of `config` and (with `run=True`) its inputs on device.

    Attributes:
      compiled: the AOT-compiled step; `compile_s` / `lower_s` its build times.
      flops: XLA's FLOPs of one step (per device; `flops_source` says which program
        was counted: the step, or, with any kernel but XLA's possible
        (`measure.counts_on_twin`), its twin traced with
        `cn_jax.kernels.choice.COUNTING`);
        `memory`: `measure.program_memory`.
      state, frozen, batch, rng: the step's arguments (None with `run=False`).
    """

    def __init__(
        self, config: Config, devices=None, run: bool = True, built=None, compile: bool = True
    ):
        """Set up and compile; `built`: the `loop.build(config)` result to use (see
        `without_controlnet`), else built here (as shapes only with `run=False`).
        `compile=False` (with `run=False`) stops before lowering: `jitted_step(models)`
        and `args` are the step and its abstract arguments, for `jax.export`
        (`cn_jax.bench.lower`)."""
        if run and not compile:
            raise ValueError("TrainBench(compile=False) needs run=False: nothing to run")
        tc = config.train
        self.config = config
        self.run = run

        # == Set up the mesh ==
        self.devices = list(devices if devices is not None else jax.devices()[:1])
        self.mesh = shd.make_mesh(config.mesh.fsdp, self.devices)
        if tc.batch_size % self.mesh.size:
            raise ValueError(
                f"train.batch_size={tc.batch_size} must be divisible by the {self.mesh.size} "
                "devices"
            )

        # == Create models (or their shapes); split what trains from what is frozen ==
        t0 = time.perf_counter()
        # Weights built here have no other owner: the state may take the trainable
        # arrays as they are. A caller's `built` may share them (bench_compare's
        # fine-tune state starts from the arrays the ControlNet side keeps frozen).
        owned = built is None
        if built is None:
            built = build(config) if run else abstract_build(config)
        models, params, sd = built
        del built
        # The bundle without its weights: the step reads them from `self.frozen` and
        # the state; a reference here would keep a second copy alive (the base UNet
        # when fine-tuning, whose state owns a copy of it).
        self.models = models
        self.sd = dataclasses.replace(
            sd, unet_params=None, vae_params=None, text_encoder_params=None
        )
        del sd
        spec = batch_spec(config, models, params)
        if config.data.cache_latents:
            # The step reads cached latents and text embeddings: the frozen encoders
            # would only hold memory (jit drops unused arguments, so XLA's counts
            # never included them; loop.train keeps them for validation samples).
            params = {k: v for k, v in params.items() if k not in ("text_encoder", "vae")}
        labels = labels_for(params, tc.trainable)
        trainable, frozen = split(params, labels, frozen_dtype=compute_dtype(config))
        del params
        self.params_trainable, self.params_frozen = _count(trainable), _count(frozen)
        tx = self.tx = make_optimizer(tc, group_labels(trainable, labels))

        def create(p):
            return TrainState.create(p, tx, ema=tc.ema_decay is not None)

        frozen_sh = shd.param_shardings(self.mesh, frozen)
        abstract_state = jax.eval_shape(create, trainable)
        state_sh = shd.param_shardings(self.mesh, abstract_state)
        batch_sh, repl = shd.batch_sharding(self.mesh), shd.replicated(self.mesh)
        if run:
            self.frozen = jax.device_put(frozen, frozen_sh)
            # The state is donated at every step, so it must own its buffers: owned
            # arrays are donated into it (no second copy at set-up), shared ones
            # copied (`jnp.copy`: never forwarded, even where jit forwards inputs).
            if owned:
                init = jax.jit(create, out_shardings=state_sh, donate_argnums=0)
            else:
                fresh = lambda p: create(jax.tree_util.tree_map(jnp.copy, p))  # noqa: E731
                init = jax.jit(fresh, out_shardings=state_sh)
            self.state = init(trainable)
            host = synthetic_batch(spec, models.text_encoder.config.vocab_size, tc.seed)
            self.batch = shd.global_batch(host, self.mesh)
            self.rng = jax.random.PRNGKey(tc.seed)
            args = (self.state, self.frozen, self.batch, self.rng)
        else:
            self.state = self.frozen = self.batch = self.rng = None

            def at(tree, shardings):
                return jax.tree_util.tree_map(
                    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                    tree,
                    shardings,
                )

            rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
            args = (
                at(abstract_state, state_sh),
                at(frozen, frozen_sh),
                at(spec, {k: batch_sh for k in spec}),
                jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=repl),
            )
        del trainable, frozen
        if run:
            release_after_setup()  # the weight-init programs too, where the program opted in
        self.setup_s = time.perf_counter() - t0

        # == Compile the step ahead of time (as loop.train does) ==
        def jitted_step(models):
            step_fn = make_train_step(
                models, self.sd.schedule.alphas_cumprod(), tx, tc.grad_accum, tc.ema_decay
            )
            return jax.jit(
                step_fn,
                in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                out_shardings=(state_sh, repl),
                donate_argnums=0,
            )

        self.jitted_step, self.args = jitted_step, args
        if not compile:
            self.compiled = self.flops = self.flops_source = None
            self.lower_s = self.compile_s = None
            self.memory, self.metrics = {}, None
            return
        t0 = time.perf_counter()
        lowered = jitted_step(models).lower(*args)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        self.lower_s, self.compile_s = t1 - t0, time.perf_counter() - t1
        del lowered  # its StableHLO module: the executable is all the step needs
        self.flops = measure.program_flops(self.compiled)
        self.flops_source = "step"
        if measure.attention_loops(self.compiled) or measure.counts_on_twin(models.unet.kernels):
            # XLA counts a loop body once, and the tiled attention kernel loops over
            # tiles; im2col convolutions multiply their padding zeros too; a cuDNN or
            # Pallas custom call may count as zero. Count the same step's arithmetic
            # on its twin traced with JAX's attention and XLA's convolutions. Lowered
            # only, never compiled or run: the lowered module is the whole (global)
            # program, before SPMD splits it, so its count is shared by the devices
            # (the batch splits evenly over them; collectives add no FLOPs).
            twin = jitted_step(models.with_kernels(COUNTING)).lower(*args)
            self.flops = measure.per_device(measure.program_flops(twin), len(self.devices))
            self.flops_source = "step with xla attention and convolutions (lowered)"
            del twin
        self.memory = measure.program_memory(self.compiled)
        self.metrics: dict[str, Any] | None = None
        # What the compiler freed, the lowered module,
        # the twin and its trace: the step is `self.compiled`, compiled ahead of time.
        release_after_setup()

    def step(self) -> float:
        """Run one step on the synthetic batch; returns its wall time in seconds."""
        if not self.run:
            raise RuntimeError("TrainBench(run=False) compiles only; it has no inputs to run")
        seconds, (self.state, self.metrics) = measure.timed(
            lambda: self.compiled(self.state, self.frozen, self.batch, self.rng)
        )
        return seconds

    def summary(self) -> dict[str, Any]:
        """What was compiled: config, device, build and compile times, FLOPs, memory."""
        c = self.config
        out = {
            "architecture": c.model.architecture if c.model.base is None else c.model.base,
            "attention": c.model.attention,
            "convolution": c.model.convolution,
            "trainable": c.train.trainable,
            "precision": c.train.precision,
            "batch_size": c.train.batch_size,
            "resolution": c.data.resolution,
            "grad_accum": c.train.grad_accum,
            "remat": c.train.remat,
            "cache_latents": c.data.cache_latents,
            **measure.device_info(self.devices),
            "params_trainable": self.params_trainable,
            "params_frozen": self.params_frozen,
            "setup_s": self.setup_s,
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "flops_per_step": self.flops,
            "flops_counted_on": self.flops_source,
            "memory": self.memory,
        }
        if c.train.grad_accum > 1:
            out["flops_note"] = "grad_accum > 1: XLA counts the accumulation loop body once"
        return out

    def timing(self, times: list[float]) -> dict[str, Any]:
        """Step-time statistics of `times` (seconds per step) and what follows from them."""
        t = measure.median(times)
        flops = self.flops
        tflops = flops / t / 1e12 if flops and t else None
        peak = measure.peak_tflops(self.devices[0].device_kind, self.config.train.precision)
        loss = None
        if self.metrics is not None:
            loss = float(jax.device_get(self.metrics["loss"]))
        return {
            "steps": len(times),
            "step_time_s": t,
            "step_times_s": times,
            "samples_per_s": self.config.train.batch_size / t if t else None,
            "tflops_per_s": tflops,  # per device
            "peak_tflops": peak,
            "fraction_of_peak": measure.ratio(tflops, peak),
            "device_peak_bytes_in_use": measure.device_peak_bytes(self.devices),
            "loss": loss,
        }


def bench_train(
    config: Config, steps: int = 10, warmup: int = 1, devices=None, run: bool = True
) -> dict[str, Any]:
    """Compile the train step of `config`; time `steps` steps after `warmup` untimed ones."""
    b = TrainBench(config, devices, run=run)
    out = {"bench": "train", **b.summary()}
    if run:
        for _ in range(warmup):
            b.step()
        out.update(b.timing([b.step() for _ in range(steps)]))
    return out


def without_controlnet(built):
    """`loop.build`'s result for `train.trainable: unet` from the ControlNet run's:
    the same base (same arrays: the fine-tune state copies them, nothing is
    donated twice) without the ControlNet, which is all `build` does differently."""
    models, params, sd = built
    params = {k: v for k, v in params.items() if k != "controlnet"}
    return dataclasses.replace(models, controlnet=None), params, sd


def finetune_config(config: Config) -> Config:
    """The same run as plain fine-tuning of the whole UNet (no ControlNet)."""
    ft = config.model_copy(deep=True)
    ft.train.trainable = "unet"
    return ft


def bench_compare(
    config: Config, steps: int = 10, warmup: int = 1, devices=None, run: bool = True
) -> dict[str, Any]:
    """The ControlNet step of `config` vs plain fine-tuning at the same shapes.

    Both steps are compiled in this process, then run interleaved (ControlNet,
    fine-tune, ControlNet, ...). Ratios are ControlNet / fine-tune: FLOPs from
    XLA's counts, memory from each program's peak estimate (the device's
    `peak_bytes_in_use` would cover both programs at once), time from the
    median step times.
    """
    if config.train.trainable == "unet":
        raise ValueError("bench compare needs a ControlNet config (train.trainable != unet)")
    # One base for both sides: building it twice would double the frozen
    # weights in memory and the set-up time, and change nothing.
    built = build(config) if run else abstract_build(config)
    ft_built = without_controlnet(built)
    sides = {"controlnet": TrainBench(config, devices, run=run, built=built)}
    del built
    sides["finetune"] = TrainBench(finetune_config(config), devices, run=run, built=ft_built)
    del ft_built
    out: dict[str, Any] = {"bench": "compare", **{k: b.summary() for k, b in sides.items()}}
    times = None
    if run:
        for _ in range(warmup):
            for b in sides.values():
                b.step()
        times = measure.interleave({k: b.step for k, b in sides.items()}, steps)
        for k, b in sides.items():
            out[k].update(b.timing(times[k]))
    cn, ft = out["controlnet"], out["finetune"]
    out.update(
        flops_ratio=measure.ratio(cn["flops_per_step"], ft["flops_per_step"]),
        memory_ratio=measure.ratio(
            cn["memory"].get("peak_estimate_bytes"), ft["memory"].get("peak_estimate_bytes")
        ),
        time_ratio=measure.ratio(cn.get("step_time_s"), ft.get("step_time_s")) if run else None,
        interleaved=run,
        paper=PAPER_RATIOS,
        pytorch_cpu_reference=PYTORCH_CPU_RATIOS,
    )
    return out
