"""ControlNetPipeline end to end against diffusers' StableDiffusionControlNetPipeline
(same tiny random weights, random zero convs, same initial latents, DDIM 10 steps,
CFG 7.5), plus compile-once, seeds and input errors."""

import functools

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
from test_pipeline_loading import _pipeline_folder

import cn_jax
from cn_jax.pipeline import ControlNetPipeline

from reference import flax_controlnet_params, nchw, randomize_, slow_unless

TOL = 1e-3  # max abs on images in [0, 1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _pipeline_folder(tmp_path_factory.mktemp("cnpipe"))


@functools.cache
def _torch_nets(folder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return [randomize_(ControlNetModel.from_unet(unet), 40 + i) for i in range(2)]


@functools.cache
def _ours(folder, n_nets):
    sd = cn_jax.load_pipeline(folder)
    nets = [flax_controlnet_params(t) for t in _torch_nets(folder)[:n_nets]]
    return ControlNetPipeline(sd, nets)


def _cond(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))


LATENTS = np.random.default_rng(0).standard_normal((2, 12, 12, 4)).astype(np.float32)
PROMPTS = ["red circle with navy blue background", "green star with black background"]

CASES = {
    "one": dict(nets=1, kw=dict(controlnet_conditioning_scale=0.8)),
    "two": dict(nets=2, kw=dict(controlnet_conditioning_scale=[0.7, 1.2])),
    "guess": dict(nets=1, kw=dict(guess_mode=True, guidance_scale=3.0)),
    "window": dict(nets=1, kw=dict(control_guidance_start=0.2, control_guidance_end=0.7)),
}


# The fast tier keeps one ControlNet and the guidance window (same compiled program).
FAST_CASES = {"one", "window"}


@pytest.mark.parametrize("case", slow_unless(sorted(CASES), FAST_CASES))
def test_matches_diffusers_pipeline(folder, case):
    n, kw = CASES[case]["nets"], dict(CASES[case]["kw"])
    kw.setdefault("guidance_scale", 7.5)
    images = [_cond(i) for i in range(n)]
    nets = _torch_nets(folder)[:n]
    ref_pipe = StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=nets if n > 1 else nets[0], safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(
            PROMPTS, image=images if n > 1 else images[0], num_inference_steps=10,
            height=96, width=96, latents=nchw(LATENTS), output_type="np", **kw,
        ).images  # fmt: skip
    ours = _ours(folder, n)(
        PROMPTS, images if n > 1 else images[0], num_inference_steps=10, latents=LATENTS,
        output_type="np", **kw,
    )  # fmt: skip
    err = float(np.abs(ours - ref).max())
    print(f"pipeline[{case}] max abs err {err:.2e}")
    assert ours.shape == ref.shape == (2, 96, 96, 3)
    assert err <= TOL


@pytest.mark.slow  # a whole-generation compile each
def test_compiles_once_and_seeds_reproduce(folder):
    pipe = _ours(folder, 1)
    before = pipe.trace_count
    a = pipe(PROMPTS[0], _cond(0), num_inference_steps=4, seed=3, output_type="np")
    b = pipe(PROMPTS[0], _cond(1), num_inference_steps=4, seed=3, output_type="np")
    c = pipe(PROMPTS[0], _cond(0), num_inference_steps=4, seed=3, output_type="np")
    d = pipe(PROMPTS[0], _cond(0), num_inference_steps=4, seed=4, output_type="np")
    assert pipe.trace_count == before + 1  # one program for all four calls
    np.testing.assert_array_equal(a, c)
    assert np.abs(a - b).max() > 0 and np.abs(a - d).max() > 0
    pil = pipe(PROMPTS[0], _cond(0), num_inference_steps=4, seed=3)
    assert isinstance(pil[0], Image.Image) and pil[0].size == (96, 96)


def test_input_errors(folder, tmp_path):
    pipe = _ours(folder, 1)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe("a", str(bad), num_inference_steps=2)
    with pytest.raises(ValueError, match="expects \\(H, W, 3\\)"):
        pipe("a", np.zeros((96, 96, 2), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="SDXL options, and this base is not SDXL"):
        pipe("a", _cond(0), num_inference_steps=2, original_size=(64, 64))
    with pytest.warns(UserWarning, match="not a multiple"):
        out = pipe("a", np.zeros((100, 100, 3)), num_inference_steps=2, output_type="np")
    assert out.shape == (1, 96, 96, 3)


@pytest.mark.slow  # a whole-generation compile each
def test_sample_cli_writes_a_grid(folder, tmp_path):
    from cn_jax.cli import main

    cn_dir = tmp_path / "cn"
    _torch_nets(folder)[0].save_pretrained(cn_dir)
    _cond(0).save(tmp_path / "c.png")
    out = tmp_path / "out.png"
    args = ["sample", "--base", folder, "--controlnet", str(cn_dir), "--image",
            str(tmp_path / "c.png"), "--prompt", PROMPTS[0], "--steps", "2", "--num-images", "2",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out).size == (2 * 96 + 2, 96)  # one row, 2 px gap
    # --compare-base: condition | base alone | with the ControlNet, labelled, cells >= 128 px.
    from cn_jax.grid import GAP, LABEL_WIDTH, MIN_CELL

    args[args.index("--num-images") + 1] = "1"
    assert main([*args, "--compare-base"]) == 0
    w, h = Image.open(out).size
    cell = 96 * -(-MIN_CELL // 96)
    assert w == max(cell, LABEL_WIDTH) + GAP + 3 * (cell + GAP) - GAP and h > cell


@pytest.mark.slow  # a whole-generation compile each
def test_base_alone_matches_diffusers(folder):
    """No ControlNet (the demo's "base alone" column) == StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(
            PROMPTS, num_inference_steps=6, height=96, width=96, latents=nchw(LATENTS),
            output_type="np", guidance_scale=5.0,
        ).images  # fmt: skip
    pipe = ControlNetPipeline(_ours(folder, 1).sd, [])
    ours = pipe(
        PROMPTS, num_inference_steps=6, latents=LATENTS, output_type="np", guidance_scale=5.0,
        height=96, width=96,
    )  # fmt: skip
    err = float(np.abs(ours - ref).max())
    print(f"pipeline[base alone] max abs err {err:.2e}")
    assert ours.shape == ref.shape == (2, 96, 96, 3) and err <= TOL


@pytest.mark.slow  # a whole-generation compile each
@pytest.mark.devices(8)
def test_batch_split_over_devices_and_bfloat16(folder):
    """8 images (4 prompts x 2) are split over the 8 virtual devices and equal
    the same images generated unsharded; bfloat16 compute runs and stays close."""
    import jax

    assert len(jax.local_devices()) == 8
    pipe = _ours(folder, 1)
    prompts = PROMPTS * 2
    lat = np.random.default_rng(1).standard_normal((8, 12, 12, 4)).astype(np.float32)
    kw = dict(num_inference_steps=2, output_type="np")
    sharded = pipe(prompts, _cond(0), num_images_per_prompt=2, latents=lat, **kw)
    assert 8 in pipe.sharded_batches and 1 not in pipe.sharded_batches
    single = np.concatenate(
        [pipe(prompts[i // 2], _cond(0), latents=lat[i : i + 1], **kw) for i in range(8)]
    )
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    nets = [flax_controlnet_params(_torch_nets(folder)[0])]
    bf16 = ControlNetPipeline(pipe.sd, nets, dtype="bfloat16")
    out = bf16(PROMPTS[0], _cond(0), latents=lat[:1], **kw)
    assert np.isfinite(out).all() and np.abs(out - single[:1]).max() < 0.1
