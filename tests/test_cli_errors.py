"""The `cn-jax` command's error boundary (issue 21): a user's mistake ends in one line
naming the culprit and exit code 2, never a stack trace or a silently wrong result;
our own bugs keep their traces. Each test gives the bad input and checks the exact
error, or the right result."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import cn_jax
from cn_jax import cli
from cn_jax.cli import main
from cn_jax.train.loop import NonFiniteLossError


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory):
    """A ControlNet for the bundled tiny base, written by `cn-jax init-controlnet`."""
    out = tmp_path_factory.mktemp("cn") / "tiny_cn"
    assert main(["init-controlnet", "--base", "bundled:tiny", "--out", str(out)]) == 0
    return out


def test_user_errors_end_in_one_line_and_bugs_keep_their_trace(monkeypatch, capsys):
    def fails(exc):
        def run(args):
            raise exc

        return run

    monkeypatch.setattr(cli, "_info", fails(NonFiniteLossError("loss is nan at step 3")))
    assert main(["info"]) == 2
    assert _error(capsys) == "cn-jax info: error: loss is nan at step 3"
    monkeypatch.setattr(cli, "_info", fails(FileExistsError(17, "File exists", "/x/out")))
    assert main(["info"]) == 2
    assert _error(capsys) == "cn-jax info: error: /x/out: File exists"
    monkeypatch.setattr(cli, "_info", fails(RuntimeError("our bug")))
    with pytest.raises(RuntimeError, match="our bug"):
        main(["info"])
    monkeypatch.setattr(cli, "_info", fails(ValueError("shown with its trace")))
    monkeypatch.setenv("CN_JAX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="shown with its trace"):
        main(["info"])


def test_overrides_may_sit_anywhere_among_the_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)) or 0)
    argv = ["train", "--config", "c.yaml", "train.seed=1", "--workdir", "w", "train.lr=2"]
    assert main(argv) == 0
    assert seen["overrides"] == ["train.seed=1", "train.lr=2"] and seen["workdir"] == "w"
    with pytest.raises(SystemExit):  # not an override: argparse's own message
        main(["train", "--config", "c.yaml", "--workdir", "w", "--bogus"])


def test_init_controlnet_serves_its_base(tiny_controlnet, tmp_path, capsys):
    """`bundled:tiny` is accepted (as `sample` accepts it) and the ControlNet written
    for this pixel-space base conditions at its latent size, so a pipeline takes it;
    the paper's encoder too."""
    sd = cn_jax.load_pipeline("bundled:tiny")
    for path in (tiny_controlnet, tmp_path / "paper"):
        if path != tiny_controlnet:
            argv = ["init-controlnet", "--base", "bundled:tiny", "--out", str(path)]
            assert main([*argv, "--encoder", "paper"]) == 0
        net, params = cn_jax.load_controlnet(path)
        assert net.config.latent_factor == 1
        cn_jax.ControlNetPipeline(sd, [(net, params)])  # refuses a mismatched factor
    assert "conditions at 1x the latent size" in capsys.readouterr().out


def test_a_controlnet_the_base_cannot_use_is_refused():
    unet_cfg = cn_jax.load_pipeline("bundled:tiny").unet.config
    with pytest.raises(ValueError, match="downsamples by 8, the base model's latents are 16"):
        cn_jax.ControlNetConfig.from_unet(unet_cfg, latent_factor=16)


@pytest.mark.parametrize(
    "option, value, want",
    [
        ("--scale", "nan", "controlnet_conditioning_scale=nan: expected a finite number"),
        ("--guidance", "nan", "guidance_scale=nan: expected a finite number"),
        ("--guidance", "inf", "guidance_scale=inf: expected a finite number"),
        ("--num-images", "0", "num_images_per_prompt=0: expected an integer >= 1"),
        ("--steps", "0", "num_inference_steps=0: expected an integer >= 1"),
        ("--seed", str(10**20), "seed=100000000000000000000: expected an integer in [0, "),
    ],
)
def test_sample_refuses_bad_numbers(tiny_controlnet, tmp_path, capsys, option, value, want):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "c.png")
    argv = ["sample", "--base", "bundled:tiny", "--controlnet", str(tiny_controlnet),
            "--image", str(tmp_path / "c.png"), "--prompt", "a red circle",
            "--out", str(tmp_path / "o.png"), option, value]  # fmt: skip
    assert main(argv) == 2
    assert want in _error(capsys)
    assert not (tmp_path / "o.png").exists()


def test_convert_onto_a_file_or_folder_of_the_other_kind(tiny_controlnet, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["convert", str(tiny_controlnet), str(tmp_path / "taken")]) == 2
    assert "taken is a file; the diffusers format writes a folder there" in _error(capsys)
    (tmp_path / "dir.safetensors").mkdir()
    argv = ["convert", str(tiny_controlnet), str(tmp_path / "dir.safetensors")]
    assert main([*argv, "--format", "original"]) == 2
    assert "dir.safetensors is a folder; the original format writes one file" in _error(capsys)
    assert (tmp_path / "taken").read_text() == "x"  # nothing lost


@pytest.mark.parametrize(
    "field, value, want",
    [
        ("in_channels", "x", "config field in_channels='x': expected int, got str"),
        ("block_out_channels", [10**9, 10**9], "block_out_channels="),
        ("norm_num_groups", 0, "norm_num_groups=0"),
    ],
)
def test_a_bad_config_json_is_one_line(tiny_controlnet, tmp_path, capsys, field, value, want):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_controlnet, bad)
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert want in err and "config.json" in err and "\n" not in err


def test_16_bit_conditions_keep_their_range_in_sampling_and_annotate(tiny_controlnet, tmp_path):
    """A 16-bit depth gradient (0..65535) reaches the ControlNet as a gradient in [0, 1]
    (PIL's convert("RGB") made it 0, 1, 1, 1...), from a uint16 array and from a 16-bit
    PNG; `cn-jax annotate` reads the PNG by its own range too."""
    ramp = np.linspace(0, 65535, 32).round().astype(np.uint16)
    depth = np.tile(ramp, (32, 1))
    Image.fromarray(depth).save(tmp_path / "depth16.png")  # mode I;16
    assert Image.open(tmp_path / "depth16.png").mode.startswith("I;16")
    sd = cn_jax.load_pipeline("bundled:tiny")
    pipe = cn_jax.ControlNetPipeline(sd, [cn_jax.load_controlnet(tiny_controlnet)])
    want = np.repeat((depth / 65535.0)[..., None], 3, axis=-1)
    for source in (np.repeat(depth[..., None], 3, axis=-1), tmp_path / "depth16.png"):
        got = pipe._condition(source, 0, None)
        np.testing.assert_allclose(got, want, atol=1e-6)
    out = tmp_path / "gray.png"
    assert main(["annotate", "grayscale", str(tmp_path / "depth16.png"), str(out)]) == 0
    row = np.asarray(Image.open(out))[0, :, 0].astype(int)
    np.testing.assert_allclose(row, np.rint(ramp / 65535 * 255), atol=1)


def test_sample_precision_bfloat16_stores_and_computes_in_bfloat16(tiny_controlnet, tmp_path):
    """Issue 22: `cn-jax sample --precision bfloat16` (ControlNetPipeline.from_pretrained
    with dtype=bfloat16) holds every weight in bfloat16 and writes its image."""
    pipe = cn_jax.ControlNetPipeline.from_pretrained(
        "bundled:tiny", tiny_controlnet, dtype="bfloat16"
    )
    dtypes = {x.dtype for x in jax.tree.leaves(pipe.params)}
    assert dtypes == {np.dtype("bfloat16")}, dtypes
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "c.png")
    argv = ["sample", "--base", "bundled:tiny", "--controlnet", str(tiny_controlnet),
            "--image", str(tmp_path / "c.png"), "--prompt", "a red circle", "--steps", "2",
            "--precision", "bfloat16", "--out", str(tmp_path / "o.png")]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(tmp_path / "o.png").size == (32, 32)


def test_base_latent_factor_from_configs_alone(tmp_path):
    """What init-controlnet builds for: a pixel-space pipeline folder 1; one checkpoint
    with a named config that config's VAE (as load_pipeline reads it); no config, or a bare
    UNet folder, SD's 8."""
    from cn_jax.weights.sd import base_latent_factor

    assert base_latent_factor("bundled:tiny") == 1
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")  # only its being a file matters: no weight is read
    assert base_latent_factor(ckpt, "sd15") == 8
    assert base_latent_factor(ckpt) == 8
    assert base_latent_factor(tmp_path) == 8
