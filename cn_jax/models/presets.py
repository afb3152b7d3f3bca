"""Named Stable Diffusion architectures, as the released diffusers folders
describe them (config.json of each component), for loading an original
single-file checkpoint, which carries no config of its own, and for random
models at real shapes (`weights.sd.random_pipeline`).

Each preset names the component configs of a pipeline folder: "unet", "vae"
(None: pixel space), "text_encoder", "scheduler", and for SDXL "text_encoder_2"
(a `CLIPTextModelWithProjection`), the key that marks the SDXL family."""

from __future__ import annotations

import copy
from typing import Any

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# CLIP ViT-L/14, SD 1.x's text encoder and the first of
# stabilityai/stable-diffusion-xl-base-1.0's two, and
# OpenCLIP ViT-bigG/14 with its projection (text_encoder_2/config.json; the legacy
# eos_token_id 2, i.e. the end-of-text token is the highest id).
_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
_OPEN_CLIP_BIGG = {
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

_SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

# SDXL base's scheduler_config.json (EulerDiscreteScheduler); the sampler fields are kept aside.
_SDXL_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # cn_jax's embedded default: a pixel-space model (no VAE, latent factor 1)
    # at 32 px with a 2-layer text encoder over the bundled tiny tokenizer.
    # Attention only at 16 and 8 px keeps a CPU step cheap.
    "tiny": {
        "unet": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "cross_attention_dim": 64,
            "norm_num_groups": 16,
            "sample_size": 32,
        },
        "vae": None,
        "text_encoder": {
            "vocab_size": 594,
            "hidden_size": 64,
            "intermediate_size": 128,
            "projection_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 593,
            "bos_token_id": 592,
            "eos_token_id": 593,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
    },
    # runwayml / stable-diffusion-v1-5: CLIP ViT-L/14 text encoder, 512 px.
    "sd15": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _SD_DOWN,
            "up_block_types": _SD_UP,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "norm_num_groups": 32,
            "sample_size": 64,
        },
        "vae": _VAE,
        "text_encoder": _CLIP_L,  # SD 1.x's text encoder is SDXL's first
        "scheduler": _SCHEDULE,
    },
    # stabilityai / stable-diffusion-2-1 (768 px, v-prediction): OpenCLIP ViT-H
    # text encoder, its penultimate layer (23 of 24 blocks), linear projections,
    # 64-wide heads, attention upcast to float32.
    "sd21": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _SD_DOWN,
            "up_block_types": _SD_UP,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
            "norm_num_groups": 32,
            "sample_size": 96,
        },
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "projection_dim": 512,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        "scheduler": {**_SCHEDULE, "prediction_type": "v_prediction"},
    },
    # stabilityai / stable-diffusion-xl-base-1.0 (1024 px): 3 levels, no attention in the
    # first, transformer depths 1, 2, 10 (the mid block 10), 64-wide heads, the context both
    # text encoders' penultimate states (768 + 1280 = 2048), and the text_time embedding of
    # the pooled OpenCLIP embedding (1280) and six size numbers (6 x 256): 2816 inputs.
    "sdxl": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _SDXL_DOWN,
            "up_block_types": _SDXL_UP,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "upcast_attention": None,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
            "sample_size": 128,
        },
        # SD's VAE retrained: same architecture, latents scaled by 0.13025.
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPEN_CLIP_BIGG,
        "scheduler": _SDXL_SCHEDULE,
    },
    # SDXL's structure at toy widths, for tests and demo-sized checks: 64 px images (VAE
    # factor 8, 8 x 8 latents), 3 levels with no transformer in the first, then 1 and 2 (the
    # mid block 2: depths differ per level, as SDXL's 2 and 10),
    # text_time with a pooled embedding of 32 and 8 features per size number (32 + 6 x 8),
    # two 2-layer text encoders over the bundled tiny tokenizer (the second pads with "!").
    "sdxl-tiny": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": _SDXL_DOWN,
            "up_block_types": _SDXL_UP,
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 2,
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 1, 2],
            "cross_attention_dim": 32 + 64,
            "use_linear_projection": True,
            "upcast_attention": None,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "norm_num_groups": 16,
            "sample_size": 8,
        },
        "vae": {
            **_VAE,
            "block_out_channels": [16, 32, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        },
        "text_encoder": {
            "vocab_size": 594,
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 593,
            "bos_token_id": 592,
            "eos_token_id": 593,
        },
        "text_encoder_2": {
            "vocab_size": 594,
            "hidden_size": 64,
            "intermediate_size": 128,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 0,
            "bos_token_id": 592,
            "eos_token_id": 593,
        },
        "scheduler": _SDXL_SCHEDULE,
    },
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of the named architecture's component configs."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; named configs: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
