"""The `cn-jax` entry point."""

import subprocess
import sys

import numpy as np

import cn_jax
from cn_jax.cli import main

from reference import flax_controlnet_params, torch_controlnet


def test_convert_both_ways(tmp_path, capsys):
    tc = torch_controlnet("gray")
    tc.save_pretrained(tmp_path / "in")
    orig = str(tmp_path / "o.safetensors")
    assert main(["convert", str(tmp_path / "in"), orig, "--format", "original"]) == 0
    assert main(["convert", str(tmp_path / "o.safetensors"), str(tmp_path / "back")]) == 0
    _, ref = flax_controlnet_params(tc)
    _, back = cn_jax.load_controlnet(tmp_path / "back")
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)
    assert "wrote" in capsys.readouterr().out


def test_convert_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    assert main(["convert", str(tmp_path / "x.safetensors"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "x.safetensors" in err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "cn_jax.cli", "info"], capture_output=True, text=True, check=True
    )
    assert "cn_jax" in out.stdout and "backend" in out.stdout


def test_annotate_canny_matches_cv2(tmp_path):
    import cv2
    from PIL import Image
    from skimage import data as photos

    img = photos.astronaut()[::4, ::4]
    Image.fromarray(img).save(tmp_path / "in.png")
    assert main(["annotate", "canny", str(tmp_path / "in.png"), str(tmp_path / "out.png"),
                 "--low", "50", "--high", "150"]) == 0  # fmt: skip
    out = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(out[..., 0], cv2.Canny(img, 50, 150))
