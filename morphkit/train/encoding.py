"""Latents and text embeddings of the training examples, computed once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import Example
from ..images import center_crop, resize_to_policy
from ..families import PromptEmbeds
from ..models import encode_conditioning, encode_image


@dataclass
class EncodedExample:
    latents: list[torch.Tensor]  # [plain] or [plain, flipped], each (4, h, w)
    # one conditioning per caption (a one-row `PromptEmbeds`, or SD 1.x's (77, dim) embeddings); empty when the
    # text encoder trains (captions are encoded at every step then)
    embeddings: list[PromptEmbeds | torch.Tensor]
    captions: list[str] = field(default_factory=list)
    empty: PromptEmbeds | None = None  # the conditioning of "" (a dropped caption), when captions may be dropped


@torch.no_grad()
def encode_examples(pipe, examples: list[Example], resolution: int, crop: str, random_flip: bool,
                    embed: bool = True, dropout: bool = False) -> list[EncodedExample]:
    """VAE latents and text embeddings of every example, computed once, fp32, on the pipeline's device.

    With crop 'center' the image is cropped square before encoding; with 'random' the latent of the
    whole (policy-sized) image is kept and a square window is cut from it at each step; with 'none'
    the whole image is used. With `embed` False the captions are kept as text only (a text encoder that
    trains encodes them at every step); with `dropout` the embedding of "" is kept too.
    """
    prompt_cache: dict[tuple, PromptEmbeds] = {}

    def embedding(caption: str, size: tuple[int, int]) -> PromptEmbeds:
        """The caption's conditioning for an image of `size` (SDXL's time ids hold the size)."""
        if (caption, size) not in prompt_cache:
            prompt_cache[caption, size] = encode_conditioning(pipe, caption, size)
        return prompt_cache[caption, size]

    encoded = []
    for ex in examples:
        img = resize_to_policy(ex.image, resolution)
        if crop == "center":
            img = center_crop(img, (resolution, resolution))
        variants = [img, img.transpose(0)] if random_flip else [img]  # 0 = FLIP_LEFT_RIGHT
        latents = [encode_image(pipe, v)[0] for v in variants]
        size = (img.height, img.width)
        embeddings = [embedding(c, size) for c in ex.captions] if embed else []
        empty = embedding("", size) if embed and dropout else None
        encoded.append(EncodedExample(latents, embeddings, list(ex.captions), empty))
    return encoded
