"""Stable Diffusion 1.x: one CLIP text encoder (ViT-L/14), 512 px, no extra UNet conditioning.

kohya names its UNet modules by diffusers' block names (`lora_unet_down_blocks_0_attentions_0_proj_in`) and its
text encoder `lora_te_`. SD 2.x folders have the same parts and load as this family too (a wider text encoder).
"""

from __future__ import annotations

import torch

from .base import CONFIGS, Family, PromptEmbeds, TextEncoder


class SD15Family(Family):
    name = "sd15"
    label = "SD 1.x"
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_controlnet = "lllyasviel/sd-controlnet-canny"
    controlnet_example = "SD 1.5 ControlNet (such as control_v11p_sd15_canny)"
    upcast_vae_in_fp16 = False  # decode in fp32 when the VAE says force_upcast
    default_resolution = 512
    default_guidance = 7.5
    default_lora_rank = 8
    tiny_name = "tiny"
    text_encoders = (TextEncoder("text_encoder", "tokenizer", "lora_te_", "clip_l"),)
    config_folder = CONFIGS / "sd15"
    controlnet_config_folder = CONFIGS / "sd15-controlnet"
    lora_bases = ("SD 1.x", "SD 2.x", "SD 1.x or 2.x")  # what `lora_files.made_for` says of LoRAs that fit
    pipeline_names = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                      "controlnet_img2img": "StableDiffusionControlNetImg2ImgPipeline"}

    def pipeline_kwargs(self) -> dict:
        return dict(safety_checker=None, requires_safety_checker=False)

    def tiny_controlnet(self):
        from ..tiny import tiny_controlnet_path

        return tiny_controlnet_path()

    @torch.no_grad()
    def encode_prompt(self, pipe, prompt: str, size: tuple[int, int] | None = None) -> PromptEmbeds:
        """The text encoder's last hidden states (1, 77, dim), fp32, as `StableDiffusionPipeline` computes them."""
        embeds, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, False)
        return PromptEmbeds(embeds.float())

    def encode_tokens(self, text_encoders: list, input_ids: list[torch.Tensor]) -> PromptEmbeds:
        """Token ids (one tensor per text encoder, from `tokenize`) -> `PromptEmbeds`, with gradients if the
        encoder has them: what a trainer with a text-encoder LoRA calls."""
        (encoder,), (ids,) = text_encoders, input_ids
        return PromptEmbeds(encoder(ids.to(encoder.device))[0])

    def tokenize(self, pipe, prompt: str) -> list[torch.Tensor]:
        tok = pipe.tokenizer
        return [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids]


SD15 = SD15Family()
