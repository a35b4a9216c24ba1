"""Latents and text embeddings of the training examples, computed once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Example
from ..images import center_crop, resize_to_policy
from ..models import encode_image, encode_prompt


@dataclass
class EncodedExample:
    latents: list[torch.Tensor]  # [plain] or [plain, flipped], each (4, h, w)
    embeddings: list[torch.Tensor]  # one (77, dim) per caption


@torch.no_grad()
def encode_examples(pipe, examples: list[Example], resolution: int, crop: str, random_flip: bool) -> list[EncodedExample]:
    """VAE latents and text embeddings of every example, computed once, fp32, on the pipeline's device.

    With crop 'center' the image is cropped square before encoding; with 'random' the latent of the
    whole (policy-sized) image is kept and a square window is cut from it at each step; with 'none'
    the whole image is used.
    """
    prompt_cache: dict[str, torch.Tensor] = {}
    encoded = []
    for ex in examples:
        img = resize_to_policy(ex.image, resolution)
        if crop == "center":
            img = center_crop(img, (resolution, resolution))
        variants = [img, img.transpose(0)] if random_flip else [img]  # 0 = FLIP_LEFT_RIGHT
        latents = [encode_image(pipe, v)[0] for v in variants]
        for caption in ex.captions:
            if caption not in prompt_cache:
                prompt_cache[caption] = encode_prompt(pipe, caption)[0]
        encoded.append(EncodedExample(latents, [prompt_cache[c] for c in ex.captions]))
    return encoded
