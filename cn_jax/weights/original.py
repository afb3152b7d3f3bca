"""Key map between diffusers' `ControlNetModel` and the original lllyasviel ControlNet layout.

Both layouts store PyTorch tensors of identical shapes; only the names differ. A ControlNet is a
copy of the UNet's encoder half (`time_embedding`, SDXL's `add_embedding`, `conv_in`,
`down_blocks`, `mid_block`) plus its own modules, usually under the `control_model.` prefix in
released checkpoints. As in
diffusers, whose ControlNet conversion is its UNet conversion of the encoder half
(`convert_ldm_unet_checkpoint(controlnet=True)`), the encoder's names here are those of the UNet
map, `original_sd.unet_original_name` / `unet_diffusers_name` (`time_embed.*`,
`input_blocks.n.*`, `middle_block.*`): a UNet name is changed in that one place. The ControlNet's
own modules:

| diffusers                                        | original                                |
|--------------------------------------------------|-----------------------------------------|
| `controlnet_down_blocks.i`                       | `zero_convs.i.0`                        |
| `controlnet_mid_block`                           | `middle_block_out.0`                    |
| `controlnet_cond_embedding.conv_in`              | `input_hint_block.0`                    |
| `controlnet_cond_embedding.blocks.j`             | `input_hint_block.{2 (j + 1)}`          |
| `controlnet_cond_embedding.conv_out`             | `input_hint_block.{2 (num_blocks + 1)}` |

The facts were checked against diffusers' own loader,
`diffusers.loaders.single_file_utils.convert_controlnet_checkpoint`, which the tests use as the
reference. Two details go beyond that loader:

* It hard-codes `input_hint_block.14` for `conv_out` (six encoder blocks, as in every released
  SD1.x/2.x ControlNet); here the index follows the number of blocks, because the original
  `input_hint_block` is a `Sequential` of convs interleaved with SiLUs (convs at even indices).
* A mid block without attention (diffusers' `UNetMidBlock2D` with `num_layers=0`, a single
  resnet) maps to `middle_block.0` alone, as in sgm/ComfyUI's `transformer_depth_middle=-1`
  layout; the UNet map's `mid_block.resnets.i -> middle_block.{2 i}` covers both cases.

SDXL ControlNets carry the UNet's `add_embedding`, which the UNet map names `label_emb.0.0` /
`label_emb.0.2` (sgm's layout, which ComfyUI's `cldm.ControlNet` with `adm_in_channels` and
Stability's control-LoRA files use); it is part of the encoder half here, so it comes with the
map. diffusers' `convert_controlnet_checkpoint` does not read it (its `addition_embed_type`
table is left unused for ControlNets), so only cn_jax and ComfyUI load such a file. Class
embeddings and `encoder_hid_proj` are not part of either layout and are rejected rather than
guessed.
"""

import functools
from collections.abc import Iterable, Mapping
from typing import TypeVar

# The UNet map and the renaming rules it is built from; this module adds only the ControlNet's
# own modules.
from cn_jax.weights.original_sd import (
    _check_agreement,
    _check_positive_int,
    _check_resnets_per_block,
    _index,
    _max_index,
    _Rename,
    _rename,
    _rename_all,
    _renames,
    _strip_shared_prefix,
    unet_diffusers_name,
    unet_original_name,
)

T = TypeVar("T")

ORIGINAL_PREFIX = "control_model."

# The top-level diffusers modules of the UNet's encoder half, which a ControlNet copies; their
# names come from the UNet map.
_UNET_ENCODER = frozenset(
    {"time_embedding", "add_embedding", "conv_in", "down_blocks", "mid_block"}
)

# ControlNet modules whose names do not depend on the configuration.
_FIXED = _renames(
    {
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_mid_block": "middle_block_out.0",
    }
)


def _hint_index(conv: int) -> int:
    """Index in `input_hint_block` of the conditioning encoder's `conv`-th convolution.

    The original encoder is `Sequential(conv, SiLU, conv, SiLU, ..., conv)`, so its convs sit at
    even indices: conv_in is conv 0, `blocks.j` is conv `j + 1`, conv_out is the last one.
    """
    return 2 * conv


def _own_module_to_original(parts: list[str], num_cond_blocks: int) -> str | None:
    """Original module path of a ControlNet-only diffusers module path (split on dots)."""
    match parts:
        case ["controlnet_cond_embedding", "blocks", j] if _index(j) is not None:
            return f"input_hint_block.{_hint_index(int(j) + 1)}"
        case ["controlnet_cond_embedding", "conv_out"]:
            return f"input_hint_block.{_hint_index(num_cond_blocks + 1)}"
        case ["controlnet_down_blocks", i] if _index(i) is not None:
            return f"zero_convs.{i}.0"
    return None


def _own_module_to_diffusers(parts: list[str], conv_out_hint_index: int) -> str | None:
    """diffusers module path of a ControlNet-only original module path (split on dots)."""
    match parts:
        # Odd indices are the parameter-free SiLUs, 0 is conv_in (a fixed name).
        case ["input_hint_block", k] if _index(k) is not None and int(k) > 0 and int(k) % 2 == 0:
            if int(k) == conv_out_hint_index:
                return "controlnet_cond_embedding.conv_out"
            return f"controlnet_cond_embedding.blocks.{int(k) // 2 - 1}"
        case ["zero_convs", i, "0"] if _index(i) is not None:
            return f"controlnet_down_blocks.{i}"
    return None


def _to_original(name: str, layers_per_block: int, num_cond_blocks: int) -> str | None:
    """Original name (without prefix) of one diffusers key, or None if it has no place."""
    if name.partition(".")[0] in _UNET_ENCODER:
        return unet_original_name(name, layers_per_block)
    own = functools.partial(_own_module_to_original, num_cond_blocks=num_cond_blocks)
    return _rename(name, _FIXED.to_original, own)


def _to_diffusers(name: str, layers_per_block: int, conv_out_hint_index: int) -> str | None:
    """diffusers name of one original key (without prefix), or None if it has no place."""
    unet = unet_diffusers_name(name, layers_per_block)
    if unet is not None:
        # The UNet's decoder half (`output_blocks`, `out`) is no part of a ControlNet.
        return unet if unet.partition(".")[0] in _UNET_ENCODER else None
    own = functools.partial(_own_module_to_diffusers, conv_out_hint_index=conv_out_hint_index)
    return _rename(name, _FIXED.to_diffusers, own)


def _to_original_for(diffusers_keys: Iterable[str], layers_per_block: int) -> _Rename:
    """`_to_original` for the ControlNet that has these parameter names: conv_out's index follows
    the number of `controlnet_cond_embedding.blocks`."""
    return functools.partial(
        _to_original,
        layers_per_block=layers_per_block,
        num_cond_blocks=_max_index(diffusers_keys, "controlnet_cond_embedding", "blocks"),
    )


def _what(layout: str, layers_per_block: int) -> str:
    return f"{layout} ControlNet (layers_per_block={layers_per_block})"


def controlnet_key_map(diffusers_keys: Iterable[str], layers_per_block: int) -> dict[str, str]:
    """Maps diffusers `ControlNetModel` parameter names to original ControlNet names.

    Args:
      diffusers_keys: names as in `ControlNetModel.state_dict()`. The whole set is needed
        because the index of `controlnet_cond_embedding.conv_out` follows the number of
        `controlnet_cond_embedding.blocks`.
      layers_per_block: `ControlNetModel.config.layers_per_block` (LDM's `num_res_blocks`);
        it fixes the `input_blocks` numbering.

    Returns:
      `{diffusers_name: original_name}`, original names without the `control_model.` prefix.

    Raises:
      ValueError: if any key has no place in the original layout (all such keys are named).
    """
    _check_positive_int(layers_per_block, "layers_per_block")
    keys = list(diffusers_keys)
    what = _what("diffusers", layers_per_block)
    return _rename_all(dict(zip(keys, keys)), _to_original_for(keys, layers_per_block), what)


def diffusers_to_original(
    state: Mapping[str, T], layers_per_block: int, prefix: str = ORIGINAL_PREFIX
) -> dict[str, T]:
    """Renames a diffusers `ControlNetModel` state dict to the original ControlNet layout.

    Args:
      state: diffusers state dict; values (numpy arrays, torch tensors, ...) are passed through
        untouched, in the same order.
      layers_per_block: `ControlNetModel.config.layers_per_block`.
      prefix: prepended to every original name; `""` for bare names.

    Returns:
      The original-layout state dict.

    Raises:
      ValueError: if a key cannot be mapped, or if `layers_per_block` disagrees with the down
        block resnets present (a too large value would otherwise renumber silently).
    """
    key_map = controlnet_key_map(state.keys(), layers_per_block)
    _check_resnets_per_block(key_map, layers_per_block)
    return {prefix + key_map[key]: value for key, value in state.items()}


def original_to_diffusers(state: Mapping[str, T], layers_per_block: int) -> dict[str, T]:
    """Renames an original ControlNet state dict to diffusers' `ControlNetModel` layout.

    Args:
      state: original-layout state dict, either every key with the `control_model.` prefix or
        none (a full SD checkpoint must be filtered to its `control_model.` part first). Values
        are passed through untouched, in the same order.
      layers_per_block: LDM's `num_res_blocks` (diffusers' `layers_per_block`).

    Returns:
      The diffusers-layout state dict.

    Raises:
      ValueError: on mixed prefixed/bare keys, or if any key cannot be mapped (all such keys
        are named, the first 20 spelled out).
    """
    _check_positive_int(layers_per_block, "layers_per_block")
    names = _strip_shared_prefix(
        {key: key for key in state}, ORIGINAL_PREFIX, "original ControlNet"
    )
    # conv_out is the encoder's last conv, i.e. the highest `input_hint_block` index.
    to_diffusers = functools.partial(
        _to_diffusers,
        layers_per_block=layers_per_block,
        conv_out_hint_index=_max_index(names.values(), "input_hint_block") - 1,
    )
    what = _what("original", layers_per_block)
    key_map = _rename_all(names, to_diffusers, what)
    to_original = _to_original_for(key_map.values(), layers_per_block)
    _check_agreement({d: names[key] for key, d in key_map.items()}, to_original, what)
    return {key_map[key]: value for key, value in state.items()}
