"""PyTorch reference models (diffusers, CPU) with random weights in every parameter,
and the helpers that compare them with ours."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from cn_jax.models.config import ControlNetConfig, UNetConfig
from cn_jax.models.unet import example_inputs as unet_example_inputs
from cn_jax.weights.keymap import torch_to_flax

# Three small shapes of the real architectures. Each name maps to
# (UNet2DConditionModel kwargs, ControlNetModel.from_unet kwargs, latent size).
CONFIGS = {
    # SD 1.5 layout: 4 blocks (3 with cross-attention), 12 skip residuals,
    # 1x1-conv projections, one head count for all blocks, released encoder
    # with its default widths (16, 32, 96, 256). Latent 12 is not a multiple
    # of 8, so the odd-size upsampling path runs too.
    "sd15": (
        dict(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        dict(),
        12,
    ),
    # SD 2.x layout: linear projections, per-block head counts (head width 16),
    # upcast attention; bgr condition order with 3 channels (a real flip).
    "sd2": (
        dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=24,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        dict(
            controlnet_conditioning_channel_order="bgr",
            conditioning_embedding_out_channels=(8, 16, 16, 32),
        ),  # fmt: skip
        8,
    ),
    # One-channel condition in bgr order (as the issue asks), one layer per
    # block, two transformer layers per block, only-cross-attention blocks,
    # sin-before-cos timestep features with a frequency shift, norm_eps 1e-6.
    "gray": (
        dict(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=16,
            attention_head_dim=2,
            transformer_layers_per_block=2,
            only_cross_attention=True,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
        ),
        dict(
            conditioning_channels=1,
            controlnet_conditioning_channel_order="bgr",
            conditioning_embedding_out_channels=(8, 8, 16, 16),
        ),
        8,
    ),
}


# SDXL's layout (diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet config, scaled
# down): three blocks, no attention in the first, transformer_layers_per_block per block
# (deeper at the bottom, as [1, 2, 10]), per-block head counts, linear projections, an
# upcast_attention of null, and the text_time added embedding: a pooled text embedding of
# 16 beside 6 time ids of 8 sinusoidal features each (projection input 16 + 48 = 64).
# Kept apart from CONFIGS: every SDXL call needs `added_cond_kwargs`.
SDXL_CONFIGS = {
    "sdxl": (
        dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=40,
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 2, 3),
            use_linear_projection=True,
            upcast_attention=None,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
        ),
        dict(conditioning_embedding_out_channels=(8, 16, 16, 32)),
        8,
    ),
}
SDXL_POOLED = 16


def added_inputs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """SDXL's `added_cond_kwargs` in numpy: a random pooled embedding and size numbers
    as a pipeline makes them (original size, crop offsets, target size)."""
    rng = np.random.default_rng(seed)
    sizes = [[1024, 768, 0, 0, 1024, 1024], [512, 640, 64, 32, 768, 512]]
    return {
        "text_embeds": rng.standard_normal((batch, SDXL_POOLED), dtype=np.float32),
        "time_ids": np.array((sizes * batch)[:batch], np.float32),
    }


def torch_added(added: dict[str, np.ndarray]) -> dict:
    return {k: torch.from_numpy(v) for k, v in added.items()}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in *every* parameter, zero convs included: a zero weight
    would hide a wrong key or layout."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # conv / linear weights: unit-variance outputs
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm gains around 1
                p.copy_(1.0 + 0.3 * noise)
            else:  # biases
                p.copy_(0.3 * noise)
    return model.eval()


@functools.cache
def torch_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    unet_kwargs, _, _ = {**CONFIGS, **SDXL_CONFIGS}[name]
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**unet_kwargs), seed)


@functools.cache
def torch_controlnet(name: str, seed: int = 1) -> ControlNetModel:
    _, cn_kwargs, _ = {**CONFIGS, **SDXL_CONFIGS}[name]
    return randomize_(ControlNetModel.from_unet(torch_unet(name), **cn_kwargs), seed)


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def flax_unet_params(model: UNet2DConditionModel):
    import jax

    from cn_jax.models.unet import UNet

    cfg = UNetConfig.from_dict(dict(model.config))
    unet = UNet(cfg)
    abstract = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet_example_inputs(cfg))
    return unet, torch_to_flax(state_numpy(model), abstract["params"])


def flax_controlnet_params(model: ControlNetModel):
    import jax

    from cn_jax.models.controlnet import ControlNet, example_inputs

    cfg = ControlNetConfig.from_dict(dict(model.config))
    cnet = ControlNet(cfg)
    abstract = jax.eval_shape(cnet.init, jax.random.PRNGKey(0), *example_inputs(cfg))
    return cnet, torch_to_flax(state_numpy(model), abstract["params"])


def inputs(name: str, batch: int = 2, seed: int = 0):
    """NHWC numpy inputs: sample, timesteps, context, condition (pixel size)."""
    unet_kwargs, cn_kwargs, latent = {**CONFIGS, **SDXL_CONFIGS}[name]
    rng = np.random.default_rng(seed)
    cond_ch = cn_kwargs.get("conditioning_channels", 3)
    factor = 2 ** (len(cn_kwargs.get("conditioning_embedding_out_channels", (0,) * 4)) - 1)
    return (
        rng.standard_normal((batch, latent, latent, 4), dtype=np.float32),
        np.array([999.0, 17.0, 500.0, 1.0][:batch], np.float32),
        rng.standard_normal((batch, 7, unet_kwargs["cross_attention_dim"]), dtype=np.float32),
        rng.random((batch, latent * factor, latent * factor, cond_ch), dtype=np.float32),
    )


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the figure the issues report)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def jit_apply(module, variables, *args, **kwargs):
    """`module.apply(variables, *args, **kwargs)` as one jitted program, as users run
    it. Op-by-op dispatch compiles every operation of a UNet on its own: twice the
    time of one trace and one compile (measured: 21 s vs 11 s for the sd15 config).
    Python scalars, flags and strings in `kwargs` are static; arrays are traced.
    One jitted function per (module, static kwargs): linen modules compare by their
    fields, so a repeated call with the same shapes is neither traced nor compiled."""
    static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
    traced = {k: v for k, v in kwargs.items() if k not in static}
    return _jitted_apply(module, tuple(sorted(static.items())))(variables, args, traced)


@functools.cache
def _jitted_apply(module, static_items):
    fn = functools.partial(module.apply, **dict(static_items))
    return jax.jit(lambda v, a, kw: fn(v, *a, **kw))


def slow_unless(names, fast):
    """Parametrize values, those not in `fast` marked slow: the fast tier keeps at
    least one parity case per model family, the full suite runs every one."""
    import pytest

    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]
