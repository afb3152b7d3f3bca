"""Whole Stable Diffusion checkpoints -> the frozen components in Flax.

`load_pipeline(path)` reads either a diffusers pipeline folder
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`; SDXL also `text_encoder_2/`, `tokenizer_2/`) or one original
checkpoint (`model.diffusion_model.*`, `first_stage_model.*`, and
`cond_stage_model.*` or SDXL's `conditioner.embedders.{0,1}.*`) plus a named
config (`sd15`, `sd21`, `sdxl`) or a given one. Tensors stream from the
safetensors files one at a time straight into the Flax trees, so a load holds
about one copy of the weights.

The family is read from what the source holds: a `text_encoder_2` (in
`model_index.json`, or in the config of a single file) makes it SDXL, whose
UNet must then have SDXL's `text_time` embedding of the pooled text embedding
and six size numbers. SDXL's refiner (`requires_aesthetics_score`, no CLIP
ViT-L, five size numbers plus an aesthetic score) and other variants that do
not fit are refused by name.
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
from cn_jax.models.clip_text import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextWithProjectionConfig,
    SDXLTextEncoders,
    canonical_torch_state,
)
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
    SDXL_TIME_IDS,
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
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_TOKENIZER = _ASSETS / "tiny_tokenizer"
# SDXL's second tokenizer (OpenCLIP's) pads with "!" where CLIP ViT-L's pads with <|endoftext|>.
SDXL_PAD_TOKEN_2 = "!"
# Single-file keys of the SDXL refiner: its only text encoder is OpenCLIP bigG, as embedder 0.
_REFINER_TEXT_PREFIX = original_sd.SDXL_CLIP_PREFIX + original_sd.SD2_CLIP_ROOT
_SDXL_TEXT_PREFIX = "conditioner.embedders."


@dataclasses.dataclass
class StableDiffusion:
    """The frozen components of a Stable Diffusion model, each with its params.

    Attributes:
      unet, unet_params: the denoiser (SDXL: with the `text_time` added embedding).
      vae, vae_params: the autoencoder (`vae.config.scaling_factor` scales latents).
      text_encoder, text_encoder_params: SD 1.x/2.x: the CLIP text transformer
        (`CLIPTextModel`). SDXL: `SDXLTextEncoders`, both encoders as one module, its
        params `{"text_encoder": ..., "text_encoder_2": ...}` (diffusers' two folders).
      tokenizer: a `transformers.CLIPTokenizer` (SDXL: `tokenizer.TokenizerPair`, the
        second padding with "!"), or None when the source had none.
      schedule: the training noise schedule and prediction type.
      source: where it was loaded from.
      force_zeros_for_empty_prompt: SDXL's `model_index.json` flag (diffusers' default
        True): the unconditional embedding of an empty negative prompt is zeros, not
        the encoded "". Carried for the sampler; SD 1.x/2.x pipelines have no such flag.
    """

    unet: UNet
    unet_params: Any
    vae: AutoencoderKL | None  # None: a pixel-space model (latent factor 1)
    vae_params: Any
    text_encoder: CLIPTextModel | SDXLTextEncoders
    text_encoder_params: Any
    tokenizer: Any
    schedule: NoiseScheduleConfig
    source: str
    force_zeros_for_empty_prompt: bool = True

    @property
    def is_sdxl(self) -> bool:
        """Whether this is an SDXL model (two text encoders, the `text_time` embedding)."""
        return self.unet.config.has_text_time

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
      config: for a single file: a named config ("sd15", "sd21", "sdxl"), or a
        dict with the component configs ("unet", "vae", "text_encoder",
        "scheduler", and for SDXL "text_encoder_2"), or a diffusers pipeline
        folder (or Hub repo id) whose configs to use. Ignored for a folder.
      tokenizer: a `tokenizer/` folder (CLIP vocab.json + merges.txt), or a Hub
        repo id holding one, for a single file, which carries none. SDXL needs
        two: a pipeline folder (or repo id) with `tokenizer/` and
        `tokenizer_2/`, or a pair `(folder, folder_2)`. Default for a folder:
        its own.
      dtype: compute dtype of the returned modules.
      param_dtype: dtype the weights are cast to (float32 or bfloat16).
      variant: diffusers weight variant in a folder (e.g. "fp16").
      allow_pickle: accept pickle files (`torch.load(weights_only=True)`).
      revision: a Hub repo's branch, tag or commit (default: main).

    Returns:
      A `StableDiffusion` bundle.

    Raises:
      WeightFileError: a missing subfolder, file or key, or a mis-shaped tensor,
        named; an unsupported variant (SDXL's refiner), named.
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
    sdxl = _is_sdxl_index(index, path / "model_index.json")
    pixel_space = _is_null(index.get("vae", "missing"))
    for sub in SUBFOLDERS + (SDXL_SUBFOLDERS if sdxl else ()):
        optional = (sub.startswith("tokenizer") and tokenizer is not None) or (
            sub == "vae" and pixel_space
        )
        if not (path / sub).is_dir() and not optional:
            raise WeightFileError(f"{path}: missing subfolder {sub}/")
    # The family from the configs alone, before any weights are read.
    configs = {"text_encoder": _text_config(path / "text_encoder", CLIPTextConfig)}
    if sdxl:
        configs["text_encoder_2"] = _text_config(
            path / "text_encoder_2", CLIPTextWithProjectionConfig
        )
    te = _text_encoder(configs, dtype, param_dtype)
    unet_cfg_file = _config_file(path / "unet", CONFIG_NAME)
    _check_family(
        UNetConfig.from_dict(_read_json(unet_cfg_file), str(unet_cfg_file)), te, str(path)
    )
    unet, unet_params = load_unet(path / "unet", dtype, param_dtype, variant, allow_pickle)

    vae = vae_params = None
    if not pixel_space:
        vae = AutoencoderKL(_folder_vae_config(path), dtype=dtype, param_dtype=param_dtype)
        vae_files = _weight_files(path / "vae", variant, allow_pickle)
        vae_state, _ = _open_state(vae_files, allow_pickle)
        vae_params = torch_to_flax(
            _vae_state(vae_state), _abstract(vae, vae_example_inputs(vae.config)), str(vae_files[0])
        )

    abstract = _abstract(te, te.example_inputs())
    te_params = {}
    for name in configs:
        files = _weight_files(
            path / name, variant, allow_pickle, stem="model", pickle_name="pytorch_model.bin"
        )
        state, _ = _open_state(files, allow_pickle)
        target = abstract[name] if sdxl else abstract
        te_params[name] = torch_to_flax(canonical_torch_state(state), target, str(files[0]))
    te_params = te_params if sdxl else te_params["text_encoder"]

    sched_file = _config_file(path / "scheduler", "scheduler_config.json")
    schedule = NoiseScheduleConfig.from_dict(_read_json(sched_file), str(sched_file))
    tok = _load_tokenizers(tokenizer or path, sdxl, default_folder=tokenizer is None)
    force_zeros = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force_zeros, bool):
        raise WeightFileError(
            f"{path / 'model_index.json'}: force_zeros_for_empty_prompt={force_zeros!r} is not "
            "a boolean"
        )
    return StableDiffusion(
        unet, unet_params, vae, vae_params, te, te_params, tok, schedule, str(path), force_zeros
    )


def _text_config(folder: Path, cls) -> CLIPTextConfig:
    cfg_file = _config_file(folder, CONFIG_NAME)
    return cls.from_dict(_read_json(cfg_file), str(cfg_file))


def _text_encoder(configs: Mapping[str, CLIPTextConfig], dtype, param_dtype):
    """`CLIPTextModel` (SD 1.x/2.x), or `SDXLTextEncoders` when there is a `text_encoder_2`."""
    if "text_encoder_2" in configs:
        return SDXLTextEncoders(
            configs["text_encoder"], configs["text_encoder_2"], dtype, param_dtype
        )
    return CLIPTextModel(configs["text_encoder"], dtype, param_dtype)


def _text_encoder_of(cfgs: Mapping[str, Any], source: str, dtype, param_dtype):
    """The text encoder of a dict of component configs (`text_encoder`, and for SDXL
    `text_encoder_2`), each parsed strictly; errors name `source` and the component."""
    classes = {"text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextWithProjectionConfig}
    configs = {
        name: cls.from_dict(cfgs[name], f"{source} {name} config")
        for name, cls in classes.items()
        if name in cfgs
    }
    return _text_encoder(configs, dtype, param_dtype)


def _is_sdxl_index(index: Mapping[str, Any], where) -> bool:
    """Whether a `model_index.json` describes an SDXL base pipeline (it lists a
    `text_encoder_2`); the refiner and other SDXL variants cn_jax cannot run are refused."""
    name = index.get("_class_name", "a pipeline")
    te2 = index.get("text_encoder_2")
    if te2 is None or _is_null(te2):
        return False
    found = [
        *(["requires_aesthetics_score"] if index.get("requires_aesthetics_score") else []),
        *(["no CLIP ViT-L text_encoder"] if _is_null(index.get("text_encoder", "missing")) else []),
    ]
    if found:
        raise WeightFileError(
            f"{where}: an SDXL refiner ({name}: {', '.join(found)}; its UNet takes an "
            "aesthetic score): not supported, cn_jax runs the SDXL base "
            "(stabilityai/stable-diffusion-xl-base-1.0 layout)"
        )
    return True


def _check_family(unet_config: UNetConfig, te, source: str) -> None:
    """The UNet and the text encoders are one family: SD 1.x/2.x (one encoder, no added
    embedding) or the SDXL base (two encoders, the text_time embedding of the second's
    pooled output and six size numbers). The SDXL refiner's UNet (five size numbers and an
    aesthetic score: 2560 inputs) is refused by name."""
    sdxl = isinstance(te, SDXLTextEncoders)
    if unet_config.has_text_time and not sdxl:
        raise WeightFileError(
            f"{source}: the UNet has SDXL's text_time embedding, but there is no second text "
            "encoder (text_encoder_2): an SDXL pipeline without it (e.g. the refiner) is not "
            "supported"
        )
    if sdxl and not unet_config.has_text_time:
        raise WeightFileError(
            f"{source}: two text encoders but the UNet has no addition_embed_type 'text_time': "
            "not an SDXL base model"
        )
    if not sdxl:
        return
    pooled = te.config_2.projection_dim
    want = pooled + SDXL_TIME_IDS * unet_config.addition_time_embed_dim
    got = unet_config.projection_class_embeddings_input_dim
    if got != want:
        refiner = got == pooled + (SDXL_TIME_IDS - 1) * unet_config.addition_time_embed_dim
        what = (
            " (five size numbers and an aesthetic score: the SDXL refiner's UNet, not supported)"
            if refiner
            else ""
        )
        raise WeightFileError(
            f"{source}: unet projection_class_embeddings_input_dim={got}, but the SDXL base "
            f"takes the pooled embedding ({pooled}) and {SDXL_TIME_IDS} size numbers of "
            f"{unet_config.addition_time_embed_dim}: {want}{what}"
        )
    if unet_config.cross_attention_dims[0] != te.context_dim:
        raise WeightFileError(
            f"{source}: unet cross_attention_dim={unet_config.cross_attention_dims[0]}, but "
            f"the two text encoders give a context {te.context_dim} wide"
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
    (`sd.vae is None`: the index lists `"vae": [null, null]`). An SDXL bundle
    also gets `text_encoder_2/` (a `CLIPTextModelWithProjection`) and
    `tokenizer_2/`, and an index diffusers' `StableDiffusionXLPipeline` loads
    (with `force_zeros_for_empty_prompt`). Each component is written complete
    before the index, so a crash never leaves a folder that looks loadable.

    Args:
      path: the folder (created; existing component files are replaced).
      sd: the bundle (e.g. a base whose UNet was trained with
        `train.trainable: unet`); it needs a tokenizer.
      dtype: cast the weights (e.g. `np.float16`); default: as they are.
    """
    from cn_jax.weights.folders import _torch_state, _write_folder, save_unet

    if sd.tokenizer is None:
        raise ValueError("save_pipeline: the bundle has no tokenizer to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_unet(path / "unet", sd.unet, sd.unet_params, dtype)
    if sd.vae is not None:
        _write_folder(path / "vae", sd.vae.config.to_dict(), _torch_state(sd.vae_params, dtype))
    if sd.is_sdxl:
        te = sd.text_encoder
        encoders = {
            "text_encoder": (te.config, sd.text_encoder_params["text_encoder"]),
            "text_encoder_2": (te.config_2, sd.text_encoder_params["text_encoder_2"]),
        }
        tokenizers = {"tokenizer": sd.tokenizer.first, "tokenizer_2": sd.tokenizer.second}
    else:
        encoders = {"text_encoder": (sd.text_encoder.config, sd.text_encoder_params)}
        tokenizers = {"tokenizer": sd.tokenizer}
    for name, (config, params) in encoders.items():
        _save_text_encoder(path / name, config, params, dtype)
    for name, tok in tokenizers.items():
        _save_tokenizer(tok, path / name)
    (path / "scheduler").mkdir(exist_ok=True)
    write_json(path / "scheduler" / "scheduler_config.json", sd.schedule.to_dict())
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sd.is_sdxl else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_COMPAT_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if sd.vae is not None else [None, None],
        **{name: ["transformers", config.class_name] for name, (config, _) in encoders.items()},
        **{name: ["transformers", "CLIPTokenizer"] for name in tokenizers},
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if sd.is_sdxl:
        index |= {
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": sd.force_zeros_for_empty_prompt,
        }
    else:
        index |= {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    write_json(path / "model_index.json", index)
    return path


def _save_text_encoder(folder: Path, config: CLIPTextConfig, params, dtype) -> None:
    """A transformers model folder: `model.safetensors` (names with `text_model.`, as
    diffusers folders store them) and `config.json` naming the model's class."""
    from cn_jax.weights.folders import _torch_state
    from cn_jax.weights.safetensors_io import write_safetensors

    folder.mkdir(exist_ok=True)
    write_safetensors(
        folder / "model.safetensors", _torch_state(params, dtype), metadata={"format": "pt"}
    )
    write_json(folder / CONFIG_NAME, config.to_dict())


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


def _tokenizer_pair(first, second):
    from cn_jax.tokenizer import TokenizerPair

    return TokenizerPair(first, second)


def _load_tokenizers(spec, sdxl: bool, default_folder: bool = False):
    """The tokenizer (SDXL: the pair) from `spec`: a `tokenizer/` folder or Hub repo id;
    for SDXL a pipeline folder or repo id with `tokenizer/` and `tokenizer_2/`, or a pair
    of folders. `default_folder`: `spec` is the pipeline folder being loaded."""
    if not sdxl:
        if isinstance(spec, tuple | list):
            raise ValueError(f"tokenizer: one folder for a model with one text encoder, got {spec}")
        return _tokenizer(Path(spec) / "tokenizer" if default_folder else spec)
    if isinstance(spec, tuple | list):
        if len(spec) != 2:
            raise ValueError(f"tokenizer: SDXL takes two tokenizer folders, got {len(spec)}")
        return _tokenizer_pair(_tokenizer(spec[0]), _tokenizer(spec[1]))
    folder = resolve_path(spec, "tokenizer")
    if not (folder / "tokenizer_2").is_dir():
        raise WeightFileError(
            f"{spec}: SDXL needs two tokenizers: a pipeline folder (or Hub repo) with "
            "tokenizer/ and tokenizer_2/, or tokenizer=(folder, folder_2)"
        )
    return _tokenizer_pair(_tokenizer(folder / "tokenizer"), _tokenizer(folder / "tokenizer_2"))


def _component_configs(config, source: Path) -> dict[str, dict]:
    """The component configs of `config` (a named preset, a dict, or a pipeline folder /
    Hub repo id), with "text_encoder_2" for SDXL."""
    if config is None:
        raise ValueError(
            f"{source}: an original checkpoint carries no config: pass config='sd15', 'sd21' or "
            "'sdxl' (or a dict of component configs, or a diffusers pipeline folder)"
        )
    if isinstance(config, Mapping):
        needed = ["unet", "vae", "text_encoder", "scheduler"]
        unet = config.get("unet")
        if isinstance(unet, Mapping) and unet.get("addition_embed_type") == "text_time":
            needed.append("text_encoder_2")  # SDXL
        missing = [k for k in needed if k not in config]
        if missing:
            raise ValueError(f"config dict lacks component config(s) {missing}")
        return dict(config)
    folder = resolve_path(config, "configs")  # a folder, or a Hub repo id's configs
    if not folder.is_dir():
        return preset(config)
    index = folder / "model_index.json"
    sdxl = index.is_file() and _is_sdxl_index(_read_json(index), index)
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if sdxl else ())
    configs = {name: _read_json(_config_file(folder / name, CONFIG_NAME)) for name in names}
    configs["scheduler"] = _read_json(_config_file(folder / "scheduler", "scheduler_config.json"))
    return configs


def _load_single_file(path, config, tokenizer, dtype, param_dtype, allow_pickle) -> StableDiffusion:
    src = str(path)
    state, _ = _open_state([path], allow_pickle)
    keys = list(state)
    if any(k.startswith(_REFINER_TEXT_PREFIX) for k in keys):
        raise WeightFileError(
            f"{src}: an SDXL refiner checkpoint (its only text encoder, OpenCLIP bigG, under "
            f"{_REFINER_TEXT_PREFIX!r}): not supported, cn_jax runs the SDXL base"
        )
    cfgs = _component_configs(config, path)
    sdxl = "text_encoder_2" in cfgs
    if not sdxl and any(k.startswith(_SDXL_TEXT_PREFIX) for k in keys):
        raise WeightFileError(
            f"{src}: an SDXL checkpoint ({_SDXL_TEXT_PREFIX}*) read with a config that has one "
            "text encoder: pass config='sdxl' (or an SDXL pipeline folder)"
        )
    unet = UNet(UNetConfig.from_dict(cfgs["unet"], f"{src} unet config"), dtype, param_dtype)
    vae = AutoencoderKL(
        AutoencoderKLConfig.from_dict(cfgs["vae"], f"{src} vae config"), dtype, param_dtype
    )
    te = _text_encoder_of(cfgs, src, dtype, param_dtype)
    _check_family(unet.config, te, f"{src} config")
    schedule = NoiseScheduleConfig.from_dict(cfgs["scheduler"], f"{src} scheduler config")

    try:
        plans = {
            "unet": original_sd.unet_sources(keys, unet.config.layers_per_block),
            "vae": original_sd.vae_sources(keys),
        }
        if sdxl:
            plans |= original_sd.sdxl_text_sources(
                keys,
                num_layers=te.config.num_hidden_layers,
                num_layers_2=te.config_2.num_hidden_layers,
            )
        else:
            n = te.config.num_hidden_layers
            plans["text_encoder"] = original_sd.clip_sources(keys, num_layers=n)
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
    abstract = _abstract(te, te.example_inputs())
    if sdxl:
        where = {
            "text_encoder": original_sd.SDXL_CLIP_PREFIX,
            "text_encoder_2": original_sd.SDXL_OPEN_CLIP_PREFIX,
        }
        te_params = {
            name: torch_to_flax(
                _Planned(state, plans[name]), abstract[name], f"{src} ({name}, {where[name]}*)"
            )
            for name in where
        }
    else:
        te_params = torch_to_flax(
            _Planned(state, plans["text_encoder"]),
            abstract,
            f"{src} (text encoder, cond_stage_model.*)",
        )
    tok = None
    if tokenizer is not None:
        tok = _load_tokenizers(tokenizer, sdxl)
    else:
        two = " (SDXL: a pipeline folder with tokenizer/ and tokenizer_2/)" if sdxl else ""
        warnings.warn(
            f"{src}: an original checkpoint has no tokenizer; pass tokenizer=<a tokenizer/ "
            f"folder>{two} to encode prompts (bundle.tokenizer is None)",
            stacklevel=2,
        )
    return StableDiffusion(unet, unet_params, vae, vae_params, te, te_params, tok, schedule, src)


def random_pipeline(
    architecture: str,
    seed: int = 0,
    tokenizer: str | os.PathLike | tuple | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> StableDiffusion:
    """A named architecture (`presets.PRESETS`) with random weights, no files needed.

    For benchmarks at real shapes (`sd15`, `sd21`, `sdxl`), for tests (`sdxl-tiny`) and
    for the embedded `tiny` model before it is trained. The tokenizer defaults to the
    bundled tiny one (its vocabulary matches `tiny` and `sdxl-tiny`; for the others it
    only needs valid ids); SDXL gets it twice, the second padding with "!" as SDXL's
    `tokenizer_2` does (`tokenizer`: a pipeline folder with both, or a pair of folders).
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
    sdxl = "text_encoder_2" in cfgs
    te = _text_encoder_of(cfgs, architecture, dtype, param_dtype)
    _check_family(unet.config, te, f"preset {architecture!r}")
    te_params = _init(te, k_text, te.example_inputs())
    schedule = NoiseScheduleConfig.from_dict(cfgs["scheduler"], architecture)
    if tokenizer is not None:
        tok = _load_tokenizers(tokenizer, sdxl)
    elif sdxl:
        second = _tokenizer(BUNDLED_TOKENIZER)
        second.pad_token = SDXL_PAD_TOKEN_2
        tok = _tokenizer_pair(_tokenizer(BUNDLED_TOKENIZER), second)
    else:
        tok = _tokenizer(BUNDLED_TOKENIZER)
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
