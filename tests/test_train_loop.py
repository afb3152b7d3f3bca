"""`cn-jax train` end to end on the tiny config: outputs, resume exactness, NaN
stop, export to diffusers, refused and damaged resumes, bad config, and
2 processes x 2 devices == 1 x 4."""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from cn_jax.cli import main
from cn_jax.config import ConfigError, load_config
from cn_jax.data.fill50k import make_fill50k
from cn_jax.train.checkpoint import Checkpointer
from cn_jax.train.loop import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), num=48, size=32, seed=0)


def _overrides(data, **kw):
    base = {
        "data.path": str(data),
        "train.batch_size": 8,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "data.num_workers": 1,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _files(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _damage(step_dir: Path) -> None:
    """Deletes a checkpoint step's array files, as a disk or a user might."""
    for p in (step_dir / "state" / "d").iterdir():
        p.unlink()


def _logged_steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def _params(workdir, step=None):
    from cn_jax.train.export import export_run

    out = Path(workdir) / f"export_{step}"
    export_run(workdir, out, step=step)
    from cn_jax.weights.safetensors_io import read_safetensors

    return read_safetensors(out / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow  # whole training runs; the fast tier trains one (export_cli)
def test_run_outputs_and_resume_is_bit_exact(data, tmp_path):
    straight = tmp_path / "straight"
    val = {"train.validate_every": 4, "train.validation_steps": 2, "train.validation_samples": 3}
    last = train(load_config(TINY, _overrides(data, **val)), straight, progress=False)
    assert last["step"] == 4 and np.isfinite(last["loss"])
    assert (straight / "config.yaml").is_file()
    assert load_config(straight / "config.yaml").train.max_steps == 4  # resolved config
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "grad_norm", "samples_per_s", "data_wait_s"} <= set(lines[0])
    assert any((straight / "tensorboard").iterdir())
    from PIL import Image

    grid = Image.open(straight / "val_0000004.png")  # condition | sample, 3 labelled rows
    assert grid.size[0] > 2 * 128 and grid.size[1] > 3 * 128  # 32 px cells scaled to 128
    ckpt = Checkpointer(straight / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()

    # Interrupted after 2 steps, then resumed to 4 in the same workdir.
    resumed = tmp_path / "resumed"
    train(load_config(TINY, _overrides(data, **{"train.max_steps": 2})), resumed, progress=False)
    train(load_config(TINY, _overrides(data)), resumed, progress=False)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(np.any(a[k]) for k in a if k.startswith("controlnet_down_blocks"))

    # The newest checkpoint damaged after steps 3 and 4 were logged: the resume
    # trains them again from step 2, logs each step once, and ends where the
    # straight run did.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged, ignore=shutil.ignore_patterns("export_*"))
    _damage(damaged / "checkpoints" / "4")
    train(load_config(TINY, _overrides(data, **val)), damaged, progress=False)
    assert _logged_steps(damaged / "metrics.jsonl") == [1, 2, 3, 4]
    assert (damaged / "checkpoints" / "4.unreadable").is_dir()
    c = _params(damaged)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)


@pytest.mark.slow  # whole training runs; the fast tier trains one (export_cli)
def test_nan_loss_stops_and_keeps_checkpoints(data, tmp_path):
    cfg = load_config(
        TINY,
        _overrides(data, **{
            "train.learning_rate": 1e30, "train.max_grad_norm": "null",
            "train.checkpoint_every": 1, "train.max_steps": 6,
        }),
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"^training stopped at step \d+: loss=.*intact"):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    assert steps and steps[-1] < 6
    _params(tmp_path / "run", steps[-1])  # the last saved checkpoint still loads


def test_export_cli_loads_in_diffusers(data, tmp_path, capsys, caplog):
    """Train, export, load in diffusers; then later commands on the finished run
    (none of which trains a step): a refused resume writes nothing, a damaged
    newest checkpoint falls back to the older one, none readable is one error."""
    run = tmp_path / "run"
    cli = ["train", "--config", str(TINY), "--workdir", str(run), *_overrides(data)]
    assert main(cli) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "cn")]) == 0
    model = ControlNetModel.from_pretrained(tmp_path / "cn")
    state = model.state_dict()
    ours = _params(run)
    for k, v in ours.items():
        assert torch.equal(state[k], torch.from_numpy(v)), k
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "o.safetensors"),
                 "--format", "original"]) == 0  # fmt: skip

    # Another base and conditioning: refused by name before anything is written.
    before = _files(run)
    capsys.readouterr()
    assert main([*cli, "model.base=bundled:tiny", "model.conditioning_channels=1"]) == 2
    err = capsys.readouterr().err
    assert f"cn-jax train: error: cannot resume {run}: these settings differ from its " in err
    assert '\n  model.base: null -> "bundled:tiny"\n  model.conditioning_channels: 3 -> 1\n' in err
    assert _files(run) == before  # config.yaml byte for byte, model/, metrics, checkpoints
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "cn2")]) == 0

    # Step 4's arrays deleted: resumed from step 2 (max_steps=2, allowed, trains
    # nothing), step 4 set aside, metrics.jsonl cut back to step 2.
    _damage(run / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="cn_jax.train.checkpoint"):
        assert main([*cli, "train.max_steps=2"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith(f"checkpoint step 4 in {run}")
    assert (run / "checkpoints" / "4.unreadable").is_dir()
    assert _logged_steps(run / "metrics.jsonl") == [1, 2]
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "cn3")]) == 0
    assert "from step 2 of" in capsys.readouterr().out

    # No checkpoint restores: one error naming each, and the run is left as it was.
    _damage(run / "checkpoints" / "2")
    before = _files(run)
    assert main(cli) == 2
    err = capsys.readouterr().err
    where = run / "checkpoints"
    assert f"cn-jax train: error: no checkpoint in {where} restores:\n  step 2: " in err
    assert "Traceback" not in err
    assert _files(run) == before


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*train.learnig_rate: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=lots"])
    with pytest.raises(ConfigError, match=r"model.scheduler.*unknown scheduler config.*beta_ned"):
        load_config(None, ["model.scheduler.beta_ned=0.02"])
    with pytest.raises(ConfigError, match="prediction_type='x0'"):
        load_config(None, ["model.scheduler.prediction_type=x0"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash"])
    assert load_config(None, ["model.attention=xla"]).model.attention == "xla"
    with pytest.raises(ConfigError, match="train.batch_size=6 must be a multiple"):
        load_config(None, ["train.batch_size=6", "train.grad_accum=4"])
    assert main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2


def test_bad_sample_stops_with_the_file_named(data, tmp_path, monkeypatch):
    """Issue 21: a dataset whose images cannot be read fails on its first rows, before
    the models are built (tens of seconds at SD size) and before anything is written."""
    import shutil

    from cn_jax.data import BadSampleError
    from cn_jax.train import loop

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for f in (copy / "target").iterdir():
        f.write_bytes(b"not a png")

    def build(config):
        raise AssertionError("the models were built before the data was checked")

    monkeypatch.setattr(loop, "build", build)
    for on_bad in ("error", "skip"):  # skip: every first row bad is still an error
        cfg = load_config(TINY, _overrides(copy, **{"data.on_bad_sample": on_bad}))
        with pytest.raises(BadSampleError, match=r"target/\d+\.png"):
            train(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MP_WORKER = str(ROOT / "tests" / "mp_worker.py")
MP_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _start_two_processes(workdir: Path, overrides: list[str], out: Path) -> list:
    """tests/mp_worker.py as 2 processes x 2 CPU devices over gloo, started; each
    writes its output to a file (a pipe nobody reads yet would stall it, and with
    it the other process at their next collective)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        e = {
            **MP_ENV,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "CN_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "CN_JAX_NUM_PROCESSES": "2",
            "CN_JAX_PROCESS_ID": str(pid),
            "CN_JAX_TEST_OUT": str(out),
        }
        cmd = [sys.executable, MP_WORKER, str(workdir), *overrides]
        log = out.with_name(f"{out.stem}.{pid}.log")
        with log.open("wb") as f:
            procs.append((subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _finish(procs: list, timeout: float = 600) -> None:
    """Waits for the processes; each must succeed (its output in the failure)."""
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, _ in procs:  # a hung peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, log) in enumerate(procs):
        assert p.returncode == 0, f"process {pid}:\n{log.read_text()[-8000:]}"


@pytest.mark.slow  # whole training runs; the fast tier trains one (export_cli)
def test_two_processes_equal_one_process(data, tmp_path):
    """2 processes x 2 CPU devices (gloo) == 1 process x 4 devices, after 2 steps."""
    # JAX's XLA attention: with the tiled kernel (the CPU default) the two runs'
    # weights differ by up to 1.4e-6 after two AdamW steps (one element of 4,096
    # over this tolerance), where XLA's path differs by 1.2e-7 (measured); the
    # losses agree to 1.2e-7 either way. Both runs compile the same program but for
    # the thread split of elementwise loops: the CPU kernels' summation order
    # follows the thread count (docs/benchmarks.md). This test checks the
    # multi-process plumbing; the tiled kernel on a sharded batch is checked
    # against one device in tests/test_attention.py.
    overrides = _overrides(data, **{"train.max_steps": 2, "model.attention": "xla"})
    procs = _start_two_processes(tmp_path / "multi", overrides, tmp_path / "multi.npz")
    single_env = {
        **MP_ENV,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "CN_JAX_TEST_OUT": str(tmp_path / "single.npz"),
    }
    single = subprocess.run(
        [sys.executable, MP_WORKER, str(tmp_path / "single"), *overrides],
        env=single_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    _finish(procs)
    assert single.returncode == 0, single.stdout + single.stderr
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    pa, pb = _params(tmp_path / "single"), _params(tmp_path / "multi")
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert jax.process_count() == 1


@pytest.mark.slow  # a two-process training run with sampling
def test_two_processes_fsdp_validate_and_evaluate(data, tmp_path):
    """2 processes x 2 CPU devices, `mesh.fsdp=2`, validation and held-out
    evaluation on: every process samples with the parameters split over both
    (process 0 alone waited on the other's shards until gloo aborted), process 0
    writes one grid and the evaluation log; each FSDP group is one process's."""
    overrides = _overrides(
        data,
        **{
            "train.max_steps": 2,
            "train.checkpoint_every": 2,
            "mesh.fsdp": 2,
            "train.validate_every": 2,
            "train.validation_samples": 2,
            "train.validation_steps": 2,
            "eval.every": 2,
            "eval.samples": 2,
            "eval.sampler_steps": 2,
        },
    )
    run = tmp_path / "run"
    _finish(_start_two_processes(run, overrides, tmp_path / "out.npz"), timeout=900)
    assert sorted(p.name for p in run.glob("*.png")) == ["val_0000002.png"]
    assert _logged_steps(run / "eval.jsonl") == [0, 2]
    assert _logged_steps(run / "metrics.jsonl") == [1, 2]
    processes = np.load(tmp_path / "out.npz")["mesh_processes"]
    np.testing.assert_array_equal(processes, [[0, 0], [1, 1]])  # ("data", "fsdp")


@pytest.mark.slow  # whole training runs; the fast tier trains one (export_cli)
def test_cache_latents_trains_the_same(data, tmp_path):
    """Text embeddings (and, with a VAE, posteriors) precomputed once: same training."""
    # adam_eps=1, lr=1: updates ~ gradients, so the comparison sees gradient
    # differences, not Adam's per-element normalisation of float32 noise.
    over = _overrides(data, **{
        "train.max_steps": 2, "train.checkpoint_every": 2, "train.adam_eps": 1.0,
        "train.learning_rate": 1.0,
    })  # fmt: skip
    a = train(load_config(TINY, over), tmp_path / "plain", progress=False)
    cached = [*over, "data.cache_latents=true"]
    b = train(load_config(TINY, cached), tmp_path / "cached", progress=False)
    assert (tmp_path / "cached" / "latent_cache" / "context.npy").is_file()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    pa, pb = _params(tmp_path / "plain"), _params(tmp_path / "cached")
    for k in pa:
        scale = max(np.abs(pa[k]).max(), 1e-9)
        assert np.abs(pa[k] - pb[k]).max() <= 1e-4 * scale, k
    with pytest.raises(ValueError, match="fixed crop"):
        train(load_config(TINY, [*over, "data.cache_latents=true", "data.random_flip=true"]),
              tmp_path / "flip", progress=False)  # fmt: skip


def test_cached_vae_posterior_gives_the_same_latents():
    from cn_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
    from cn_jax.models.vae import example_inputs as vae_inputs
    from cn_jax.train.step import StepModels, encode_batch

    vae = AutoencoderKL(
        AutoencoderKLConfig(
            block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
    )  # fmt: skip
    vp = vae.init(jax.random.PRNGKey(0), *vae_inputs(vae.config))["params"]
    models = StepModels(unet=None, controlnet=None, vae=vae, text_encoder=None)
    pixels = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
    ctx = np.zeros((2, 4, 8), np.float32)
    noise = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 4))
    plain = {"pixel_values": pixels, "encoder_hidden_states": ctx}
    mean, logvar = vae.apply({"params": vp}, pixels, method="encode")
    cached = {"latent_mean": mean, "latent_logvar": logvar, "encoder_hidden_states": ctx}
    a, _ = encode_batch(models, {"vae": vp}, plain, noise)
    b, _ = encode_batch(models, {"vae": vp}, cached, noise)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # whole training runs; the fast tier trains one (export_cli)
def test_base_run_evaluates_and_exports_a_pipeline(data, tmp_path):
    """train.trainable=unet (the demo base's recipe, v-prediction with zero terminal
    SNR from `model.scheduler`): eval.jsonl at step 0 and every K steps, and
    `cn-jax export` writes a diffusers pipeline folder, with that schedule, that
    loads back (ours) and in diffusers / transformers with the same tensors."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cn_jax.weights.keymap import flax_to_torch
    from cn_jax.weights.sd import load_pipeline, random_pipeline

    run = tmp_path / "base"
    extra = {
        "train.trainable": "unet", "train.max_steps": 3, "train.checkpoint_every": 3,
        "train.ema_decay": 0.5, "eval.every": 2, "eval.samples": 2, "eval.sampler_steps": 2,
        "model.scheduler.prediction_type": "v_prediction",
        "model.scheduler.rescale_betas_zero_snr": "true",
    }  # fmt: skip
    cli = ["train", "--config", str(TINY), "--workdir", str(run), *_overrides(data, **extra)]
    assert main(cli) == 0
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert all(0.0 <= e["iou"] <= 1.0 and 0.0 <= e["colour_adherence"] <= 1.0 for e in evals)

    out = tmp_path / "pipeline"
    assert main(["export", "--run", str(run), "--out", str(out), "--ema"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and not (out / "vae").exists()
    sd = load_pipeline(out)
    assert sd.vae is None and sd.tokenizer is not None
    assert sd.schedule.prediction_type == "v_prediction" and sd.schedule.rescale_betas_zero_snr
    assert sd.schedule.alphas_cumprod()[-1] == 0.0  # zero terminal SNR
    ref = random_pipeline("tiny", seed=0)  # the run's frozen text encoder: the seeded one
    te, te_ref = jax.tree.leaves(sd.text_encoder_params), jax.tree.leaves(ref.text_encoder_params)
    for a, b in zip(te, te_ref):
        np.testing.assert_array_equal(a, b)
    from cn_jax.train.export import _restore

    cfg = load_config(run / "config.yaml")
    abstract = {"unet": jax.eval_shape(lambda: ref.unet_params)}
    _, ema = _restore(run, cfg, abstract, None, ema=True)
    _, raw = _restore(run, cfg, abstract, None, ema=False)
    ours = flax_to_torch(sd.unet_params)
    for k, v in flax_to_torch(ema["unet"]).items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
    torch_unet = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    for k, v in ours.items():
        assert torch.equal(torch_unet[k], torch.from_numpy(np.asarray(v))), k
    from cn_jax.models.clip_text import canonical_torch_state

    torch_te = canonical_torch_state(
        CLIPTextModel.from_pretrained(out / "text_encoder").state_dict()
    )
    for k, v in flax_to_torch(sd.text_encoder_params).items():
        assert torch.equal(torch_te[k], torch.from_numpy(np.asarray(v))), k
