"""The Stable Diffusion 1.x/2.x VAE (diffusers `AutoencoderKL` semantics), NHWC.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels
and `config.latent_factor` (8 for SD) times smaller sides.

As in diffusers, `encode` / `decode` work on *unscaled* latents: a caller
multiplies `sample_latents(...)` (or the posterior mean) by
`config.scaling_factor` before handing latents to the UNet, and divides by it
before `decode`.

Module names are diffusers' attribute names with list indices joined by `_`
(`encoder.down_blocks.0.resnets.1.conv1.weight` <->
`encoder/down_blocks_0/resnets_1/conv1/kernel`), so `cn_jax.weights.keymap`
converts weights with no extra table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.kernels import DEFAULT, Kernels
from cn_jax.models.config import (
    CHANNELS,
    LAYERS,
    POSITIVE,
    SAMPLE_SIZE,
    Bound,
    _tuple,
    check_fields,
    config_to_dict,
    strict_config,
)
from cn_jax.models.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
    torch_like_kernel_init,
)

VAE_DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
VAE_UP_BLOCK_TYPES = ("UpDecoderBlock2D",)

# diffusers hard-codes this epsilon for every norm of the VAE (resnets, the
# mid-block attention and conv_norm_out); it is not a config field.
VAE_NORM_EPS = 1e-6

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Fields that exist for other model families (SD3 / Flux / SDXL-style latent
# normalisation). Accepted only at these values; anything else is refused.
_FIXED_FIELDS: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config (the SD 1.x / 2.x subset).

    Defaults are diffusers' constructor defaults (a one-block toy VAE); a
    real SD VAE has block_out_channels (128, 256, 512, 512), four blocks of
    each type, layers_per_block 2.

    `scaling_factor`, `force_upcast` and `sample_size` do not change the
    network: they are carried for the callers (latent scaling, precision
    policy, default resolution) and written back by `to_dict`.
    """

    class_name: ClassVar[str] = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # The range of every numeric field (`check_fields`); the latent-normalisation fields of
    # other families are fixed below.
    bounds: ClassVar[Mapping[str, Bound]] = {
        "in_channels": CHANNELS,
        "out_channels": CHANNELS,
        "block_out_channels": CHANNELS,
        "layers_per_block": LAYERS,
        "latent_channels": CHANNELS,
        "norm_num_groups": CHANNELS,
        "sample_size": SAMPLE_SIZE,
        "scaling_factor": POSITIVE,
    }

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        check_fields(self, self.bounds)
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("config field block_out_channels must not be empty")
        for field, allowed in (
            ("down_block_types", VAE_DOWN_BLOCK_TYPES),
            ("up_block_types", VAE_UP_BLOCK_TYPES),
        ):
            types = getattr(self, field)
            if len(types) != n:
                raise ValueError(
                    f"config: {field} has {len(types)} entries but block_out_channels has {n}"
                )
            for t in types:
                if t not in allowed:
                    raise ValueError(
                        f"config field {field}: unsupported {t!r} (cn_jax supports {allowed})"
                    )
        for key, want in _FIXED_FIELDS.items():
            if getattr(self, key) != want:
                raise ValueError(
                    f"config field {key}={getattr(self, key)!r} is not supported by cn_jax "
                    f"(Stable Diffusion 1.x/2.x VAEs need {want!r})"
                )
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(
                f"config field layers_per_block={self.layers_per_block!r} must be an int >= 1"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"config: block_out_channels {c} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )

    @property
    def latent_factor(self) -> int:
        """Image side / latent side (one stride-2 downsampler between blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # -- (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> AutoencoderKLConfig:
        """Build from a diffusers `config.json` dict; refuse unknown or unsupported fields.

        Args:
          data: the parsed JSON (keys starting with "_" are ignored).
          source: where it came from, for error messages (e.g. the file path).

        Raises:
          ValueError: naming every unknown field, or the field whose value
            cn_jax does not support.
        """
        # The other-family fields are dataclass fields here, checked in __post_init__.
        return strict_config(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible `config.json` dict."""
        return config_to_dict(self, self.class_name)

    def replace(self, **changes) -> AutoencoderKLConfig:
        return dataclasses.replace(self, **changes)


# -- modules -------------------------------------------------------------------


class AttentionBlock(nn.Module):
    """The VAE mid-block self-attention (diffusers `Attention` built with
    `_from_deprecated_attn_block=True`).

    group_norm -> to_q / to_k / to_v (with bias) over the H*W tokens -> one
    head as wide as the channels -> to_out_0 (with bias) -> + input. diffusers'
    `residual_connection=True` and `rescale_output_factor=1` make the residual
    a plain add. Its `upcast_softmax=True` holds here too: the XLA attention
    computes logits and softmax in float32 whatever the compute dtype.
    """

    groups: int = 32
    eps: float = VAE_NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, p = self.dtype, self.param_dtype
        b, hgt, wid, ch = x.shape
        dense = dict(dtype=d, param_dtype=p, kernel_init=torch_like_kernel_init)
        h = group_norm(self.groups, self.eps, d, p, "group_norm")(x)
        h = h.reshape(b, hgt * wid, ch)
        # (B, T, heads=1, C): diffusers' VAE uses attention_head_dim = channels.
        q, k, v = (
            nn.Dense(ch, name=name, **dense)(h)[:, :, None, :] for name in ("to_q", "to_k", "to_v")
        )
        out = jax.nn.dot_product_attention(q, k, v, scale=ch**-0.5)
        out = nn.Dense(ch, name="to_out_0", **dense)(out.reshape(b, hgt * wid, ch).astype(d))
        return out.reshape(b, hgt, wid, ch) + x


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` as the VAE builds it: resnet, attention, resnet.

    Without attention (`mid_block_add_attention=False`) it is two resnets,
    still named resnets_0 and resnets_1.
    """

    channels: int
    groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res = dict(
            groups=self.groups, eps=VAE_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
            kernels=self.kernels,
        )  # fmt: skip
        x = ResnetBlock2D(self.channels, **res, name="resnets_0")(x, None)
        if self.add_attention:
            x = AttentionBlock(
                self.groups, VAE_NORM_EPS, self.dtype, self.param_dtype, name="attentions_0"
            )(x)
        return ResnetBlock2D(self.channels, **res, name="resnets_1")(x, None)


class CoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D` (`resample="down"`) and `UpDecoderBlock2D`
    (`resample="up"`): resnets without time conditioning or skip inputs, then an
    optional resampler (`None`: the last block of either).

    The VAE's downsampler pads only right and bottom (diffusers'
    `downsample_padding=0` -> F.pad(0, 1, 0, 1)), unlike the UNet's symmetric pad.
    """

    out_channels: int
    num_layers: int
    resample: str | None  # "down", "up" or None
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, p, k = self.dtype, self.param_dtype, self.kernels
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, VAE_NORM_EPS, dtype=d, param_dtype=p, kernels=k,
                name=f"resnets_{i}",
            )(x, None)  # fmt: skip
        if self.resample == "down":
            x = Downsample2D(self.out_channels, 0, d, p, k, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, d, p, k, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers VAE `Encoder` (with `double_z=True`).

    conv_in -> DownEncoderBlocks -> mid block -> GroupNorm -> SiLU -> conv_out
    to 2 * latent_channels (mean and log-variance, not yet split).
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c, d, p, k = self.config, self.dtype, self.param_dtype, self.kernels
        ch = c.block_out_channels
        x = conv(ch[0], 3, d, p, "conv_in", kernels=k)(images.astype(d))
        for i in range(len(ch)):
            x = CoderBlock(
                ch[i], c.layers_per_block, "down" if i < len(ch) - 1 else None,
                c.norm_num_groups, d, p, k, name=f"down_blocks_{i}",
            )(x)  # fmt: skip
        mid = MidBlock(
            ch[-1], c.norm_num_groups, c.mid_block_add_attention, d, p, k, name="mid_block"
        )
        x = mid(x)
        x = group_norm(c.norm_num_groups, VAE_NORM_EPS, d, p, "conv_norm_out")(x)
        x = nn.silu(x)
        return conv(2 * c.latent_channels, 3, d, p, "conv_out", kernels=k)(x)


class Decoder(nn.Module):
    """diffusers VAE `Decoder` (group-norm variant).

    conv_in -> mid block -> UpDecoderBlocks (widths reversed, one more layer
    per block than the encoder) -> GroupNorm -> SiLU -> conv_out.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        c, d, p, k = self.config, self.dtype, self.param_dtype, self.kernels
        rev = tuple(reversed(c.block_out_channels))
        x = conv(rev[0], 3, d, p, "conv_in", kernels=k)(latents.astype(d))
        mid = MidBlock(
            rev[0], c.norm_num_groups, c.mid_block_add_attention, d, p, k, name="mid_block"
        )
        x = mid(x)
        for i in range(len(rev)):
            x = CoderBlock(
                rev[i], c.layers_per_block + 1, "up" if i < len(rev) - 1 else None,
                c.norm_num_groups, d, p, k, name=f"up_blocks_{i}",
            )(x)  # fmt: skip
        x = group_norm(c.norm_num_groups, VAE_NORM_EPS, d, p, "conv_norm_out")(x)
        x = nn.silu(x)
        return conv(c.out_channels, 3, d, p, "conv_out", kernels=k)(x)


class AutoencoderKL(nn.Module):
    """Stable Diffusion 1.x/2.x VAE.

    Use: `vae.apply({"params": p}, images, method="encode") -> (mean, logvar)`,
    `vae.apply({"params": p}, latents, method="decode") -> images`.
    Latents here are unscaled (multiply by `config.scaling_factor` for the UNet).

    Args (of `__call__`):
      images: NHWC (B, H, W, in_channels) in [-1, 1]; H and W multiples of
        `config.latent_factor`.
      rng: PRNG key, needed when `sample_posterior` is True.
      sample_posterior: decode a posterior sample instead of its mean
        (diffusers' `sample_posterior`).

    Returns:
      NHWC (B, H, W, out_channels) reconstruction, in the compute dtype.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT  # convolution kernels (cn_jax.kernels); attention is XLA's

    def setup(self):
        c, d, p, k = self.config, self.dtype, self.param_dtype, self.kernels
        self.encoder = Encoder(c, d, p, k)
        self.decoder = Decoder(c, d, p, k)
        one = dict(padding=0, kernels=k)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, 1, d, p, "quant_conv", **one)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, 1, d, p, "post_quant_conv", **one)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior of `images`: diffusers' `encode(x).latent_dist` (mean, logvar).

        Args:
          images: NHWC (B, H, W, in_channels) in [-1, 1].

        Returns:
          (mean, logvar), each NHWC (B, H/f, W/f, latent_channels) in the
          compute dtype, f = `config.latent_factor`; logvar is clipped to
          [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
          Unscaled: see `sample_latents`.
        """
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        # diffusers chunks dim 1 (channels): first half mean, second logvar.
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images of unscaled `latents` (divide UNet latents by `config.scaling_factor` first).

        Args:
          latents: NHWC (B, h, w, latent_channels).

        Returns:
          NHWC (B, h*f, w*f, out_channels), nominally in [-1, 1] (not
          clipped), in the compute dtype.
        """
        x = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            x = self.post_quant_conv(x)
        return self.decoder(x)

    def __call__(
        self, images: jax.Array, rng: jax.Array | None = None, sample_posterior: bool = False
    ) -> jax.Array:
        mean, logvar = self.encode(images)
        if sample_posterior:
            if rng is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs an rng key")
            z = sample_latents(mean, logvar, rng)
        else:
            z = mean  # the posterior's mode, as diffusers
        return self.decode(z)


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1).

    The result is unscaled: multiply by `config.scaling_factor` to get the
    latents the UNet is trained on (and divide by it before `decode`).

    Args:
      mean, logvar: from `AutoencoderKL.encode`.
      rng: PRNG key.

    Returns:
      float32 (at least) array shaped like `mean`: the draw is made in float32
      so that bfloat16 encoder outputs do not quantise the noise.
    """
    dtype = jnp.promote_types(mean.dtype, jnp.float32)
    noise = jax.random.normal(rng, mean.shape, dtype)
    return mean.astype(dtype) + jnp.exp(0.5 * logvar.astype(dtype)) * noise


def example_inputs(config: AutoencoderKLConfig, batch: int = 1) -> tuple[jax.Array]:
    """Smallest valid inputs for `AutoencoderKL.init` / `eval_shape`: (images,).

    The image side is `config.latent_factor`, i.e. a 1x1 latent.
    """
    side = config.latent_factor
    return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32),)
