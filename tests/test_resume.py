"""Tests for cn_jax.train.resume (what a resume may change, logs cut back to the
restored step) and the NaN stop's message; no training here (the whole runs
are in test_train_loop.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import jax.numpy as jnp
import pytest
import yaml

from cn_jax.config import Config, ConfigError, load_config
from cn_jax.train.checkpoint import Checkpointer
from cn_jax.train.loop import NonFiniteLossError, check_finite
from cn_jax.train.resume import (
    SAFE_TO_CHANGE,
    ResumeConfigError,
    changed_fields,
    check_resume,
    cut_log,
    saved_config,
)


def _files(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes: what "nothing written" compares."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(tmp_path: Path, config: Config, meta_config: bool = True) -> Path:
    """A workdir as `train` leaves it: config.yaml and one checkpoint of `config`."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    meta = {"step": 2, "config": config.model_dump()} if meta_config else {"step": 2}
    with Checkpointer(workdir / "checkpoints") as ckpt:
        ckpt.save(2, {"w": jnp.ones(3)}, meta)
    return workdir


def test_safe_fields_exist():
    fields = {f"{s}.{k}" for s, section in Config().model_dump().items() for k in section}
    assert SAFE_TO_CHANGE <= fields, SAFE_TO_CHANGE - fields


def test_changed_fields_names_each_refused_change():
    saved = load_config(None, ["data.path=/data/a"]).model_dump()
    new = load_config(None, [
        "data.path=/data/a", "model.base=bundled:tiny", "model.conditioning_channels=1",
        "train.seed=3", "train.max_steps=50", "train.log_every=1", "model.attention=xla",
    ])  # fmt: skip
    assert changed_fields(saved, new) == [
        'model.base: null -> "bundled:tiny"',
        "model.conditioning_channels: 3 -> 1",
        "train.seed: 0 -> 3",
    ]
    assert changed_fields(saved, load_config(None, ["data.path=/data/a"])) == []
    # A field an older run's config lacks counts as its default; one it has that
    # this version lacks is ignored.
    old = json.loads(json.dumps(saved))
    del old["train"]["remat"], old["model"]["scheduler"]
    old["train"]["retired_knob"] = 1
    assert changed_fields(old, load_config(None, ["data.path=/data/a"])) == []
    assert changed_fields(old, load_config(None, ["data.path=/data/a", "train.remat=true"])) == []
    assert changed_fields(
        old, load_config(None, ["data.path=/data/a", "model.scheduler.prediction_type=epsilon"])
    ) == ['model.scheduler: null -> {"prediction_type": "epsilon"}']


def test_refused_resume_writes_nothing(tmp_path):
    config = load_config(None, ["data.path=/data/a"])
    workdir = _run(tmp_path, config)
    before = _files(workdir)
    changed = load_config(None, [
        "data.path=/data/b", "model.conditioning_channels=1", "train.batch_size=16",
        "train.max_steps=9",
    ])  # fmt: skip
    with pytest.raises(ResumeConfigError) as e:
        check_resume(workdir, changed)
    assert isinstance(e.value, ConfigError)  # a user error: the command prints one message
    lines = str(e.value).splitlines()
    assert lines[:4] == [
        f"cannot resume {workdir}: these settings differ from its checkpoint step 2's:",
        "  model.conditioning_channels: 3 -> 1",
        "  train.batch_size: 8 -> 16",
        '  data.path: "/data/a" -> "/data/b"',
    ]
    assert lines[4].startswith("Nothing was written.") and "train.max_steps" in lines[4]
    assert _files(workdir) == before
    check_resume(workdir, load_config(None, ["data.path=/data/a", "train.max_steps=9"]))
    assert _files(workdir) == before


def test_resume_check_reads_config_yaml_for_older_checkpoints(tmp_path):
    config = load_config(None, ["data.path=/data/a"])
    workdir = _run(tmp_path, config, meta_config=False)
    assert saved_config(workdir) == (str(workdir / "config.yaml"), config.model_dump())
    with pytest.raises(ResumeConfigError, match=r"config.yaml's:\n  model.base: null -> \"x\""):
        check_resume(workdir, load_config(None, ["data.path=/data/a", "model.base=x"]))


def test_new_run_passes_and_creates_nothing(tmp_path):
    check_resume(tmp_path / "new", Config())
    assert not (tmp_path / "new").exists()
    (tmp_path / "crashed").mkdir()  # config.yaml but no checkpoint yet: a new start
    (tmp_path / "crashed" / "config.yaml").write_text("model:\n  base: x\n")
    check_resume(tmp_path / "crashed", Config())
    assert saved_config(tmp_path / "crashed") is None


def test_cut_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 0.1 * s} for s in (1, 2, 3, 4)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
    assert cut_log(log, lambda s: s <= 2) == 3  # steps 3 and 4, and the cut-off line
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert cut_log(log, lambda s: s <= 2) == 0
    assert cut_log(tmp_path / "absent.jsonl", lambda s: False) == 0
    assert not (tmp_path / "absent.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_non_finite_loss_is_one_line_naming_step_value_and_fix():
    tc = load_config(None, ["train.learning_rate=1e6"]).train
    check_finite({"loss": 0.5, "grad_norm": 3.0}, 7, 6, tc)  # finite: no error
    with pytest.raises(NonFiniteLossError) as e:
        check_finite({"loss": math.nan, "grad_norm": math.inf, "lr": 1.0}, 7, 6, tc)
    assert isinstance(e.value, ValueError)  # the command's user-error boundary catches it
    assert str(e.value) == (
        "training stopped at step 7: loss=nan grad_norm=inf is not finite; nothing was "
        "saved for this step and checkpoint step 6 is intact. Try a lower "
        "train.learning_rate (now 1e+06): resuming (the same command) may change it; a "
        "lower train.max_grad_norm (now 1) needs a new --workdir."
    )
    tc = load_config(None, ["train.max_grad_norm=null", "train.precision=bfloat16"]).train
    with pytest.raises(NonFiniteLossError) as e:
        check_finite({"loss": math.inf, "grad_norm": 2.0}, 3, None, tc)
    assert str(e.value) == (
        "training stopped at step 3: loss=inf grad_norm=2.0 is not finite; nothing was "
        "saved for this step and no checkpoint was saved before it. Try a lower "
        "train.learning_rate (now 1e-05), or train.max_grad_norm=1.0 (now null) or "
        "train.precision=float32."
    )
