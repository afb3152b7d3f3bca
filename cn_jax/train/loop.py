"""The training run: `train(config, workdir)`, read top to bottom.

Set up processes and mesh -> load the frozen base and the ControlNet -> split
trainable / frozen -> create or restore the state -> data -> compile the step
ahead of time -> loop (progress bar, TensorBoard scalars, checkpoints,
validation grids), stopping cleanly on a NaN/Inf loss without touching what
was saved.

Resuming (the same command on the same workdir) is checked against the config
the checkpoints were trained with before anything is written
(cn_jax.train.resume), restores the newest checkpoint that reads back, and
cuts metrics.jsonl / eval.jsonl back to the restored step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cn_jax.config import Config, TrainConfig, dump_config
from cn_jax.diffusion.schedule import NoiseScheduleConfig
from cn_jax.kernels import Kernels
from cn_jax.models.config import ControlNetConfig
from cn_jax.models.controlnet import ControlNet, init_controlnet_from_unet
from cn_jax.runtime import release_after_setup, release_host_memory
from cn_jax.train import sharding as shd
from cn_jax.train.checkpoint import Checkpointer
from cn_jax.train.resume import check_resume, cut_log
from cn_jax.train.state import (
    TrainState,
    group_labels,
    labels_for,
    make_optimizer,
    merge,
    split,
)
from cn_jax.train.step import StepModels, make_train_step

log = logging.getLogger("cn_jax.train")
# Global batches put on the devices ahead of the step that uses them (transfers overlap it).
DEVICE_PREFETCH = 2


class NonFiniteLossError(ValueError):
    """The loss or gradient norm became NaN or Inf; the run stopped before saving
    that step. A user error (a ValueError, as ConfigError is): the message names
    the step, the values, the intact checkpoint and the settings to try."""


def check_finite(
    metrics: dict[str, float], step: int, latest_checkpoint: int | None, tc: TrainConfig
) -> None:
    """Raises NonFiniteLossError, one line, when a fetched metric is NaN or Inf."""
    if all(math.isfinite(v) for v in metrics.values()):
        return
    values = " ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
    lr = f"a lower train.learning_rate (now {tc.learning_rate:g})"
    others = [
        "train.max_grad_norm=1.0 (now null)"
        if tc.max_grad_norm is None
        else f"a lower train.max_grad_norm (now {tc.max_grad_norm:g})"
    ]
    if tc.precision == "bfloat16":
        others.append("train.precision=float32")
    if latest_checkpoint is None:
        saved = "no checkpoint was saved before it"
        advice = f"Try {lr}, or {' or '.join(others)}."
    else:  # a resume may change the learning rate only (resume.SAFE_TO_CHANGE)
        saved = f"checkpoint step {latest_checkpoint} is intact"
        advice = (
            f"Try {lr}: resuming (the same command) may change it; "
            f"{' or '.join(others)} needs a new --workdir."
        )
    raise NonFiniteLossError(
        f"training stopped at step {step}: {values} is not finite; nothing was saved for "
        f"this step and {saved}. {advice}"
    )


# -- models -----------------------------------------------------------------------


def load_base(config: Config, dtype, param_dtype=jnp.float32):
    """The frozen Stable Diffusion components the config names (or random ones), weights
    stored in `param_dtype`."""
    from cn_jax.weights.sd import load_pipeline, random_pipeline

    m = config.model
    if m.base is None:
        seed, tok = config.train.seed, m.tokenizer
        sd = random_pipeline(
            m.architecture, seed=seed, tokenizer=tok, dtype=dtype, param_dtype=param_dtype
        )
    else:
        sd = load_pipeline(
            m.base, config=m.base_config, tokenizer=m.tokenizer, dtype=dtype,
            param_dtype=param_dtype, revision=m.revision, variant=m.variant,
        )  # fmt: skip
    if m.scheduler:
        fields = {**sd.schedule.to_dict(), **m.scheduler}
        schedule = NoiseScheduleConfig.from_dict(fields, "model.scheduler")
        sd = dataclasses.replace(sd, schedule=schedule)
    return sd


def controlnet_config(config: Config, unet_config, latent_factor: int) -> ControlNetConfig:
    """The ControlNet for this base: its condition encoder (`model.conditioning_embedding`)
    downsampling to the base's latents (`ControlNetConfig.from_unet(latent_factor=)`)."""
    m = config.model
    return ControlNetConfig.from_unet(
        unet_config,
        conditioning_channels=m.conditioning_channels,
        controlnet_conditioning_channel_order=m.conditioning_channel_order,
        conditioning_embedding_type=m.conditioning_embedding,
        latent_factor=latent_factor,
    )


def kernels_of(config: Config) -> Kernels:
    """The run's kernel choice (`model.attention`, `model.convolution`) settled for
    the backend it runs on."""
    return Kernels(config.model.attention, config.model.convolution).for_platform()


def compute_dtype(config: Config):
    """The run's compute dtype (`train.precision`), also the frozen weights' storage:
    the trained weights and the optimizer state stay float32."""
    return jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32


def build(config: Config):
    """Models, the full parameter tree, and the base bundle."""
    dtype = compute_dtype(config)
    sd = load_base(config, dtype).with_kernels(kernels_of(config))
    latent_factor = 1 if sd.vae is None else sd.vae.config.latent_factor
    cnet = None
    params = {"unet": sd.unet_params, "text_encoder": sd.text_encoder_params}
    if sd.vae is not None:
        params["vae"] = sd.vae_params
    if config.train.trainable != "unet":
        if config.model.controlnet:
            from cn_jax.weights.folders import load_controlnet

            cnet, cparams = load_controlnet(
                config.model.controlnet, dtype=dtype, revision=config.model.controlnet_revision
            )
            cnet = cnet.clone(remat=config.train.remat, kernels=sd.unet.kernels)
        else:
            ccfg = controlnet_config(config, sd.unet.config, latent_factor)
            cnet = ControlNet(ccfg, dtype=dtype, remat=config.train.remat, kernels=sd.unet.kernels)
            cparams = init_controlnet_from_unet(
                sd.unet_params, ccfg, jax.random.PRNGKey(config.train.seed)
            )
        params["controlnet"] = cparams
    models = StepModels(
        unet=sd.unet.clone(remat=config.train.remat),
        controlnet=cnet,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        prediction_type=sd.schedule.prediction_type,
        scaling_factor=sd.vae.config.scaling_factor if sd.vae is not None else 1.0,
    )
    return models, params, sd


# -- the run ----------------------------------------------------------------------


def train(config: Config, workdir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) in `workdir`; returns the last step's metrics.

    After set-up it hands freed host memory back (`cn_jax.runtime.release_after_setup()`);
    it drops JAX's trace and compile caches too only in a process that opted in
    with `cn_jax.runtime.configure_host()` (the `cn-jax` command does: nothing
    calls the set-up's weight-init programs again).
    """
    from cn_jax.data import Loader, open_dataset
    from cn_jax.data.loader import check_first_rows, prefetch
    from cn_jax.tokenizer import tokenize

    workdir = Path(workdir)
    tc = config.train

    # == Set up processes and mesh ==
    shd.maybe_initialize_distributed()
    mesh = shd.make_mesh(config.mesh.fsdp)
    n_proc, proc = jax.process_count(), jax.process_index()
    if tc.batch_size % mesh.size:
        raise ValueError(
            f"train.batch_size={tc.batch_size} must be divisible by the {mesh.size} devices"
        )
    if config.data.path is None:
        raise ValueError("data.path is not set: point it at a dataset folder")
    # A resume may change only what is safe (resume.SAFE_TO_CHANGE). Checked before
    # anything is written, so a refused command leaves a finished run exportable.
    check_resume(workdir, config)

    # == Data: opened, and its first rows decoded, before minutes of model set-up ==
    dataset = open_dataset(
        config.data.path,
        format=config.data.format,
        image_column=config.data.image_column,
        conditioning_image_column=config.data.conditioning_image_column,
        caption_column=config.data.caption_column,
    )
    check_first_rows(
        dataset, config.data.resolution, config.model.conditioning_channels,
        config.data.on_bad_sample,
    )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)

    # == Create models; split what trains from what is frozen ==
    models, params, sd = build(config)
    labels = labels_for(params, tc.trainable)
    trainable, frozen = split(params, labels, frozen_dtype=compute_dtype(config))
    del params
    tx = make_optimizer(tc, group_labels(trainable, labels))
    frozen_sh = shd.param_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_sh)

    # == Create the state already sharded (eval_shape, then jit with out_shardings) ==
    def create(p):
        return TrainState.create(p, tx, ema=tc.ema_decay is not None)

    abstract_state = jax.eval_shape(create, trainable)
    state_sh = shd.param_shardings(mesh, abstract_state)
    state = jax.jit(create, out_shardings=state_sh)(trainable)
    del trainable

    # == Restore the newest checkpoint that reads back, if any ==
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=tc.max_to_keep)
    data_position = None
    if ckpt.latest_step() is not None:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            state_sh,
        )
        try:
            _, state, meta = ckpt.restore_latest(target)  # newer unreadable steps: set aside
        except BaseException:
            ckpt.close()
            raise
        data_position = meta.get("data_position")
        log.info("resumed from step %d", int(state.step))
    start_step = int(state.step)

    # == Describe the run: after the restore, so a failed resume changed nothing ==
    if proc == 0:
        dump_config(config, workdir / "config.yaml")
        _write_model_configs(workdir, models)
        # The steps after the restored one are trained and logged again: each step
        # once in the logs. Step 0 is evaluated again only when starting over.
        cut_log(workdir / "metrics.jsonl", lambda s: s <= start_step)
        cut_log(workdir / "eval.jsonl", lambda s: 0 < start_step and s <= start_step)
    # The set-up's freed host buffers and its traced weight-init programs; nothing
    # is compiled yet that a later step needs (cn_jax.runtime).
    release_after_setup()

    # == Data ==
    max_len = sd.text_encoder.config.max_position_embeddings
    cache = None
    if config.data.cache_latents:
        from cn_jax.train.cache import build_cache, cached_batch, check_cacheable

        check_cacheable(config)
        cache = build_cache(config, models, _host_frozen(frozen), sd, dataset, workdir)
    loader = Loader(
        dataset,
        global_batch_size=tc.batch_size,
        resolution=config.data.resolution,
        seed=tc.seed,
        proportion_empty_prompts=config.data.proportion_empty_prompts,
        conditioning_channels=config.model.conditioning_channels,
        random_crop=config.data.random_crop,
        random_flip=config.data.random_flip,
        on_bad_sample=config.data.on_bad_sample,
        num_workers=config.data.num_workers,
        prefetch=config.data.prefetch,
        process_index=proc,
        process_count=n_proc,
        tokenize=None if cache else (lambda prompts: tokenize(sd.tokenizer, prompts, max_len)),
        images=cache is None or models.vae is None,  # cached latents: no target decode
        time_ids=models.unet.config.has_text_time,  # SDXL's size numbers of each sample
        start_position=data_position,
    )

    # == Compile the step ahead of time ==
    rng = jax.random.PRNGKey(tc.seed)
    step_fn = make_train_step(models, sd.schedule.alphas_cumprod(), tx, tc.grad_accum, tc.ema_decay)
    batch_sh = shd.batch_sharding(mesh)
    repl = shd.replicated(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,  # the state only: `frozen` is never donated
    )
    metrics_path = workdir / "metrics.jsonl"
    writer = _summary_writer(workdir) if proc == 0 else None
    evaluator = _evaluator(config, models, sd) if config.eval.every else None
    last: dict[str, Any] = {}
    bar = None

    def device_batches():
        # With its data position after it: what a checkpoint after its step stores.
        for local in loader:
            if cache is not None:
                local = cached_batch(cache, local, has_vae=models.vae is not None)
            local.pop("index", None)
            local.pop("captions", None)
            yield shd.global_batch(local, mesh), loader.position

    try:
        it = prefetch(device_batches(), DEVICE_PREFETCH)  # 2 batches on their way to the devices
        compiled = None
        t_last, step_last = time.perf_counter(), start_step
        if progress and proc == 0:
            from tqdm import tqdm

            bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", unit="step")
        if evaluator is not None and start_step == 0:
            _evaluate(evaluator, state, frozen, 0, workdir, writer, bar, proc)
        for step in range(start_step, tc.max_steps):
            batch, position = next(it)
            if compiled is None:
                t0 = time.perf_counter()
                compiled = jitted.lower(state, frozen, batch, rng).compile()
                log.info("compiled the train step in %.1fs", time.perf_counter() - t0)
                release_host_memory()  # and the compiler's
                t_last = time.perf_counter()
            state, metrics = compiled(state, frozen, batch, rng)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.max_steps or done % tc.checkpoint_every == 0:
                # Host sync only here: the device runs ahead between logs.
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(m, done, ckpt.latest_step(), tc)
                now = time.perf_counter()
                m["samples_per_s"] = tc.batch_size * (done - step_last) / max(now - t_last, 1e-9)
                m["data_wait_s"] = loader.wait_seconds
                m["skipped_samples"] = loader.skipped
                t_last, step_last = now, done
                last = {"step": done, **m}
                if writer is not None:
                    for k, v in m.items():
                        writer.add_scalar(f"train/{k}", v, done)
                    writer.flush()
                if proc == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", sps=f"{m['samples_per_s']:.1f}")
            if done % tc.checkpoint_every == 0 or done == tc.max_steps:
                meta = {
                    "step": done,
                    "data_position": position,
                    "rng": {"seed": tc.seed, "rule": "fold_in(PRNGKey(seed), step)"},
                    "config": config.model_dump(),
                }
                t_save = time.perf_counter()
                ckpt.save(done, state, meta)  # async: blocks only to copy off the devices
                blocked = time.perf_counter() - t_save
                log.info("checkpoint step %d: the save blocked training %.2fs", done, blocked)
            if tc.validate_every and done % tc.validate_every == 0:
                # Every process: the params may be split over all of them.
                _validate(config, models, state, frozen, sd, dataset, workdir, done)
            if evaluator is not None and (done % config.eval.every == 0 or done == tc.max_steps):
                _evaluate(evaluator, state, frozen, done, workdir, writer, bar, proc)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        loader.close()
        ckpt.wait()
        ckpt.close()
        if writer is not None:
            writer.close()
    return last


def _host_frozen(frozen: dict) -> dict:
    """The frozen encoders' params as used by the cache builder (text encoder, VAE)."""
    return {k: v for k, v in frozen.items() if k in ("text_encoder", "vae")}


def _write_model_configs(workdir: Path, models: StepModels) -> None:
    """The architectures being trained, so `cn-jax export` needs no base model."""
    out = workdir / "model"
    out.mkdir(exist_ok=True)
    (out / "unet_config.json").write_text(json.dumps(models.unet.config.to_dict(), indent=2))
    if models.controlnet is not None:
        cfg = models.controlnet.config.to_dict()
        cfg["conditioning_embedding_type"] = models.controlnet.config.conditioning_embedding_type
        cfg["conditioning_latent_factor"] = models.controlnet.config.conditioning_latent_factor
        (out / "controlnet_config.json").write_text(json.dumps(cfg, indent=2))


def _summary_writer(workdir: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))


def _evaluator(config: Config, models: StepModels, sd):
    """The held-out control-adherence evaluation (`eval.*`) for this run."""
    from cn_jax.eval.control import ControlEvaluator

    e = config.eval
    return ControlEvaluator(
        models.unet, models.controlnet, models.text_encoder, models.vae, sd.tokenizer,
        sd.schedule, config.data.resolution, num_samples=e.samples,
        sampler_steps=e.sampler_steps, guidance_scale=e.guidance_scale, sampler=e.sampler,
        seed=e.seed, scaling_factor=models.scaling_factor,
    )  # fmt: skip


def _evaluate(evaluator, state, frozen, step, workdir: Path, writer, bar, proc) -> None:
    """Score the held-out set with the current weights; append to eval.jsonl.

    Every process runs the sampling (the params may be sharded over all of
    them); process 0 writes."""
    result = {"step": step, **evaluator(merge(state.params, frozen))}
    if proc != 0:
        return
    with (workdir / "eval.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    if writer is not None:
        for k, v in result.items():
            if k != "step":
                writer.add_scalar(f"eval/{k}", v, step)
        writer.flush()
    line = (
        f"eval step {step}: iou={result['iou']:.3f} colour={result['colour_adherence']:.2f} "
        f"roundness={result['roundness']:.3f} ({result['seconds']:.1f}s)"
    )
    if bar is not None:  # above the progress bar, which a log line would break
        bar.write(line)
    else:
        log.info(line)


def _validate(config, models, state, frozen, sd, dataset, workdir, step) -> None:
    """Write a PNG grid (condition | sample) from the current model: every process
    samples, process 0 writes."""
    from cn_jax.train.validation import validation_grid

    validation_grid(config, models, state, frozen, sd, dataset, workdir / f"val_{step:07d}.png")
