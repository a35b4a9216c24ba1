"""`tiny-sdxl`: a small SDXL-architecture model, built in code from a fixed seed, as `morphkit.tiny` is for SD 1.5.

Every part SDXL has, at toy size: two CLIP text encoders (the second a `CLIPTextModelWithProjection`, whose
projected output is the pooled embedding) with their tokenizers, a UNet with `addition_embed_type="text_time"`
(its added embedding reads 6 time ids x `addition_time_embed_dim` + the pooled width), a VAE that downsamples by
8, SDXL's scheduler settings, and a matching ControlNet. It is saved as a diffusers folder in the cache and
loaded from there like any local folder, so tests run SDXL's real code paths in seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .tiny import _tiny_controlnet, _tiny_text_encoder, _tiny_vae, _write_tokenizer, built_in_cache, save_tiny

TINY_SDXL_NAME = "tiny-sdxl"
TINY_SDXL_VERSION = "tiny-sdxl-v3"  # v3: the tokenizer without a gap in its ids (tiny-v2's)
# Random UNets differ in how fast fixed-point inversion converges in few steps: of seeds 0 to 4, seed 1 reaches
# 8e-7 round-trip latent error at 8 steps (20 iterations, tolerance 1e-7); seeds 0, 2 and 3 need about 20 steps.
# Tests run few steps, so tiny-sdxl is built from seed 1.
TINY_SDXL_SEED = 1
TINY_SDXL_RESOLUTION = 64
TINY_SDXL_UNET_CHANNELS = (32, 64)
TINY_SDXL_TEXT_WIDTHS = (32, 48)  # text_encoder, text_encoder_2 (unequal, as 768 and 1280 are: single-file loading tells them apart by width)
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_POOLED_DIM = 32

# SDXL base's scheduler settings (its scheduler_config.json): morphkit samples with DDIM from this config.
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)


def build_tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = TINY_SDXL_SEED) -> Path:
    """Build tiny-sdxl from `seed` and save it, diffusers-style, into `folder` (which must not exist)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = Path(folder)
    tokenizer, vocab_size = _write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    text_encoder = _tiny_text_encoder(tokenizer, vocab_size, seed + 10)
    text_encoder_2 = _tiny_text_encoder_2(tokenizer, vocab_size, seed + 11)
    unet = _tiny_sdxl_unet(seed + 12)
    vae = _tiny_vae(seed + 13)
    vae.register_to_config(force_upcast=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True)
    return save_tiny(folder, pipe, _tiny_controlnet(unet, seed + 14), f"{TINY_SDXL_VERSION} seed={seed}")


def _tiny_text_encoder_2(tokenizer, vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=vocab_size, hidden_size=TINY_SDXL_TEXT_WIDTHS[1], intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       projection_dim=TINY_SDXL_POOLED_DIM, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _tiny_sdxl_unet(seed: int):
    """SDXL's UNet layout (two resnets per level, no attention at the first level, two transformer blocks at the
    second, linear projections, text-time added embedding) at toy width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_SDXL_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=TINY_SDXL_UNET_CHANNELS,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(TINY_SDXL_TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_POOLED_DIM,
        norm_num_groups=8,
    )


def tiny_sdxl_model_path() -> Path:
    """tiny-sdxl's folder in the cache, built on first use (about a second)."""
    return built_in_cache(TINY_SDXL_VERSION, build_tiny_sdxl_pipeline)


def tiny_sdxl_controlnet_path() -> Path:
    return tiny_sdxl_model_path() / "controlnet"
