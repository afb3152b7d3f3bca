"""ControlNet: a trainable copy of the UNet encoder steered by a condition image,
joined to the locked UNet through zero convolutions.

- `ControlNet`: diffusers `ControlNetModel` semantics (NHWC), with the released
  or the paper's condition encoder.
- `init_controlnet_from_unet`: the trainable copy starts as the locked weights.
- `combine_controlnet_residuals`: several ControlNets, residuals summed.
- `ControlledBlock`: the paper's general form around any linen block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cn_jax.kernels import DEFAULT, Kernels
from cn_jax.models.config import ControlNetConfig
from cn_jax.models.layers import Dtype, conv, zero_conv
from cn_jax.models.unet import down_pass, example_added_cond, make_encoder, time_embedding

# Parameter groups of a ControlNet that are copies of the UNet's (same names;
# add_embedding: SDXL's text_time embedding).
COPIED_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "down_blocks_", "mid_block")


class ReleasedConditioningEmbedding(nn.Module):
    """lllyasviel's / diffusers' `ControlNetConditioningEmbedding`.

    conv_in (3x3) -> SiLU -> [3x3 conv, SiLU, 3x3 stride-2 conv to the next
    width, SiLU] per width step -> zero-initialised 3x3 conv_out.
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        d, p, k = self.dtype, self.param_dtype, self.kernels
        ch = self.block_out_channels
        x = nn.silu(conv(ch[0], 3, d, p, "conv_in", kernels=k)(cond))
        for i in range(len(ch) - 1):
            x = nn.silu(conv(ch[i], 3, d, p, f"blocks_{2 * i}", kernels=k)(x))
            x = nn.silu(conv(ch[i + 1], 3, d, p, f"blocks_{2 * i + 1}", stride=2, kernels=k)(x))
        zeros = nn.initializers.zeros
        return conv(self.out_channels, 3, d, p, "conv_out", kernel_init=zeros, kernels=k)(x)


class PaperConditioningEmbedding(nn.Module):
    """The paper's condition encoder E(c) followed by the zero conv Z(c; theta_z1).

    Four 4x4 convolutions with ReLU (widths 16/32/64/128 by default, Gaussian
    init); the first log2(latent_factor) have stride 2 and padding 1, the rest
    stride 1 with TF-style "same" padding (1 before, 2 after) so the size holds.
    A 1x1 zero conv then projects to the first UNet block's width.
    Parameters: conv_in, blocks_0..2, conv_out (the zero conv).
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    latent_factor: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        d, p, k = self.dtype, self.param_dtype, self.kernels
        n_down = int(math.log2(self.latent_factor))
        gaussian = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He normal
        x = cond
        for i, width in enumerate(self.block_out_channels):
            stride, pad = (2, 1) if i < n_down else (1, ((1, 2), (1, 2)))
            name = "conv_in" if i == 0 else f"blocks_{i - 1}"
            x = conv(width, 4, d, p, name, stride, pad, kernel_init=gaussian, kernels=k)(x)
            x = nn.relu(x)
        return zero_conv(self.out_channels, d, p, "conv_out", kernels=k)(x)


def condition_encoder(
    config: ControlNetConfig, dtype: Dtype, param_dtype: Dtype, kernels: Kernels = DEFAULT
) -> nn.Module:
    """The condition encoder the config selects, ending at the first block's width."""
    c = config
    width, ch = c.block_out_channels[0], c.conditioning_embedding_out_channels
    if c.is_released:
        return ReleasedConditioningEmbedding(width, ch, dtype, param_dtype, kernels)
    return PaperConditioningEmbedding(width, ch, c.latent_factor, dtype, param_dtype, kernels)


class ControlNet(nn.Module):
    """Trainable encoder copy + condition encoder + 12 (+1) zero convs.

    Call: `cnet.apply({"params": p}, sample, timesteps, encoder_hidden_states,
    controlnet_cond, conditioning_scale=1.0, guess_mode=False)`.

    Args (of `__call__`):
      sample: NHWC latents (B, h, w, in_channels).
      timesteps: (B,) or scalar.
      encoder_hidden_states: (B, L, D) text context.
      controlnet_cond: NHWC condition in [0, 1] at pixel size
        (B, h * latent_factor, w * latent_factor, conditioning_channels).
      conditioning_scale: multiplies every residual (control strength).
      guess_mode: diffusers' guess mode scales, logspace(-1, 0, 13) * scale,
        from the shallowest skip to the mid block (`guess_mode_scales`).
      added_cond_kwargs: SDXL only, required there: {"text_embeds", "time_ids"} as the
        UNet takes them.

    Returns:
      (down_residuals, mid_residual): a list of `config.num_down_residuals`
      NHWC arrays matching the UNet skips, and the mid block residual.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute block activations in the backward pass
    kernels: Kernels = DEFAULT  # attention and convolution kernels (cn_jax.kernels)

    def setup(self):
        c = self.config
        d, p, k = self.dtype, self.param_dtype, self.kernels
        # conv_in, time_embedding, down_blocks, mid_block: the UNet's encoder half.
        for name, module in make_encoder(c, d, p, self.remat, k).items():
            setattr(self, name, module)
        self.controlnet_cond_embedding = condition_encoder(c, d, p, k)
        widths = residual_channels(c)
        self.controlnet_down_blocks = [
            zero_conv(w, d, p, f"controlnet_down_blocks_{i}", kernels=k)
            for i, w in enumerate(widths)
        ]
        self.controlnet_mid_block = zero_conv(
            c.block_out_channels[-1], d, p, "controlnet_mid_block", kernels=k
        )

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: dict | None = None,
    ) -> tuple[list[jax.Array], jax.Array]:
        c = self.config
        f = c.latent_factor
        b, h, w, _ = sample.shape
        want = (b, h * f, w * f, c.conditioning_channels)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; expected {want} "
                f"(NHWC, latent size x {f}, {c.conditioning_channels} channels)"
            )
        cond = controlnet_cond.astype(self.dtype)
        if c.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = time_embedding(self, c, timesteps, b, added_cond_kwargs)

        x = self.conv_in(sample) + self.controlnet_cond_embedding(cond)
        x, skips = down_pass(self.down_blocks, x, temb, context)
        x = self.mid_block(x, temb, context)

        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not c.global_pool_conditions:
            scales = jnp.asarray(guess_mode_scales("diffusers", c, (h, w))) * conditioning_scale
            down = [r * scales[i].astype(r.dtype) for i, r in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            down = [r * conditioning_scale for r in down]
            mid = mid * conditioning_scale
        if c.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def residual_channels(config: ControlNetConfig) -> list[int]:
    """Channel count of each down residual, in the UNet's skip order."""
    ch = config.block_out_channels
    out = [ch[0]]
    for i, width in enumerate(ch):
        out += [width] * config.layers_per_block
        if i < len(ch) - 1:
            out.append(width)
    return out


def example_inputs(config: ControlNetConfig, batch: int = 1, latent: int | None = None):
    """Smallest valid inputs for `init` / `eval_shape` (sample, t, context, cond, and for
    SDXL the default scale and guess mode and `added_cond_kwargs`)."""
    latent = latent or 2 ** (len(config.block_out_channels) - 1)
    f = config.latent_factor
    inputs = (
        jnp.zeros((batch, latent, latent, config.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, 1, config.cross_attention_dims[0]), jnp.float32),
        jnp.zeros((batch, latent * f, latent * f, config.conditioning_channels), jnp.float32),
    )
    if config.has_text_time:
        # guess_mode None (off): a Python bool would become a tracer in a jitted init.
        inputs += (1.0, None, example_added_cond(config, batch))
    return inputs


def residual_sizes(config, latent_hw: tuple[int, int]) -> list[int]:
    """Spatial height of each ControlNet residual (skips in UNet order, then mid)."""
    h = latent_hw[0]
    n = len(config.block_out_channels)
    sizes = [h]
    for b in range(n):
        sizes += [h] * config.layers_per_block
        if b < n - 1:
            h = -(-h // 2)  # stride-2 conv with padding 1: ceil(h / 2)
            sizes.append(h)
    return sizes + [h]


def guess_mode_scales(kind: str, config, latent_hw: tuple[int, int], strength: float = 1.0):
    """Per-residual multipliers for guess mode, shallowest skip first, mid last.

    - "diffusers": logspace(-1, 0, 13) (diffusers' ControlNetModel);
    - "original": strength * 0.825 ** (12 - i) (lllyasviel's gradio apps);
    - "paper": the paper's CFG resolution weighting w_i = 64 / h_i with h_i the
      block's spatial size at 512 px, generalised as (latent height) / h_i.
    """
    sizes = residual_sizes(config, latent_hw)
    n = len(sizes)
    if kind == "diffusers":
        w = np.logspace(-1.0, 0.0, n)
    elif kind == "original":
        w = 0.825 ** (n - 1 - np.arange(n, dtype=np.float64))
    elif kind == "paper":
        w = latent_hw[0] / np.asarray(sizes, np.float64)
    else:
        raise ValueError(f"guess mode scales {kind!r}: expected diffusers, original or paper")
    return (strength * w).astype(np.float32)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def init_controlnet_from_unet(
    unet_params: Mapping[str, Any],
    config: ControlNetConfig,
    rng: jax.Array | None = None,
    param_dtype: Dtype = jnp.float32,
) -> dict[str, Any]:
    """ControlNet parameters whose encoder copy starts as the locked UNet's.

    conv_in, time_embedding, down_blocks_* and mid_block are copied (fresh
    buffers: training donates the ControlNet's state, which must never alias
    the frozen UNet); the condition encoder gets a fresh init; every zero
    conv (and the released encoder's conv_out) is zero. Equivalent to
    diffusers' `ControlNetModel.from_unet(unet)`.

    Args:
      unet_params: the UNet's `params` tree (without the "params" wrapper).
      config: the ControlNet config (e.g. `ControlNetConfig.from_unet(unet.config)`).
      rng: key for the condition encoder's init; default PRNGKey(0).
      param_dtype: storage dtype of the new parameters.

    Raises:
      ValueError: naming every UNet parameter that is missing or mis-shaped
        for this config.
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    unet_params = unet_params.get("params", unet_params)
    model = ControlNet(config, param_dtype=param_dtype)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs(config))["params"]

    # Only the condition encoder is new and random: init it alone (cheap).
    cond = example_inputs(config)[3]
    cond_params = condition_encoder(config, jnp.float32, param_dtype).init(rng, cond)["params"]

    problems = []
    out: dict[str, Any] = {}
    for name, sub in abstract.items():
        if name.startswith(COPIED_FROM_UNET):
            if name not in unet_params:
                problems.append(f"missing UNet parameter group {name!r}")
                continue
            out[name] = _copy_checked(unet_params[name], sub, name, problems)
        elif name == "controlnet_cond_embedding":
            out[name] = cond_params
        else:  # zero convs
            out[name] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sub)
    if problems:
        raise ValueError(
            "init_controlnet_from_unet: the UNet parameters do not fit this ControlNet config:\n  "
            + "\n  ".join(problems)
        )
    return out


def _copy_checked(src: Any, abstract: Any, prefix: str, problems: list[str]) -> Any:
    """A fresh copy of `src` shaped and typed like `abstract`; mismatches go to `problems`."""
    flat_src = {_path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(src)}
    expected = set()

    def copy_leaf(path, spec):
        key = _path_str(path)
        expected.add(key)
        if key not in flat_src:
            problems.append(f"missing {prefix}/{key}")
        elif tuple(np.shape(flat_src[key])) != tuple(spec.shape):
            problems.append(
                f"{prefix}/{key}: shape {tuple(np.shape(flat_src[key]))}, expected {spec.shape}"
            )
        else:
            return jnp.array(flat_src[key], dtype=spec.dtype, copy=True)
        return None

    out = jax.tree_util.tree_map_with_path(copy_leaf, abstract)
    problems += [f"unexpected {prefix}/{k}" for k in sorted(set(flat_src) - expected)]
    return out


def combine_controlnet_residuals(
    outputs: Sequence[tuple[Sequence[jax.Array], jax.Array]],
    scales: Sequence[float] | None = None,
) -> tuple[list[jax.Array], jax.Array]:
    """Several ControlNets on one UNet: their residuals, each scaled, summed.

    Args:
      outputs: `(down, mid)` pairs, one per ControlNet.
      scales: one multiplier per ControlNet (default 1 each). Use 1 when each
        ControlNet was already applied with its own `conditioning_scale`.

    Returns:
      `(down, mid)` to pass to the UNet.
    """
    if not outputs:
        raise ValueError("combine_controlnet_residuals: no ControlNet outputs given")
    scales = [1.0] * len(outputs) if scales is None else list(scales)
    if len(scales) != len(outputs):
        raise ValueError(f"{len(outputs)} ControlNet outputs but {len(scales)} scales")
    n = len(outputs[0][0])
    for k, (down, _) in enumerate(outputs):
        if len(down) != n:
            raise ValueError(f"ControlNet {k} gives {len(down)} down residuals, ControlNet 0 {n}")
    down = [sum(s * o[0][i] for o, s in zip(outputs, scales)) for i in range(n)]
    mid = sum(s * o[1] for o, s in zip(outputs, scales))
    return down, mid


class ControlledBlock(nn.Module):
    """The paper's ControlNet around any linen block F (eq. 2):

        y_c = F(x; locked) + Z(F(x + Z(c; z1); copy); z2)

    `locked` and `copy` are two instances of `block`; `z1` / `z2` are 1x1
    (channel-wise Dense) zero-initialised projections. Gradients never reach
    the locked parameters (they pass through `stop_gradient`), so only the
    copy and the zero convs train. At init, with `copy` set to the locked
    weights, y_c == F(x; locked) exactly.

    Call: `y = m.apply(vars, x, c, *args)`; extra args go to both blocks.
    """

    block: nn.Module
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, *args, **kwargs) -> jax.Array:
        locked = self.block.clone(parent=self, name="locked")
        copy = self.block.clone(parent=self, name="copy")

        def frozen_call(module, *a, **k):
            return module(*a, **k)

        frozen_call = nn.map_variables(
            frozen_call,
            "params",
            trans_in_fn=jax.lax.stop_gradient,
            init=self.is_initializing(),
        )
        y = frozen_call(locked, x, *args, **kwargs)
        z = dict(
            use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
        )  # fmt: skip
        h = x + nn.Dense(x.shape[-1], name="zero_in", **z)(c)
        yc = copy(h, *args, **kwargs)
        return y + nn.Dense(y.shape[-1], name="zero_out", **z)(yc)
