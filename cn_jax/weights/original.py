"""Key map between diffusers' `ControlNetModel` and the original lllyasviel ControlNet layout.

Both layouts store PyTorch tensors of identical shapes; only the names differ. The original
(`cldm.ControlNet`) names are those of LDM's `openaimodel.UNetModel` encoder half plus the
ControlNet extras, usually under the `control_model.` prefix in released checkpoints:

| diffusers                                        | original                               |
|--------------------------------------------------|----------------------------------------|
| `time_embedding.linear_1` / `linear_2`           | `time_embed.0` / `time_embed.2`        |
| `conv_in`                                        | `input_blocks.0.0`                     |
| `down_blocks.b.resnets.l.<resnet sub-module>`    | `input_blocks.n.0.<ResBlock sub-module>` |
| `down_blocks.b.attentions.l.<rest>`              | `input_blocks.n.1.<rest>`              |
| `down_blocks.b.downsamplers.0.conv`              | `input_blocks.m.0.op`                  |
| `mid_block.resnets.i`                            | `middle_block.{2 i}`                   |
| `mid_block.attentions.0.<rest>`                  | `middle_block.1.<rest>`                |
| `controlnet_down_blocks.i`                       | `zero_convs.i.0`                       |
| `controlnet_mid_block`                           | `middle_block_out.0`                   |
| `controlnet_cond_embedding.conv_in`              | `input_hint_block.0`                   |
| `controlnet_cond_embedding.blocks.j`             | `input_hint_block.{2 (j + 1)}`         |
| `controlnet_cond_embedding.conv_out`             | `input_hint_block.{2 (num_blocks + 1)}` |

with `n = 1 + b (layers_per_block + 1) + l` and `m = 1 + b (layers_per_block + 1) +
layers_per_block`. The transformer internals (`norm`, `proj_in`, `transformer_blocks.k.*`,
`proj_out`) are named identically in both layouts and pass through unchanged.

The facts were checked against diffusers' own loader,
`diffusers.loaders.single_file_utils.convert_controlnet_checkpoint`, which the tests use as the
reference. Two details go beyond that loader:

* It hard-codes `input_hint_block.14` for `conv_out` (six encoder blocks, as in every released
  SD1.x/2.x ControlNet); here the index follows the number of blocks, because the original
  `input_hint_block` is a `Sequential` of convs interleaved with SiLUs (convs at even indices).
* A mid block without attention (diffusers' `UNetMidBlock2D` with `num_layers=0`, a single
  resnet) maps to `middle_block.0` alone, as in sgm/ComfyUI's `transformer_depth_middle=-1`
  layout; `mid_block.resnets.i -> middle_block.{2 i}` covers both cases.

Class/addition embeddings (SDXL-style `label_emb`) and `encoder_hid_proj` are not part of the
SD1.x/2.x layout and are rejected rather than guessed.
"""

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

ORIGINAL_PREFIX = "control_model."

# Modules whose names do not depend on the configuration (diffusers -> original module path;
# the parameter name, `weight`/`bias`, is appended unchanged).
_FIXED_MODULES: dict[str, str] = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_mid_block": "middle_block_out.0",
}
_FIXED_MODULES_INV: dict[str, str] = {v: k for k, v in _FIXED_MODULES.items()}

# diffusers `ResnetBlock2D` sub-module -> LDM `ResBlock` sub-module. The LDM names index into
# `nn.Sequential`s: in_layers = (norm, SiLU, conv), emb_layers = (SiLU, linear),
# out_layers = (norm, SiLU, dropout, conv).
_RESNET_RENAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_RENAMES_INV: dict[str, str] = {v: k for k, v in _RESNET_RENAMES.items()}

# Top-level children of diffusers' `Transformer2DModel` and of LDM's `SpatialTransformer`; they
# share every name below this level, so attention keys are re-rooted, never renamed.
_TRANSFORMER_CHILDREN = frozenset({"norm", "proj_in", "transformer_blocks", "proj_out"})

# Position of the ResBlock and of the SpatialTransformer inside one `input_blocks.n` /
# `middle_block` `TimestepEmbedSequential`.
_RESBLOCK_SLOT = "0"
_ATTENTION_SLOT = "1"

# How many offending keys an error message spells out before summarising the rest.
_MAX_KEYS_IN_ERROR = 20


def _index(text: str) -> int | None:
    """Parses a canonical non-negative integer path component (`"3"`, not `"03"` or `"-1"`)."""
    if text.isdecimal() and str(int(text)) == text:
        return int(text)
    return None


def _input_block(block: int, layer: int, layers_per_block: int) -> int:
    """Index `n` of `input_blocks.n` holding layer `layer` of down block `block`.

    Each down block contributes `layers_per_block` resnet(+attention) entries and one downsampler
    entry (`layer == layers_per_block`); entry 0 is `conv_in`. The last down block has no
    downsampler, but the numbering of the earlier ones does not depend on that.
    """
    return 1 + block * (layers_per_block + 1) + layer


def _hint_index(conv: int) -> int:
    """Index in `input_hint_block` of the conditioning encoder's `conv`-th convolution.

    The original encoder is `Sequential(conv, SiLU, conv, SiLU, ..., conv)`, so its convs sit at
    even indices: conv_in is conv 0, `blocks.j` is conv `j + 1`, conv_out is the last one.
    """
    return 2 * conv


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_IN_ERROR])
    rest = len(keys) - _MAX_KEYS_IN_ERROR
    return shown + (f" ... and {rest} more" if rest > 0 else "")


def _unmapped_error(keys: list[str], layout: str, layers_per_block: int) -> ValueError:
    return ValueError(
        f"cannot map {len(keys)} {layout} ControlNet key(s) with "
        f"layers_per_block={layers_per_block}: {_format_keys(keys)}"
    )


def _check_layers_per_block(layers_per_block: int) -> None:
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int):
        raise TypeError(f"layers_per_block must be an int, got {layers_per_block!r}")
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")


def _num_cond_blocks(diffusers_keys: Iterable[str]) -> int:
    """Number of `controlnet_cond_embedding.blocks.j` convs (max j + 1), which fixes conv_out."""
    indices = [0]
    for key in diffusers_keys:
        parts = key.split(".")
        if parts[:2] == ["controlnet_cond_embedding", "blocks"] and len(parts) > 2:
            j = _index(parts[2])
            if j is not None:
                indices.append(j + 1)
    return max(indices)


def _to_original(key: str, layers_per_block: int, num_cond_blocks: int) -> str | None:
    """Original name (without prefix) of one diffusers key, or None if it has no place."""
    module, _, leaf = key.rpartition(".")
    if module in _FIXED_MODULES:
        return f"{_FIXED_MODULES[module]}.{leaf}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{_hint_index(num_cond_blocks + 1)}.{leaf}"

    parts = key.split(".")
    match parts:
        case ["controlnet_cond_embedding", "blocks", j, leaf] if _index(j) is not None:
            return f"input_hint_block.{_hint_index(_index(j) + 1)}.{leaf}"
        case ["controlnet_down_blocks", i, leaf] if _index(i) is not None:
            return f"zero_convs.{i}.0.{leaf}"
        case ["down_blocks", b, kind, l_, *rest] if (
            _index(b) is not None and _index(l_) is not None
        ):
            return _down_block_to_original(_index(b), kind, _index(l_), rest, layers_per_block)
        case ["mid_block", "resnets", i, sub, leaf] if (
            _index(i) in (0, 1) and sub in _RESNET_RENAMES
        ):
            # The second resnet sits after the transformer (slot 1); without attention there is
            # only resnets.0 -> middle_block.0.
            return f"middle_block.{2 * _index(i)}.{_RESNET_RENAMES[sub]}.{leaf}"
        case ["mid_block", "attentions", "0", child, *rest] if (
            child in _TRANSFORMER_CHILDREN and rest
        ):
            return ".".join(["middle_block", _ATTENTION_SLOT, child, *rest])
    return None


def _down_block_to_original(
    block: int, kind: str, layer: int, rest: list[str], layers_per_block: int
) -> str | None:
    """Maps `down_blocks.{block}.{kind}.{layer}.{rest}`; None if it has no place."""
    if kind == "downsamplers":
        if layer == 0 and len(rest) == 2 and rest[0] == "conv":
            n = _input_block(block, layers_per_block, layers_per_block)
            return f"input_blocks.{n}.{_RESBLOCK_SLOT}.op.{rest[1]}"
        return None
    # A layer index >= layers_per_block would collide with the downsampler's input block.
    if layer >= layers_per_block:
        return None
    n = _input_block(block, layer, layers_per_block)
    if kind == "resnets" and len(rest) == 2 and rest[0] in _RESNET_RENAMES:
        return f"input_blocks.{n}.{_RESBLOCK_SLOT}.{_RESNET_RENAMES[rest[0]]}.{rest[1]}"
    if kind == "attentions" and len(rest) >= 2 and rest[0] in _TRANSFORMER_CHILDREN:
        return ".".join(["input_blocks", str(n), _ATTENTION_SLOT, *rest])
    return None


def _to_diffusers(key: str, layers_per_block: int, conv_out_hint_index: int) -> str | None:
    """diffusers name of one original key (without prefix), or None if it has no place."""
    module, _, leaf = key.rpartition(".")
    if module in _FIXED_MODULES_INV:
        return f"{_FIXED_MODULES_INV[module]}.{leaf}"

    parts = key.split(".")
    match parts:
        case ["input_hint_block", k, leaf] if _index(k) is not None and _index(k) > 0:
            k_int = _index(k)
            if k_int % 2:  # odd indices are the parameter-free SiLUs
                return None
            if k_int == conv_out_hint_index:
                return f"controlnet_cond_embedding.conv_out.{leaf}"
            return f"controlnet_cond_embedding.blocks.{k_int // 2 - 1}.{leaf}"
        case ["zero_convs", i, "0", leaf] if _index(i) is not None:
            return f"controlnet_down_blocks.{i}.{leaf}"
        case ["input_blocks", n, slot, *rest] if _index(n) is not None and _index(n) > 0:
            return _input_block_to_diffusers(_index(n), slot, rest, layers_per_block)
        case ["middle_block", k, *sub, leaf] if k in ("0", "2") and ".".join(sub) in (
            _RESNET_RENAMES_INV
        ):
            return f"mid_block.resnets.{int(k) // 2}.{_RESNET_RENAMES_INV['.'.join(sub)]}.{leaf}"
        case ["middle_block", "1", child, *rest] if child in _TRANSFORMER_CHILDREN and rest:
            return ".".join(["mid_block", "attentions", "0", child, *rest])
    return None


def _input_block_to_diffusers(
    n: int, slot: str, rest: list[str], layers_per_block: int
) -> str | None:
    """Maps `input_blocks.{n}.{slot}.{rest}` for n >= 1; None if it has no place."""
    block, layer = divmod(n - 1, layers_per_block + 1)
    if layer == layers_per_block:
        # The last entry of each down block is the downsampler, nothing else.
        if slot == _RESBLOCK_SLOT and len(rest) == 2 and rest[0] == "op":
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[1]}"
        return None
    if slot == _RESBLOCK_SLOT and len(rest) >= 2:
        sub = ".".join(rest[:-1])
        if sub in _RESNET_RENAMES_INV:
            return f"down_blocks.{block}.resnets.{layer}.{_RESNET_RENAMES_INV[sub]}.{rest[-1]}"
    if slot == _ATTENTION_SLOT and len(rest) >= 2 and rest[0] in _TRANSFORMER_CHILDREN:
        return ".".join(["down_blocks", str(block), "attentions", str(layer), *rest])
    return None


def _check_unique(mapping: dict[str, str], layout: str) -> None:
    """Guards against two source keys landing on one target (it would drop a tensor)."""
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        clashes = []
        for src, dst in mapping.items():
            if dst in seen:
                clashes.append(f"{seen[dst]!r} and {src!r} -> {dst!r}")
            seen[dst] = src
        raise ValueError(f"{layout} keys map onto the same name: {'; '.join(clashes[:5])}")


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
    _check_layers_per_block(layers_per_block)
    keys = list(diffusers_keys)
    num_cond_blocks = _num_cond_blocks(keys)
    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key in keys:
        original = _to_original(key, layers_per_block, num_cond_blocks)
        if original is None:
            unmapped.append(key)
        else:
            mapping[key] = original
    if unmapped:
        raise _unmapped_error(unmapped, "diffusers", layers_per_block)
    _check_unique(mapping, "diffusers")
    return mapping


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
    # controlnet_key_map already rejected resnet indices >= layers_per_block; a state dict whose
    # down blocks stop short of it was made with a smaller layers_per_block.
    resnet_layers = {
        int(parts[3])
        for parts in (key.split(".") for key in key_map)
        if parts[0] == "down_blocks" and parts[2] == "resnets"
    }
    if resnet_layers and max(resnet_layers) + 1 != layers_per_block:
        raise ValueError(
            f"layers_per_block={layers_per_block} but the down blocks have "
            f"{max(resnet_layers) + 1} resnet(s) each"
        )
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
    _check_layers_per_block(layers_per_block)
    prefixed = [key.startswith(ORIGINAL_PREFIX) for key in state]
    if any(prefixed) and not all(prefixed):
        bare = [key for key, p in zip(state, prefixed, strict=True) if not p]
        raise ValueError(
            f"original ControlNet keys mix {ORIGINAL_PREFIX!r}-prefixed and bare names; "
            f"bare: {_format_keys(bare)}"
        )
    strip = len(ORIGINAL_PREFIX) if prefixed and all(prefixed) else 0
    names = {key: key[strip:] for key in state}

    # conv_out is the encoder's last conv, i.e. the highest even `input_hint_block` index.
    hint_indices = [
        _index(parts[1])
        for parts in (name.split(".") for name in names.values())
        if parts[0] == "input_hint_block" and len(parts) == 3 and _index(parts[1]) is not None
    ]
    conv_out_hint_index = max(hint_indices, default=0)

    mapping: dict[str, str] = {}
    unmapped: list[str] = []
    for key, name in names.items():
        diffusers_name = _to_diffusers(name, layers_per_block, conv_out_hint_index)
        if diffusers_name is None:
            unmapped.append(key)
        else:
            mapping[name] = diffusers_name
    if unmapped:
        raise _unmapped_error(unmapped, "original", layers_per_block)
    _check_unique(mapping, "original")

    # The two directions are separate parsers; insist they agree on this very key set so that a
    # round trip can never change a name.
    forward = controlnet_key_map(mapping.values(), layers_per_block)
    disagree = [name for name, d in mapping.items() if forward[d] != name]
    if disagree:
        raise ValueError(f"ambiguous original ControlNet keys: {_format_keys(disagree)}")

    return {mapping[names[key]]: value for key, value in state.items()}
