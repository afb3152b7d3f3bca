"""`cn-jax export`: a trained ControlNet from a run directory, in a file the
PyTorch world loads (diffusers folder or one original-format .safetensors);
or, for a `train.trainable: unet` run, the trained base as a diffusers
pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from cn_jax.config import load_config
from cn_jax.models.config import ControlNetConfig, UNetConfig
from cn_jax.models.controlnet import ControlNet, example_inputs
from cn_jax.models.unet import UNet
from cn_jax.models.unet import example_inputs as unet_example_inputs
from cn_jax.train.checkpoint import Checkpointer
from cn_jax.train.state import TrainState, group_labels, labels_for, make_optimizer, split
from cn_jax.weights.folders import save_controlnet


def export_run(
    run: str | Path, out: str | Path, format: str = "diffusers", step: int | None = None,
    ema: bool = False,
) -> int:  # fmt: skip
    """Export checkpoint `step` (default: latest) of `run` to `out`.

    A ControlNet run writes its ControlNet (`format` "diffusers" folder or one
    "original" .safetensors file). A `train.trainable: unet` run writes the
    whole base model as a diffusers pipeline folder: its trained UNet with the
    run's frozen text encoder, tokenizer, scheduler (and VAE, if any).

    Returns the exported step. With `ema=True` the EMA weights are exported
    (the run must have train.ema_decay set).
    """
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a cn-jax run directory (no config.yaml)")
    config = load_config(run / "config.yaml")
    unet_cfg = UNetConfig.from_dict(_json(run / "model" / "unet_config.json"))
    unet = UNet(unet_cfg)
    key = jax.random.PRNGKey(0)
    abstract = {"unet": jax.eval_shape(unet.init, key, *unet_example_inputs(unet_cfg))["params"]}
    cnet = None
    if config.train.trainable == "unet":
        if format != "diffusers":
            raise ValueError(
                f"{run}: a trained base (train.trainable=unet) exports as a diffusers pipeline "
                f"folder only, not format={format!r}"
            )
    else:
        cnet_cfg = ControlNetConfig.from_dict(_json(run / "model" / "controlnet_config.json"))
        cnet = ControlNet(cnet_cfg)
        abstract["controlnet"] = jax.eval_shape(cnet.init, key, *example_inputs(cnet_cfg))["params"]
    step, params = _restore(run, config, abstract, step, ema)
    if cnet is None:
        _save_base(config, params["unet"], out)
        return step
    save_controlnet(out, cnet, params["controlnet"], format=format)
    if "unet" in params:  # controlnet+decoder: the trained decoder goes beside it
        from cn_jax.weights.keymap import flax_to_torch
        from cn_jax.weights.safetensors_io import write_safetensors

        dest = Path(out) if format == "diffusers" else Path(out).parent
        write_safetensors(dest / "unet_decoder.safetensors", flax_to_torch(params["unet"]))
    return step


def _restore(run: Path, config, abstract: dict, step: int | None, ema: bool):
    """(step, trainable params) of a checkpoint, on this process's first device."""
    labels = labels_for(abstract, config.train.trainable)
    trainable, _ = split(abstract, labels)
    tx = make_optimizer(config.train, group_labels(trainable, labels))
    target = jax.eval_shape(
        lambda p: TrainState.create(p, tx, ema=config.train.ema_decay is not None), trainable
    )
    # Restore onto this process's first device, whatever mesh wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target
    )
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run}: no checkpoint to export")
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    params = state.params
    if ema:
        if state.ema_params is None:
            raise ValueError(f"{run}: no EMA weights (train.ema_decay was not set)")
        params = state.ema_params
    return step, jax.tree_util.tree_map(jnp.asarray, params)


def _save_base(config, unet_params, out) -> None:
    """The run's base (frozen parts as the run loaded them) with the trained UNet."""
    import dataclasses

    from cn_jax.train.loop import load_base
    from cn_jax.weights.sd import save_pipeline

    sd = load_base(config, jnp.float32)
    save_pipeline(out, dataclasses.replace(sd, unet_params=unet_params))


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (was the run made by this cn-jax version?)")
    return json.loads(path.read_text())
