"""SDXL weights in and out (issue 23): a tiny random diffusers StableDiffusionXLPipeline
(the `sdxl-tiny` preset's shapes, every parameter random) read as a folder and as one
original (sgm) checkpoint, written back for diffusers; SDXL ControlNets in the diffusers
and original layouts; the refiner refused by name; init-controlnet on an SDXL base."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_controlnet_checkpoint,
)
from huggingface_hub.utils import filter_repo_objects
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

import cn_jax
from cn_jax import WeightFileError
from cn_jax.cli import main
from cn_jax.models.clip_text import encode_text
from cn_jax.models.config import ControlNetConfig
from cn_jax.models.controlnet import ControlNet
from cn_jax.models.controlnet import example_inputs as controlnet_example_inputs
from cn_jax.models.presets import preset
from cn_jax.tokenizer import TokenizerPair, tokenize
from cn_jax.weights import hub, original, original_sd, read_safetensors, write_safetensors
from cn_jax.weights.sd import (
    BUNDLED_TOKENIZER,
    base_latent_factor,
    load_pipeline,
    random_pipeline,
    save_pipeline,
)

from reference import jit_apply, max_rel_err, nchw, nhwc, randomize_

TOL = 1e-4  # float32 max relative error
MAX_LEN = 16  # the bundled tiny tokenizer's model_max_length and the tiny encoders' positions
PROMPTS = ["red circle with navy blue background", ""]


# -- the reference: a tiny random SDXL pipeline in diffusers ----------------------------------


def _sdxl_pipeline(force_zeros: bool = False) -> StableDiffusionXLPipeline:
    """The `sdxl-tiny` preset built by diffusers / transformers, every parameter random;
    the tokenizers are the bundled tiny one, the second padding with "!" as SDXL's."""
    cfg = preset("sdxl-tiny")
    tok = CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    tok_2 = CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER, pad_token="!")
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    vae = AutoencoderKL(**cfg["vae"])
    unet = UNet2DConditionModel(**cfg["unet"])
    for i, m in enumerate((text, text_2, vae, unet)):
        randomize_(m, 40 + i)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> str:
    """The pipeline saved by `save_pretrained`, with force_zeros_for_empty_prompt False
    (diffusers' default is True: the flag must come from model_index.json)."""
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    _sdxl_pipeline(force_zeros=False).save_pretrained(folder)
    return str(folder)


@functools.cache
def _reference(folder: str) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)


@pytest.fixture(scope="module")
def loaded(sdxl_folder):
    return load_pipeline(sdxl_folder)


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)


def _same_tree(a, b) -> bool:
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in leaves)


def _added(batch: int = 2, pooled: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "text_embeds": rng.standard_normal((batch, pooled), dtype=np.float32),
        "time_ids": np.array([[1024, 768, 0, 0, 1024, 1024], [512, 640, 64, 32, 768, 512]][:batch],
                             np.float32),
    }  # fmt: skip


def _check_components(sd, ref, label: str) -> dict[str, float]:
    """Text encoders (on real ids of both tokenizers), VAE and UNet (with
    added_cond_kwargs) against the diffusers pipeline; max relative errors."""
    rng = np.random.default_rng(0)
    ids = tokenize(sd.tokenizer, PROMPTS, MAX_LEN)
    assert ids.shape == (2, 2, MAX_LEN)
    for row, ref_tok in enumerate((ref.tokenizer, ref.tokenizer_2)):
        want = ref_tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True)
        np.testing.assert_array_equal(ids[:, row], np.array(want["input_ids"]))
    context, pooled = encode_text(sd.text_encoder, sd.text_encoder_params, ids)
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = ref.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    errs = {
        "text context": max_rel_err(context, ref_ctx),
        "pooled": max_rel_err(pooled, ref_pooled),
    }

    img = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    mean, logvar = jit_apply(sd.vae, {"params": sd.vae_params}, img, method="encode")
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    dec = jit_apply(sd.vae, {"params": sd.vae_params}, z, method="decode")
    with torch.no_grad():
        dist = ref.vae.encode(nchw(img)).latent_dist
        ref_dec = ref.vae.decode(nchw(z)).sample
    errs["vae mean"] = max_rel_err(mean, nhwc(dist.mean))
    errs["vae logvar"] = max_rel_err(logvar, nhwc(dist.logvar))
    errs["vae decode"] = max_rel_err(dec, nhwc(ref_dec))

    ctx = rng.standard_normal((2, MAX_LEN, 96)).astype(np.float32)
    t = np.array([3.0, 800.0], np.float32)
    added = _added()
    eps = jit_apply(sd.unet, {"params": sd.unet_params}, z, t, ctx, added_cond_kwargs=added)
    with torch.no_grad():
        ref_eps = ref.unet(
            nchw(z), torch.from_numpy(t), torch.from_numpy(ctx),
            added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
        ).sample  # fmt: skip
    errs["unet"] = max_rel_err(eps, nhwc(ref_eps))
    print(label, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    return errs


# -- pipeline folders ---------------------------------------------------------------------------


def test_folder_matches_diffusers(sdxl_folder, loaded):
    ref = _reference(sdxl_folder)
    assert loaded.is_sdxl and isinstance(loaded.tokenizer, TokenizerPair)
    assert set(loaded.text_encoder_params) == {"text_encoder", "text_encoder_2"}
    assert loaded.force_zeros_for_empty_prompt is False  # from model_index.json
    assert loaded.vae.config.scaling_factor == 0.13025
    assert loaded.tokenizer.second.pad_token == "!"
    assert base_latent_factor(sdxl_folder) == 8
    np.testing.assert_allclose(
        loaded.schedule.alphas_cumprod(), ref.scheduler.alphas_cumprod.numpy(), rtol=1e-5
    )
    _check_components(loaded, ref, "folder")


def test_save_pipeline_loads_in_diffusers(sdxl_folder, loaded, tmp_path):
    out = save_pipeline(tmp_path / "out", loaded)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is False
    ours, ref = StableDiffusionXLPipeline.from_pretrained(out), _reference(sdxl_folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same_state(getattr(ours, name), getattr(ref, name)), name
    assert type(ours.text_encoder_2) is CLIPTextModelWithProjection
    assert ours.config.force_zeros_for_empty_prompt is False
    for name in ("tokenizer", "tokenizer_2"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.pad_token == b.pad_token and a(PROMPTS).input_ids == b(PROMPTS).input_ids
    # And back: the same bundle.
    again = load_pipeline(out)
    for name in ("unet_params", "vae_params", "text_encoder_params"):
        assert _same_tree(getattr(again, name), getattr(loaded, name)), name
    assert again.text_encoder == loaded.text_encoder and again.unet.config == loaded.unet.config


def test_controlnet_pipeline_folder_loads_its_base(sdxl_folder, loaded, tmp_path):
    """A StableDiffusionXLControlNetPipeline folder: load_pipeline reads the base
    components and leaves controlnet/ to load_controlnet."""
    folder = tmp_path / "cnpipe"
    shutil.copytree(sdxl_folder, folder)
    cn = ControlNetModel.from_unet(_reference(sdxl_folder).unet)
    cn.save_pretrained(folder / "controlnet")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLControlNetPipeline",
              "controlnet": ["diffusers", "ControlNetModel"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    sd = load_pipeline(folder)
    assert sd.is_sdxl and _same_tree(sd.unet_params, loaded.unet_params)
    cnet, params = cn_jax.load_controlnet(folder)
    assert cnet.config.has_text_time and "add_embedding" in params


# -- one original (sgm) checkpoint --------------------------------------------------------------


def _write_original(folder: str, path: Path, extra: dict | None = None) -> Path:
    """The folder's weights as one SDXL single file in sgm's names, written by our writers
    (UNet, VAE, both text encoders), plus what real files carry that SDXL does not read."""
    ref = _reference(folder)
    state = {}
    state.update(original_sd.unet_to_original(_numpy_state(ref.unet), 2))
    state.update(original_sd.vae_to_original(_numpy_state(ref.vae)))
    state.update(
        original_sd.sdxl_text_to_original(
            _numpy_state(ref.text_encoder), _numpy_state(ref.text_encoder_2)
        )
    )
    state["conditioner.embedders.1.model.logit_scale"] = np.array(4.6, np.float32)
    state["alphas_cumprod"] = ref.scheduler.alphas_cumprod.numpy()
    state.update(extra or {})
    write_safetensors(path, state)
    return path


@pytest.fixture(scope="module")
def sdxl_file(sdxl_folder, tmp_path_factory) -> Path:
    return _write_original(sdxl_folder, tmp_path_factory.mktemp("single") / "sdxl.safetensors")


def test_single_file_equals_folder_and_diffusers_reads_it(sdxl_folder, loaded, sdxl_file):
    keys = read_safetensors(sdxl_file).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    # diffusers' own single-file loader (offline, configs from the local folder) reads our file
    # back bit for bit.
    ref = _reference(sdxl_folder)
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(sdxl_file), config=sdxl_folder, local_files_only=True, add_watermarker=False
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same_state(getattr(theirs, name), getattr(ref, name)), name
    # Ours, with the folder's configs and with the named preset.
    for config in (sdxl_folder, "sdxl-tiny"):
        single = load_pipeline(sdxl_file, config=config, tokenizer=sdxl_folder)
        assert single.is_sdxl and isinstance(single.tokenizer, TokenizerPair)
        for name in ("unet_params", "vae_params", "text_encoder_params"):
            assert _same_tree(getattr(single, name), getattr(loaded, name)), (config, name)
    assert base_latent_factor(sdxl_file, "sdxl") == 8
    with pytest.warns(UserWarning, match="tokenizer_2"):
        assert load_pipeline(sdxl_file, config="sdxl-tiny").tokenizer is None
    folder = Path(sdxl_folder)
    pair = load_pipeline(
        sdxl_file, config="sdxl-tiny", tokenizer=(folder / "tokenizer", folder / "tokenizer_2")
    ).tokenizer
    assert pair.second.pad_token == "!" and pair.first.pad_token == "<|endoftext|>"


@pytest.mark.slow
def test_single_file_components_match_diffusers(sdxl_folder, sdxl_file):
    """The single file's components computed, against diffusers (same numbers as the folder's:
    the trees are equal, this runs them once more through `load_pipeline(file)`)."""
    single = load_pipeline(sdxl_file, config="sdxl-tiny", tokenizer=sdxl_folder)
    _check_components(single, _reference(sdxl_folder), "single file")


def test_single_file_errors_name_the_problem(sdxl_folder, sdxl_file, tmp_path):
    with pytest.raises(WeightFileError, match="pass config='sdxl'"):
        load_pipeline(sdxl_file, config="sd15")
    with pytest.raises(ValueError, match="'sd15', 'sd21' or 'sdxl'"):
        load_pipeline(sdxl_file)
    # Real SDXL shapes against the tiny file: every mis-shaped tensor is named.
    with pytest.raises(WeightFileError, match="mis-shaped"):
        load_pipeline(sdxl_file, config="sdxl")
    extra = "conditioner.embedders.1.model.transformer.resblocks.9.ln_1.weight"
    bad = _write_original(sdxl_folder, tmp_path / "x.safetensors", {extra: np.ones(64, np.float32)})
    with pytest.raises(WeightFileError, match=r"(?s)1 unexpected keys.*resblocks\.9\.ln_1"):
        load_pipeline(bad, config="sdxl-tiny")
    with pytest.raises(ValueError, match=r"lacks component config\(s\) \['text_encoder_2'\]"):
        cfg = preset("sdxl-tiny")
        del cfg["text_encoder_2"]
        load_pipeline(sdxl_file, config=cfg)


# -- refused variants ---------------------------------------------------------------------------


def test_refiner_is_refused_by_name(sdxl_folder, sdxl_file, tmp_path):
    # A refiner's model_index.json: StableDiffusionXLImg2ImgPipeline, no CLIP ViT-L.
    folder = tmp_path / "refiner"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
              "text_encoder": [None, None], "tokenizer": [None, None]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match=r"SDXL refiner \(StableDiffusionXLImg2ImgPipeline"):
        load_pipeline(folder)
    with pytest.raises(WeightFileError, match="SDXL refiner"):
        load_pipeline(sdxl_file, config=folder)
    # A refiner single file: OpenCLIP bigG alone, as embedders.0.
    state = read_safetensors(sdxl_file)
    state = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in state.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    write_safetensors(tmp_path / "refiner.safetensors", state)
    with pytest.raises(WeightFileError, match="SDXL refiner checkpoint") as e:
        load_pipeline(tmp_path / "refiner.safetensors", config="sdxl-tiny")
    assert "\n" not in str(e.value)
    # A refiner's UNet: five size numbers and an aesthetic score (SDXL: 1280 + 5 x 256 = 2560),
    # refused from the configs, before any weights are read.
    cfg = preset("sdxl-tiny")
    cfg["unet"]["projection_class_embeddings_input_dim"] = 32 + 5 * 8
    with pytest.raises(WeightFileError, match="SDXL refiner's UNet"):
        load_pipeline(sdxl_file, config=cfg)
    folder = tmp_path / "refiner_unet"
    shutil.copytree(sdxl_folder, folder)
    (folder / "unet" / "config.json").write_text(json.dumps(cfg["unet"]))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightFileError, match="projection_class_embeddings_input_dim=72.*refiner"):
        load_pipeline(folder)
    # An SDXL UNet in a pipeline without the second text encoder.
    folder = tmp_path / "one_encoder"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match="text_time embedding, but there is no second"):
        load_pipeline(folder)


# -- presets and random pipelines ---------------------------------------------------------------


@pytest.mark.slow  # ~30 s: the random inits are compiled
def test_random_sdxl_tiny():
    sd = random_pipeline("sdxl-tiny")
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt
    ids = tokenize(sd.tokenizer, ["red circle"], MAX_LEN)
    assert ids[0, 1, -1] == 0 and ids[0, 0, -1] == 593  # "!" and <|endoftext|> padding
    context, pooled = encode_text(sd.text_encoder, sd.text_encoder_params, ids)
    assert context.shape == (1, MAX_LEN, sd.unet.config.cross_attention_dim)
    assert pooled.shape == (1, 32)


def test_sdxl_preset_has_the_real_parameter_counts():
    """The `sdxl` preset's models (traced, no weights) have exactly the parameters of
    diffusers' / transformers' models built from the same configs (on the meta device):
    stabilityai/stable-diffusion-xl-base-1.0's 2,567,463,684 (UNet), 83,653,863 (VAE),
    123,060,480 (CLIP ViT-L) and 694,659,840 (OpenCLIP bigG with its projection)."""
    from cn_jax.models.clip_text import CLIPTextConfig as Ours
    from cn_jax.models.clip_text import CLIPTextWithProjectionConfig, SDXLTextEncoders
    from cn_jax.models.config import UNetConfig
    from cn_jax.models.unet import UNet
    from cn_jax.models.unet import example_inputs as unet_inputs
    from cn_jax.models.vae import AutoencoderKL as FlaxVAE
    from cn_jax.models.vae import AutoencoderKLConfig
    from cn_jax.models.vae import example_inputs as vae_inputs

    cfg = preset("sdxl")

    def count(module, inputs):
        tree = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))

    unet_cfg = UNetConfig.from_dict(cfg["unet"])
    vae_cfg = AutoencoderKLConfig.from_dict(cfg["vae"])
    te = SDXLTextEncoders(
        Ours.from_dict(cfg["text_encoder"]),
        CLIPTextWithProjectionConfig.from_dict(cfg["text_encoder_2"]),
    )
    te_tree = jax.eval_shape(te.init, jax.random.PRNGKey(0), *te.example_inputs())["params"]
    ours = {
        "unet": count(UNet(unet_cfg), unet_inputs(unet_cfg)),
        "vae": count(FlaxVAE(vae_cfg), vae_inputs(vae_cfg)),
        **{k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v))
           for k, v in te_tree.items()},
    }  # fmt: skip
    with torch.device("meta"):
        theirs = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        }
    theirs = {k: sum(p.numel() for p in m.parameters()) for k, m in theirs.items()}
    real = {"unet": 2_567_463_684, "vae": 83_653_863,
            "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}  # fmt: skip
    assert ours == theirs == real


# -- ControlNets --------------------------------------------------------------------------------

# diffusers/controlnet-canny-sdxl-1.0's config.json (xinsir/controlnet-canny-sdxl-1.0 has the
# same fields): SDXL's encoder half, text_time, `addition_embed_type_num_heads`, nulls.
CANNY_SDXL_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "valhalla/depth-2", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "class_embed_type": None, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True,
}  # fmt: skip


def test_released_sdxl_controlnet_config_is_read():
    """The released config builds a ControlNet with diffusers' parameter count."""
    cfg = ControlNetConfig.from_dict(CANNY_SDXL_CONFIG, "controlnet-canny-sdxl-1.0")
    assert cfg.has_text_time and cfg.upcast_attention is False and cfg.latent_factor == 8
    tree = jax.eval_shape(
        ControlNet(cfg).init, jax.random.PRNGKey(0), *controlnet_example_inputs(cfg)
    )["params"]
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
    with torch.device("meta"):
        kwargs = {k: v for k, v in CANNY_SDXL_CONFIG.items() if not k.startswith("_")}
        theirs = sum(p.numel() for p in ControlNetModel(**kwargs).parameters())
    assert ours == theirs, (ours, theirs)


@pytest.fixture(scope="module")
def torch_sdxl_controlnet(sdxl_folder) -> ControlNetModel:
    """A ControlNet of the tiny SDXL base (condition at the VAE's factor 8), all random."""
    return randomize_(ControlNetModel.from_unet(_reference(sdxl_folder).unet), 7)


def _torch_cn_outputs(model, cond_seed: int = 0):
    rng = np.random.default_rng(cond_seed)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.standard_normal((2, MAX_LEN, 96)).astype(np.float32)
    cond = rng.random((2, 64, 64, 3), dtype=np.float32)
    added = _added()
    with torch.no_grad():
        down, mid = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
            added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()},
            return_dict=False,
        )  # fmt: skip
    return (x, t, ctx, cond, added), [nhwc(d) for d in down] + [nhwc(mid)]


def test_controlnet_diffusers_folder_round_trip(torch_sdxl_controlnet, tmp_path):
    torch_sdxl_controlnet.save_pretrained(tmp_path / "cn")
    cnet, params = cn_jax.load_controlnet(tmp_path / "cn")
    assert cnet.config.has_text_time and "add_embedding" in params
    cn_jax.save_controlnet(tmp_path / "out", cnet, params)
    back = ControlNetModel.from_pretrained(tmp_path / "out").eval()
    assert _same_state(back, torch_sdxl_controlnet)
    assert back.config.addition_embed_type == "text_time"
    _, want = _torch_cn_outputs(torch_sdxl_controlnet)
    _, got = _torch_cn_outputs(back)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.slow
def test_controlnet_loaded_matches_diffusers(torch_sdxl_controlnet, tmp_path):
    torch_sdxl_controlnet.save_pretrained(tmp_path / "cn")
    cnet, params = cn_jax.load_controlnet(tmp_path / "cn")
    (x, t, ctx, cond, added), want = _torch_cn_outputs(torch_sdxl_controlnet)
    down, mid = jit_apply(cnet, {"params": params}, x, t, ctx, cond, added_cond_kwargs=added)
    err = max(max_rel_err(a, b) for a, b in zip([*down, mid], want, strict=True))
    print(f"SDXL ControlNet from a diffusers folder: max rel err {err:.1e}")
    assert err <= TOL


def test_controlnet_original_layout(torch_sdxl_controlnet, tmp_path):
    """The original (`control_model.*`) layout of an SDXL ControlNet: the UNet map's
    `label_emb.0.0` / `label_emb.0.2` for `add_embedding` (sgm's names, which ComfyUI's
    `cldm.ControlNet` reads). diffusers' `convert_controlnet_checkpoint` reads the rest of
    the file as we do but leaves `add_embedding` out, although its own
    `DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]` names it so."""
    state = _numpy_state(torch_sdxl_controlnet)
    torch_sdxl_controlnet.save_pretrained(tmp_path / "cn")
    cnet, params = cn_jax.load_controlnet(tmp_path / "cn")
    cfg = cnet.config
    path = tmp_path / "cn_sdxl.safetensors"
    cn_jax.save_controlnet(path, cnet, params, format="original")
    written = read_safetensors(path)
    table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    assert {f"control_model.{v}" for v in table.values()} <= set(written)
    for diffusers_key, ldm_key in table.items():
        assert np.array_equal(written[f"control_model.{ldm_key}"], state[diffusers_key])
    back, back_params = cn_jax.load_controlnet(path)
    assert back.config == cnet.config and _same_tree(back_params, params)
    # A bare file (no metadata, no prefix): the config is inferred, text_time included; a
    # tiny net's 8 features per size number are not SDXL's 256, so that needs its config.
    bare = original.diffusers_to_original(state, cfg.layers_per_block, prefix="")
    write_safetensors(tmp_path / "bare.safetensors", bare)
    with pytest.raises(WeightFileError, match="addition_time_embed_dim"):
        cn_jax.load_controlnet(tmp_path / "bare.safetensors")
    _, bare_params = cn_jax.load_controlnet(tmp_path / "bare.safetensors", config=cfg)
    assert _same_tree(bare_params, params)
    # diffusers' converter: everything but add_embedding, equal.
    theirs = convert_controlnet_checkpoint(
        {k: torch.from_numpy(v) for k, v in written.items()}, dict(torch_sdxl_controlnet.config)
    )
    assert set(state) - set(theirs) == set(table)
    assert all(np.array_equal(theirs[k].numpy(), state[k]) for k in theirs)


def test_bare_sdxl_controlnet_config_is_inferred(tmp_path):
    """With SDXL's conventions (64-wide heads, linear projections, 256 features per size
    number, 32 groups) the whole config comes from the shapes of an original-layout file."""
    model = ControlNetModel(
        block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        cross_attention_dim=48, use_linear_projection=True, upcast_attention=None,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=16 + 6 * 256,
    )  # fmt: skip
    state = original.diffusers_to_original(_numpy_state(model), 1)
    write_safetensors(tmp_path / "cn.safetensors", state)
    cnet, _ = cn_jax.load_controlnet(tmp_path / "cn.safetensors")
    assert cnet.config == ControlNetConfig.from_dict(dict(model.config))


# -- init-controlnet on an SDXL base ------------------------------------------------------------


def _check_initialised(out: Path, unet: UNet2DConditionModel) -> None:
    ours, ref = ControlNetModel.from_pretrained(out), ControlNetModel.from_unet(unet)
    assert ours.config.addition_embed_type == "text_time"
    sd, rd = ours.state_dict(), ref.state_dict()
    assert set(sd) == set(rd)
    copied = [k for k in rd if not k.startswith("controlnet_cond_embedding.")]
    assert all(torch.equal(sd[k], rd[k]) for k in copied)
    assert any(k.startswith("add_embedding.") for k in copied)
    assert not torch.any(sd["controlnet_cond_embedding.conv_out.weight"])


def test_init_controlnet_on_sdxl_bases(sdxl_folder, sdxl_file, tmp_path):
    unet = _reference(sdxl_folder).unet
    assert main(["init-controlnet", "--base", sdxl_folder, "--out", str(tmp_path / "a")]) == 0
    _check_initialised(tmp_path / "a", unet)
    args = ["--base", str(sdxl_file), "--config", "sdxl-tiny", "--out", str(tmp_path / "b")]
    assert main(["init-controlnet", *args]) == 0
    _check_initialised(tmp_path / "b", unet)


# -- what a Hub fetch of an SDXL pipeline asks for ----------------------------------------------


def test_hub_fetches_the_sdxl_components(sdxl_folder, tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    shutil.copytree(sdxl_folder, remote)
    extra = {"sd_xl_base_1.0.safetensors", "README.md", "text_encoder_2/pytorch_model.bin"}
    for name in extra:  # what the SDXL base repo also holds
        (remote / name).write_bytes(b"x")
    available = {str(p.relative_to(remote)): p for p in remote.rglob("*") if p.is_file()}
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False):
        for name in filter_repo_objects(available, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(available[name], snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.resolve_path("org/sdxl", "pipeline") == snapshot
    fetched = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
    assert fetched == set(available) - extra  # every file a load reads, and only those
    assert load_pipeline("org/sdxl").is_sdxl
