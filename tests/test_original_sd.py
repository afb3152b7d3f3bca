"""Tests of the original Stable Diffusion single-file (LDM) <-> diffusers key maps.

The reference is diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
and `create_diffusers_clip_model_from_ldm` around the last two): a diffusers state written in
the original layout by us and read back by them must come out unchanged, key for key and bit for
bit; our own lazy load plans must then read the same original dict back to the same state.
Every parameter holds random values first, so two same-shaped tensors swapped by a wrong map
cannot go unnoticed.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from cn_jax.weights.original_sd import (  # noqa: E402
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    apply_sources,
    clip_kind,
    clip_sources,
    clip_to_original,
    ignored_keys,
    unet_sources,
    unet_to_original,
    unexpected_keys,
    vae_sources,
    vae_to_original,
)

from reference import randomize_  # noqa: E402

UNET_CONFIGS: dict[str, dict] = {
    # SD 1.x layout: four blocks (input/output block indices reach two digits), 1x1-conv
    # projections, one head count; UpBlock2D (upsampler in slot 1) and CrossAttnUpBlock2D
    # (upsampler in slot 2) both carry upsamplers.
    "sd1_like": dict(
        block_out_channels=(8, 16, 16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
    ),
    # SD 2.x layout: linear projections, per-block head counts, upcast attention.
    "sd2_like": dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # Other index arithmetic: one layer per block, two-deep transformers, attention only in the
    # low-resolution block.
    "one_layer": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
    ),
}

VAE_CONFIGS: dict[str, dict] = {
    "two_blocks": dict(block_out_channels=(32, 64), layers_per_block=1),
    # Three blocks: the reversed decoder numbering has a fixed point (up.1) and two swaps.
    "three_blocks": dict(block_out_channels=(16, 32, 32), layers_per_block=2),
}

_CLIP_BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    vocab_size=100,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_CONFIGS: dict[str, dict] = {
    "sd1": dict(_CLIP_BASE, num_hidden_layers=2, hidden_act="quick_gelu"),
    "sd2": dict(_CLIP_BASE, num_hidden_layers=2, hidden_act="gelu"),
    # 23 diffusers layers = 24 OpenCLIP blocks, the depth diffusers' ignore list hard-codes
    # (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE` names `resblocks.23`).
    "sd2_depth23": dict(
        _CLIP_BASE, hidden_size=16, intermediate_size=32, num_hidden_layers=23, hidden_act="gelu"
    ),
}

# LatentDiffusion buffers and EMA entries found in released SD checkpoints.
_EXTRA_TOP_LEVEL = ("betas", "alphas_cumprod", "posterior_mean_coef2", "model_ema.decay")


def _numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch(state: dict[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


@functools.cache
def _unet(name: str) -> tuple[UNet2DConditionModel, dict[str, np.ndarray]]:
    model = randomize_(UNet2DConditionModel(**UNET_CONFIGS[name]), seed=0)
    return model, _numpy(model)


@functools.cache
def _vae(name: str) -> tuple[AutoencoderKL, dict[str, np.ndarray]]:
    cfg = VAE_CONFIGS[name]
    n = len(cfg["block_out_channels"])
    model = AutoencoderKL(
        **cfg,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=8,
        latent_channels=4,
    )
    model = randomize_(model, seed=1)
    return model, _numpy(model)


@functools.cache
def _clip(name: str) -> tuple[CLIPTextModel, dict[str, np.ndarray]]:
    model = randomize_(CLIPTextModel(CLIPTextConfig(**CLIP_CONFIGS[name])), seed=2)
    return model, _numpy(model)


def _assert_same_torch(actual: dict, expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], torch.from_numpy(value)), key


def _assert_same_numpy(actual: dict, expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert np.array_equal(actual[key], value), key


def _assert_lazy(plan: dict) -> None:
    """A plan holds names and transforms, never tensors."""
    for target, (original, transform) in plan.items():
        assert isinstance(target, str) and isinstance(original, str)
        assert transform is None or callable(transform)


def _extra_open_clip_block(width: int, index: int, seed: int) -> dict[str, np.ndarray]:
    """A random OpenCLIP resblock as the last (unused by SD 2.x) block of a file."""
    rng = np.random.default_rng(seed)
    head = f"{CLIP_PREFIX}model.transformer.resblocks.{index}."
    shapes = {
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (4 * width, width),
        "mlp.c_fc.bias": (4 * width,),
        "mlp.c_proj.weight": (width, 4 * width),
        "mlp.c_proj.bias": (width,),
    }
    return {head + k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def _sd2_original(name: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Our SD 2.x text encoder file plus what a real one has beyond the diffusers model: one more
    resblock, `text_projection` and `logit_scale`. Returns (file, the extra keys)."""
    model, state = _clip(name)
    width, layers = model.config.hidden_size, model.config.num_hidden_layers
    original = clip_to_original(state, "sd2")
    extra = _extra_open_clip_block(width, layers, seed=3)
    rng = np.random.default_rng(4)
    extra[f"{CLIP_PREFIX}model.text_projection"] = rng.standard_normal((width, width), np.float32)
    extra[f"{CLIP_PREFIX}model.logit_scale"] = np.array(4.6, np.float32)
    return {**original, **extra}, list(extra)


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_diffusers_converter_reads_our_original_layout(name: str) -> None:
    model, state = _unet(name)
    original = unet_to_original(state, model.config.layers_per_block)
    assert len(original) == len(state)
    assert all(key.startswith(UNET_PREFIX) for key in original)
    assert all(original[k].shape == v.shape for k, v in zip(original, state.values()))
    restored = convert_ldm_unet_checkpoint(_torch(original), model.config)
    _assert_same_torch(restored, state)


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_load_plan_reads_the_original_layout(name: str) -> None:
    model, state = _unet(name)
    lpb = model.config.layers_per_block
    original = unet_to_original(state, lpb)
    plan = unet_sources(original, lpb)
    _assert_lazy(plan)
    assert all(transform is None for _, transform in plan.values())
    _assert_same_numpy(apply_sources(original, plan), state)
    # Bare keys (prefix "") give the same plan.
    bare = unet_to_original(state, lpb, prefix="")
    assert apply_sources(bare, unet_sources(bare, lpb, prefix="")).keys() == state.keys()


def test_unet_upsampler_slots() -> None:
    """The upsampler follows the transformer when its up block has one (slot 2), else slot 1."""
    model, state = _unet("sd1_like")
    original = unet_to_original(state, 2)
    # up block 0 is an UpBlock2D, up blocks 1 and 2 are CrossAttnUpBlock2D; m = 3 b + 2.
    assert f"{UNET_PREFIX}output_blocks.2.1.conv.weight" in original
    assert f"{UNET_PREFIX}output_blocks.5.2.conv.weight" in original
    assert f"{UNET_PREFIX}output_blocks.8.2.conv.weight" in original
    assert f"{UNET_PREFIX}input_blocks.3.0.op.weight" in original
    assert f"{UNET_PREFIX}out.2.weight" in original


def test_unet_errors_name_the_keys() -> None:
    model, state = _unet("sd1_like")
    with pytest.raises(ValueError, match="class_embedding.linear_1.weight"):
        unet_to_original({**state, "class_embedding.linear_1.weight": np.zeros(1)}, 2)
    with pytest.raises(ValueError, match="layers_per_block=3"):
        unet_to_original(state, 3)
    with pytest.raises(ValueError, match=r"cannot map .*layers_per_block=1"):
        unet_to_original(state, 1)

    original = unet_to_original(state, 2)
    junk = {f"{UNET_PREFIX}label_emb.{i}.weight": None for i in range(25)}
    with pytest.raises(ValueError, match=r"25 original UNet .*and 5 more"):
        unet_sources([*original, *junk], 2)
    # With the wrong layers_per_block, transformers and downsamplers land in the wrong slots.
    with pytest.raises(ValueError, match=r"cannot map .*layers_per_block=1"):
        unet_sources(original, 1)
    op = f"{UNET_PREFIX}input_blocks.3.0.op.weight"
    assert unet_sources([op], 2) == {"down_blocks.0.downsamplers.0.conv.weight": (op, None)}
    with pytest.raises(ValueError, match=op):
        unet_sources([op], 1)
    with pytest.raises(ValueError, match="no UNet keys"):
        unet_sources(["first_stage_model.encoder.conv_in.weight"], 2)
    # An upsampler in slot 1 of an output block that also holds a transformer is ambiguous.
    moved = [k.replace("output_blocks.5.2.conv", "output_blocks.5.1.conv") for k in original]
    with pytest.raises(ValueError, match="ambiguous"):
        unet_sources(moved, 2)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_diffusers_converter_reads_our_original_layout(name: str) -> None:
    model, state = _vae(name)
    original = vae_to_original(state)
    assert len(original) == len(state)
    assert all(key.startswith(VAE_PREFIX) for key in original)
    for side in ("encoder", "decoder"):
        for sub in ("q", "k", "v", "proj_out"):
            assert original[f"{VAE_PREFIX}{side}.mid.attn_1.{sub}.weight"].ndim == 4
    restored = convert_ldm_vae_checkpoint(_torch(original), model.config)
    _assert_same_torch(restored, state)


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_load_plan_reads_the_original_layout(name: str) -> None:
    model, state = _vae(name)
    original = vae_to_original(state)
    plan = vae_sources(original)
    _assert_lazy(plan)
    reshaped = sorted(k for k, (_, t) in plan.items() if t is not None)
    assert reshaped == sorted(
        f"{side}.mid_block.attentions.0.{sub}.weight"
        for side in ("encoder", "decoder")
        for sub in ("to_q", "to_k", "to_v", "to_out.0")
    )
    _assert_same_numpy(apply_sources(original, plan), state)
    n = len(model.config.up_block_types)
    assert vae_sources(original, num_blocks=n) == plan
    # Projection weights stored as linear (out, in) in the original file are read as well.
    squeezed = {
        k: (v[:, :, 0, 0] if ".mid.attn_1." in k and v.ndim == 4 else v)
        for k, v in original.items()
    }
    assert np.array_equal(
        apply_sources(squeezed, plan)["decoder.mid_block.attentions.0.to_q.weight"],
        state["decoder.mid_block.attentions.0.to_q.weight"],
    )


def test_vae_decoder_order_is_reversed() -> None:
    model, state = _vae("three_blocks")
    original = vae_to_original(state)
    for i in range(3):
        key = f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"
        if key in state:
            assert original[f"{VAE_PREFIX}decoder.up.{2 - i}.upsample.conv.weight"] is state[key]
    assert f"{VAE_PREFIX}decoder.up.0.upsample.conv.weight" not in original


def test_vae_errors_name_the_keys() -> None:
    model, state = _vae("two_blocks")
    with pytest.raises(ValueError, match="encoder.mid_block.attentions.1.to_q.weight"):
        vae_to_original({**state, "encoder.mid_block.attentions.1.to_q.weight": np.zeros((2, 2))})
    original = vae_to_original(state)
    with pytest.raises(ValueError, match="first_stage_model.loss.logvar"):
        vae_sources([*original, "first_stage_model.loss.logvar"])
    with pytest.raises(ValueError, match="1x1 convolution"):
        apply_sources(
            {**original, f"{VAE_PREFIX}encoder.mid.attn_1.q.weight": np.zeros((4, 4, 3, 3))},
            vae_sources(original),
        )


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------


def test_sd1_clip_diffusers_converters_read_our_original_layout(tmp_path) -> None:
    model, state = _clip("sd1")
    original = clip_to_original(state, "sd1")
    assert all(k.startswith(f"{CLIP_PREFIX}transformer.text_model.") for k in original)
    assert clip_kind(original) == "sd1"
    restored = convert_ldm_clip_checkpoint(_torch(original))
    _assert_same_torch(restored, {"text_model." + k: v for k, v in state.items()})
    # The whole single-file flow (detection, prefix handling, loading into a model).
    model.config.save_pretrained(tmp_path)
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, _torch(original), config=str(tmp_path), local_files_only=True
    )
    _assert_same_torch(loaded.state_dict(), state)
    # Either form of the diffusers names writes the same file.
    assert clip_to_original({"text_model." + k: v for k, v in state.items()}, "sd1") == original


def test_sd1_clip_load_plan_reads_the_original_layout() -> None:
    _, state = _clip("sd1")
    original = clip_to_original(state, "sd1")
    position_ids = f"{CLIP_PREFIX}transformer.text_model.embeddings.position_ids"
    original[position_ids] = np.arange(16)[None]
    plan = clip_sources(original, text_model_prefix="")
    _assert_lazy(plan)
    assert all(t is None for _, t in plan.values())
    _assert_same_numpy(apply_sources(original, plan), state)
    assert ignored_keys(original) == [position_ids]
    assert unexpected_keys(original, plan) == []
    # Default names carry `text_model.`, as diffusers' converter and diffusers folders do.
    assert set(clip_sources(original)) == {"text_model." + k for k in state}
    # Old files without the `text_model.` level.
    old = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in original.items()}
    _assert_same_numpy(apply_sources(old, clip_sources(old, text_model_prefix="")), state)
    # A smaller target model reads fewer layers; the rest is then unexpected, not ignored.
    plan1 = clip_sources(original, num_layers=1, text_model_prefix="")
    assert not any(k.startswith("encoder.layers.1.") for k in plan1)
    assert unexpected_keys(original, plan1) == [k for k in original if ".layers.1." in k]


@pytest.mark.parametrize("name", ["sd2", "sd2_depth23"])
def test_sd2_clip_diffusers_converters_read_our_original_layout(name: str, tmp_path) -> None:
    model, state = _clip(name)
    layers = model.config.num_hidden_layers
    original, _ = _sd2_original(name)
    assert clip_kind(original) == "sd2"
    restored = convert_open_clip_checkpoint(model, _torch(original))
    # diffusers skips only `resblocks.23`; any other last block comes out as an extra layer
    # that its loader then drops (`strict=False`).
    extra_layer = f"text_model.encoder.layers.{layers}."
    if layers == 23:
        assert not any(k.startswith(extra_layer) for k in restored)
    restored = {k: v for k, v in restored.items() if not k.startswith(extra_layer)}
    _assert_same_torch(restored, {"text_model." + k: v for k, v in state.items()})
    # The whole single-file flow, for the file exactly as we write it (no extra block).
    model.config.save_pretrained(tmp_path)
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel,
        _torch(clip_to_original(state, "sd2")),
        config=str(tmp_path),
        local_files_only=True,
    )
    _assert_same_torch(loaded.state_dict(), state)


@pytest.mark.parametrize("name", ["sd2", "sd2_depth23"])
def test_sd2_clip_load_plan_reads_the_original_layout(name: str) -> None:
    model, state = _clip(name)
    layers = model.config.num_hidden_layers
    original, extra = _sd2_original(name)
    plan = clip_sources(original, text_model_prefix="")
    _assert_lazy(plan)
    _assert_same_numpy(apply_sources(original, plan), state)
    # q/k/v are slices of one in_proj tensor; nothing else is transformed.
    in_proj = f"{CLIP_PREFIX}model.transformer.resblocks.0.attn.in_proj_weight"
    assert [t for k, (o, t) in plan.items() if o == in_proj] != []
    assert [k for k, (o, _) in plan.items() if o == in_proj] == [
        f"encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    ]
    assert all(t is None for o, t in plan.values() if "in_proj" not in o)
    # The extra block, text_projection and logit_scale are not read, and they are excused.
    read = {o for o, _ in plan.values()}
    assert not read & set(extra)
    assert sorted(ignored_keys(original)) == sorted(extra)
    assert unexpected_keys(original, plan) == []
    assert clip_sources(original, num_layers=layers, text_model_prefix="") == plan
    # The writer emits only what the model has.
    assert sorted(clip_to_original(state, "sd2")) == sorted(set(original) - set(extra))


def test_clip_errors() -> None:
    _, state = _clip("sd2")
    with pytest.raises(ValueError, match="incomplete q/k/v"):
        clip_to_original(
            {k: v for k, v in state.items() if "layers.1.self_attn.v_proj" not in k}, "sd2"
        )
    with pytest.raises(ValueError, match="text_projection.weight"):
        clip_to_original({**state, "text_projection.weight": np.zeros((2, 2))}, "sd1")
    with pytest.raises(ValueError, match="mix"):
        clip_to_original({**state, "text_model.final_layer_norm.bias": np.zeros(2)}, "sd2")
    with pytest.raises(ValueError, match="kind"):
        clip_to_original(state, "sdxl")
    sd1 = clip_to_original(state, "sd1")
    sd2 = clip_to_original(state, "sd2")
    with pytest.raises(ValueError, match="both"):
        clip_kind([*sd1, *sd2])
    assert clip_kind(["model.diffusion_model.out.2.weight"]) is None
    with pytest.raises(ValueError, match="no text encoder"):
        clip_sources(["model.diffusion_model.out.2.weight"])
    with pytest.raises(ValueError, match="resblocks.0.attn.qkv.weight"):
        clip_sources([*sd2, f"{CLIP_PREFIX}model.transformer.resblocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="planned key"):
        apply_sources({}, clip_sources(sd2))


# ---------------------------------------------------------------------------------------------
# A whole single file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_whole_single_file(version: str) -> None:
    """One original file from all three components (plus the buffers real files carry): every
    diffusers converter and every plan picks exactly its own part of it."""
    unet_model, unet_state = _unet("sd1_like" if version == "sd1" else "sd2_like")
    vae_model, vae_state = _vae("two_blocks")
    clip_model, clip_state = _clip(version)
    lpb = unet_model.config.layers_per_block
    original = {
        **unet_to_original(unet_state, lpb),
        **vae_to_original(vae_state),
    }
    if version == "sd1":
        original.update(clip_to_original(clip_state, "sd1"))
        clip_extra = [f"{CLIP_PREFIX}transformer.text_model.embeddings.position_ids"]
        original[clip_extra[0]] = np.arange(16)[None]
    else:
        sd2, clip_extra = _sd2_original(version)
        original.update(sd2)
    for key in _EXTRA_TOP_LEVEL:
        original[key] = np.zeros(3, np.float32)

    as_torch = _torch(original)
    _assert_same_torch(convert_ldm_unet_checkpoint(as_torch, unet_model.config), unet_state)
    _assert_same_torch(convert_ldm_vae_checkpoint(as_torch, vae_model.config), vae_state)

    plans = (
        unet_sources(original, lpb),
        vae_sources(original),
        clip_sources(original, text_model_prefix=""),
    )
    for plan, state in zip(plans, (unet_state, vae_state, clip_state)):
        _assert_same_numpy(apply_sources(original, plan), state)
    assert unexpected_keys(original, *plans) == []
    assert sorted(ignored_keys(original)) == sorted([*_EXTRA_TOP_LEVEL, *clip_extra])
    # Without the text encoder's plan, exactly its keys are unexpected.
    clip_read = {o for o, _ in plans[2].values()}
    assert set(unexpected_keys(original, *plans[:2])) == clip_read
