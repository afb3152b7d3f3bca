"""The README's first command in its short variant: `scripts/demo.sh --quick`
runs every stage (data, train with held-out evaluation, export, sample, report)
and every output file exists and parses."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # six fresh cn-jax processes
def test_demo_quick_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in proc.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("iou_initial", "iou_final", "colour_adherence", "iou_chance"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert [c["step"] for c in metrics["curve"]] == [0, 1, 2]
    assert set(metrics["targets"]) and metrics["train_seconds"] >= 0

    samples = Image.open(out / "samples.png")
    samples.load()
    # condition | base | ControlNet, 2 labelled rows; the 32 px cells scaled to 128
    assert samples.size[0] > 3 * 128 and samples.size[1] > 2 * 128
    curve = Image.open(out / "control_curve.png")
    curve.load()
    assert curve.size[0] > 100 and np.asarray(curve).std() > 0

    from cn_jax.weights.folders import load_controlnet

    cnet, params = load_controlnet(out / "controlnet")
    assert cnet.config.conditioning_channels == 3 and params
    evals = [json.loads(x) for x in (out / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1, 2]
