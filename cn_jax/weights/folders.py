"""Load and save UNets and ControlNets in the files people have.

- diffusers model folders: `config.json` + `diffusion_pytorch_model.safetensors`
  (or the `.fp16` variant, or a sharded `.safetensors.index.json`), also a
  pipeline folder's `unet/` / `controlnet/` subfolder;
- one ControlNet `.safetensors` file in diffusers names or in the original
  lllyasviel names (`control_model.*`, prefix optional);
- pickle files (`.bin`, `.pth`, `.ckpt`) only with `allow_pickle=True`.

Tensors are read one at a time from the file and converted straight into the
Flax tree, so a load holds about one copy of the weights plus one tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.models.config import ControlNetConfig, UNetConfig
from cn_jax.models.controlnet import ControlNet, example_inputs
from cn_jax.models.layers import Dtype
from cn_jax.models.unet import UNet
from cn_jax.models.unet import example_inputs as unet_example_inputs
from cn_jax.weights import original
from cn_jax.weights.errors import WeightFileError
from cn_jax.weights.hub import resolve_path
from cn_jax.weights.keymap import flax_to_torch, torch_to_flax
from cn_jax.weights.safetensors_io import (
    SafetensorsFile,
    load_pickle_checkpoint,
    write_safetensors,
)

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# The diffusers version our exported folders were verified against.
DIFFUSERS_COMPAT_VERSION = "0.42.1"
# safetensors metadata key holding cn_jax's exact config in single files.
CONFIG_METADATA_KEY = "cn_jax_config"
# SDXL's text_time embedding, assumed when a bare file's config is inferred: six size
# numbers of 256 sinusoidal features each.
SDXL_TIME_IDS = 6
SDXL_TIME_EMBED_DIM = 256


# -- reading --------------------------------------------------------------------


class _LazyState(Mapping):
    """A read-only state dict whose tensors are read from disk on access."""

    def __init__(self, sources: dict[str, tuple[Any, str]]):
        self._sources = sources  # key -> (SafetensorsFile or dict, key in it)

    def __getitem__(self, key: str) -> np.ndarray:
        src, name = self._sources[key]
        return src.get(name) if isinstance(src, SafetensorsFile) else src[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def shape(self, key: str) -> tuple[int, ...]:
        src, name = self._sources[key]
        return src.shape(name) if isinstance(src, SafetensorsFile) else tuple(src[name].shape)

    def renamed(self, mapping: Mapping[str, str]) -> _LazyState:
        """The same tensors under new names (`mapping`: new name -> current name)."""
        return _LazyState({new: self._sources[old] for new, old in mapping.items()})


def _open_state(files: list[Path], allow_pickle: bool) -> tuple[_LazyState, dict[str, str]]:
    """Open weight files as one lazy state dict; also return safetensors metadata."""
    sources: dict[str, tuple[Any, str]] = {}
    metadata: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sf = SafetensorsFile(f)
            metadata.update(sf.metadata)
            sources.update({k: (sf, k) for k in sf.keys()})
        elif f.suffix.lower() in PICKLE_SUFFIXES:
            state = load_pickle_checkpoint(f, allow_pickle=allow_pickle)
            sources.update({k: (state, k) for k in state})
        else:
            raise WeightFileError(f"{f}: unsupported weight file type {f.suffix!r}")
    return _LazyState(sources), metadata


def _model_dir(path: Path, subfolder: str) -> Path:
    """The folder holding config.json: `path` itself or its `subfolder`."""
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / subfolder / CONFIG_NAME).is_file():
        return path / subfolder
    raise WeightFileError(
        f"{path}: not a diffusers model folder (no {CONFIG_NAME}, and no {subfolder}/{CONFIG_NAME} "
        "as in a pipeline folder)"
    )


def _weight_files(
    folder: Path,
    variant: str | None,
    allow_pickle: bool,
    stem: str = WEIGHTS_NAME,
    pickle_name: str | None = None,
) -> list[Path]:
    """The weight files of a model folder, in diffusers' order of preference.

    `stem` is diffusers' `diffusion_pytorch_model` or transformers' `model`;
    `pickle_name` the legacy pickle file (default `<stem>.bin`). A `variant`'s
    files come first, then (as diffusers does for a pipeline's component that
    lacks the variant) the plain ones.
    """
    stems = [f"{stem}.{variant}", stem] if variant else [stem, f"{stem}.fp16"]
    for name in stems:
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{name}.safetensors.index.json"
        if not index.is_file() and name != stem:  # diffusers' spelling of a variant's index
            index = folder / f"{stem}.safetensors.index{name[len(stem) :]}.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightFileError(f"{index}: not a safetensors index ({e})") from None
            return [folder / f for f in sorted(set(weight_map.values()))]
    pickle = folder / (pickle_name or f"{stem}.bin")
    if pickle.is_file():
        if not allow_pickle:
            load_pickle_checkpoint(pickle, allow_pickle=False)  # raises the explanation
        return [pickle]
    raise WeightFileError(
        f"{folder}: no weights found (looked for {', '.join(n + '.safetensors' for n in stems)})"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise WeightFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightFileError(f"{path}: expected a JSON object")
    return data


def _abstract_params(module, *inputs) -> Any:
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]


def _convert(state: Mapping, module, inputs, source: str) -> dict:
    return torch_to_flax(state, _abstract_params(module, *inputs), source=source)


def load_unet(
    path: str | os.PathLike,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
) -> tuple[UNet, dict]:
    """Load a UNet from a diffusers model folder (or a pipeline folder with `unet/`).

    Args:
      path: the folder, or a Hugging Face Hub repo id "org/name" (fetched into
        the Hugging Face cache: `weights.hub`; a local folder that exists wins).
      dtype: compute dtype of the returned module.
      param_dtype: dtype the weights are cast to.
      variant: weight variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`
        where the folder has it, else the plain file (default: the plain file,
        else the fp16 one).
      allow_pickle: accept `diffusion_pytorch_model.bin` (loaded with
        `torch.load(weights_only=True)`).
      revision: a Hub repo's branch, tag or commit (default: main).
      subfolder: the model's folder inside `path` or the repo, e.g. "unet".

    Returns:
      `(unet, params)`: the linen module (its `.config` is the `UNetConfig`)
      and its `params` tree.
    """
    path = resolve_path(
        path, "unet", revision=revision, subfolder=subfolder, variant=variant,
        allow_pickle=allow_pickle,
    )  # fmt: skip
    folder = _model_dir(path, "unet")
    config = UNetConfig.from_dict(
        _read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME)
    )
    files = _weight_files(folder, variant, allow_pickle)
    state, _ = _open_state(files, allow_pickle)
    unet = UNet(config, dtype=dtype, param_dtype=param_dtype)
    return unet, _convert(state, unet, unet_example_inputs(config), str(files[0]))


def load_controlnet(
    path: str | os.PathLike,
    config: ControlNetConfig | Mapping | str | os.PathLike | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
) -> tuple[ControlNet, dict]:
    """Load a ControlNet from a diffusers folder or a single weight file.

    `path` may also be a Hugging Face Hub repo id, "org/name" (a diffusers
    ControlNet, at the repo's root or in `controlnet/`) or
    "org/name/file.safetensors" (one file of a repo), fetched into the Hugging
    Face cache at `revision` (`weights.hub`; a local path that exists wins);
    `subfolder` is the model's folder inside the repo or local folder.

    A single file may use diffusers names or the original names
    (`control_model.*`, as in `control_v11p_sd15_canny.safetensors`; the
    prefix is optional, and other keys of a full original checkpoint are
    ignored; an SDXL ControlNet's `add_embedding` is sgm's `label_emb.0.*`).
    Its config comes from, in order: the `config` argument; the
    config cn_jax stores in the file's metadata; a `config.json` beside it;
    else it is inferred from the tensor shapes (`infer_controlnet_config`:
    heads: 8 for 1x1-conv projections as SD 1.x, 64-wide heads for linear
    projections as SD 2.x and SDXL).

    SDXL ControlNets (`addition_embed_type: "text_time"`, as
    diffusers/controlnet-canny-sdxl-1.0 and xinsir/controlnet-canny-sdxl-1.0
    lay them out, `upcast_attention: null` and `addition_embed_type_num_heads`
    included) load the same way.

    Returns:
      `(controlnet, params)`.
    """
    path = resolve_path(
        path, "controlnet", revision=revision, subfolder=subfolder, variant=variant,
        allow_pickle=allow_pickle,
    )  # fmt: skip
    if path.is_dir():
        folder = _model_dir(path, "controlnet")
        cfg_file = folder / CONFIG_NAME
        cfg = ControlNetConfig.from_dict(_read_json(cfg_file), source=str(cfg_file))
        if config is not None:
            cfg = _as_controlnet_config(config)
        files = _weight_files(folder, variant, allow_pickle)
        state, _ = _open_state(files, allow_pickle)
        source = str(files[0])
    else:
        if not path.is_file():
            raise WeightFileError(f"{path}: no such file or folder")
        state, metadata = _open_state([path], allow_pickle)
        source = str(path)
        state = _to_diffusers_names(state, source)
        if config is not None:
            cfg = _as_controlnet_config(config)
        elif CONFIG_METADATA_KEY in metadata:
            cfg = ControlNetConfig.from_dict(
                json.loads(metadata[CONFIG_METADATA_KEY]), source=f"{path} metadata"
            )
        elif (path.parent / CONFIG_NAME).is_file():
            cfg_file = path.parent / CONFIG_NAME
            cfg = ControlNetConfig.from_dict(_read_json(cfg_file), source=str(cfg_file))
        else:
            cfg = infer_controlnet_config(state, source)
    cnet = ControlNet(cfg, dtype=dtype, param_dtype=param_dtype)
    return cnet, _convert(state, cnet, example_inputs(cfg), source)


def _as_controlnet_config(config) -> ControlNetConfig:
    if isinstance(config, ControlNetConfig):
        return config
    if isinstance(config, Mapping):
        return ControlNetConfig.from_dict(config)
    p = Path(config)
    return ControlNetConfig.from_dict(_read_json(p), source=str(p))


def _to_diffusers_names(state: _LazyState, source: str) -> _LazyState:
    """Rename an original-layout state (control_model.*) to diffusers names."""
    keys = list(state)
    prefixed = [k for k in keys if k.startswith(original.ORIGINAL_PREFIX)]
    if prefixed:
        keys = prefixed  # a full cldm checkpoint: keep only the ControlNet
    elif not any(k.startswith(("input_blocks.", "zero_convs.", "input_hint_block.")) for k in keys):
        return state  # already diffusers names
    lpb = _original_layers_per_block(keys, source)
    try:
        # Values are the current names, so the result maps new name -> old name.
        mapping = original.original_to_diffusers({k: k for k in keys}, lpb)
    except ValueError as e:
        raise WeightFileError(f"{source}: {e}") from None
    return state.renamed(mapping)


def _original_layers_per_block(keys: list[str], source: str) -> int:
    """layers_per_block of an original-layout ControlNet, from its key names.

    The first downsampler sits at input_blocks.{layers_per_block + 1}.0.op; with
    a single block, the zero convs count 1 + layers_per_block.
    """
    ops, zero = [], set()
    for k in keys:
        parts = k.removeprefix(original.ORIGINAL_PREFIX).split(".")
        if parts[0] == "input_blocks" and len(parts) > 3 and parts[3] == "op":
            ops.append(int(parts[1]))
        if parts[0] == "zero_convs":
            zero.add(int(parts[1]))
    if ops:
        return min(ops) - 1
    if zero:
        return len(zero) - 1
    raise WeightFileError(f"{source}: original ControlNet layout without input blocks/zero convs")


def infer_controlnet_config(state: Mapping, source: str = "weights") -> ControlNetConfig:
    """Guess a ControlNet config from diffusers-named tensor shapes.

    Everything but the head count and GroupNorm settings is in the shapes; for
    those the Stable Diffusion conventions are assumed (8 heads with 1x1-conv
    projections as SD 1.x, heads of width 64 with linear projections as SD 2.x
    and SDXL, 32 groups). An `add_embedding` makes it SDXL's (`text_time`), with
    SDXL's 256 features per size number (the rest of its input is the pooled
    text embedding). Pass an explicit config when a file breaks these conventions.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise WeightFileError(f"{source}: cannot infer the ControlNet config, no {key!r}")
        return tuple(state.shape(key) if isinstance(state, _LazyState) else state[key].shape)

    keys = list(state)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("down_blocks."))
    lpb = 1 + max(int(k.split(".")[3]) for k in keys if k.startswith("down_blocks.0.resnets."))
    widths = tuple(shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in range(n_blocks))
    has_attn = [
        any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(n_blocks)
    ]
    linear = len(shape("mid_block.attentions.0.proj_in.weight")) == 2
    heads = tuple(w // 64 for w in widths) if linear else 8
    layers = []
    for b in list(range(n_blocks)) + [None]:
        prefix = f"down_blocks.{b}.attentions.0." if b is not None else "mid_block.attentions.0."
        start = prefix + "transformer_blocks."
        blocks = {k[len(start) :].split(".")[0] for k in keys if k.startswith(start)}
        layers.append(max(len(blocks), 1))
    hint_in = shape("controlnet_cond_embedding.conv_in.weight")
    paper = hint_in[2] == 4  # the paper's encoder uses 4x4 kernels
    n_hint = 1 + max(
        (int(k.split(".")[2]) for k in keys if k.startswith("controlnet_cond_embedding.blocks.")),
        default=-1,
    )
    if paper:
        hint = (hint_in[0],) + tuple(
            shape(f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in range(n_hint)
        )
    else:
        hint = (hint_in[0],) + tuple(
            shape(f"controlnet_cond_embedding.blocks.{2 * j + 1}.weight")[0]
            for j in range(n_hint // 2)
        )
    ctx = shape("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")[1]
    added = {}
    if "add_embedding.linear_1.weight" in state:  # SDXL: pooled text + 6 size numbers
        inputs = shape("add_embedding.linear_1.weight")[1]
        if inputs <= SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM:
            raise WeightFileError(
                f"{source}: cannot infer an SDXL ControlNet's addition_time_embed_dim: "
                f"add_embedding takes {inputs} inputs, not the pooled embedding plus "
                f"{SDXL_TIME_IDS} x {SDXL_TIME_EMBED_DIM} as in SDXL; pass its config"
            )
        added = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=inputs,
        )
    return ControlNetConfig(
        in_channels=shape("conv_in.weight")[1],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        block_out_channels=widths,
        layers_per_block=lpb,
        cross_attention_dim=ctx,
        attention_head_dim=heads,
        use_linear_projection=linear,
        transformer_layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers[:-1]),
        conditioning_channels=hint_in[1],
        conditioning_embedding_out_channels=hint,
        conditioning_embedding_type="paper" if paper else "released",
        **added,
    )


# -- writing --------------------------------------------------------------------


def _torch_state(params: Any, dtype) -> dict[str, np.ndarray]:
    params = params.get("params", params) if isinstance(params, Mapping) else params
    state = flax_to_torch(params)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    return state


def _write_folder(path: Path, config_dict: dict, state: dict[str, np.ndarray]) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; the diffusers format writes a folder there")
    path.mkdir(parents=True, exist_ok=True)
    config_dict = {**config_dict, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
    write_safetensors(path / f"{WEIGHTS_NAME}.safetensors", state, metadata={"format": "pt"})
    write_json(path / CONFIG_NAME, config_dict)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_unet(path: str | os.PathLike, unet: UNet, params: Any, dtype=None) -> None:
    """Write a diffusers UNet folder (`config.json` + `diffusion_pytorch_model.safetensors`)."""
    _write_folder(Path(path), unet.config.to_dict(), _torch_state(params, dtype))


def save_controlnet(
    path: str | os.PathLike,
    cnet: ControlNet,
    cnet_params: Any,
    format: str = "diffusers",
    dtype=None,
) -> None:
    """Save a ControlNet for the PyTorch world.

    Args:
      path: `format="diffusers"`: a folder (created) with `config.json` and
        `diffusion_pytorch_model.safetensors`, loadable by diffusers'
        `ControlNetModel.from_pretrained`. `format="original"`: one
        `.safetensors` file with lllyasviel's `control_model.*` names, as the
        released `control_v11p_*.safetensors` files. An SDXL ControlNet's
        `add_embedding` is written as sgm's `label_emb.0.0` / `label_emb.0.2`,
        the layout of ComfyUI's `cldm.ControlNet` (which reads such a file);
        diffusers' single-file loader does not read `label_emb` for ControlNets,
        so for diffusers use the default format.
      cnet: the module (for its config).
      cnet_params: its `params` tree.
      format: "diffusers" or "original".
      dtype: cast the weights (e.g. `np.float16`); default: as they are.

    Files are written atomically: a crash leaves any previous file intact.
    """
    state = _torch_state(cnet_params, dtype)
    path = Path(path)
    if format == "diffusers":
        _write_folder(path, cnet.config.to_dict(), state)
    elif format == "original":
        if path.suffix != ".safetensors":
            raise ValueError(f"format='original' writes one .safetensors file; got {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; the original format writes one file there")
        path.parent.mkdir(parents=True, exist_ok=True)
        out = original.diffusers_to_original(state, cnet.config.layers_per_block)
        config_json = json.dumps(cnet.config.to_dict())
        write_safetensors(path, out, metadata={"format": "pt", CONFIG_METADATA_KEY: config_json})
    else:
        raise ValueError(
            f"save_controlnet: format must be 'diffusers' or 'original', got {format!r}"
        )
