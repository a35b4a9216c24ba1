"""Stable Diffusion XL: two text encoders, pooled embeddings and size conditioning, 1024 px.

- **Prompt.** Both CLIP encoders (ViT-L `text_encoder`, ViT-bigG `text_encoder_2`, a
  `CLIPTextModelWithProjection`) read the prompt; their penultimate hidden states are concatenated (768 + 1280
  = 2048 wide), and the second one's projected end-of-text state is the pooled embedding (1280).
- **Time ids.** The UNet's `addition_embed_type="text_time"` also reads (original height, width, crop top,
  crop left, target height, width): morphkit draws whole images at their frame size, so original = target and
  the crop is (0, 0), as diffusers' pipeline does by default.
- **kohya names.** The UNet in the original (LDM) layout (`lora_unet_input_blocks_4_1_...`,
  `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_0_1_...`); text encoders `lora_te1_` and `lora_te2_`.
- **Refiner.** The refiner has only the bigG encoder and aesthetic-score time ids; morphkit does not draw with
  it (detection refuses it).
"""

from __future__ import annotations

import torch

from .base import CONFIGS, Family, PromptEmbeds, TextEncoder


class SDXLFamily(Family):
    name = "sdxl"
    label = "SDXL"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    default_controlnet = "diffusers/controlnet-canny-sdxl-1.0"
    default_vae = "madebyollin/sdxl-vae-fp16-fix"  # for --vae: SDXL's own VAE overflows in fp16
    controlnet_example = "SDXL ControlNet (such as diffusers/controlnet-canny-sdxl-1.0)"
    upcast_vae_in_fp16 = True  # decode in fp32 when the VAE says force_upcast
    default_resolution = 1024
    default_guidance = 5.0
    default_lora_rank = 32
    tiny_name = "tiny-sdxl"
    text_encoders = (TextEncoder("text_encoder", "tokenizer", "lora_te1_", "clip_l"),
                     TextEncoder("text_encoder_2", "tokenizer_2", "lora_te2_", "clip_g"))
    config_folder = CONFIGS / "sdxl"
    controlnet_config_folder = CONFIGS / "sdxl-controlnet"
    lora_bases = ("SDXL",)  # what `lora_files.made_for` says of LoRAs that fit
    pipeline_names = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                      "controlnet_img2img": "StableDiffusionXLControlNetImg2ImgPipeline"}

    def pipeline_kwargs(self) -> dict:
        return dict(add_watermarker=False)  # an invisible watermark would change the pixels morphkit measures

    def tiny_controlnet(self):
        from ..tiny_sdxl import tiny_sdxl_controlnet_path

        return tiny_sdxl_controlnet_path()

    def tokenize(self, pipe, prompt: str) -> list[torch.Tensor]:
        """Token ids (1, 77) for each of the two tokenizers."""
        return [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]

    def encode_tokens(self, text_encoders: list, input_ids: list[torch.Tensor]) -> PromptEmbeds:
        """Token ids of both tokenizers -> `PromptEmbeds` (embeds, pooled; no time ids), with gradients if the
        encoders have them: the penultimate hidden states of both, concatenated, and text_encoder_2's pooled
        (projected) output, exactly as `StableDiffusionXLPipeline.encode_prompt` computes them."""
        states, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            states.append(out.hidden_states[-2])
        return PromptEmbeds(torch.cat(states, dim=-1), pooled)

    @torch.no_grad()
    def encode_prompt(self, pipe, prompt: str, size: tuple[int, int] | None = None) -> PromptEmbeds:
        """(1, 77, 2048) embeds, (1, 1280) pooled and (1, 6) time ids for an image of `size`, fp32."""
        encoders = list(self.text_encoder_modules(pipe).values())
        cond = self.encode_tokens(encoders, self.tokenize(pipe, prompt))
        size = size or (self.default_resolution,) * 2
        return PromptEmbeds(cond.embeds.float(), cond.pooled.float(), time_ids(size, (0, 0), size))

    def encode_negative(self, pipe, prompt: str, size: tuple[int, int] | None = None) -> PromptEmbeds:
        """As SDXL's pipelines do: an empty negative prompt is all zeros (`force_zeros_for_empty_prompt`)."""
        cond = self.encode_prompt(pipe, prompt, size)
        if prompt == "" and getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            return cond.zeros_like()
        return cond

    def with_sizes(self, cond: PromptEmbeds, sizes: list[tuple[int, int]]) -> PromptEmbeds:
        ids = torch.cat([time_ids(size, (0, 0), size) for size in sizes]).to(cond.embeds.device)
        return PromptEmbeds(cond.embeds, cond.pooled, ids)

    def added_cond_kwargs(self, cond: PromptEmbeds, dtype=None) -> dict:
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("SDXL's UNet needs pooled prompt embeddings and time ids; encode the prompt with "
                             "the SDXL family (morphkit.families.SDXL.encode_prompt).")
        return {"text_embeds": cond.pooled.to(dtype=dtype), "time_ids": cond.time_ids.to(dtype=dtype)}

    def kohya_unet_name(self, path: str, unet_config) -> str:
        from ..checkpoint import unet_ldm_path

        return unet_ldm_path(path, unet_config).replace(".", "_")


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's size conditioning, (1, 6) fp32: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


SDXL = SDXLFamily()
