"""cn_jax: ControlNet for Stable Diffusion in JAX/Flax, compiled by XLA.

Public API (external checks call exactly these names):

    unet, unet_params = cn_jax.load_unet(path)
    cnet, cnet_params = cn_jax.load_controlnet(path)
    cn_jax.save_controlnet(path, cnet, cnet_params, format="diffusers")  # or "original"
    cnet_params = cn_jax.init_controlnet_from_unet(unet_params, cnet.config)
    sd = cn_jax.load_pipeline(path)  # frozen components: unet, vae, text encoder, tokenizer
    unet = unet.clone(kernels=cn_jax.Kernels(attention="xla"))  # kernel choice per model

Importing cn_jax changes nothing outside it. A program that owns its process
opts into the host settings the `cn-jax` command uses (XLA's memory-first CPU
scheduler, JAX's caches dropped after set-up), before JAX starts:
`cn_jax.runtime.configure_host()`.
"""

from cn_jax import runtime  # noqa: F401 (cn_jax.runtime.configure_host)
from cn_jax.diffusion import NoiseScheduleConfig
from cn_jax.kernels import Kernels
from cn_jax.models import (
    ControlledBlock,
    ControlNet,
    ControlNetConfig,
    UNet,
    UNetConfig,
    combine_controlnet_residuals,
    init_controlnet_from_unet,
)
from cn_jax.pipeline import ControlNetPipeline
from cn_jax.weights import (
    WeightFileError,
    load_controlnet,
    load_unet,
    save_controlnet,
    save_unet,
)
from cn_jax.weights.sd import StableDiffusion, load_pipeline  # noqa: I001 (after weights)

__version__ = "0.1.0"

__all__ = [
    "Kernels",
    "ControlNet",
    "ControlNetConfig",
    "ControlNetPipeline",
    "ControlledBlock",
    "NoiseScheduleConfig",
    "StableDiffusion",
    "UNet",
    "UNetConfig",
    "WeightFileError",
    "combine_controlnet_residuals",
    "init_controlnet_from_unet",
    "load_controlnet",
    "load_pipeline",
    "load_unet",
    "save_controlnet",
    "save_unet",
]
