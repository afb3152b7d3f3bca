"""Building blocks shared by the UNet and the ControlNet: convolution,
timestep embedding, resnet block, up/down sampling, zero convolution.

Every module works on NHWC arrays and takes `dtype` (compute) and
`param_dtype` (storage); those with convolutions also take `kernels`, the
model's kernel choice (`cn_jax.kernels.Kernels`), passed down the tree the
same way. Submodule names follow diffusers' attribute names so that weight
conversion is one mechanical rule (see `cn_jax.weights.keymap`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.kernels import DEFAULT, Kernels, conv2d
from cn_jax.kernels.im2col import Padding

Dtype = jnp.dtype | type

# PyTorch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance_scaling(1/3, fan_in, uniform).
# We use it for freshly created layers so that a model trained from scratch
# here starts like its PyTorch twin.
torch_like_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv2D(nn.Module):
    """`flax.linen.Conv` for NHWC images (parameters `kernel` HWIO, `bias`; same
    names, shapes and initialisation), computed by `cn_jax.kernels.conv2d` with
    the kernel `kernels` names."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: Padding = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, (self.strides, self.strides), self.padding, self.kernels)
        return y + bias


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, as diffusers' `get_timestep_embedding`.

    Args:
      timesteps: shape (B,) (or a scalar), any real dtype; computed in float32.
      dim: feature size.
      flip_sin_to_cos: put cos before sin (SD's convention).
      freq_shift: `downscale_freq_shift` of diffusers.
      max_period: controls the lowest frequency.

    Returns:
      float32 array (B, dim).
    """
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - freq_shift))
    args = timesteps[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal features: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_like_kernel_init
        )
        x = nn.Dense(self.features, name="linear_1", **dense)(x)
        x = nn.silu(x)
        return nn.Dense(self.features, name="linear_2", **dense)(x)


def group_norm(
    groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.GroupNorm:
    # Exact two-pass variance: the fast E[x^2]-E[x]^2 form loses digits that
    # the 1e-4 parity budget cannot afford on large activations.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def conv(
    features: int,
    kernel: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    stride: int = 1,
    padding: int | tuple = 1,
    kernel_init=torch_like_kernel_init,
    bias_init=nn.initializers.zeros,
    *,
    kernels: Kernels,
) -> Conv2D:
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return Conv2D(
        features,
        kernel,
        strides=stride,
        padding=tuple(tuple(side) for side in pad),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        kernels=kernels,
        name=name,
    )


def zero_conv(
    features: int, dtype: Dtype, param_dtype: Dtype, name: str, *, kernels: Kernels
) -> Conv2D:
    """1x1 convolution with weight and bias initialised to zero (ControlNet's Z)."""
    return conv(
        features,
        1,
        dtype,
        param_dtype,
        name,
        padding=0,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        kernels=kernels,
    )


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with `time_embedding_norm="default"`.

    norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU ->
    conv2, plus the (1x1 projected when channels change) input.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        """`temb=None`: a block without time conditioning (the VAE's), no time_emb_proj."""
        d, p, k = self.dtype, self.param_dtype, self.kernels
        h = group_norm(self.groups, self.eps, d, p, "norm1")(x)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, d, p, "conv1", kernels=k)(h)
        if temb is not None:
            t = nn.Dense(
                self.out_channels,
                dtype=d,
                param_dtype=p,
                kernel_init=torch_like_kernel_init,
                name="time_emb_proj",
            )(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, self.eps, d, p, "norm2")(h)
        h = nn.silu(h)
        h = conv(self.out_channels, 3, d, p, "conv2", kernels=k)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, d, p, "conv_shortcut", padding=0, kernels=k)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (`downsamplers.0.conv`)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # diffusers pads (0, 1, 0, 1) by hand when downsample_padding == 0.
        pad = self.padding if self.padding else ((0, 1), (0, 1))
        d, p = self.dtype, self.param_dtype
        return conv(self.out_channels, 3, d, p, "conv", 2, pad, kernels=self.kernels)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution (`upsamplers.0.conv`)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        if output_size is None or output_size == (2 * x.shape[1], 2 * x.shape[2]):
            # Exact nearest x2: each pixel repeated, as torch's interpolate.
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # Odd skip sizes: torch's "nearest" picks floor(i * in / out).
            hi = (jnp.arange(output_size[0]) * x.shape[1]) // output_size[0]
            wi = (jnp.arange(output_size[1]) * x.shape[2]) // output_size[1]
            x = x[:, hi][:, :, wi]
        d, p = self.dtype, self.param_dtype
        return conv(self.out_channels, 3, d, p, "conv", kernels=self.kernels)(x)
