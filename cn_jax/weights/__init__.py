"""Weight files: safetensors I/O, Flax <-> PyTorch key maps, diffusers and original layouts."""

from cn_jax.weights.errors import WeightFileError
from cn_jax.weights.folders import (
    infer_controlnet_config,
    load_controlnet,
    load_unet,
    save_controlnet,
    save_unet,
)
from cn_jax.weights.safetensors_io import (
    SafetensorsFile,
    load_pickle_checkpoint,
    read_safetensors,
    read_weights,
    write_safetensors,
)

__all__ = [
    "SafetensorsFile",
    "WeightFileError",
    "infer_controlnet_config",
    "load_controlnet",
    "load_pickle_checkpoint",
    "load_unet",
    "read_safetensors",
    "read_weights",
    "save_controlnet",
    "save_unet",
    "write_safetensors",
]
