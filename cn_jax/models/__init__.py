"""Linen modules: the Stable Diffusion UNet, the ControlNet and their layers. No I/O."""

from cn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cn_jax.models.config import ControlNetConfig, UNetConfig
from cn_jax.models.controlnet import (
    ControlledBlock,
    ControlNet,
    combine_controlnet_residuals,
    init_controlnet_from_unet,
)
from cn_jax.models.unet import UNet
from cn_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "ControlNet",
    "ControlNetConfig",
    "ControlledBlock",
    "UNet",
    "UNetConfig",
    "combine_controlnet_residuals",
    "init_controlnet_from_unet",
]
