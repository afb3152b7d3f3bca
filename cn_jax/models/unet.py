"""The Stable Diffusion UNet (diffusers `UNet2DConditionModel` semantics), NHWC.

The encoder half (conv_in, time embedding, down blocks, mid block) is written
once as `UNetEncoder`-style helpers used both by `UNet` and by the trainable
copy in `cn_jax.models.controlnet`: the ControlNet copy is literally the same
code as the locked encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cn_jax.kernels import DEFAULT, Kernels
from cn_jax.models.attention import Transformer2DModel
from cn_jax.models.config import EncoderConfig, UNetConfig
from cn_jax.models.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).

    Returns the block output and the skip tensors it emits (one per layer, plus
    one after the downsampler).
    """

    out_channels: int
    num_layers: int
    has_attention: bool
    add_downsample: bool
    heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    downsample_padding: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x, temb, context):
        d, p, k = self.dtype, self.param_dtype, self.kernels
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, self.eps, dtype=d, param_dtype=p, kernels=k,
                name=f"resnets_{i}",
            )(x, temb)  # fmt: skip
            if self.has_attention:
                x = _transformer(self, name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, self.downsample_padding, d, p, k, name="downsamplers_0"
            )(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs."""

    channels: int
    heads: int = 8
    transformer_layers: int = 1
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    only_cross_attention: bool = False  # never in the mid block (diffusers)
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x, temb, context):
        res = dict(
            groups=self.groups, eps=self.eps, output_scale_factor=self.output_scale_factor,
            dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
        )  # fmt: skip
        x = ResnetBlock2D(self.channels, **res, name="resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = _transformer(self, name=f"attentions_{i}")(x, context)
            x = ResnetBlock2D(self.channels, **res, name=f"resnets_{i + 1}")(x, temb)
        return x


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` / `UpBlock2D`: each layer concatenates one skip tensor."""

    out_channels: int
    num_layers: int
    has_attention: bool
    add_upsample: bool
    heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: Kernels = DEFAULT

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context, upsample_size=None):
        d, p, k = self.dtype, self.param_dtype, self.kernels
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock2D(
                self.out_channels, self.groups, self.eps, dtype=d, param_dtype=p, kernels=k,
                name=f"resnets_{i}",
            )(x, temb)  # fmt: skip
            if self.has_attention:
                x = _transformer(self, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, d, p, k, name="upsamplers_0")(x, upsample_size)
        return x


def _transformer(block, name: str) -> Transformer2DModel:
    """The spatial transformer of a block, configured from the block's fields."""
    channels = getattr(block, "out_channels", None) or block.channels
    return Transformer2DModel(
        heads=block.heads,
        head_dim=channels // block.heads,
        num_layers=block.transformer_layers,
        groups=block.groups,
        use_linear_projection=block.use_linear_projection,
        only_cross_attention=block.only_cross_attention,
        upcast_attention=block.upcast_attention,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        kernels=block.kernels,
        name=name,
    )


# -- the encoder half, shared by UNet and ControlNet ----------------------------


def block_classes(remat: bool):
    """(DownBlock, MidBlock, UpBlock), rematerialised when `remat`: their
    activations are recomputed in the backward pass instead of stored
    (parameter names are unchanged)."""
    if not remat:
        return DownBlock, MidBlock, UpBlock
    return nn.remat(DownBlock), nn.remat(MidBlock), nn.remat(UpBlock, static_argnums=(5,))


def make_encoder(
    config: EncoderConfig, dtype: Dtype, param_dtype: Dtype, remat: bool, kernels: Kernels
) -> dict[str, nn.Module]:
    """Submodules of the encoder half, named as diffusers names them.

    Called from `setup` of `UNet` and `ControlNet`, so both get identical
    parameter trees for conv_in, time_embedding, down_blocks_* and mid_block.
    """
    c = config
    n = len(c.block_out_channels)
    down_cls, mid_cls, _ = block_classes(remat)
    down = []
    for i, block_type in enumerate(c.down_block_types):
        down.append(
            down_cls(
                out_channels=c.block_out_channels[i],
                num_layers=c.layers_per_block,
                has_attention=block_type == "CrossAttnDownBlock2D",
                add_downsample=i < n - 1,
                heads=c.heads_per_block[i],
                transformer_layers=c.transformer_layers[i],
                groups=c.norm_num_groups,
                eps=c.norm_eps,
                downsample_padding=c.downsample_padding,
                use_linear_projection=c.use_linear_projection,
                only_cross_attention=c.only_cross_per_block[i],
                upcast_attention=c.upcast_attention,
                dtype=dtype,
                param_dtype=param_dtype,
                kernels=kernels,
            )
        )
    width = 4 * c.block_out_channels[0]  # the timestep embedding's
    added = {}
    if c.has_text_time:  # SDXL: projected from projection_class_embeddings_input_dim
        added["add_embedding"] = TimestepEmbedding(width, dtype, param_dtype)
    return dict(
        conv_in=conv(c.block_out_channels[0], 3, dtype, param_dtype, "conv_in", kernels=kernels),
        time_embedding=TimestepEmbedding(width, dtype, param_dtype),
        **added,
        down_blocks=down,
        mid_block=mid_cls(
            channels=c.block_out_channels[-1],
            heads=c.heads_per_block[-1],
            transformer_layers=c.transformer_layers[-1],
            groups=c.norm_num_groups,
            eps=c.norm_eps,
            output_scale_factor=c.mid_block_scale_factor,
            use_linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
            dtype=dtype,
            param_dtype=param_dtype,
            kernels=kernels,
        ),
    )


def down_pass(blocks, x: jax.Array, temb, context) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks in turn: their output and every skip tensor, `x` (conv_in's
    output) first, as the UNet's skip connections and the ControlNet's residuals."""
    skips = [x]
    for block in blocks:
        x, s = block(x, temb, context)
        skips += s
    return x, skips


def time_features(config: EncoderConfig, timesteps: jax.Array, batch: int, dtype) -> jax.Array:
    """Sinusoidal features of `timesteps` broadcast to the batch, in the compute dtype."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    emb = timestep_embedding(
        t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift
    )
    return emb.astype(dtype)


# SDXL's size numbers per image: original (height, width), crop (top, left), target
# (height, width); diffusers' `add_time_ids`.
NUM_TIME_IDS = 6


def time_embedding(module, config: EncoderConfig, timesteps, batch: int, added_cond_kwargs):
    """The timestep embedding of `module` (a UNet or ControlNet set up by `make_encoder`),
    plus SDXL's added embedding of the pooled text embedding and the size numbers."""
    temb = module.time_embedding(time_features(config, timesteps, batch, module.dtype))
    if not config.has_text_time:
        if added_cond_kwargs is not None:
            raise ValueError(
                "added_cond_kwargs given, but this model's config has no addition_embed_type "
                "(only SDXL's text_time models take them)"
            )
        return temb
    return temb + module.add_embedding(added_features(config, added_cond_kwargs, batch, temb.dtype))


def added_features(config: EncoderConfig, added_cond_kwargs, batch: int, dtype) -> jax.Array:
    """diffusers' text_time input: concat(text_embeds, sinusoidal features of each time id)."""
    if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
        raise ValueError(
            "this SDXL (addition_embed_type='text_time') model needs added_cond_kwargs="
            "{'text_embeds': (B, pooled width), 'time_ids': (B, 6)}"
        )
    text = jnp.asarray(added_cond_kwargs["text_embeds"])
    ids = jnp.asarray(added_cond_kwargs["time_ids"])
    width = text.shape[-1] + ids.shape[-1] * config.addition_time_embed_dim
    if (
        text.ndim != 2
        or ids.ndim != 2
        or text.shape[0] != batch
        or ids.shape[0] != batch
        or width != config.projection_class_embeddings_input_dim
    ):
        raise ValueError(
            f"added_cond_kwargs: text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} "
            f"for a batch of {batch}; expected (B, P) and (B, T) with P + T * "
            f"{config.addition_time_embed_dim} = projection_class_embeddings_input_dim "
            f"{config.projection_class_embeddings_input_dim}"
        )
    feats = timestep_embedding(
        ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
    ).reshape(batch, -1)
    return jnp.concatenate([text.astype(jnp.float32), feats], axis=-1).astype(dtype)


def example_added_cond(config: EncoderConfig, batch: int = 1) -> dict | None:
    """`added_cond_kwargs` of the right shapes for an SDXL config; None otherwise."""
    if not config.has_text_time:
        return None
    pooled = config.projection_class_embeddings_input_dim
    pooled -= NUM_TIME_IDS * config.addition_time_embed_dim
    if pooled < 1:
        raise ValueError(
            f"config: projection_class_embeddings_input_dim "
            f"{config.projection_class_embeddings_input_dim} leaves no room for the pooled text "
            f"embedding beside {NUM_TIME_IDS} time ids of {config.addition_time_embed_dim}"
        )
    return {
        "text_embeds": jnp.zeros((batch, pooled), jnp.float32),
        "time_ids": jnp.zeros((batch, NUM_TIME_IDS), jnp.float32),
    }


def example_inputs(config: UNetConfig, batch: int = 1):
    """Smallest valid inputs for `UNet.init` / `eval_shape` (sample, t, context, and for
    SDXL the residuals' None placeholders and `added_cond_kwargs`)."""
    latent = 2 ** (len(config.block_out_channels) - 1)
    inputs = (
        jnp.zeros((batch, latent, latent, config.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, 1, config.cross_attention_dims[0]), jnp.float32),
    )
    if config.has_text_time:
        inputs += (None, None, example_added_cond(config, batch))
    return inputs


class UNet(nn.Module):
    """Stable Diffusion 1.x/2.x/XL denoiser.

    Call: `unet.apply({"params": p}, sample, timesteps, encoder_hidden_states,
    down_block_additional_residuals=None, mid_block_additional_residual=None)`.

    Args (of `__call__`):
      sample: NHWC latents (B, H, W, in_channels).
      timesteps: (B,) or scalar, float32 by default.
      encoder_hidden_states: (B, L, cross_attention_dim) text context.
      down_block_additional_residuals: ControlNet residuals, one per skip
        connection (`config.num_down_residuals`), added to the skips.
      mid_block_additional_residual: added to the mid block output.
      added_cond_kwargs: SDXL (`addition_embed_type: text_time`) only, and required there:
        {"text_embeds": (B, 1280) pooled text embedding, "time_ids": (B, 6) original
        height/width, crop top/left, target height/width}, as diffusers.

    Returns:
      NHWC (B, H, W, out_channels) noise (or v) prediction.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute block activations in the backward pass
    kernels: Kernels = DEFAULT  # attention and convolution kernels (cn_jax.kernels)

    def setup(self):
        c = self.config
        d, p, k = self.dtype, self.param_dtype, self.kernels
        # conv_in, time_embedding, down_blocks, mid_block: the ControlNet's too.
        for name, module in make_encoder(c, d, p, self.remat, k).items():
            setattr(self, name, module)
        up_cls = block_classes(self.remat)[2]
        rev_channels = tuple(reversed(c.block_out_channels))
        rev_heads = tuple(reversed(c.heads_per_block))
        rev_layers = tuple(reversed(c.transformer_layers))
        rev_only_cross = tuple(reversed(c.only_cross_per_block))
        n = len(rev_channels)
        self.up_blocks = [
            up_cls(
                out_channels=rev_channels[i],
                num_layers=c.layers_per_block + 1,
                has_attention=block_type == "CrossAttnUpBlock2D",
                add_upsample=i < n - 1,
                heads=rev_heads[i],
                transformer_layers=rev_layers[i],
                groups=c.norm_num_groups,
                eps=c.norm_eps,
                use_linear_projection=c.use_linear_projection,
                only_cross_attention=rev_only_cross[i],
                upcast_attention=c.upcast_attention,
                dtype=d,
                param_dtype=p,
                kernels=k,
            )
            for i, block_type in enumerate(c.up_block_types)
        ]
        self.conv_norm_out = group_norm(c.norm_num_groups, c.norm_eps, d, p, "conv_norm_out")
        self.conv_out = conv(c.out_channels, 3, d, p, "conv_out", kernels=k)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> jax.Array:
        c = self.config
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        temb = time_embedding(self, c, timesteps, sample.shape[0], added_cond_kwargs)

        x = self.conv_in(sample)
        x, skips = down_pass(self.down_blocks, x, temb, context)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                    f"tensors; this UNet has {len(skips)} skip connections"
                )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]

        x = self.mid_block(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        for block in self.up_blocks:
            n_skip = block.num_layers
            block_skips, skips = skips[-n_skip:], skips[:-n_skip]
            # Non-multiple sizes: upsample to the next skip's size (diffusers'
            # forward_upsample_size), otherwise plain x2.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, block_skips, temb, context, size)

        x = self.conv_norm_out(x)
        x = nn.silu(x)
        return self.conv_out(x)
