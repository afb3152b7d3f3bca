"""Resuming a run: what the command that continues a run may change, and its
logs cut back to the step it continues from.

A run's checkpoints hold the config they were trained with (`meta["config"]`,
cn_jax.train.loop). Running `cn-jax train` again on the same workdir resumes
only if every field outside `SAFE_TO_CHANGE` is as it was: a different base,
architecture, conditioning, trainable set, batch size, seed or dataset
would silently continue a different run from these weights. The check
runs before anything is written into the workdir, so a refused command leaves
the finished run as it was (`cn-jax export` still reads it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from cn_jax.config import Config, ConfigError
from cn_jax.train.checkpoint import Checkpointer, UnreadableCheckpointError

log = logging.getLogger("cn_jax.train")

# Fields a resume may change: how long and how often, the step size, and how
# the same computation is laid out. Everything else that differs is refused:
# the model, its inputs, the data and its order, and the optimizer's other
# settings (`train.max_grad_norm` to or from null even changes the optimizer
# state's tree).
SAFE_TO_CHANGE = frozenset({
    "train.max_steps",  # also the cosine schedule's length
    "train.warmup_steps",  # the schedule's warmup length
    "train.learning_rate",  # a step size from here on, e.g. lower after a NaN stop
    "train.decoder_learning_rate",
    "train.checkpoint_every",
    "train.max_to_keep",
    "train.log_every",
    "train.validate_every",  # validation grids: pictures, not training
    "train.validation_samples",
    "train.validation_steps",
    "train.grad_accum",  # the same batch per step, in fewer or more micro-batches
    "train.remat",  # recompute activations: memory, not results
    "data.num_workers",
    "data.prefetch",
    "data.on_bad_sample",  # a run stopped by a bad file continues with "skip"
    "data.cache_latents",  # same training (tests/test_train_loop.py), fixed crops only
    "eval.every",  # the other eval fields define what eval.jsonl's curve measures
    "model.attention",  # kernels compute the same model
    "model.convolution",
    "mesh.fsdp",  # checkpoints restore onto any mesh
})  # fmt: skip


class ResumeConfigError(ConfigError):
    """A resume changes fields outside SAFE_TO_CHANGE; the message lists each as
    `section.key: old -> new`."""


def saved_config(workdir: str | os.PathLike) -> tuple[str, dict] | None:
    """`(where, config dict)` the run in `workdir` was trained with, or None when
    it has no checkpoint (a new run, or one that never reached its first save).

    Read from the newest checkpoint whose meta reads back, without creating or
    cleaning anything; for checkpoints written before the meta held the
    config, from the workdir's config.yaml.
    """
    workdir = Path(workdir)
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return None
    with Checkpointer(directory, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        for step in reversed(steps):
            try:
                meta = ckpt.restore_meta(step)
            except UnreadableCheckpointError:
                continue  # restore_latest will say why, if it comes to it
            if isinstance(meta.get("config"), dict):
                return f"checkpoint step {step}", meta["config"]
            break
    if not steps:
        return None
    path = workdir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        log.warning("%s: cannot check this resume against the run's config: %s", workdir, e)
        return None
    return str(path), data if isinstance(data, dict) else {}


def changed_fields(saved: dict, config: Config) -> list[str]:
    """`section.key: old -> new` for each field outside SAFE_TO_CHANGE that differs.

    A field the saved config lacks (written by an older cn-jax) counts as its
    default; a saved field this version no longer has is ignored.
    """
    new = json.loads(json.dumps(config.model_dump()))  # as the checkpoint's JSON holds it
    defaults = json.loads(json.dumps(Config().model_dump()))
    changed = []
    for section, fields in new.items():
        old_fields = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in fields.items():
            name = f"{section}.{key}"
            old = old_fields.get(key, defaults[section][key])
            if old != value and name not in SAFE_TO_CHANGE:
                changed.append(f"{name}: {json.dumps(old)} -> {json.dumps(value)}")
    return changed


def check_resume(workdir: str | os.PathLike, config: Config) -> None:
    """Raises ResumeConfigError when `config` may not continue the run in `workdir`.

    Writes nothing. A workdir without checkpoints passes (a new run).
    """
    found = saved_config(workdir)
    if found is None:
        return
    where, saved = found
    changed = changed_fields(saved, config)
    if changed:
        lines = "\n  ".join(changed)
        raise ResumeConfigError(
            f"cannot resume {workdir}: these settings differ from its {where}'s:\n  {lines}\n"
            "Nothing was written. Set them as they were to resume, or train in a new "
            f"--workdir. Safe to change on resume: {', '.join(sorted(SAFE_TO_CHANGE))}."
        )


def cut_log(path: str | os.PathLike, keep: Callable[[int], bool]) -> int:
    """Drops the lines of a JSON-lines log whose "step" fails `keep`, and lines that
    do not parse (a write cut short); rewrites the file atomically. Returns the
    number of lines dropped.

    A resumed run logs the steps after its checkpoint again: cutting first keeps
    every step in the log once.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            dropped += 1
            continue
        if isinstance(step, int) and not keep(step):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped
