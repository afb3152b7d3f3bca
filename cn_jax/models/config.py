"""Model configs: frozen dataclasses mirroring diffusers' `config.json` fields.

A config read from a file is validated strictly: a field cn_jax does not know
is an error, and so is a known diffusers field set to a value outside Stable
Diffusion 1.x/2.x/XL (e.g. `addition_embed_type: "text"` or `class_embed_type`), instead
of silently building a different model than the file describes. SDXL's
`addition_embed_type: "text_time"` (six size numbers and the pooled text embedding added
to the timestep embedding) is supported.

Every field is also checked against its annotation and its range (`check_fields`, shared by
the VAE, CLIP text and noise-schedule configs): `in_channels: "x"` or `true` is refused by
name and type, a float must be finite (`norm_eps: NaN` is refused), and sizes must lie in
sane bounds, so `block_out_channels: [1000000000]` is a one-line error naming the field
instead of an allocation of petabytes. The upper bounds (`MAX_CHANNELS`, `MAX_LAYERS`,
`MAX_SAMPLE_SIZE`) are far above any released model and far below what would exhaust memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

MAX_CHANNELS = 65536  # widths (channels, hidden sizes, heads): SD's widest is 1280
MAX_LAYERS = 256  # layers per block / transformer depth: SD's deepest is 23 (OpenCLIP)
MAX_SAMPLE_SIZE = 16384  # a side in pixels or latents

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text_time")

# diffusers fields that exist for other model families. Accepted only at these
# values (the ones SD 1.x/2.x files carry); anything else is refused by name.
_FIXED_FIELDS: dict[str, tuple[Any, ...]] = {
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None,),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu",),
    "dropout": (0.0,),
}
# Informational fields written by diffusers/other tools, ignored on read.
_IGNORED_FIELDS = ("addition_embed_type_num_heads",)


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def strict_config(
    cls,
    data: Mapping[str, Any],
    source: str,
    fixed: Mapping[str, tuple[Any, ...]] = {},  # noqa: B006 (read-only)
    ignored: Iterable[str] = (),
):
    """Build the dataclass `cls` from a config.json dict, refusing what it can't honour.

    Keys starting with "_" and `ignored` ones are skipped; `fixed` fields (those
    of other model families) must hold one of their allowed values; any other
    unknown key is an error. Every error names `source` and the field.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in data.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in names:
            kwargs[key] = value
        elif key in fixed:
            if _tuple(value) not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                raise ValueError(
                    f"{source}: field {key}={value!r} is not supported by cn_jax's "
                    f"{cls.__name__} (expected {allowed})"
                )
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) for {cls.__name__}: {sorted(unknown)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# -- field checks ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bound:
    """An interval a number (or each entry of a tuple of numbers) must lie in."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def __str__(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else ""
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else ""
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


POSITIVE = Bound(gt=0)  # a finite number > 0 (epsilons, scales)
CHANNELS = Bound(ge=1, le=MAX_CHANNELS)
LAYERS = Bound(ge=1, le=MAX_LAYERS)
SAMPLE_SIZE = Bound(ge=1, le=MAX_SAMPLE_SIZE)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the annotated type (bool is not a number; an int is a float)."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(origin or hint, type):
        return isinstance(value, origin or hint)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


def _value_type(value: Any) -> str:
    """``float``, or ``tuple of float, int`` for a tuple: what a type error reports."""
    if isinstance(value, tuple) and value:
        return "tuple of " + ", ".join(sorted({type(v).__name__ for v in value}))
    return type(value).__name__


def check_fields(
    config: Any,
    bounds: Mapping[str, Bound] = {},
    what: str = "config field",  # noqa: B006
) -> None:
    """Check every dataclass field of `config` against its annotation and `bounds`.

    Types: the value must have the annotated type (lists already turned into tuples); a bool is
    not accepted for a number, an int is for a float. Every float, alone or in a tuple, must be
    finite. A field in `bounds` (or each number of its tuple) must lie in its `Bound`; None
    passes where the annotation allows it.

    Raises:
      ValueError: one line, ``config field norm_eps=nan: must be a finite number``.
    """
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints.get(f.name, Any)
        if not _matches(value, hint):
            raise ValueError(
                f"{what} {f.name}={value!r}: expected {_type_name(hint)}, got {_value_type(value)}"
            )
        numbers_ = [v for v in (value if isinstance(value, tuple) else (value,))]
        numbers_ = [v for v in numbers_ if isinstance(v, numbers.Real) and not isinstance(v, bool)]
        for v in numbers_:
            if not math.isfinite(v):
                raise ValueError(f"{what} {f.name}={value!r}: must be a finite number")
        bound = bounds.get(f.name)
        if bound is not None:
            for v in numbers_:
                if not bound.holds(v):
                    entry = f" (entry {v!r})" if isinstance(value, tuple) else ""
                    raise ValueError(f"{what} {f.name}={value!r}: must be {bound}{entry}")


def config_to_dict(config, class_name: str) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples as lists), `_class_name` first."""
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _per_block(value: Any, n: int, field: str) -> tuple:
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"config field {field}={value!r} must have one entry per block ({n})")
        return value
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Fields shared by the UNet and the ControlNet (the part the ControlNet copies)."""

    class_name: ClassVar[str] = ""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical misnomer: without num_attention_heads this is the
    # number of heads (SD 1.5: 8 heads; SD 2: (5, 10, 20, 20) heads of 64).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # SDXL files write null: False
    # SDXL: "text_time" adds an embedding of the pooled text embedding and the six size
    # numbers (`time_ids`), each as `addition_time_embed_dim` sinusoidal features, projected
    # from `projection_class_embeddings_input_dim` to the timestep embedding's width.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    # The range of every numeric field (`check_fields`); subclasses extend it.
    bounds: ClassVar[Mapping[str, Bound]] = {
        "in_channels": CHANNELS,
        "freq_shift": Bound(ge=0),  # and < block_out_channels[0] // 2, checked below
        "block_out_channels": CHANNELS,
        "layers_per_block": LAYERS,
        "downsample_padding": Bound(ge=0, le=1),  # 1, or diffusers' hand padding for 0
        "mid_block_scale_factor": POSITIVE,
        "norm_num_groups": CHANNELS,
        "norm_eps": POSITIVE,
        "cross_attention_dim": CHANNELS,
        "transformer_layers_per_block": LAYERS,
        "attention_head_dim": CHANNELS,
        "num_attention_heads": CHANNELS,
        "addition_time_embed_dim": Bound(ge=2, le=MAX_CHANNELS),
        "projection_class_embeddings_input_dim": CHANNELS,
    }

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        check_fields(self, self.bounds)
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("config field block_out_channels must not be empty")
        half = self.block_out_channels[0] // 2  # the timestep embedding's frequencies
        if self.freq_shift >= half:
            raise ValueError(
                f"config field freq_shift={self.freq_shift}: must be < block_out_channels[0] // 2"
                f" = {half} (the timestep embedding divides by their difference)"
            )
        if len(self.down_block_types) != n:
            raise ValueError(
                f"config: down_block_types has {len(self.down_block_types)} entries but "
                f"block_out_channels has {n}"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"config field down_block_types: unsupported {t!r}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"config field mid_block_type: unsupported {self.mid_block_type!r}")
        if not isinstance(self.layers_per_block, int):
            raise ValueError("config field layers_per_block: only an int is supported")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"config: block_out_channels {c} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )
        for heads, c in zip(self.heads_per_block, self.block_out_channels, strict=True):
            if c % heads:
                raise ValueError(f"config: {c} channels not divisible by {heads} attention heads")
        if len(set(self.cross_attention_dims)) != 1:
            # One text context feeds every block, so the widths must agree.
            raise ValueError(
                f"config field cross_attention_dim={self.cross_attention_dim!r}: per-block values "
                "must all be equal (one text encoder feeds every block)"
            )
        _ = (self.transformer_layers, self.only_cross_per_block)  # validate per-block lengths
        if self.upcast_attention is None:
            object.__setattr__(self, "upcast_attention", False)
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            allowed = " or ".join(repr(v) for v in ADDITION_EMBED_TYPES)
            raise ValueError(
                f"config field addition_embed_type={self.addition_embed_type!r} is not supported "
                f"by cn_jax (expected {allowed})"
            )
        extra = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if self.has_text_time:
            missing = [f for f in extra if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"config: addition_embed_type='text_time' needs {' and '.join(missing)}"
                )
            if self.addition_time_embed_dim % 2:
                raise ValueError(
                    f"config field addition_time_embed_dim={self.addition_time_embed_dim}: must "
                    "be even (sin and cos features)"
                )
        else:
            for f in extra:
                if getattr(self, f) is not None:
                    raise ValueError(
                        f"config field {f}={getattr(self, f)!r} is set but addition_embed_type "
                        "is not 'text_time' (cn_jax supports it only with SDXL's text_time)"
                    )

    @property
    def has_text_time(self) -> bool:
        """SDXL's added conditioning: pooled text embedding + size numbers (`time_ids`)."""
        return self.addition_embed_type == "text_time"

    # -- per-block views of the int-or-tuple fields -------------------------
    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        field = "num_attention_heads" if self.num_attention_heads else "attention_head_dim"
        return _per_block(heads, len(self.block_out_channels), field)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(
            self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim"
        )

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(
            self.transformer_layers_per_block,
            len(self.block_out_channels),
            "transformer_layers_per_block",
        )

    @property
    def only_cross_per_block(self) -> tuple[bool, ...]:
        return _per_block(
            self.only_cross_attention, len(self.block_out_channels), "only_cross_attention"
        )

    @property
    def num_down_residuals(self) -> int:
        """Skip connections the encoder produces: conv_in + each layer + each downsampler."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1)

    # -- (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> EncoderConfig:
        """Build from a diffusers `config.json` dict; refuse unknown or unsupported fields.

        Args:
          data: the parsed JSON.
          source: where it came from, for error messages (e.g. the file path).
        """
        return strict_config(cls, data, source, _FIXED_FIELDS, _IGNORED_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible `config.json` dict."""
        return config_to_dict(self, self.class_name)

    def replace(self, **changes) -> EncoderConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class UNetConfig(EncoderConfig):
    """diffusers `UNet2DConditionModel` config (SD 1.x / 2.x subset)."""

    class_name: ClassVar[str] = "UNet2DConditionModel"

    sample_size: int | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )

    bounds: ClassVar[Mapping[str, Bound]] = {
        **EncoderConfig.bounds,
        "sample_size": SAMPLE_SIZE,
        "out_channels": CHANNELS,
    }

    def __post_init__(self):
        super().__post_init__()
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("config: up_block_types must have one entry per block")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"config field up_block_types: unsupported {t!r}")


CONDITIONING_EMBEDDING_TYPES = ("released", "paper")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(EncoderConfig):
    """diffusers `ControlNetModel` config plus cn_jax's condition-encoder variant.

    `conditioning_embedding_type`:
      - "released": lllyasviel's/diffusers' encoder (3x3 convs + SiLU, widths
        `conditioning_embedding_out_channels`, a stride-2 conv between widths,
        zero-initialised 3x3 `conv_out`). Weight-compatible with their files.
      - "paper": the paper's text: four 4x4 convs with ReLU, widths
        `conditioning_embedding_out_channels` (default 16/32/64/128), Gaussian
        init, stride 2 on the first log2(`conditioning_latent_factor`) of them,
        then a 1x1 zero conv to the first block's width (Z(c; theta_z1)).
    """

    class_name: ClassVar[str] = "ControlNetModel"

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"  # or "bgr" (flip channels first)
    conditioning_embedding_out_channels: tuple[int, ...] | None = None  # None: variant default
    global_pool_conditions: bool = False  # shuffle-style nets: residuals averaged over H, W
    conditioning_embedding_type: str = "released"
    conditioning_latent_factor: int | None = None  # paper variant only; None: 8

    bounds: ClassVar[Mapping[str, Bound]] = {
        **EncoderConfig.bounds,
        "conditioning_channels": CHANNELS,
        "conditioning_embedding_out_channels": CHANNELS,
        "conditioning_latent_factor": Bound(ge=1, le=MAX_SAMPLE_SIZE),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.conditioning_embedding_type not in CONDITIONING_EMBEDDING_TYPES:
            raise ValueError(
                f"config field conditioning_embedding_type={self.conditioning_embedding_type!r} "
                f"must be one of {CONDITIONING_EMBEDDING_TYPES}"
            )
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                "config field controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                f"{self.controlnet_conditioning_channel_order!r}"
            )
        if self.conditioning_embedding_out_channels is None:
            default = (16, 32, 96, 256) if self.is_released else (16, 32, 64, 128)
            object.__setattr__(self, "conditioning_embedding_out_channels", default)
        if not self.conditioning_embedding_out_channels:
            raise ValueError("config field conditioning_embedding_out_channels must not be empty")
        if self.is_released and self.conditioning_latent_factor not in (None, self.latent_factor):
            raise ValueError(
                f"config: conditioning_latent_factor={self.conditioning_latent_factor} but the "
                f"released encoder with {len(self.conditioning_embedding_out_channels)} widths "
                f"downsamples by {self.latent_factor}"
            )
        if not self.is_released:
            f = self.latent_factor
            if f & (f - 1) or f > 2 ** len(self.conditioning_embedding_out_channels):
                raise ValueError(
                    f"config: conditioning_latent_factor={f} must be a power of two at most "
                    f"2**{len(self.conditioning_embedding_out_channels)}"
                )

    @property
    def is_released(self) -> bool:
        return self.conditioning_embedding_type == "released"

    @property
    def latent_factor(self) -> int:
        """Pixel size of the condition / size of the latent."""
        if self.is_released:
            return 2 ** (len(self.conditioning_embedding_out_channels) - 1)
        return self.conditioning_latent_factor or 8

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.is_released:
            # Keep files written for the released encoder loadable by diffusers,
            # whose ControlNetModel does not know cn_jax's extra fields.
            out.pop("conditioning_embedding_type")
            out.pop("conditioning_latent_factor")
        return out

    @classmethod
    def from_unet(
        cls,
        unet_config: EncoderConfig,
        conditioning_channels: int = 3,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = None,
        conditioning_embedding_type: str = "released",
        conditioning_latent_factor: int | None = None,
        global_pool_conditions: bool = False,
        latent_factor: int | None = None,
    ) -> ControlNetConfig:
        """A ControlNet config whose encoder copies `unet_config` (diffusers' `from_unet`).

        `latent_factor`: the base's pixels per latent (its VAE's; 1 in pixel space).
        Given, the condition encoder is built to downsample by exactly that much (the
        released encoder's widths (16, 32, 96, 256) cut to log2(factor) + 1, the
        paper's `conditioning_latent_factor`), or a ValueError says why it cannot.
        """
        if latent_factor is not None:
            if conditioning_embedding_type == "released":
                n = latent_factor.bit_length()  # log2(factor) + 1 for a power of two
                if conditioning_embedding_out_channels is None and 1 <= n <= 4:
                    conditioning_embedding_out_channels = (16, 32, 96, 256)[:n]
            elif conditioning_latent_factor is None:
                conditioning_latent_factor = latent_factor
        shared = {f.name: getattr(unet_config, f.name) for f in dataclasses.fields(EncoderConfig)}
        config = cls(
            **shared,
            conditioning_channels=conditioning_channels,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            conditioning_embedding_type=conditioning_embedding_type,
            conditioning_latent_factor=conditioning_latent_factor,
            global_pool_conditions=global_pool_conditions,
        )
        if latent_factor is not None and config.latent_factor != latent_factor:
            raise ValueError(
                f"the {conditioning_embedding_type} condition encoder downsamples by "
                f"{config.latent_factor}, the base model's latents are {latent_factor} pixels "
                "apart (a power of two up to 8 for the released encoder; the paper's takes any "
                "power of two its widths allow)"
            )
        return config
