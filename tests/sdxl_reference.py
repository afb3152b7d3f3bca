"""A tiny random SDXL ControlNet pipeline in diffusers (every parameter random), saved as
a pipeline folder: the reference of the SDXL pipeline, training and export tests."""

from __future__ import annotations

import functools
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from reference import randomize_
from tiny_tokenizer import build_tiny_clip_tokenizer

MAX_LEN = 16  # token ids per prompt (SDXL: 77)
POOLED = 24  # text_encoder_2's projection width (SDXL: 1280)
# SDXL's structure at toy widths: no attention in the first block, text_time with 6 size
# numbers of 8 features beside the pooled embedding, cross-attention over the two
# encoders' concatenated widths (16 + 32), VAE factor 4.
UNET = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=16 + 32,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + 6 * 8,
    sample_size=16,
)
CONTROLNET = dict(conditioning_embedding_out_channels=(8, 16, 32))  # factor 4, as the VAE


def _text_config(tok, width: int, layers: int, act: str, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kw,
    )  # fmt: skip


def sdxl_pipeline(root: Path) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline, its tokenizers written under `root`."""
    tok = build_tiny_clip_tokenizer(root / "tok", model_max_length=MAX_LEN)
    tok_2 = build_tiny_clip_tokenizer(root / "tok2", pad_token="!", model_max_length=MAX_LEN)
    text = CLIPTextModel(_text_config(tok, 16, 3, "quick_gelu"))
    text_2 = CLIPTextModelWithProjection(_text_config(tok_2, 32, 3, "gelu", projection_dim=POOLED))
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.13025,
    )  # fmt: skip
    unet = UNet2DConditionModel(**UNET)
    for i, m in enumerate((text, text_2, vae, unet)):
        randomize_(m, 60 + i)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading",
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
        unet=unet, scheduler=scheduler,
    )  # fmt: skip


def sdxl_pipeline_folder(root: Path) -> str:
    """`sdxl_pipeline` saved with `save_pretrained` into `root / "sdxl"`."""
    folder = Path(root) / "sdxl"
    sdxl_pipeline(Path(root)).save_pretrained(folder)
    return str(folder)


@functools.cache
def sdxl_controlnets(folder: str, n: int = 2) -> list[ControlNetModel]:
    """`n` random SDXL ControlNets (zero convs random too) copying the folder's UNet."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return [randomize_(ControlNetModel.from_unet(unet, **CONTROLNET), 70 + i) for i in range(n)]
