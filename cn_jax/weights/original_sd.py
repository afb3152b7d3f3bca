"""Key maps between an original Stable Diffusion single file (LDM layout) and diffusers' components.

An original SD 1.x/2.x checkpoint (`v1-5-pruned.safetensors`, `v2-1_768-ema-pruned.safetensors`,
...) holds the whole `LatentDiffusion` module in one state dict:

| original prefix           | component                 | diffusers / transformers class |
|---------------------------|---------------------------|--------------------------------|
| `model.diffusion_model.`  | LDM `openaimodel.UNetModel` | `UNet2DConditionModel`       |
| `first_stage_model.`      | LDM `AutoencoderKL`       | `AutoencoderKL`                |
| `cond_stage_model.transformer.` | SD 1.x: transformers CLIP text model | `CLIPTextModel` |
| `cond_stage_model.model.` | SD 2.x: OpenCLIP ViT-H text tower | `CLIPTextModel`        |
| `conditioner.embedders.0.transformer.` | SDXL: transformers CLIP ViT-L | `CLIPTextModel` |
| `conditioner.embedders.1.model.` | SDXL: OpenCLIP ViT-bigG | `CLIPTextModelWithProjection` |

**UNet** (pure renames, identical shapes). With `n = 1 + b (L + 1) + l` and `m = b (L + 1) + l`
for `L = layers_per_block`:

| diffusers                                     | original                                      |
|-----------------------------------------------|-----------------------------------------------|
| `time_embedding.linear_1` / `linear_2`        | `time_embed.0` / `time_embed.2`               |
| `add_embedding.linear_1` / `linear_2` (SDXL)  | `label_emb.0.0` / `label_emb.0.2`             |
| `conv_in`                                     | `input_blocks.0.0`                            |
| `down_blocks.b.resnets.l.<resnet>` (l < L)    | `input_blocks.n.0.<ResBlock>`                 |
| `down_blocks.b.attentions.l.<rest>` (l < L)   | `input_blocks.n.1.<rest>`                     |
| `down_blocks.b.downsamplers.0.conv`           | `input_blocks.{n at l = L}.0.op`              |
| `mid_block.resnets.0` / `attentions.0` / `resnets.1` | `middle_block.0` / `.1` / `.2`         |
| `up_blocks.b.resnets.l.<resnet>` (l <= L)     | `output_blocks.m.0.<ResBlock>`                |
| `up_blocks.b.attentions.l.<rest>` (l <= L)    | `output_blocks.m.1.<rest>`                    |
| `up_blocks.b.upsamplers.0.conv`               | `output_blocks.{m at l = L}.{s}.conv` (*)     |
| `conv_norm_out` / `conv_out`                  | `out.0` / `out.2`                             |

(*) `s` is 1, or 2 when the layer has a transformer (slot 1) before the upsampler. And
`<resnet>` -> `<ResBlock>` is `norm1 -> in_layers.0`, `conv1 -> in_layers.2`,
`time_emb_proj -> emb_layers.1`, `norm2 -> out_layers.0`, `conv2 -> out_layers.3`,
`conv_shortcut -> skip_connection`, and the transformer internals (`norm`, `proj_in`,
`transformer_blocks.k.*`, `proj_out`) are named alike in both layouts. A ControlNet is a copy of
the encoder half, and its map (`original.py`) names it with this one (`unet_original_name`,
`unet_diffusers_name`), as diffusers' ControlNet conversion is its UNet conversion.

SDXL's UNet (sgm's `UNetModel` with `adm_in_channels`, 3 levels) is the same map: its
`label_emb = Sequential(Sequential(Linear, SiLU, Linear))` is diffusers' `add_embedding`
(`DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]`), the first level's missing
transformers leave no gap in the numbering (slot 1 is simply absent), and a transformer's depth
is its `transformer_blocks.k` count, named alike in both layouts.

**VAE.** With `N` up blocks, diffusers' `decoder.up_blocks.i` is LDM's `decoder.up.{N - 1 - i}`
(LDM numbers the decoder from the highest resolution, diffusers from the lowest):

| diffusers                                          | original                                |
|----------------------------------------------------|-----------------------------------------|
| `encoder.down_blocks.i.resnets.j.<resnet>`         | `encoder.down.i.block.j.<resnet>`       |
| `encoder.down_blocks.i.downsamplers.0.conv`        | `encoder.down.i.downsample.conv`        |
| `decoder.up_blocks.i.resnets.j.<resnet>`           | `decoder.up.{N-1-i}.block.j.<resnet>`   |
| `decoder.up_blocks.i.upsamplers.0.conv`            | `decoder.up.{N-1-i}.upsample.conv`      |
| `{en,de}coder.mid_block.resnets.0` / `.1`          | `{en,de}coder.mid.block_1` / `block_2`  |
| `{en,de}coder.mid_block.attentions.0.group_norm`   | `{en,de}coder.mid.attn_1.norm`          |
| `...attentions.0.to_q` / `to_k` / `to_v` / `to_out.0` | `...attn_1.q` / `k` / `v` / `proj_out` |
| `{en,de}coder.conv_norm_out`                       | `{en,de}coder.norm_out`                 |
| `{en,de}coder.conv_in`, `conv_out`, `quant_conv`, `post_quant_conv` | the same               |

with `conv_shortcut -> nin_shortcut` the only resnet rename. LDM's attention projections are
1x1 convolutions: their weights are `(out, in, 1, 1)` in the original file and `(out, in)`
linear weights in diffusers; this is the only place where a value changes shape.

**Text encoder, SD 1.x**: `cond_stage_model.transformer.text_model.<name>` is transformers'
`text_model.<name>` unchanged (very old files lack the `text_model.` level; both are read).

**Text encoder, SD 2.x** (OpenCLIP, below `cond_stage_model.model.`):

| transformers (below `text_model.`)              | OpenCLIP                                 |
|-------------------------------------------------|------------------------------------------|
| `embeddings.token_embedding.weight`             | `token_embedding.weight`                 |
| `embeddings.position_embedding.weight`          | `positional_embedding`                   |
| `encoder.layers.N.layer_norm1` / `layer_norm2`  | `transformer.resblocks.N.ln_1` / `ln_2`  |
| `encoder.layers.N.self_attn.{q,k,v}_proj`       | `...resblocks.N.attn.in_proj_*` (**)     |
| `encoder.layers.N.self_attn.out_proj`           | `...resblocks.N.attn.out_proj`           |
| `encoder.layers.N.mlp.fc1` / `fc2`              | `...resblocks.N.mlp.c_fc` / `c_proj`     |
| `final_layer_norm`                              | `ln_final`                               |
| `text_projection.weight` (outside `text_model.`) | `text_projection` (transposed) (***)    |

(**) q, k and v are the thirds, in that order, of axis 0 of `in_proj_weight` / `in_proj_bias`.
(***) Only `CLIPTextModelWithProjection` has it (`projection=True`): OpenCLIP's
`text_projection` is a `(width, projection)` matrix applied as `x @ text_projection`, so the
torch `Linear` weight is its transpose.

SD 2.x conditions on OpenCLIP's penultimate layer, so diffusers' SD 2 text encoder has one layer
fewer than OpenCLIP (23 of 24): the last resblock and `text_projection` are dropped (diffusers'
`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`, which hard-codes `resblocks.23`; here the last block is found
from the keys or `num_layers`), and `logit_scale` is never read. Writing the other way can only
produce the blocks the diffusers model has; LDM's `FrozenOpenCLIPEmbedder(layer="penultimate")`
never runs the missing last block, and diffusers' loader reads the file fine.

**Text encoders, SDXL** (sgm's `conditioner.embedders.*`): the SD 1.x rule below
`conditioner.embedders.0.transformer.` (CLIP ViT-L, diffusers' `text_encoder`) and the OpenCLIP
rule above below `conditioner.embedders.1.model.` (ViT-bigG, `text_encoder_2`), with every
resblock and `text_projection` read: SDXL takes the penultimate hidden state from the whole
tower (`hidden_states[-2]`) and the pooled embedding from its last layer, so diffusers'
`text_encoder_2` has all 32 blocks (`sdxl_text_sources`, `sdxl_text_to_original`).
`logit_scale` (and `position_ids` of the ViT-L) are not read.

The diffusers-side text encoder names carry the `text_model.` prefix that diffusers' converters
produce and diffusers folders store; transformers >= 5.6 flattens `CLIPTextModel`, so its own
`state_dict()` lacks it (`text_model_prefix=""` / either form accepted when writing).

All facts were checked against diffusers' converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` in
`diffusers.loaders.single_file_utils`), which the tests use as the reference.

Every name is a module path and a `weight` / `bias` leaf; the module is renamed by a table of
fixed names or by a small parser of the rest, one for each direction (`_rename`). Each
direction's parser is checked against the other's on the very keys read.

Loading is planned lazily: the `*_sources` functions look at key names only and return
`{diffusers_key: (original_key, transform or None)}`, so a loader can read, transform and place
one tensor at a time; `apply_sources` is the eager version. Writing (`*_to_original`) is eager,
numpy in and numpy out.
"""

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")

# (original key, transform applied to that tensor or None).
Source = tuple[str, Callable[[np.ndarray], np.ndarray] | None]

# Renames one name (a whole key or a module path); None if it has no place in the other layout.
_Rename = Callable[[str], str | None]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model."
# Below CLIP_PREFIX: SD 1.x (transformers) and SD 2.x (OpenCLIP) text encoders.
SD1_CLIP_ROOT = "transformer."
SD2_CLIP_ROOT = "model."
TEXT_MODEL_PREFIX = "text_model."
# SDXL (sgm) files: CLIP ViT-L below `<SDXL_CLIP_PREFIX>transformer.` and OpenCLIP ViT-bigG
# below `<SDXL_OPEN_CLIP_PREFIX>model.` (the refiner has only the latter, as embedders.0).
SDXL_CLIP_PREFIX = "conditioner.embedders.0."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1."
SDXL_TEXT_PREFIXES = (SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)

ClipKind = Literal["sd1", "sd2"]

# Every parameter of the three SD components is a `weight` or a `bias`, except OpenCLIP's
# `positional_embedding`, which the fixed CLIP table names in full.
_LEAVES = ("weight", "bias")

# How many offending keys an error message spells out before summarising the rest.
_MAX_KEYS_IN_ERROR = 20

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


class _Renames(NamedTuple):
    """A one-to-one rename table, read either way."""

    to_original: Mapping[str, str]  # diffusers -> original
    to_diffusers: Mapping[str, str]  # original -> diffusers


def _renames(to_original: dict[str, str]) -> _Renames:
    to_diffusers = {v: k for k, v in to_original.items()}
    if len(to_diffusers) != len(to_original):
        raise ValueError(f"rename table is not one-to-one: {to_original}")
    return _Renames(to_original, to_diffusers)


# UNet modules whose names do not depend on the configuration.
_UNET_FIXED = _renames(
    {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        # SDXL's added (pooled text + size) embedding: sgm's `label_emb.0` Sequential.
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
)

# diffusers `ResnetBlock2D` sub-module -> LDM `ResBlock` sub-module. The LDM names index into
# `nn.Sequential`s: in_layers = (norm, SiLU, conv), emb_layers = (SiLU, linear),
# out_layers = (norm, SiLU, dropout, conv).
_UNET_RESNET = _renames(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
)

# Top-level children of diffusers' `Transformer2DModel` and LDM's `SpatialTransformer`; they
# share every name below this level, so attention keys are re-rooted, never renamed.
_TRANSFORMER_CHILDREN = frozenset({"norm", "proj_in", "transformer_blocks", "proj_out"})

# Slots inside one LDM `TimestepEmbedSequential` (`input_blocks.n`, `output_blocks.m`,
# `middle_block`, whose second resnet is slot 2).
_RESBLOCK_SLOT = "0"
_ATTENTION_SLOT = "1"

# diffusers' block lists -> LDM's lists of `TimestepEmbedSequential` entries, and the entry of
# block 0's layer 0 (`input_blocks.0` is `conv_in`).
_UNET_BLOCKS = _renames({"down_blocks": "input_blocks", "up_blocks": "output_blocks"})
_UNET_FIRST_ENTRY = {"down_blocks": 1, "up_blocks": 0}

# VAE modules named independently of the configuration.
_VAE_FIXED = _renames(
    {
        "encoder.conv_in": "encoder.conv_in",
        "encoder.conv_norm_out": "encoder.norm_out",
        "encoder.conv_out": "encoder.conv_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.conv_norm_out": "decoder.norm_out",
        "decoder.conv_out": "decoder.conv_out",
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
)

# diffusers VAE `ResnetBlock2D` (no time embedding) -> LDM `ResnetBlock`.
_VAE_RESNET = _renames(
    {
        "norm1": "norm1",
        "conv1": "conv1",
        "norm2": "norm2",
        "conv2": "conv2",
        "conv_shortcut": "nin_shortcut",
    }
)

# diffusers mid-block `Attention` -> LDM `AttnBlock`.
_VAE_ATTENTION = _renames(
    {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
)
# Their weights are 1x1 convs in LDM and linear layers in diffusers.
_VAE_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "to_out.0"})

# Per side: diffusers' block list and resampler, then LDM's
# (`encoder.down_blocks.i.downsamplers.0` is `encoder.down.i.downsample`).
_VAE_BLOCKS = {
    "encoder": ("down_blocks", "downsamplers", "down", "downsample"),
    "decoder": ("up_blocks", "upsamplers", "up", "upsample"),
}
# Each side's mid block: diffusers `mid_block.resnets.i` is LDM `mid.block_{i+1}`.
_VAE_MID_RESNETS = _renames({"0": "block_1", "1": "block_2"})

# Text encoder names independent of the layer (transformers below `text_model.` -> OpenCLIP
# below `model.`).
_CLIP_FIXED = _renames(
    {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
)

# One transformer layer: transformers `encoder.layers.N.<module>` -> OpenCLIP
# `transformer.resblocks.N.<module>`.
_CLIP_LAYER = _renames(
    {
        "layer_norm1": "ln_1",
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
)

# q, k and v, in the order OpenCLIP stacks them along axis 0 of `attn.in_proj_{weight,bias}`.
_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPEN_CLIP_IN_PROJ = "attn.in_proj"

# `CLIPTextModelWithProjection`'s head, outside `text_model.` (transformers -> OpenCLIP below
# `model.`); the value is transposed (`transpose_2d`).
_CLIP_PROJECTION = _renames({"text_projection.weight": "text_projection"})

# ---------------------------------------------------------------------------------------------
# Keys an SD loader legitimately leaves unread
# ---------------------------------------------------------------------------------------------

# `LatentDiffusion` buffers: the noise schedule (`DDPM.register_schedule`), `scale_factor`
# (a buffer with `scale_by_std`), `cond_ids` (`shorten_cond_schedule`) and `logvar`
# (a parameter with `learn_logvar`). diffusers rebuilds all of these from its scheduler config.
_IGNORED_TOP_LEVEL = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        "scale_factor",
        "cond_ids",
    }
)
# The EMA copy of the UNet (`LitEma`, flattened names plus `decay` / `num_updates`).
_IGNORED_PREFIXES = ("model_ema.",)
# transformers' position-id buffer, persistent in the transformers versions SD 1.x was saved with.
_SD1_CLIP_IGNORED = frozenset({"embeddings.position_ids"})
# OpenCLIP parts no diffusers text encoder has (`attn_mask` is a buffer) ...
_OPEN_CLIP_IGNORED = frozenset({"logit_scale", "attn_mask"})
# ... and for SD 2.x, whose `CLIPTextModel` has no projection head, `text_projection` too.
_SD2_CLIP_IGNORED = _OPEN_CLIP_IGNORED | {"text_projection"}


# ---------------------------------------------------------------------------------------------
# Renaming rules shared by every component (and by the ControlNet map, `original.py`)
# ---------------------------------------------------------------------------------------------


def _index(text: str) -> int | None:
    """Parses a canonical non-negative integer path component (`"3"`, not `"03"` or `"-1"`)."""
    if text.isdecimal() and str(int(text)) == text:
        return int(text)
    return None


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_IN_ERROR])
    rest = len(keys) - _MAX_KEYS_IN_ERROR
    return shown + (f" ... and {rest} more" if rest > 0 else "")


def _unmapped_error(keys: list[str], what: str) -> ValueError:
    return ValueError(f"cannot map {len(keys)} {what} key(s): {_format_keys(keys)}")


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_unique(mapping: Mapping[str, object], what: str) -> None:
    """Guards against two source keys landing on one target (it would drop a tensor)."""
    seen: dict[object, str] = {}
    clashes = []
    for src, dst in mapping.items():
        if dst in seen:
            clashes.append(f"{seen[dst]!r} and {src!r} -> {dst!r}")
        seen[dst] = src
    if clashes:
        raise ValueError(f"{what} keys map onto the same name: {'; '.join(clashes[:5])}")


def _under(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """`{key: key without prefix}` for the keys under `prefix`, in order."""
    return {key: key[len(prefix) :] for key in keys if key.startswith(prefix)}


def _strip_shared_prefix(names: Mapping[str, str], prefix: str, what: str) -> dict[str, str]:
    """`{key: name without prefix}` if every name has `prefix`, `names` as they are if none has.

    Raises:
      ValueError: if only some have it (the keys of the others are named).
    """
    with_prefix = [name.startswith(prefix) for name in names.values()]
    if any(with_prefix) and not all(with_prefix):
        bare = [key for key, w in zip(names, with_prefix, strict=True) if not w]
        raise ValueError(
            f"{what} keys mix {prefix!r}-prefixed and bare names; bare: {_format_keys(bare)}"
        )
    strip = len(prefix) if any(with_prefix) else 0
    return {key: name[strip:] for key, name in names.items()}


def _max_index(names: Iterable[str], *head: str) -> int:
    """1 + the largest `i` in names starting with `head + (i,)`; 0 if there is none."""
    depth = len(head)
    found = [-1]
    for name in names:
        parts = name.split(".")
        if len(parts) > depth and tuple(parts[:depth]) == head:
            i = _index(parts[depth])
            if i is not None:
                found.append(i)
    return max(found) + 1


def _rename(
    name: str, fixed: Mapping[str, str], module: Callable[[list[str]], str | None]
) -> str | None:
    """The one rule behind every UNet, VAE and ControlNet name, in either direction.

    A parameter name is a module path and a leaf, `weight` or `bias`, which is kept. The module
    is renamed by a table of fixed names or, failing that, by `module` on its dotted parts.
    Returns None if either has no place for it.
    """
    path, _, leaf = name.rpartition(".")
    if leaf not in _LEAVES:
        return None
    renamed = fixed[path] if path in fixed else module(path.split("."))
    return None if renamed is None else f"{renamed}.{leaf}"


def _rename_all(names: Mapping[str, str], rename: _Rename, what: str) -> dict[str, str]:
    """`{key: rename(name)}` for `{key: name}`.

    Raises:
      ValueError: naming every key that `rename` has no place for, or any keys that land on one
        name.
    """
    renamed = {key: rename(name) for key, name in names.items()}
    unmapped = [key for key, new in renamed.items() if new is None]
    if unmapped:
        raise _unmapped_error(unmapped, what)
    _check_unique(renamed, what)
    return renamed


def _check_agreement(read: Mapping[str, str], to_original: _Rename, what: str) -> None:
    """Reading and writing are separate parsers; insist that every `{diffusers: original}` name
    read writes back to the name it was read from, so that a round trip never changes a name."""
    disagree = [original for name, original in read.items() if to_original(name) != original]
    if disagree:
        raise ValueError(f"ambiguous {what} keys: {_format_keys(disagree)}")


# Transforms used by the load plans. Module-level functions (wrapped in `functools.partial`
# where they take an argument) keep plans picklable and readable in a repr.


def conv1x1_to_linear(x: np.ndarray) -> np.ndarray:
    """`(out, in, 1, 1)` (or `(out, in, 1)`, or already `(out, in)`) -> `(out, in)`."""
    if x.ndim == 2:
        return x
    if x.ndim in (3, 4) and all(d == 1 for d in x.shape[2:]):
        return x.reshape(x.shape[:2])
    raise ValueError(f"expected a 1x1 convolution weight, got shape {tuple(x.shape)}")


def linear_to_conv1x1(x: np.ndarray) -> np.ndarray:
    """`(out, in)` -> `(out, in, 1, 1)`."""
    if x.ndim != 2:
        raise ValueError(f"expected a linear weight (out, in), got shape {tuple(x.shape)}")
    return x.reshape(*x.shape, 1, 1)


def third(x: np.ndarray, part: int) -> np.ndarray:
    """Part `part` (0: q, 1: k, 2: v) of a q/k/v stack along axis 0 (a view, not a copy)."""
    if x.shape[0] % 3:
        raise ValueError(f"cannot split axis 0 of shape {tuple(x.shape)} into q, k, v")
    size = x.shape[0] // 3
    return x[part * size : (part + 1) * size]


# One shared transform per part, so that equal plans compare equal.
_THIRDS = tuple(functools.partial(third, part=part) for part in range(3))


def transpose_2d(x: np.ndarray) -> np.ndarray:
    """A matrix transposed (contiguous): OpenCLIP's `text_projection` <-> a `Linear` weight."""
    if x.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x.T)


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------


def _unet_layers(blocks: str, lpb: int) -> int:
    """Resnet (+ transformer) layers of each of diffusers' `blocks`: a down block has `lpb`, then
    its downsampler's entry; an up block has `lpb + 1`, the last one also holding the upsampler."""
    return lpb if blocks == "down_blocks" else lpb + 1


def _unet_entry(blocks: str, block: int, layer: int, lpb: int) -> str:
    """LDM entry (`input_blocks.n` / `output_blocks.m`) of layer `layer` of `blocks.block`; every
    block spans `lpb + 1` entries (the last down block has no downsampler, but the numbering
    does not depend on that)."""
    n = _UNET_FIRST_ENTRY[blocks] + block * (lpb + 1) + layer
    return f"{_UNET_BLOCKS.to_original[blocks]}.{n}"


def _unet_layer_to_original(entry: str, kind: str, rest: list[str]) -> str | None:
    """A resnet (`kind` "resnets", slot 0) or transformer ("attentions", slot 1) in `entry`."""
    sub = ".".join(rest)
    if kind == "resnets" and sub in _UNET_RESNET.to_original:
        return f"{entry}.{_RESBLOCK_SLOT}.{_UNET_RESNET.to_original[sub]}"
    if kind == "attentions" and rest and rest[0] in _TRANSFORMER_CHILDREN:
        return f"{entry}.{_ATTENTION_SLOT}.{sub}"
    return None


def _unet_layer_to_diffusers(head: str, layer: int, slot: str, rest: list[str]) -> str | None:
    """The inverse: a resnet (slot 0) or transformer (slot 1) as layer `layer` of `head`
    (`down_blocks.b`, `mid_block`, `up_blocks.b`)."""
    sub = ".".join(rest)
    if slot == _RESBLOCK_SLOT and sub in _UNET_RESNET.to_diffusers:
        return f"{head}.resnets.{layer}.{_UNET_RESNET.to_diffusers[sub]}"
    if slot == _ATTENTION_SLOT and rest and rest[0] in _TRANSFORMER_CHILDREN:
        return f"{head}.attentions.{layer}.{sub}"
    return None


def _unet_module_to_original(
    parts: list[str], lpb: int, up_attention: frozenset[int]
) -> str | None:
    """Original module path of a diffusers UNet module path (split on dots), or None."""
    match parts:
        case [blocks, b, ("resnets" | "attentions") as kind, l_, *rest] if (
            blocks in _UNET_FIRST_ENTRY
            and _index(b) is not None
            and _index(l_) is not None
            and int(l_) < _unet_layers(blocks, lpb)
        ):
            return _unet_layer_to_original(_unet_entry(blocks, int(b), int(l_), lpb), kind, rest)
        case ["down_blocks", b, "downsamplers", "0", "conv"] if _index(b) is not None:
            return f"{_unet_entry('down_blocks', int(b), lpb, lpb)}.{_RESBLOCK_SLOT}.op"
        case ["up_blocks", b, "upsamplers", "0", "conv"] if _index(b) is not None:
            # The upsampler follows the last layer's resnet, and its transformer if any.
            slot = 2 if int(b) in up_attention else 1
            return f"{_unet_entry('up_blocks', int(b), lpb, lpb)}.{slot}.conv"
        case ["mid_block", "resnets", ("0" | "1") as i, sub] if sub in _UNET_RESNET.to_original:
            # The second resnet sits after the transformer (slot 1).
            return f"middle_block.{2 * int(i)}.{_UNET_RESNET.to_original[sub]}"
        case ["mid_block", "attentions", "0", *rest]:
            return _unet_layer_to_original("middle_block", "attentions", rest)
    return None


def _unet_module_to_diffusers(parts: list[str], lpb: int) -> str | None:
    """diffusers module path of an original UNet module path (split on dots), or None."""
    match parts:
        case [("input_blocks" | "output_blocks") as entries, n, slot, *rest] if (
            _index(n) is not None
        ):
            blocks = _UNET_BLOCKS.to_diffusers[entries]
            if int(n) < _UNET_FIRST_ENTRY[blocks]:
                return None
            block, layer = divmod(int(n) - _UNET_FIRST_ENTRY[blocks], lpb + 1)
            head = f"{blocks}.{block}"
            if layer == lpb and blocks == "down_blocks":
                # A down block's last entry is its downsampler, nothing else.
                ok = slot == _RESBLOCK_SLOT and rest == ["op"]
                return f"{head}.downsamplers.0.conv" if ok else None
            if layer == lpb and slot in ("1", "2") and rest == ["conv"]:
                return f"{head}.upsamplers.0.conv"
            return _unet_layer_to_diffusers(head, layer, slot, rest)
        case ["middle_block", ("0" | "2") as k, *rest] if (
            ".".join(rest) in _UNET_RESNET.to_diffusers
        ):
            sub = _UNET_RESNET.to_diffusers[".".join(rest)]
            return f"mid_block.resnets.{int(k) // 2}.{sub}"
        case ["middle_block", "1", *rest]:
            return _unet_layer_to_diffusers("mid_block", 0, _ATTENTION_SLOT, rest)
    return None


def _up_blocks_with_attention(diffusers_names: Iterable[str]) -> frozenset[int]:
    return frozenset(
        int(parts[1])
        for parts in (name.split(".") for name in diffusers_names)
        if parts[0] == "up_blocks" and len(parts) > 2 and parts[2] == "attentions"
    )


def unet_original_name(
    name: str, layers_per_block: int, up_blocks_with_attention: frozenset[int] = frozenset()
) -> str | None:
    """Original (LDM) name, without prefix, of one diffusers UNet parameter name.

    The ControlNet map (`original.py`) names its copy of the UNet's encoder half with this too.

    Args:
      name: e.g. `down_blocks.0.resnets.1.conv1.weight`.
      layers_per_block: `UNet2DConditionModel.config.layers_per_block`.
      up_blocks_with_attention: indices of the up blocks that have transformers, after which
        their upsamplers sit (slot 2 instead of 1).

    Returns:
      e.g. `input_blocks.2.0.in_layers.2.weight`; None if the name has no place in the layout.
    """
    to_original = functools.partial(
        _unet_module_to_original, lpb=layers_per_block, up_attention=up_blocks_with_attention
    )
    return _rename(name, _UNET_FIXED.to_original, to_original)


def unet_diffusers_name(name: str, layers_per_block: int) -> str | None:
    """The inverse of `unet_original_name`: the diffusers name of one original UNet name
    (without prefix), or None if it has no place in diffusers' layout."""
    to_diffusers = functools.partial(_unet_module_to_diffusers, lpb=layers_per_block)
    return _rename(name, _UNET_FIXED.to_diffusers, to_diffusers)


def _unet_to_original_for(diffusers_names: Iterable[str], lpb: int) -> _Rename:
    """`unet_original_name` for the UNet that has these parameter names."""
    return functools.partial(
        unet_original_name,
        layers_per_block=lpb,
        up_blocks_with_attention=_up_blocks_with_attention(diffusers_names),
    )


def _check_resnets_per_block(diffusers_names: Iterable[str], lpb: int) -> None:
    """The maps reject resnet indices past `lpb`; a state whose blocks stop short of it was made
    with a smaller `layers_per_block`, which would otherwise renumber silently."""
    parsed = [name.split(".") for name in diffusers_names]
    for blocks in _UNET_BLOCKS.to_original:
        per_block = {int(p[3]) for p in parsed if p[0] == blocks and p[2] == "resnets"}
        expected = _unet_layers(blocks, lpb)
        if per_block and max(per_block) + 1 != expected:
            raise ValueError(
                f"layers_per_block={lpb} but the {blocks} have "
                f"{max(per_block) + 1} resnet(s) each (expected {expected})"
            )


def unet_sources(
    original_keys: Iterable[str], layers_per_block: int, prefix: str = UNET_PREFIX
) -> dict[str, Source]:
    """Plans loading a diffusers `UNet2DConditionModel` from an original SD single file.

    Args:
      original_keys: the file's keys (all components; only those under `prefix` are read).
      layers_per_block: LDM's `num_res_blocks` (diffusers' `layers_per_block`); it fixes the
        `input_blocks` / `output_blocks` numbering.
      prefix: the UNet's prefix in the file; `""` for a bare UNet state dict.

    Returns:
      `{diffusers_key: (original_key, None)}` (the UNet's tensors keep their shapes), in file
      order.

    Raises:
      ValueError: if no key is under `prefix`, or a key under it has no place in the diffusers
        layout (all such keys are named).
    """
    _check_positive_int(layers_per_block, "layers_per_block")
    names = _under(original_keys, prefix)
    if not names:
        raise ValueError(f"no UNet keys under {prefix!r}")
    what = f"original UNet (layers_per_block={layers_per_block})"
    to_diffusers = functools.partial(unet_diffusers_name, layers_per_block=layers_per_block)
    targets = _rename_all(names, to_diffusers, what)
    to_original = _unet_to_original_for(targets.values(), layers_per_block)
    _check_agreement({t: names[k] for k, t in targets.items()}, to_original, what)
    return {target: (key, None) for key, target in targets.items()}


def unet_to_original(
    state: Mapping[str, T], layers_per_block: int, prefix: str = UNET_PREFIX
) -> dict[str, T]:
    """Renames a diffusers `UNet2DConditionModel` state dict to the original (LDM) layout.

    Args:
      state: diffusers state dict; values are passed through untouched, in the same order.
      layers_per_block: `UNet2DConditionModel.config.layers_per_block`.
      prefix: prepended to every original name.

    Returns:
      The original-layout state dict.

    Raises:
      ValueError: if a key has no place in the original layout (class embeddings,
        `encoder_hid_proj`, ...), or `layers_per_block` disagrees with the resnets present.
    """
    _check_positive_int(layers_per_block, "layers_per_block")
    to_original = _unet_to_original_for(state, layers_per_block)
    what = f"diffusers UNet (layers_per_block={layers_per_block})"
    key_map = _rename_all({key: key for key in state}, to_original, what)
    _check_resnets_per_block(key_map, layers_per_block)
    return {prefix + key_map[key]: value for key, value in state.items()}


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def _vae_block(side: str, i: str, num_up: int) -> int | None:
    """Block `i` of `side` in the other layout, the same map either way (None if out of range):
    the encoder keeps its numbering; the decoder's is reversed, LDM counting from the highest
    resolution and diffusers from the lowest."""
    if _index(i) is None:
        return None
    if side == "encoder":
        return int(i)
    return num_up - 1 - int(i) if int(i) < num_up else None


def _vae_module_to_original(parts: list[str], num_up: int) -> str | None:
    """Original module path of a diffusers VAE module path (split on dots), or None."""
    side, *rest = parts
    if side not in _VAE_BLOCKS:
        return None
    blocks, sampler, ldm_blocks, ldm_sampler = _VAE_BLOCKS[side]
    match rest:
        case [b, i, "resnets", j, sub] if (
            b == blocks and _index(j) is not None and sub in _VAE_RESNET.to_original
        ) and (k := _vae_block(side, i, num_up)) is not None:
            return f"{side}.{ldm_blocks}.{k}.block.{j}.{_VAE_RESNET.to_original[sub]}"
        case [b, i, s, "0", "conv"] if (b, s) == (blocks, sampler) and (
            k := _vae_block(side, i, num_up)
        ) is not None:
            return f"{side}.{ldm_blocks}.{k}.{ldm_sampler}.conv"
        case ["mid_block", "resnets", i, sub] if (
            i in _VAE_MID_RESNETS.to_original and sub in _VAE_RESNET.to_original
        ):
            block = _VAE_MID_RESNETS.to_original[i]
            return f"{side}.mid.{block}.{_VAE_RESNET.to_original[sub]}"
        case ["mid_block", "attentions", "0", *sub] if ".".join(sub) in _VAE_ATTENTION.to_original:
            return f"{side}.mid.attn_1.{_VAE_ATTENTION.to_original['.'.join(sub)]}"
    return None


def _vae_module_to_diffusers(parts: list[str], num_up: int) -> str | None:
    """diffusers module path of an original VAE module path (split on dots), or None."""
    side, *rest = parts
    if side not in _VAE_BLOCKS:
        return None
    blocks, sampler, ldm_blocks, ldm_sampler = _VAE_BLOCKS[side]
    match rest:
        case [b, i, "block", j, sub] if (
            b == ldm_blocks and _index(j) is not None and sub in _VAE_RESNET.to_diffusers
        ) and (k := _vae_block(side, i, num_up)) is not None:
            return f"{side}.{blocks}.{k}.resnets.{j}.{_VAE_RESNET.to_diffusers[sub]}"
        case [b, i, s, "conv"] if (b, s) == (ldm_blocks, ldm_sampler) and (
            k := _vae_block(side, i, num_up)
        ) is not None:
            return f"{side}.{blocks}.{k}.{sampler}.0.conv"
        case ["mid", block, sub] if (
            block in _VAE_MID_RESNETS.to_diffusers and sub in _VAE_RESNET.to_diffusers
        ):
            i = _VAE_MID_RESNETS.to_diffusers[block]
            return f"{side}.mid_block.resnets.{i}.{_VAE_RESNET.to_diffusers[sub]}"
        case ["mid", "attn_1", sub] if sub in _VAE_ATTENTION.to_diffusers:
            return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION.to_diffusers[sub]}"
    return None


def _vae_original_name(name: str, num_up: int) -> str | None:
    to_original = functools.partial(_vae_module_to_original, num_up=num_up)
    return _rename(name, _VAE_FIXED.to_original, to_original)


def _vae_diffusers_name(name: str, num_up: int) -> str | None:
    to_diffusers = functools.partial(_vae_module_to_diffusers, num_up=num_up)
    return _rename(name, _VAE_FIXED.to_diffusers, to_diffusers)


def _is_vae_projection_weight(diffusers_name: str) -> bool:
    """Whether a diffusers VAE key is a linear attention projection (a 1x1 conv in LDM)."""
    module, _, leaf = diffusers_name.rpartition(".")
    head, _, sub = module.partition(".mid_block.attentions.0.")
    return leaf == "weight" and head in _VAE_BLOCKS and sub in _VAE_PROJECTIONS


def vae_sources(
    original_keys: Iterable[str], prefix: str = VAE_PREFIX, num_blocks: int | None = None
) -> dict[str, Source]:
    """Plans loading a diffusers `AutoencoderKL` from an original SD single file.

    Args:
      original_keys: the file's keys (all components; only those under `prefix` are read).
      prefix: the VAE's prefix in the file (`"vae."` in some files, `""` for a bare VAE).
      num_blocks: number of decoder up blocks (`len(config.up_block_types)`), which fixes the
        reversed `decoder.up.N` numbering; by default counted from the keys.

    Returns:
      `{diffusers_key: (original_key, transform)}` in file order; the transform is
      `conv1x1_to_linear` for the attention projection weights, None elsewhere.

    Raises:
      ValueError: if no key is under `prefix`, or a key under it has no place in the diffusers
        layout (all such keys are named).
    """
    names = _under(original_keys, prefix)
    if not names:
        raise ValueError(f"no VAE keys under {prefix!r}")
    if num_blocks is None:
        num_blocks = _max_index(names.values(), "decoder", "up")
    else:
        _check_positive_int(num_blocks, "num_blocks")
    what = f"original VAE ({num_blocks} up blocks)"
    targets = _rename_all(names, functools.partial(_vae_diffusers_name, num_up=num_blocks), what)
    to_original = functools.partial(_vae_original_name, num_up=num_blocks)
    _check_agreement({t: names[k] for k, t in targets.items()}, to_original, what)
    return {
        target: (key, conv1x1_to_linear if _is_vae_projection_weight(target) else None)
        for key, target in targets.items()
    }


def vae_to_original(
    state: Mapping[str, np.ndarray], prefix: str = VAE_PREFIX
) -> dict[str, np.ndarray]:
    """Converts a diffusers `AutoencoderKL` state dict to the original (LDM) layout.

    Args:
      state: diffusers state dict of numpy arrays; order is kept.
      prefix: prepended to every original name.

    Returns:
      The original-layout state dict; attention projection weights become `(out, in, 1, 1)`
      convolutions, every other value is passed through untouched.

    Raises:
      ValueError: if a key has no place in the original layout (all such keys are named).
    """
    to_original = functools.partial(
        _vae_original_name, num_up=_max_index(state.keys(), "decoder", "up_blocks")
    )
    key_map = _rename_all({key: key for key in state}, to_original, "diffusers VAE")
    return {
        prefix + key_map[key]: linear_to_conv1x1(value) if _is_vae_projection_weight(key) else value
        for key, value in state.items()
    }


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def _clip_layer(name: str) -> tuple[int, str, str] | None:
    """`(N, module, leaf)` of a transformers `encoder.layers.N.<module>.<leaf>` name, or None."""
    match name.split("."):
        case ["encoder", "layers", n, *module, leaf] if _index(n) is not None and leaf in _LEAVES:
            sub = ".".join(module)
            if sub in _CLIP_LAYER.to_original or sub in _CLIP_QKV:
                return int(n), sub, leaf
    return None


def _clip_to_open_clip(name: str) -> tuple[str, int | None] | None:
    """`(OpenCLIP name below "model.", q/k/v part or None)` of a transformers name (below
    `text_model.`), or None if it has no place."""
    if name in _CLIP_FIXED.to_original:
        return _CLIP_FIXED.to_original[name], None
    layer = _clip_layer(name)
    if layer is None:
        return None
    n, sub, leaf = layer
    if sub in _CLIP_QKV:
        return f"transformer.resblocks.{n}.{_OPEN_CLIP_IN_PROJ}_{leaf}", _CLIP_QKV.index(sub)
    return f"transformer.resblocks.{n}.{_CLIP_LAYER.to_original[sub]}.{leaf}", None


def _open_clip_to_clip(name: str) -> tuple[int | None, list[tuple[str, int | None]]] | None:
    """`(layer or None, [(transformers name below text_model., part or None), ...])` of an
    OpenCLIP name (below `model.`); None if it has no place."""
    if name in _CLIP_FIXED.to_diffusers:
        return None, [(_CLIP_FIXED.to_diffusers[name], None)]
    match name.split("."):
        case ["transformer", "resblocks", n, "attn", ("in_proj_weight" | "in_proj_bias") as p] if (
            _index(n) is not None
        ):
            leaf = p.removeprefix("in_proj_")
            return int(n), [
                (f"encoder.layers.{n}.{sub}.{leaf}", i) for i, sub in enumerate(_CLIP_QKV)
            ]
        case ["transformer", "resblocks", n, *module, leaf] if (
            _index(n) is not None
            and leaf in _LEAVES
            and ".".join(module) in _CLIP_LAYER.to_diffusers
        ):
            sub = _CLIP_LAYER.to_diffusers[".".join(module)]
            return int(n), [(f"encoder.layers.{n}.{sub}.{leaf}", None)]
    return None


def _is_sd1_clip_name(name: str) -> bool:
    return name in _CLIP_FIXED.to_original or _clip_layer(name) is not None


def clip_kind(original_keys: Iterable[str], prefix: str = CLIP_PREFIX) -> ClipKind | None:
    """`"sd1"` (transformers CLIP under `transformer.`), `"sd2"` (OpenCLIP under `model.`), or
    None if the file has no text encoder under `prefix`.

    Raises:
      ValueError: if both are present.
    """
    sd1 = sd2 = False
    for key in original_keys:
        sd1 = sd1 or key.startswith(prefix + SD1_CLIP_ROOT)
        sd2 = sd2 or key.startswith(prefix + SD2_CLIP_ROOT)
    if sd1 and sd2:
        raise ValueError(
            f"both an SD 1.x ({prefix + SD1_CLIP_ROOT!r}) and an SD 2.x "
            f"({prefix + SD2_CLIP_ROOT!r}) text encoder in one file"
        )
    return "sd1" if sd1 else "sd2" if sd2 else None


def clip_sources(
    original_keys: Iterable[str],
    prefix: str = CLIP_PREFIX,
    num_layers: int | None = None,
    text_model_prefix: str = TEXT_MODEL_PREFIX,
    projection: bool = False,
) -> dict[str, Source]:
    """Plans loading a transformers `CLIPTextModel` (or, with `projection`, an OpenCLIP tower as
    a `CLIPTextModelWithProjection`) from an original SD single file.

    The kind (SD 1.x transformers CLIP or SD 2.x OpenCLIP) is read from the keys (`clip_kind`).

    Args:
      original_keys: the file's keys (all components; only the text encoder's are read).
      prefix: the text encoder's prefix in the file (`SDXL_CLIP_PREFIX` /
        `SDXL_OPEN_CLIP_PREFIX` for SDXL's two; see `sdxl_text_sources`).
      num_layers: `config.num_hidden_layers` of the target model; layers at or past it are left
        out of the plan. By default every SD 1.x layer; of OpenCLIP's resblocks all but the last
        (SD 2.x uses the penultimate layer; diffusers' SD 2 text encoder has 23 of 24), or all
        of them with `projection`.
      text_model_prefix: prepended to the transformers names; `""` for the flattened
        `CLIPTextModel.state_dict()` of transformers >= 5.6.
      projection: also read OpenCLIP's `text_projection` into `text_projection.weight` (never
        prefixed), as SDXL's `text_encoder_2` (`CLIPTextModelWithProjection`) has it. OpenCLIP
        files only.

    Returns:
      `{transformers_key: (original_key, transform)}` in file order. For OpenCLIP, q/k/v are
      `functools.partial(third, part=0|1|2)` of one `attn.in_proj_{weight,bias}` and the
      projection is `transpose_2d`; every other transform is None. `position_ids`,
      `logit_scale`, layers past `num_layers` and, without `projection`, `text_projection` are
      not read (see `ignored_keys`).

    Raises:
      ValueError: if the file has no (or two) text encoders under `prefix`, a key has no
        place in the transformers layout (all such keys are named), or `projection` is asked of
        a file without OpenCLIP's `text_projection`.
    """
    keys = list(original_keys)
    kind = clip_kind(keys, prefix)
    if kind is None:
        raise ValueError(
            f"no text encoder keys under {prefix + SD1_CLIP_ROOT!r} or {prefix + SD2_CLIP_ROOT!r}"
        )
    if num_layers is not None:
        _check_positive_int(num_layers, "num_layers")
    plan: dict[str, Source] = {}
    unmapped: list[str] = []

    if kind == "sd1":
        root = prefix + SD1_CLIP_ROOT
        if projection:
            raise ValueError(
                f"projection: the transformers CLIP text encoder below {root!r} has no "
                "text_projection (only an OpenCLIP tower, below 'model.', has one)"
            )
        # Very old files lack the `text_model.` level.
        what = f"SD 1.x text encoder (below {root!r})"
        names = _strip_shared_prefix(_under(keys, root), TEXT_MODEL_PREFIX, what)
        limit = (
            num_layers
            if num_layers is not None
            else _max_index(names.values(), "encoder", "layers")
        )
        for key, name in names.items():
            if name in _SD1_CLIP_IGNORED:
                continue
            if not _is_sd1_clip_name(name):
                unmapped.append(key)
                continue
            layer = _clip_layer(name)
            if layer is None or layer[0] < limit:
                plan[text_model_prefix + name] = (key, None)
        if unmapped:
            raise _unmapped_error(unmapped, "original SD 1.x text encoder")
        return plan

    root = prefix + SD2_CLIP_ROOT
    names = _under(keys, root)
    limit = num_layers
    if limit is None:
        blocks = _max_index(names.values(), "transformer", "resblocks")
        limit = blocks if projection else max(blocks - 1, 0)
    for key, name in names.items():
        if name in (_OPEN_CLIP_IGNORED if projection else _SD2_CLIP_IGNORED):
            continue
        if name in _CLIP_PROJECTION.to_diffusers:
            plan[_CLIP_PROJECTION.to_diffusers[name]] = (key, transpose_2d)
            continue
        parsed = _open_clip_to_clip(name)
        if parsed is None:
            unmapped.append(key)
            continue
        layer, targets = parsed
        if layer is not None and layer >= limit:
            continue
        for target, part in targets:
            transform = None if part is None else _THIRDS[part]
            plan[text_model_prefix + target] = (key, transform)
    if unmapped:
        raise _unmapped_error(unmapped, "original SD 2.x (OpenCLIP) text encoder")
    if projection and not any(t in plan for t in _CLIP_PROJECTION.to_original):
        raise ValueError(f"projection: no {root + 'text_projection'!r} in the file")
    # Cross-check with the writing direction's parser.
    for target, (key, transform) in plan.items():
        if target in _CLIP_PROJECTION.to_original:
            agree = root + _CLIP_PROJECTION.to_original[target] == key
        else:
            back = _clip_to_open_clip(target[len(text_model_prefix) :])
            part = None if transform is None else _THIRDS.index(transform)
            agree = back is not None and (root + back[0], back[1]) == (key, part)
        if not agree:
            raise ValueError(f"ambiguous original SD 2.x text encoder key {key!r}")
    return plan


def clip_to_original(
    state: Mapping[str, np.ndarray], kind: ClipKind, prefix: str = CLIP_PREFIX
) -> dict[str, np.ndarray]:
    """Converts a transformers `CLIPTextModel` state dict to the original SD layout.

    Args:
      state: text encoder state dict of numpy arrays, every key with the `text_model.` prefix or
        none (transformers >= 5.6 `CLIPTextModel.state_dict()`); order is kept where possible.
        For `"sd2"` it may also hold a `CLIPTextModelWithProjection`'s `text_projection.weight`.
      kind: `"sd1"` writes `cond_stage_model.transformer.text_model.*` unchanged; `"sd2"` writes
        OpenCLIP `cond_stage_model.model.*`, stacking q/k/v into `attn.in_proj_{weight,bias}`
        (at the position of the layer's `q_proj`) and `text_projection.weight` transposed into
        `text_projection`.
      prefix: prepended to every original name (`SDXL_CLIP_PREFIX` / `SDXL_OPEN_CLIP_PREFIX`
        for SDXL's two; see `sdxl_text_to_original`).

    Returns:
      The original-layout state dict. For `"sd2"` it has only the `num_hidden_layers` resblocks
      the model has: OpenCLIP's last block (unused by SD 2.x), `text_projection` (for a model
      without one) and `logit_scale` have no diffusers counterpart and are not written.

    Raises:
      ValueError: on an unknown kind, mixed prefixed/bare keys, a key with no place in the
        original layout, or an incomplete q/k/v triple.
    """
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    # OpenCLIP's projection head sits outside `text_model.` on both sides.
    head = {key for key in state if key in _CLIP_PROJECTION.to_original} if kind == "sd2" else ()
    names = _strip_shared_prefix(
        {key: key for key in state if key not in head}, TEXT_MODEL_PREFIX, "text encoder"
    )

    if kind == "sd1":
        unmapped = [key for key, name in names.items() if not _is_sd1_clip_name(name)]
        if unmapped:
            raise _unmapped_error(unmapped, "diffusers SD 1.x text encoder")
        root = prefix + SD1_CLIP_ROOT + TEXT_MODEL_PREFIX
        return {root + names[key]: value for key, value in state.items()}

    root = prefix + SD2_CLIP_ROOT
    mapped = {key: _clip_to_open_clip(name) for key, name in names.items()}
    unmapped = [key for key, m in mapped.items() if m is None]
    if unmapped:
        raise _unmapped_error(unmapped, "diffusers SD 2.x text encoder")
    # Collect q/k/v parts per in_proj tensor first; they are written where q_proj sits.
    stacks: dict[str, list[np.ndarray | None]] = {}
    for key, (name, part) in mapped.items():
        if part is not None:
            stacks.setdefault(name, [None, None, None])[part] = state[key]
    incomplete = [root + name for name, parts in stacks.items() if any(p is None for p in parts)]
    if incomplete:
        raise ValueError(f"incomplete q/k/v for {_format_keys(incomplete)}")
    out: dict[str, np.ndarray] = {}
    for key in state:
        if key in head:
            out[root + _CLIP_PROJECTION.to_original[key]] = transpose_2d(state[key])
            continue
        name, part = mapped[key]
        if part is None:
            out[root + name] = state[key]
        elif part == 0:
            out[root + name] = np.concatenate(stacks[name], axis=0)
    return out


def sdxl_text_sources(
    original_keys: Iterable[str],
    num_layers: int | None = None,
    num_layers_2: int | None = None,
    text_model_prefix: str = TEXT_MODEL_PREFIX,
) -> dict[str, dict[str, Source]]:
    """Plans loading SDXL's two text encoders from an original (sgm) SDXL single file.

    Args:
      original_keys: the file's keys (all components; only the text encoders' are read).
      num_layers: `text_encoder`'s `num_hidden_layers` (CLIP ViT-L: 12); by default all.
      num_layers_2: `text_encoder_2`'s (OpenCLIP ViT-bigG: 32); by default all.
      text_model_prefix: of `text_encoder`'s names (`""` for the flattened
        `CLIPTextModel.state_dict()` of transformers >= 5.6); `text_encoder_2`'s always have it,
        as `CLIPTextModelWithProjection` keeps its `text_model` level.

    Returns:
      `{"text_encoder": plan, "text_encoder_2": plan}`, each as `clip_sources` makes them: the
      transformers CLIP below `SDXL_CLIP_PREFIX`, and the OpenCLIP tower below
      `SDXL_OPEN_CLIP_PREFIX` with `projection=True`.

    Raises:
      ValueError: if either encoder is missing or of the other kind (an SDXL refiner file has
        only an OpenCLIP tower, below `SDXL_CLIP_PREFIX`), or as `clip_sources` raises.
    """
    keys = list(original_keys)
    for prefix, want, root in (
        (SDXL_CLIP_PREFIX, "sd1", SD1_CLIP_ROOT),
        (SDXL_OPEN_CLIP_PREFIX, "sd2", SD2_CLIP_ROOT),
    ):
        if clip_kind(keys, prefix) != want:
            raise ValueError(f"not an SDXL base file: no text encoder keys under {prefix + root!r}")
    return {
        "text_encoder": clip_sources(keys, SDXL_CLIP_PREFIX, num_layers, text_model_prefix),
        "text_encoder_2": clip_sources(keys, SDXL_OPEN_CLIP_PREFIX, num_layers_2, projection=True),
    }


def sdxl_text_to_original(
    text_encoder: Mapping[str, np.ndarray], text_encoder_2: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Converts SDXL's two text encoders to the original (sgm) single-file layout.

    Args:
      text_encoder: the transformers `CLIPTextModel` state dict (CLIP ViT-L), written below
        `conditioner.embedders.0.transformer.text_model.`.
      text_encoder_2: the `CLIPTextModelWithProjection` state dict (OpenCLIP ViT-bigG), written
        in OpenCLIP names below `conditioner.embedders.1.model.`, `text_projection` included.

    Raises:
      ValueError: if `text_encoder_2` has no `text_projection.weight`, or as `clip_to_original`
        raises.
    """
    if not any(key in _CLIP_PROJECTION.to_original for key in text_encoder_2):
        raise ValueError("SDXL text_encoder_2 state has no 'text_projection.weight'")
    return {
        **clip_to_original(text_encoder, "sd1", SDXL_CLIP_PREFIX),
        **clip_to_original(text_encoder_2, "sd2", SDXL_OPEN_CLIP_PREFIX),
    }


# ---------------------------------------------------------------------------------------------
# Plans as a whole
# ---------------------------------------------------------------------------------------------


def apply_sources(
    state: Mapping[str, np.ndarray], sources: Mapping[str, Source]
) -> dict[str, np.ndarray]:
    """Eagerly executes a load plan: `{target: transform(state[original])}`, in plan order.

    Raises:
      ValueError: if the plan reads keys `state` lacks (all are named).
    """
    missing = sorted({original for original, _ in sources.values() if original not in state})
    if missing:
        raise ValueError(f"{len(missing)} planned key(s) not in the state: {_format_keys(missing)}")
    out = {}
    for target, (original, transform) in sources.items():
        value = state[original]
        out[target] = value if transform is None else transform(value)
    return out


def ignored_keys(keys: Iterable[str], clip_prefix: str = CLIP_PREFIX) -> list[str]:
    """The keys of an original SD file that SD loaders legitimately leave unread, in order.

    These are the `LatentDiffusion` schedule buffers (`betas`, `alphas_cumprod`, ...,
    `scale_factor`, `logvar`), the EMA copy `model_ema.*`, transformers' `position_ids` buffer
    (SD 1.x), and for OpenCLIP (SD 2.x) `text_projection`, `logit_scale`, `attn_mask` and the
    last resblock, which SD 2.x never runs. Below SDXL's `conditioner.embedders.{0,1}.`, whose
    towers are read whole, only `position_ids`, `logit_scale` and `attn_mask`.
    """
    keys = list(keys)
    sd1_root = clip_prefix + SD1_CLIP_ROOT
    sd2_root = clip_prefix + SD2_CLIP_ROOT
    sd2_names = _under(keys, sd2_root)
    last_block = _max_index(sd2_names.values(), "transformer", "resblocks") - 1
    last_block_head = f"transformer.resblocks.{last_block}."

    def ignored(key: str) -> bool:
        if key in _IGNORED_TOP_LEVEL or key.startswith(_IGNORED_PREFIXES):
            return True
        for prefix in SDXL_TEXT_PREFIXES:
            if key.startswith(prefix + SD1_CLIP_ROOT):
                name = key[len(prefix + SD1_CLIP_ROOT) :].removeprefix(TEXT_MODEL_PREFIX)
                return name in _SD1_CLIP_IGNORED
            if key.startswith(prefix + SD2_CLIP_ROOT):
                return key[len(prefix + SD2_CLIP_ROOT) :] in _OPEN_CLIP_IGNORED
        if key.startswith(sd1_root):
            name = key[len(sd1_root) :].removeprefix(TEXT_MODEL_PREFIX)
            return name in _SD1_CLIP_IGNORED
        if key in sd2_names:
            name = sd2_names[key]
            return name in _SD2_CLIP_IGNORED or (
                last_block >= 0 and name.startswith(last_block_head)
            )
        return False

    return [key for key in keys if ignored(key)]


def unexpected_keys(
    original_keys: Iterable[str], *plans: Mapping[str, Source], clip_prefix: str = CLIP_PREFIX
) -> list[str]:
    """The keys of an original file that no plan reads and `ignored_keys` does not excuse, in
    order: what a loader should report as unexpected."""
    keys = list(original_keys)
    read = {original for plan in plans for original, _ in plan.values()}
    excused = set(ignored_keys(keys, clip_prefix))
    return [key for key in keys if key not in read and key not in excused]
