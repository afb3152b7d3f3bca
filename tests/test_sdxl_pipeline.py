"""ControlNetPipeline on an SDXL base against diffusers' StableDiffusionXLControlNetPipeline
(same tiny random weights, random zero convs, same initial latents): one and two
ControlNets, guess mode, a None negative prompt (force_zeros_for_empty_prompt), negative
size numbers, the second prompt."""

import functools

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline
from PIL import Image
from sdxl_reference import sdxl_controlnets, sdxl_pipeline_folder

import cn_jax
from cn_jax.pipeline import ControlNetPipeline

from reference import flax_controlnet_params, nchw, slow_unless

TOL = 1e-3  # max abs on images in [0, 1]
SIDE = 64  # pixels; latents 16 (VAE factor 4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_pipeline_folder(tmp_path_factory.mktemp("sdxlpipe"))


@functools.cache
def _ours(folder, n_nets):
    sd = cn_jax.load_pipeline(folder)
    nets = [flax_controlnet_params(t) for t in sdxl_controlnets(folder)[:n_nets]]
    return ControlNetPipeline(sd, nets)


def _cond(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


LATENTS = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
PROMPTS = ["red circle with navy blue background", "green star with black background"]
NEGATIVE = ["white square", "blue ring"]

CASES = {
    # negative_prompt None: zero unconditional embeddings (force_zeros_for_empty_prompt)
    "one": dict(nets=1, kw=dict(controlnet_conditioning_scale=0.8)),
    "two": dict(
        nets=2, kw=dict(controlnet_conditioning_scale=[0.7, 1.2], negative_prompt=NEGATIVE)
    ),
    "guess": dict(nets=1, kw=dict(guess_mode=True, guidance_scale=3.0, negative_prompt=NEGATIVE)),
    "sizes": dict(
        nets=1,
        kw=dict(
            original_size=(96, 80),
            crops_coords_top_left=(8, 4),
            target_size=(64, 64),
            prompt_2=["yellow triangle", "purple ring"],
            negative_prompt=NEGATIVE,
            control_guidance_start=0.2,
            control_guidance_end=0.7,
        ),
    ),  # fmt: skip
}
FAST_CASES = {"one"}


def _reference(folder, n, kw):
    images = [_cond(i) for i in range(n)]
    nets = sdxl_controlnets(folder)[:n]
    ref_pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        folder, controlnet=nets if n > 1 else nets[0]
    )
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return ref_pipe(
            PROMPTS, image=images if n > 1 else images[0], num_inference_steps=8,
            height=SIDE, width=SIDE, latents=nchw(LATENTS), output_type="np", **kw,
        ).images  # fmt: skip


@pytest.mark.parametrize("case", slow_unless(sorted(CASES), FAST_CASES))
def test_sdxl_matches_diffusers_pipeline(folder, case):
    n, kw = CASES[case]["nets"], dict(CASES[case]["kw"])
    kw.setdefault("guidance_scale", 5.0)
    ref = _reference(folder, n, kw)
    images = [_cond(i) for i in range(n)]
    ours = _ours(folder, n)(
        PROMPTS, images if n > 1 else images[0], num_inference_steps=8, latents=LATENTS,
        output_type="np", scheduler="euler", **kw,
    )  # fmt: skip
    err = float(np.abs(ours - ref).max())
    print(f"SDXL pipeline[{case}] max abs err {err:.2e}")
    assert ours.shape == ref.shape == (2, SIDE, SIDE, 3)
    assert err <= TOL


def test_sdxl_none_negative_is_zeros_not_empty_prompt(folder):
    """force_zeros_for_empty_prompt: a None negative prompt is not the same as "" """
    pipe = _ours(folder, 1)
    kw = dict(num_inference_steps=3, latents=LATENTS, output_type="np", scheduler="euler")
    zero = pipe(PROMPTS, _cond(0), **kw)
    empty = pipe(PROMPTS, _cond(0), negative_prompt="", **kw)
    assert np.abs(zero - empty).max() > 1e-3
    with pytest.raises(ValueError, match="original_size=nan: expected a finite number >= 0"):
        pipe.prepare(PROMPTS, _cond(0), original_size=(float("nan"), 64))
    with pytest.raises(ValueError, match=r"target_size=\(64,\): expected two numbers"):
        pipe.prepare(PROMPTS, _cond(0), target_size=(64,))
    # An SD 1.x ControlNet cannot steer it.
    from cn_jax.models.controlnet import ControlNet

    sd15_net = ControlNet(
        pipe.controlnets[0].config.replace(
            addition_embed_type=None,
            addition_time_embed_dim=None,
            projection_class_embeddings_input_dim=None,
        )
    )
    with pytest.raises(ValueError, match="SD 1.x/2.x ControlNet cannot steer an SDXL base"):
        ControlNetPipeline(pipe.sd, [(sd15_net, None)])


@pytest.mark.slow  # a whole-generation compile each
def test_sdxl_sample_cli_writes_a_grid(folder, tmp_path):
    from cn_jax.cli import main

    cn_dir = tmp_path / "cn"
    sdxl_controlnets(folder)[0].save_pretrained(cn_dir)
    _cond(0).save(tmp_path / "c.png")
    out = tmp_path / "out.png"
    args = ["sample", "--base", folder, "--controlnet", str(cn_dir), "--image",
            str(tmp_path / "c.png"), "--prompt", PROMPTS[0], "--steps", "2", "--num-images", "2",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out).size == (2 * SIDE + 2, SIDE)  # one row, 2 px gap
    assert main([*args, "--compare-base", "--precision", "bfloat16"]) == 0
