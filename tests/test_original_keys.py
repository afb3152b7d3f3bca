"""Tests of the diffusers <-> original (lllyasviel) ControlNet key map.

The reference is diffusers' own single-file loader, `convert_controlnet_checkpoint`, which reads
the original layout: a diffusers state dict renamed by us and read back by it must come out
unchanged. Every tensor is filled with fresh random values first, because ControlNet's zero
convolutions would otherwise hide two same-shaped tensors swapped by a wrong map.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

from cn_jax.models.presets import preset  # noqa: E402
from cn_jax.weights.original import (  # noqa: E402
    ORIGINAL_PREFIX,
    controlnet_key_map,
    diffusers_to_original,
    original_to_diffusers,
)
from cn_jax.weights.original_sd import UNET_PREFIX, unet_sources, unet_to_original  # noqa: E402

_BASE = dict(
    norm_num_groups=8,
    cross_attention_dim=32,
    # diffusers' converter hard-codes conv_out at input_hint_block.14, i.e. six encoder blocks,
    # which needs four conditioning channel entries.
    conditioning_embedding_out_channels=(8, 8, 16, 16),
)

# The UNet's encoder half, which a ControlNet copies.
ENCODER_MODULES = ("time_embedding", "conv_in", "down_blocks", "mid_block")

# Small configurations covering the layout's degrees of freedom.
CONFIGS: dict[str, dict] = {
    "sd15_small": dict(
        _BASE,
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ),
    # Four blocks with two layers each: input block indices reach two digits, as in SD1.5.
    "sd15_topology": dict(
        _BASE,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=2,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    ),
    "sd2_like": dict(
        _BASE,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    ),
    "one_layer_deep_transformers": dict(
        _BASE,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        attention_head_dim=2,
        transformer_layers_per_block=(1, 2, 3, 2),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    ),
    "no_attention": dict(
        _BASE,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2D",
    ),
}


@functools.cache
def _model_and_state(name: str) -> tuple[ControlNetModel, dict[str, "torch.Tensor"]]:
    model = ControlNetModel(**CONFIGS[name])
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in model.state_dict().items()
    }
    return model, state


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key] is not None, key
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_loader_reads_our_original_layout(name: str) -> None:
    model, state = _model_and_state(name)
    original = diffusers_to_original(state, model.config.layers_per_block)
    assert all(key.startswith(ORIGINAL_PREFIX) for key in original)
    assert len(original) == len(state)
    restored = convert_controlnet_checkpoint(original, model.config)
    _assert_same_state(restored, state)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_identity(name: str) -> None:
    model, state = _model_and_state(name)
    lpb = model.config.layers_per_block
    for prefix in (ORIGINAL_PREFIX, ""):
        original = diffusers_to_original(state, lpb, prefix=prefix)
        back = original_to_diffusers(original, lpb)
        assert list(back) == list(state)  # order kept as well
        assert all(back[k] is state[k] for k in state)  # values untouched
        # And the other way round, starting from the original layout.
        assert diffusers_to_original(back, lpb, prefix=prefix) == original


def test_prefixless_original_is_read_by_diffusers_too() -> None:
    model, state = _model_and_state("sd2_like")
    bare = diffusers_to_original(state, 2, prefix="")
    assert not any(key.startswith(ORIGINAL_PREFIX) for key in bare)
    _assert_same_state(convert_controlnet_checkpoint(bare, model.config), state)


def test_key_map_matches_known_sd15_names() -> None:
    """Hand-written expectations, independent of diffusers' loader."""
    _, state = _model_and_state("sd15_topology")
    key_map = controlnet_key_map(state, layers_per_block=2)
    expected = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.0.resnets.1.time_emb_proj.weight": "input_blocks.2.0.emb_layers.1.weight",
        "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
        "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
        "down_blocks.0.resnets.0.norm2.bias": "input_blocks.1.0.out_layers.0.bias",
        "down_blocks.0.resnets.0.conv2.bias": "input_blocks.1.0.out_layers.3.bias",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight": (
            "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
        ),
        "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.2.attentions.1.proj_out.bias": "input_blocks.8.1.proj_out.bias",
        "down_blocks.2.downsamplers.0.conv.bias": "input_blocks.9.0.op.bias",
        "down_blocks.3.resnets.1.conv2.weight": "input_blocks.11.0.out_layers.3.weight",
        "mid_block.resnets.0.norm1.weight": "middle_block.0.in_layers.0.weight",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (
            "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"
        ),
        "mid_block.resnets.1.norm2.bias": "middle_block.2.out_layers.0.bias",
        "controlnet_down_blocks.0.weight": "zero_convs.0.0.weight",
        "controlnet_down_blocks.11.bias": "zero_convs.11.0.bias",
        "controlnet_mid_block.weight": "middle_block_out.0.weight",
        "controlnet_cond_embedding.conv_in.weight": "input_hint_block.0.weight",
        "controlnet_cond_embedding.blocks.0.weight": "input_hint_block.2.weight",
        "controlnet_cond_embedding.blocks.5.weight": "input_hint_block.12.weight",
        "controlnet_cond_embedding.conv_out.weight": "input_hint_block.14.weight",
    }
    assert {k: key_map[k] for k in expected} == expected
    assert "down_blocks.3.downsamplers.0.conv.weight" not in key_map  # last block: none
    assert max(int(k.split(".")[1]) for k in key_map.values() if k.startswith("zero_convs")) == 11


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_encoder_names_are_the_unet_maps(name: str) -> None:
    """The ControlNet map is the UNet map on the encoder half: every ControlNet parameter that
    the UNet has too is named as the UNet map names it, under `control_model.`, both ways; the
    other parameters are the ControlNet's own `controlnet_*` modules."""
    config = preset(name)["unet"]
    lpb = config["layers_per_block"]
    with torch.device("meta"):  # names only: no memory for SD-sized weights
        unet = UNet2DConditionModel(**config)
        controlnet = ControlNetModel.from_unet(unet)
    unet_keys = list(unet.state_dict())
    unet_names = {d: o for o, d in unet_to_original(dict(zip(unet_keys, unet_keys)), lpb).items()}
    keys = list(controlnet.state_dict())
    encoder = [k for k in keys if k in unet_names]
    own = [k for k in keys if k not in unet_names]
    assert own == [k for k in keys if k.startswith("controlnet_")]
    assert {k.split(".")[0] for k in encoder} == set(ENCODER_MODULES)

    # Writing.
    by_original = {unet_names[k].replace(UNET_PREFIX, ORIGINAL_PREFIX, 1): k for k in encoder}
    original = diffusers_to_original(dict(zip(keys, keys)), lpb)
    assert {o: d for o, d in original.items() if d in unet_names} == by_original
    # Reading, by the ControlNet's map and by the UNet's load plan.
    assert original_to_diffusers(by_original, lpb) == dict(zip(encoder, encoder))
    plan = unet_sources([unet_names[k] for k in encoder], lpb)
    assert {o.replace(UNET_PREFIX, ORIGINAL_PREFIX, 1): d for d, (o, _) in plan.items()} == (
        by_original
    )


@pytest.mark.parametrize(("channels", "conv_out_index"), [((8, 16), 6), ((8,), 2)])
def test_conditioning_encoder_of_any_length(channels: tuple[int, ...], conv_out_index: int) -> None:
    # diffusers' loader cannot read these (it hard-codes input_hint_block.14), so check the
    # original `Sequential(conv, SiLU, ..., conv)` positions directly.
    model = ControlNetModel(
        **dict(CONFIGS["sd15_small"], conditioning_embedding_out_channels=channels)
    )
    state = model.state_dict()
    original = diffusers_to_original(state, 2, prefix="")
    hint = sorted({int(k.split(".")[1]) for k in original if k.startswith("input_hint_block.")})
    assert hint == list(range(0, conv_out_index + 1, 2))
    assert (
        original[f"input_hint_block.{conv_out_index}.weight"]
        is state["controlnet_cond_embedding.conv_out.weight"]
    )
    back = original_to_diffusers(original, 2)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


def test_values_of_any_type_pass_through() -> None:
    _, state = _model_and_state("sd15_small")
    arrays = {k: np.asarray(v) for k, v in state.items()}
    original = diffusers_to_original(arrays, 2)
    assert all(type(v) is np.ndarray for v in original.values())
    back = original_to_diffusers(original, 2)
    assert all(back[k] is arrays[k] for k in arrays)


def test_unknown_diffusers_key_is_named() -> None:
    _, state = _model_and_state("sd15_small")
    for bad in (
        "not_a_module.weight",
        "down_blocks.0.resnets.2.conv1.weight",  # layer index == layers_per_block
        "down_blocks.0.resnets.0.conv3.weight",
        "down_blocks.0.downsamplers.1.conv.weight",
        "mid_block.attentions.1.proj_in.weight",
        "class_embedding.linear_1.weight",  # add_embedding is SDXL's label_emb, mapped
    ):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            diffusers_to_original({**state, bad: torch.zeros(1)}, 2)
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            controlnet_key_map([*state, bad], 2)


def test_unknown_original_key_is_named() -> None:
    _, state = _model_and_state("sd15_small")
    original = diffusers_to_original(state, 2)
    for bad in (
        "control_model.bogus.weight",
        "control_model.input_hint_block.3.weight",  # a SiLU slot
        "control_model.input_blocks.3.0.in_layers.0.weight",  # the downsampler slot
        "control_model.input_blocks.1.0.op.weight",  # a resnet slot
        "control_model.input_blocks.1.2.weight",
        "control_model.middle_block.3.in_layers.0.weight",
    ):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            original_to_diffusers({**original, bad: torch.zeros(1)}, 2)


def test_error_lists_at_most_twenty_keys() -> None:
    bad = {f"control_model.bogus.{i}.weight": i for i in range(25)}
    with pytest.raises(ValueError, match=r"cannot map 25 .*bogus\.19\.weight' \.\.\. and 5 more"):
        original_to_diffusers(bad, 2)


def test_mixed_prefixes_are_rejected() -> None:
    _, state = _model_and_state("sd15_small")
    original = diffusers_to_original(state, 2)
    original["time_embed.0.weight"] = original.pop("control_model.time_embed.0.weight")
    with pytest.raises(ValueError, match=r"mix .*'time_embed\.0\.weight'"):
        original_to_diffusers(original, 2)


def test_wrong_layers_per_block_is_caught() -> None:
    _, state = _model_and_state("sd15_topology")
    original = diffusers_to_original(state, 2)
    for wrong in (1, 3):
        with pytest.raises(ValueError):
            diffusers_to_original(state, wrong)
        with pytest.raises(ValueError):
            original_to_diffusers(original, wrong)
    with pytest.raises(ValueError):
        controlnet_key_map(state, 0)
