"""Run configuration: YAML files validated into typed models.

Every section forbids unknown keys, so a typo (`train.learnig_rate`) is an
error naming the key and the file instead of a silently ignored setting.
Command-line overrides use `section.key=value` with YAML scalars
(`train.learning_rate=2e-4`, `data.random_flip=true`, `model.base=null`).

Every number has its valid range in the model: floats must be finite (NaN and infinity are
refused everywhere), and each field carries the bounds under which training means what it
says (a negative `train.max_grad_norm` would flip the gradient's sign; `adam_beta2=1` divides
by zero; a seed above 2**32 - 1 collides with a smaller one in `jax.random.PRNGKey`, which
keeps only 32 bits without x64). An error names `section.key`, the value and the bound.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Trainable = Literal["controlnet", "controlnet+decoder", "unet"]

MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: PRNGKey(2**32) == PRNGKey(0)
MAX_STEPS = 2**31 - 1  # the step counter is an int32 on device
MAX_RESOLUTION = 16384  # pixels per side; 4x SDXL's largest bucket
MAX_CHANNELS = 65536  # as cn_jax.models.config: a bound on absurd widths, not a model limit


class _Section(BaseModel):
    # allow_inf_nan=False: every float field refuses NaN and +-inf, from YAML (.nan, .inf)
    # or an override (train.learning_rate=inf) alike.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic's lax mode reads true as 1: `train.batch_size=true` is a typo, not a size.
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            accepted = set(typing.get_args(annotation)) or {annotation}
            if bool not in accepted and accepted & {int, float}:
                raise ValueError("expected a number, got a boolean")
        return value


class ModelConfig(_Section):
    """What is trained on top of what."""

    # A diffusers pipeline folder, one original checkpoint, or "bundled:tiny"
    # (the trained 32 px demo base shipped in the package). None: random
    # weights of `architecture` (benchmarks, tests). Every model path here may also be a
    # Hugging Face Hub repo id, "org/name" (or "org/name/file.safetensors" for one file),
    # fetched into the Hugging Face cache (HF_HUB_OFFLINE=1: the cache only); a local path
    # that exists wins.
    base: str | None = None
    revision: str | None = None  # Hub branch, tag or commit of `base`; None: main
    # Weight variant of `base`, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors; a
    # component without it: its plain weights); None: the plain weights, else the fp16 ones.
    variant: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    base_config: str | None = None  # named config of a single-file base: sd15 | sd21 | sdxl
    architecture: str = "tiny"  # for random bases: tiny | sd15 | sd21 | sdxl | sdxl-tiny
    tokenizer: str | None = None  # tokenizer folder; default: the base's (or bundled tiny one)
    controlnet: str | None = None  # continue from this ControlNet; None: copy of the base UNet
    controlnet_revision: str | None = None  # Hub branch, tag or commit of `controlnet`
    conditioning_channels: int = Field(3, ge=1, le=MAX_CHANNELS)
    conditioning_embedding: Literal["released", "paper"] = "released"
    conditioning_channel_order: Literal["rgb", "bgr"] = "rgb"
    # scheduler_config.json fields that replace the base's, e.g. {prediction_type:
    # v_prediction, rescale_betas_zero_snr: true, timestep_spacing: trailing} to train a
    # base from scratch with zero terminal SNR. The export writes the result.
    scheduler: dict[str, Any] | None = None
    # Attention kernel (cn_jax.kernels.attention): auto = cuDNN flash attention on GPU in
    # bfloat16/float16 where the head size allows, Pallas flash attention on TPU where its
    # tiles fit, our cache-tiled kernel on CPU, XLA elsewhere; xla | cudnn | tiled | pallas
    # force one.
    attention: Literal["auto", "xla", "cudnn", "tiled", "pallas"] = "auto"
    # Convolution kernel (cn_jax.kernels.convolution): auto = XLA's on accelerators; on CPU
    # one matrix product over the gathered taps (im2col) for 1x1 convolutions and small
    # images, XLA's above; xla | im2col force one.
    convolution: Literal["auto", "xla", "im2col"] = "auto"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler_fields(cls, value):
        if value:
            from cn_jax.diffusion.schedule import NoiseScheduleConfig

            NoiseScheduleConfig.from_dict(value, "model.scheduler")
        return value


class TrainConfig(_Section):
    """The optimisation."""

    max_steps: int = Field(1000, ge=0, le=MAX_STEPS)
    batch_size: int = Field(8, ge=1)  # global batch per optimizer step, all devices
    grad_accum: int = Field(1, ge=1)  # micro-batches per step (batch_size / grad_accum each)
    learning_rate: float = Field(1e-5, gt=0)  # the original ControlNet's
    decoder_learning_rate: float | None = Field(None, gt=0)  # controlnet+decoder: decoder lr
    lr_schedule: Literal["constant", "warmup_constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # 1 divides by 1 - beta2**t = 0
    adam_eps: float = Field(1e-8, gt=0)  # 0: a zero gradient (frozen at init) gives 0/0
    weight_decay: float = Field(1e-2, ge=0)
    # Global-norm clipping; None: off. A norm <= 0 would scale by a negative or infinite factor.
    max_grad_norm: float | None = Field(1.0, gt=0)
    trainable: Trainable = "controlnet"
    precision: Literal["float32", "bfloat16"] = "float32"  # compute; master weights float32
    remat: bool = False  # recompute block activations in the backward pass
    ema_decay: float | None = Field(None, ge=0, le=1)  # e.g. 0.9999; None: no EMA
    seed: int = Field(0, ge=0, le=MAX_SEED)  # numpy's SeedSequence refuses negative seeds
    checkpoint_every: int = Field(1000, ge=1)
    max_to_keep: int | None = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    validate_every: int | None = Field(None, ge=1)  # steps; None: never
    validation_samples: int = Field(4, ge=1)
    validation_steps: int = Field(20, ge=1)  # sampler steps per validation image

    @model_validator(mode="after")
    def _accum_divides(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"train.grad_accum={self.grad_accum}"
            )
        return self


class DataConfig(_Section):
    """The dataset and the host input pipeline."""

    path: str | None = None
    format: Literal["auto", "fill50k", "imagefolder", "disk", "parquet"] = "auto"
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    resolution: int = Field(512, ge=8, le=MAX_RESOLUTION)
    proportion_empty_prompts: float = Field(0.5, ge=0.0, le=1.0)  # the paper's 50%
    random_crop: bool = False
    random_flip: bool = False
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = Field(2, ge=1)
    prefetch: int = Field(2, ge=1)
    cache_latents: bool = False


class EvalConfig(_Section):
    """Control adherence on a fixed held-out fill50k set (cn_jax.eval), during training."""

    every: int | None = Field(None, ge=1)  # steps; also at step 0 and the last step. None: off
    samples: int = Field(32, ge=1)  # held-out conditions, sampled with a fixed noise
    sampler: str = "ddim"
    sampler_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)  # of the initial noise


class MeshConfig(_Section):
    """Device mesh ("data", "fsdp"): the batch is split over both axes."""

    fsdp: int = Field(1, ge=1)  # devices sharing each parameter; 1: replicated params


class Config(_Section):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


def _set(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.learning_rate=2e-4", ...]` -> [("train.learning_rate", 0.0002), ...]."""
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate.

    Raises:
      ConfigError: naming the file (or "override") and each offending key.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set(data, key, value, "override")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        if len(problems) == 1:
            raise ConfigError(f"{source}: invalid config: {problems[0]}") from None
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def _problem(err: dict) -> str:
    """One pydantic error as one line: ``train.adam_beta1=2.0: Input should be less than 1``."""
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    value, msg = err.get("input"), err["msg"]
    if err["type"] == "value_error":  # our validators: the message names what is wrong
        msg = msg.removeprefix("Value error, ")
        if msg.startswith(loc + ":"):
            return msg
    if isinstance(value, dict | list):
        return f"{loc}: {msg}"  # a whole section (the value is not one number)
    return f"{loc}={value!r}: {msg}"


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
