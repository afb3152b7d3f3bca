"""`load_pipeline`: a tiny random diffusers StableDiffusionPipeline folder and the
same weights as one original checkpoint; every component against its reference."""

import functools
import json
import shutil
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

import cn_jax
from cn_jax import WeightFileError
from cn_jax.cli import main
from cn_jax.models.unet import example_inputs as unet_example_inputs
from cn_jax.tokenizer import tokenize
from cn_jax.weights import original_sd, read_safetensors, write_safetensors

from reference import CONFIGS, jit_apply, max_rel_err, nchw, nhwc, randomize_
from tiny_tokenizer import build_tiny_clip_tokenizer

TOL = 1e-4


@functools.cache
def _pipeline_folder(root) -> str:
    """A tiny SD pipeline (SD 1.x layout, VAE factor 8) saved with save_pretrained."""
    folder = root / "sd"
    tok = build_tiny_clip_tokenizer(root / "tok")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    )
    tok.model_max_length = 16
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    unet = UNet2DConditionModel(**CONFIGS["sd15"][0])
    for i, m in enumerate((text, vae, unet)):
        randomize_(m, 20 + i)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return _pipeline_folder(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def loaded(sd_folder):
    return cn_jax.load_pipeline(sd_folder)


def _reference(folder):
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def _check_components(sd, ref, label):
    rng = np.random.default_rng(0)
    # Text encoder on real token ids from the folder's tokenizer.
    ids = tokenize(sd.tokenizer, ["red circle with navy blue background", ""], 16)
    ours = np.asarray(jit_apply(sd.text_encoder, {"params": sd.text_encoder_params}, ids)[0])
    with torch.no_grad():
        want = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0].numpy()
    errs = {"text": max_rel_err(ours, want)}
    # VAE encode (mean, logvar) and decode.
    img = rng.uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    mean, logvar = jit_apply(sd.vae, {"params": sd.vae_params}, img, method="encode")
    z = rng.standard_normal((2, 12, 12, 4)).astype(np.float32)
    dec = jit_apply(sd.vae, {"params": sd.vae_params}, z, method="decode")
    with torch.no_grad():
        dist = ref.vae.encode(nchw(img)).latent_dist
        ref_dec = ref.vae.decode(nchw(z)).sample
    errs["vae mean"] = max_rel_err(mean, nhwc(dist.mean))
    errs["vae logvar"] = max_rel_err(logvar, nhwc(dist.logvar))
    errs["vae decode"] = max_rel_err(dec, nhwc(ref_dec))
    # UNet.
    ctx = rng.standard_normal((2, 16, 32)).astype(np.float32)
    t = np.array([3.0, 800.0], np.float32)
    eps = jit_apply(sd.unet, {"params": sd.unet_params}, z, t, ctx)
    with torch.no_grad():
        ref_eps = ref.unet(nchw(z), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    errs["unet"] = max_rel_err(eps, nhwc(ref_eps))
    print(label, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs


def test_folder_components_match_diffusers(sd_folder, loaded):
    ref = _reference(sd_folder)
    assert loaded.vae.config.scaling_factor == ref.vae.config.scaling_factor
    ac = loaded.schedule.alphas_cumprod()
    np.testing.assert_allclose(ac, ref.scheduler.alphas_cumprod.numpy(), rtol=1e-5)
    assert loaded.schedule.prediction_type == "epsilon"
    _check_components(loaded, ref, "folder")


def _write_original(sd_folder, path):
    """The folder's weights as one original checkpoint (LDM names), plus EMA-free extras."""
    ref = _reference(sd_folder)

    def numpy_state(m):
        return {k: v.numpy() for k, v in m.state_dict().items()}

    state = {}
    state.update(original_sd.unet_to_original(numpy_state(ref.unet), 2))
    state.update(original_sd.vae_to_original(numpy_state(ref.vae)))
    state.update(original_sd.clip_to_original(numpy_state(ref.text_encoder), kind="sd1"))
    state["alphas_cumprod"] = ref.scheduler.alphas_cumprod.numpy()
    write_safetensors(path, state)
    return path


def _same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_single_file_equals_folder(sd_folder, loaded, tmp_path):
    path = _write_original(sd_folder, tmp_path / "tiny.safetensors")
    single = cn_jax.load_pipeline(path, config=sd_folder, tokenizer=f"{sd_folder}/tokenizer")
    for name in ("unet_params", "vae_params", "text_encoder_params"):
        assert _same_tree(getattr(single, name), getattr(loaded, name)), name
    assert single.unet.config == loaded.unet.config
    _check_components(single, _reference(sd_folder), "single file")
    # Without a tokenizer the weights still load, with a warning.
    with pytest.warns(UserWarning, match="no tokenizer"):
        assert cn_jax.load_pipeline(path, config=sd_folder).tokenizer is None


def test_single_file_needs_a_config_and_reports_wrong_one(sd_folder, tmp_path):
    path = _write_original(sd_folder, tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="config='sd15'"):
        cn_jax.load_pipeline(path)
    with pytest.raises(WeightFileError, match="mis-shaped keys"):
        cn_jax.load_pipeline(path, config="sd15")  # real SD 1.5 shapes: every tensor differs
    with pytest.raises(ValueError, match="unknown model config 'sd9'"):
        cn_jax.load_pipeline(path, config="sd9")
    with pytest.raises(WeightFileError, match="not an SDXL base file"):
        cn_jax.load_pipeline(path, config="sdxl")  # an SD 1.x file read as SDXL


def test_single_file_unexpected_keys_named(sd_folder, tmp_path):
    path = _write_original(sd_folder, tmp_path / "tiny.safetensors")
    state = read_safetensors(path)
    state["model.diffusion_model.extra_block.weight"] = np.zeros(2, np.float32)
    write_safetensors(path, state)
    with pytest.raises(WeightFileError, match="extra_block"):
        cn_jax.load_pipeline(path, config=sd_folder, tokenizer=f"{sd_folder}/tokenizer")


def test_bfloat16_weights(sd_folder):
    sd = cn_jax.load_pipeline(sd_folder, param_dtype=jax.numpy.bfloat16)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves([sd.unet_params, sd.vae_params])}
    assert dtypes == {jax.numpy.dtype("bfloat16")}


def test_loading_streams_tensors(sd_folder):
    """The conversion reads one tensor at a time from the file into the Flax tree:
    host memory holds about one tensor, never the file's whole state dict.
    (Measured around the conversion: tracing `eval_shape` for the target tree
    costs Python memory proportional to the graph, not to the weights.)"""
    from cn_jax.weights.folders import _abstract_params, _open_state
    from cn_jax.weights.keymap import torch_to_flax

    unet, _ = cn_jax.load_unet(sd_folder)
    abstract = _abstract_params(unet, *unet_example_inputs(unet.config))
    file = f"{sd_folder}/unet/diffusion_pytorch_model.safetensors"
    total = sum(a.nbytes for a in read_safetensors(file).values())
    largest = max(a.nbytes for a in read_safetensors(file).values())
    state, _ = _open_state([Path(file)], allow_pickle=False)
    tracemalloc.start()
    params = torch_to_flax(state, abstract)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak traced host memory {peak / total:.2f} x the weights")
    assert peak < 0.5 * total and peak < 4 * largest + 1e6, (peak, total, largest)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)


@pytest.mark.parametrize(
    "remove,message",
    [
        ("vae", "missing subfolder vae/"),
        ("text_encoder/config.json", "missing config.json"),
        ("unet/diffusion_pytorch_model.safetensors", "no weights found"),
        ("scheduler/scheduler_config.json", "missing scheduler_config.json"),
        ("model_index.json", "no model_index.json"),
    ],
)
def test_missing_parts_are_named(sd_folder, tmp_path, remove, message):
    copy = tmp_path / "sd"
    shutil.copytree(sd_folder, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightFileError, match=message):
        cn_jax.load_pipeline(copy)


def test_wrong_shape_in_component_is_named(sd_folder, tmp_path):
    copy = tmp_path / "sd"
    shutil.copytree(sd_folder, copy)
    cfg_file = copy / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["latent_channels"] = 8
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match=r"(?s)vae.*mis-shaped.*quant_conv.weight"):
        cn_jax.load_pipeline(copy)


def test_init_controlnet_command(sd_folder, tmp_path):
    out = tmp_path / "cn"
    assert main(["init-controlnet", "--base", sd_folder, "--out", str(out)]) == 0
    ours = ControlNetModel.from_pretrained(out)
    ref = ControlNetModel.from_unet(
        UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    )
    sd, rd = ours.state_dict(), ref.state_dict()
    assert set(sd) == set(rd)
    copied = [k for k in rd if not k.startswith("controlnet_cond_embedding.")]
    assert all(torch.equal(sd[k], rd[k]) for k in copied)
    assert not torch.any(sd["controlnet_cond_embedding.conv_out.weight"])
