"""Whole Stable Diffusion checkpoints -> the frozen components in Flax.

`load_pipeline(path)` reads either a diffusers pipeline folder
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`) or one original checkpoint (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`) plus a named config (`sd15`,
`sd21`) or a given one. Tensors stream from the safetensors files one at a time
straight into the Flax trees, so a load holds about one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.diffusion.schedule import NoiseScheduleConfig
from cn_jax.kernels import Kernels
from cn_jax.kernels.choice import XLA_ONLY
from cn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, canonical_torch_state
from cn_jax.models.clip_text import example_inputs as text_example_inputs
from cn_jax.models.config import UNetConfig
from cn_jax.models.layers import Dtype
from cn_jax.models.presets import preset
from cn_jax.models.unet import UNet
from cn_jax.models.unet import example_inputs as unet_example_inputs
from cn_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from cn_jax.models.vae import example_inputs as vae_example_inputs
from cn_jax.weights import original_sd
from cn_jax.weights.errors import WeightFileError
from cn_jax.weights.folders import (
    CONFIG_NAME,
    DIFFUSERS_COMPAT_VERSION,
    _LazyState,
    _open_state,
    _read_json,
    _weight_files,
    load_unet,
    write_json,
)
from cn_jax.weights.hub import BUNDLED, resolve_path  # noqa: F401 (resolve_path: re-exported)
from cn_jax.weights.keymap import torch_to_flax

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_TOKENIZER = _ASSETS / "tiny_tokenizer"


@dataclasses.dataclass
class StableDiffusion:
    """The frozen components of a Stable Diffusion model, each with its params.

    Attributes:
      unet, unet_params: the denoiser.
      vae, vae_params: the autoencoder (`vae.config.scaling_factor` scales latents).
      text_encoder, text_encoder_params: the CLIP text transformer.
      tokenizer: a `transformers.CLIPTokenizer`, or None when the source had none.
      schedule: the training noise schedule and prediction type.
      source: where it was loaded from.
    """

    unet: UNet
    unet_params: Any
    vae: AutoencoderKL | None  # None: a pixel-space model (latent factor 1)
    vae_params: Any
    text_encoder: CLIPTextModel
    text_encoder_params: Any
    tokenizer: Any
    schedule: NoiseScheduleConfig
    source: str

    def with_kernels(self, kernels: Kernels) -> StableDiffusion:
        """The same bundle whose UNet and VAE compute with `kernels` (same params)."""
        vae = None if self.vae is None else self.vae.clone(kernels=kernels)
        return dataclasses.replace(self, unet=self.unet.clone(kernels=kernels), vae=vae)


def _abstract(module, inputs) -> Any:
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]


# Deprecated attention names of older diffusers VAE files (diffusers renames
# them on load too).
_VAE_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_state(state: _LazyState) -> _LazyState:
    """The VAE state under current diffusers names (old `query`/`proj_attn` renamed)."""
    names = {}
    for key in state:
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _VAE_DEPRECATED:
            parts[-2] = _VAE_DEPRECATED[parts[-2]]
        names[".".join(parts)] = key
    return state.renamed(names)


class _Planned(Mapping):
    """Diffusers-named tensors computed lazily from an original checkpoint."""

    def __init__(self, state: Mapping, sources: Mapping[str, tuple[str, Callable | None]]):
        self._state, self._sources = state, sources

    def __getitem__(self, key: str) -> np.ndarray:
        name, transform = self._sources[key]
        value = self._state[name]
        return transform(value) if transform is not None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def load_pipeline(
    path: str | os.PathLike,
    config: str | Mapping | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> StableDiffusion:
    """Load the frozen components of a Stable Diffusion model.

    Args:
      path: a diffusers pipeline folder, or one original checkpoint file
        (`.safetensors`; `.ckpt` with `allow_pickle=True`), or the name of a
        bundled model: "bundled:tiny" (the demo's 32 px pixel-space base), or
        a Hugging Face Hub repo id "org/name" (a pipeline) or
        "org/name/file.safetensors" (one checkpoint in a repo), fetched into
        the Hugging Face cache (`weights.hub`; a local path that exists wins).
      config: for a single file: a named config ("sd15", "sd21"), or a dict
        with the component configs ("unet", "vae", "text_encoder",
        "scheduler"), or a diffusers pipeline folder (or Hub repo id) whose
        configs to use. Ignored for a folder.
      tokenizer: a `tokenizer/` folder (CLIP vocab.json + merges.txt), or a Hub
        repo id holding one, for a single file, which carries none. Default for
        a folder: its own.
      dtype: compute dtype of the returned modules.
      param_dtype: dtype the weights are cast to (float32 or bfloat16).
      variant: diffusers weight variant in a folder (e.g. "fp16").
      allow_pickle: accept pickle files (`torch.load(weights_only=True)`).
      revision: a Hub repo's branch, tag or commit (default: main).

    Returns:
      A `StableDiffusion` bundle.

    Raises:
      WeightFileError: a missing subfolder, file or key, or a mis-shaped tensor,
        named.
    """
    path = resolve_path(
        path, "pipeline", revision=revision, variant=variant, allow_pickle=allow_pickle
    )
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, dtype, param_dtype, variant, allow_pickle, tokenizer)
    return _load_single_file(path, config, tokenizer, dtype, param_dtype, allow_pickle)


def _load_folder(path, dtype, param_dtype, variant, allow_pickle, tokenizer) -> StableDiffusion:
    if not (path / "model_index.json").is_file():
        raise WeightFileError(
            f"{path}: not a diffusers pipeline folder (no model_index.json); for a single "
            "model use load_unet / load_controlnet"
        )
    index = _read_json(path / "model_index.json")
    pixel_space = _is_null(index.get("vae", "missing"))
    for sub in SUBFOLDERS:
        optional = (sub == "tokenizer" and tokenizer is not None) or (sub == "vae" and pixel_space)
        if not (path / sub).is_dir() and not optional:
            raise WeightFileError(f"{path}: missing subfolder {sub}/")
    unet, unet_params = load_unet(path / "unet", dtype, param_dtype, variant, allow_pickle)

    vae = vae_params = None
    if not pixel_space:
        vae = AutoencoderKL(_folder_vae_config(path), dtype=dtype, param_dtype=param_dtype)
        vae_files = _weight_files(path / "vae", variant, allow_pickle)
        vae_state, _ = _open_state(vae_files, allow_pickle)
        vae_params = torch_to_flax(
            _vae_state(vae_state), _abstract(vae, vae_example_inputs(vae.config)), str(vae_files[0])
        )

    te_cfg_file = _config_file(path / "text_encoder", CONFIG_NAME)
    te = CLIPTextModel(
        CLIPTextConfig.from_dict(_read_json(te_cfg_file), str(te_cfg_file)),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    te_files = _weight_files(
        path / "text_encoder", variant, allow_pickle, stem="model", pickle_name="pytorch_model.bin"
    )
    te_state, _ = _open_state(te_files, allow_pickle)
    te_params = torch_to_flax(
        canonical_torch_state(te_state),
        _abstract(te, text_example_inputs(te.config)),
        str(te_files[0]),
    )

    sched_file = _config_file(path / "scheduler", "scheduler_config.json")
    schedule = NoiseScheduleConfig.from_dict(_read_json(sched_file), str(sched_file))
    tok = _tokenizer(tokenizer or path / "tokenizer")
    return StableDiffusion(
        unet, unet_params, vae, vae_params, te, te_params, tok, schedule, str(path)
    )


def base_latent_factor(
    path: str | os.PathLike, config: str | Mapping | None = None, revision: str | None = None
) -> int:
    """Pixels per latent of the base model at `path`, from its configs alone (no weights):
    1 for a pipeline folder without a VAE (a pixel-space model), else its VAE's
    factor; a single checkpoint's from its named `config`; a bare UNet folder's is
    unknown, and SD's 8 is assumed (its VAE's). A Hub repo id's configs are fetched."""
    folder = resolve_path(path, "configs", revision=revision)
    if folder.is_file():  # one checkpoint: its configs are `config`'s, as load_pipeline reads
        if config is None:
            return 8
        vae = _component_configs(config, folder)["vae"]
        return AutoencoderKLConfig.from_dict(vae, f"{folder} vae config").latent_factor
    if not (folder / "model_index.json").is_file():
        return 8
    if _is_null(_read_json(folder / "model_index.json").get("vae", "missing")):
        return 1
    return _folder_vae_config(folder).latent_factor


def _folder_vae_config(folder: Path) -> AutoencoderKLConfig:
    """A pipeline folder's `vae/config.json`."""
    vae_cfg_file = _config_file(folder / "vae", CONFIG_NAME)
    return AutoencoderKLConfig.from_dict(_read_json(vae_cfg_file), str(vae_cfg_file))


def _is_null(entry: Any) -> bool:
    """A model_index.json component entry that is absent by design: [null, null]."""
    return isinstance(entry, list) and all(v is None for v in entry)


def save_pipeline(path: str | os.PathLike, sd: StableDiffusion, dtype=None) -> Path:
    """Write `sd` as a diffusers pipeline folder that `load_pipeline` reads back.

    `model_index.json`, `unet/`, `text_encoder/` (transformers names),
    `tokenizer/`, `scheduler/`, and `vae/` unless the model is pixel-space
    (`sd.vae is None`: the index lists `"vae": [null, null]`). Each component
    is written complete before the index, so a crash never leaves a folder
    that looks loadable.

    Args:
      path: the folder (created; existing component files are replaced).
      sd: the bundle (e.g. a base whose UNet was trained with
        `train.trainable: unet`); it needs a tokenizer.
      dtype: cast the weights (e.g. `np.float16`); default: as they are.
    """
    from cn_jax.weights.folders import _torch_state, _write_folder, save_unet
    from cn_jax.weights.safetensors_io import write_safetensors

    if sd.tokenizer is None:
        raise ValueError("save_pipeline: the bundle has no tokenizer to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_unet(path / "unet", sd.unet, sd.unet_params, dtype)
    if sd.vae is not None:
        _write_folder(path / "vae", sd.vae.config.to_dict(), _torch_state(sd.vae_params, dtype))
    te_dir = path / "text_encoder"
    te_dir.mkdir(exist_ok=True)
    write_safetensors(
        te_dir / "model.safetensors", _torch_state(sd.text_encoder_params, dtype),
        metadata={"format": "pt"},
    )  # fmt: skip
    write_json(te_dir / CONFIG_NAME, sd.text_encoder.config.to_dict())
    _save_tokenizer(sd.tokenizer, path / "tokenizer")
    (path / "scheduler").mkdir(exist_ok=True)
    write_json(path / "scheduler" / "scheduler_config.json", sd.schedule.to_dict())
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_COMPAT_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if sd.vae is not None else [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    write_json(path / "model_index.json", index)
    return path


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """`save_pretrained`, plus the slow tokenizer's vocab.json / merges.txt that
    transformers 5 no longer writes (older transformers and diffusers read them)."""
    import json

    tokenizer.save_pretrained(str(folder))
    fast = folder / "tokenizer.json"
    if (folder / "vocab.json").is_file() or not fast.is_file():
        return
    model = json.loads(fast.read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    write_json(folder / "vocab.json", model["vocab"])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _config_file(folder: Path, name: str) -> Path:
    f = folder / name
    if not f.is_file():
        raise WeightFileError(f"{folder}: missing {name}")
    return f


def _tokenizer(folder):
    from cn_jax.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def _component_configs(config, source: Path) -> dict[str, dict]:
    if config is None:
        raise ValueError(
            f"{source}: an original checkpoint carries no config: pass config='sd15' or 'sd21' "
            "(or a dict of component configs, or a diffusers pipeline folder)"
        )
    if isinstance(config, Mapping):
        missing = [k for k in ("unet", "vae", "text_encoder", "scheduler") if k not in config]
        if missing:
            raise ValueError(f"config dict lacks component config(s) {missing}")
        return dict(config)
    folder = resolve_path(config, "configs")  # a folder, or a Hub repo id's configs
    if not folder.is_dir():
        return preset(config)
    return {
        "unet": _read_json(_config_file(folder / "unet", CONFIG_NAME)),
        "vae": _read_json(_config_file(folder / "vae", CONFIG_NAME)),
        "text_encoder": _read_json(_config_file(folder / "text_encoder", CONFIG_NAME)),
        "scheduler": _read_json(_config_file(folder / "scheduler", "scheduler_config.json")),
    }


def _load_single_file(path, config, tokenizer, dtype, param_dtype, allow_pickle) -> StableDiffusion:
    cfgs = _component_configs(config, path)
    src = str(path)
    unet = UNet(UNetConfig.from_dict(cfgs["unet"], f"{src} unet config"), dtype, param_dtype)
    vae = AutoencoderKL(
        AutoencoderKLConfig.from_dict(cfgs["vae"], f"{src} vae config"), dtype, param_dtype
    )
    te = CLIPTextModel(
        CLIPTextConfig.from_dict(cfgs["text_encoder"], f"{src} text_encoder config"),
        dtype,
        param_dtype,
    )
    schedule = NoiseScheduleConfig.from_dict(cfgs["scheduler"], f"{src} scheduler config")

    state, _ = _open_state([path], allow_pickle)
    keys = list(state)
    try:
        plans = {
            "unet": original_sd.unet_sources(keys, unet.config.layers_per_block),
            "vae": original_sd.vae_sources(keys),
            "text_encoder": original_sd.clip_sources(keys, num_layers=te.config.num_hidden_layers),
        }
    except ValueError as e:
        raise WeightFileError(f"{src}: {e}") from None
    unexpected = original_sd.unexpected_keys(keys, *plans.values())
    if unexpected:
        shown = "\n    ".join(unexpected[:20])
        more = f"\n    ... and {len(unexpected) - 20} more" if len(unexpected) > 20 else ""
        raise WeightFileError(
            f"{src}: {len(unexpected)} unexpected keys in the checkpoint:\n    {shown}{more}"
        )
    unet_params = torch_to_flax(
        _Planned(state, plans["unet"]),
        _abstract(unet, unet_example_inputs(unet.config)),
        f"{src} (unet, model.diffusion_model.*)",
    )
    vae_params = torch_to_flax(
        _Planned(state, plans["vae"]),
        _abstract(vae, vae_example_inputs(vae.config)),
        f"{src} (vae, first_stage_model.*)",
    )
    te_params = torch_to_flax(
        _Planned(state, plans["text_encoder"]),
        _abstract(te, text_example_inputs(te.config)),
        f"{src} (text encoder, cond_stage_model.*)",
    )
    tok = None
    if tokenizer is not None:
        tok = _tokenizer(tokenizer)
    else:
        warnings.warn(
            f"{src}: an original checkpoint has no tokenizer; pass tokenizer=<a tokenizer/ "
            "folder> to encode prompts (bundle.tokenizer is None)",
            stacklevel=2,
        )
    return StableDiffusion(unet, unet_params, vae, vae_params, te, te_params, tok, schedule, src)


def random_pipeline(
    architecture: str,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> StableDiffusion:
    """A named architecture (`presets.PRESETS`) with random weights, no files needed.

    For benchmarks at real shapes (`sd15`, `sd21`) and for the embedded `tiny`
    model before it is trained. The tokenizer defaults to the bundled tiny one
    (its vocabulary matches `tiny`; for the others it only needs valid ids).
    """
    cfgs = preset(architecture)
    k_unet, k_vae, k_text = jax.random.split(jax.random.PRNGKey(seed), 3)
    unet = UNet(UNetConfig.from_dict(cfgs["unet"], architecture), dtype, param_dtype)
    unet_params = _init(unet, k_unet, unet_example_inputs(unet.config))
    vae = vae_params = None
    if cfgs["vae"] is not None:
        vae_cfg = AutoencoderKLConfig.from_dict(cfgs["vae"], architecture)
        vae = AutoencoderKL(vae_cfg, dtype, param_dtype)
        vae_params = _init(vae, k_vae, vae_example_inputs(vae.config))
    te_cfg = CLIPTextConfig.from_dict(cfgs["text_encoder"], architecture)
    te = CLIPTextModel(te_cfg, dtype, param_dtype)
    te_params = _init(te, k_text, text_example_inputs(te.config))
    schedule = NoiseScheduleConfig.from_dict(cfgs["scheduler"], architecture)
    tok = _tokenizer(tokenizer or BUNDLED_TOKENIZER)
    return StableDiffusion(
        unet, unet_params, vae, vae_params, te, te_params, tok, schedule, f"random:{architecture}"
    )


def _jitted_init(module):
    """One jitted init per architecture (linen modules compare and hash by their
    fields): a second random pipeline of the same architecture in this process
    (each `train` of a random base builds one) is neither traced nor compiled again.
    Traced with XLA's kernels whatever the module's: the values do not depend on
    them, and the program must lower on the host CPU where `_init` compiles it
    (cuDNN attention, chosen for a GPU, has no CPU lowering)."""
    if hasattr(module, "kernels"):
        module = module.clone(kernels=XLA_ONLY)
    return _jitted_init_of(module)


@functools.lru_cache(maxsize=4)
def _jitted_init_of(module):
    """Holds programs only, never weights; `jax.clear_caches()` empties them."""
    return jax.jit(module.init)


def _init(module, key, inputs) -> Any:
    """Random parameters: one jitted init (not op-by-op dispatch of every initializer).
    On an accelerator it is compiled and run on this process's host CPU, then put on
    its first local device: the accelerator's compiler is far slower for this one-off
    program (on an H200 with jax 0.11 small programs took minutes), and the values are
    the same (threefry is exact)."""
    init = _jitted_init(module)
    if jax.default_backend() == "cpu":
        return init(key, *inputs)["params"]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = init(key, *inputs)["params"]
    return jax.device_put(params, jax.local_devices()[0])
