"""What every model family answers: the `Family` interface, and `PromptEmbeds`, what a prompt becomes.

A family is the knowledge one architecture needs and nothing more: which pipeline classes draw with it, its
text encoders (with their kohya prefixes and embedding-file keys), how a prompt is encoded, what extra
conditioning its UNet takes, how kohya names its UNet modules, where its single-file configs live, and its
defaults. Commands ask the family of the pipeline they hold (`morphkit.families.family_of`); none of them
tests for a particular family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: the pipeline's attribute names, its kohya prefix, its key in embedding files."""

    attr: str  # "text_encoder" or "text_encoder_2": the pipeline attribute and LoRA part name
    tokenizer: str  # "tokenizer" or "tokenizer_2"
    kohya_prefix: str  # "lora_te_" (SD 1.x), "lora_te1_" / "lora_te2_" (SDXL)
    embedding_key: str  # "clip_l" or "clip_g": the key of its vectors in a textual-inversion file


@dataclass
class PromptEmbeds:
    """A prompt as the UNet reads it: the token embeddings and, for SDXL, the pooled embedding and time ids.

    Every tensor has the batch first, so a batch of prompts is one `PromptEmbeds` (`cat`), and a morph's frames
    interpolate all of it per sample (`lerp`). SD 1.x fills `embeds` alone.
    """

    embeds: torch.Tensor  # (B, tokens, dim)
    pooled: torch.Tensor | None = None  # (B, pooled dim): text_encoder_2's projected end-of-text state (SDXL)
    time_ids: torch.Tensor | None = None  # (B, 6): original size, crop top-left, target size (SDXL)

    def __len__(self) -> int:
        return len(self.embeds)

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.time_ids)))

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def rows(self, index) -> "PromptEmbeds":
        """The samples at `index` (an int, slice or index tensor), batch dimension kept."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self._map(lambda t: t[index])

    def expand(self, n: int) -> "PromptEmbeds":
        """One prompt repeated for a batch of `n` (it must hold one sample)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        first = items[0]
        return PromptEmbeds(*(None if getattr(first, f) is None else torch.cat([getattr(i, f) for i in items])
                              for f in ("embeds", "pooled", "time_ids")))

    def lerp(self, other: "PromptEmbeds", alphas: torch.Tensor, lerp) -> "PromptEmbeds":
        """Per sample α: every tensor of `self` (one sample) blended towards `other`'s with `lerp(a, b, alphas)`."""
        fields = [(a, b) for a, b in zip((self.embeds, self.pooled, self.time_ids),
                                          (other.embeds, other.pooled, other.time_ids))]
        return PromptEmbeds(*(None if a is None else lerp(a[0], b[0], alphas) for a, b in fields))

    def zeros_like(self) -> "PromptEmbeds":
        """The empty conditioning SDXL uses for an empty negative prompt (time ids kept: they are not text)."""
        return replace(self, embeds=torch.zeros_like(self.embeds),
                       pooled=None if self.pooled is None else torch.zeros_like(self.pooled))


def as_prompt_embeds(embeds) -> PromptEmbeds:
    """A `PromptEmbeds` from a tensor of token embeddings (SD 1.x) or a `PromptEmbeds` itself."""
    return embeds if isinstance(embeds, PromptEmbeds) else PromptEmbeds(embeds)


class Family:
    """A model family. Subclasses (`morphkit.families.sd15.SD15Family`, `.sdxl.SDXLFamily`) fill in the answers."""

    name: str  # "sd15", "sdxl": in cache keys and file headers
    label: str  # "SD 1.x", "SDXL": in messages
    default_model: str
    default_controlnet: str
    controlnet_example: str  # for messages: 'SD 1.5 ControlNet (such as ...)'
    upcast_vae_in_fp16: bool
    default_resolution: int
    default_guidance: float  # stylize's classifier-free guidance
    default_lora_rank: int  # a subject/style LoRA's rank (DESIGN.md's references): for the trainer
    tiny_name: str  # the built-in test model's name for --model
    text_encoders: tuple[TextEncoder, ...]
    config_folder: Path  # the diffusers configs for single-file checkpoints (no weights)
    controlnet_config_folder: Path
    lora_bases: tuple[str, ...]  # the bases `lora_files.made_for` names of LoRAs that fit this family
    pipeline_names: dict[str, str]  # "txt2img" / "img2img" / "controlnet_img2img" -> diffusers class name

    def pipeline_class(self, kind: str = "txt2img"):
        """The diffusers pipeline class for `kind`: txt2img, img2img or controlnet_img2img."""
        import diffusers

        return getattr(diffusers, self.pipeline_names[kind])

    def pipeline_kwargs(self) -> dict:
        """What `from_pretrained` / `from_single_file` take besides the weights (no safety checker)."""
        return {}

    def tiny_controlnet(self) -> Path:
        """The folder of the family's tiny ControlNet (`--controlnet tiny`)."""
        raise NotImplementedError

    def part_names(self) -> tuple[str, ...]:
        """The model parts a LoRA may adapt: unet, then the text encoders."""
        return ("unet", *(te.attr for te in self.text_encoders))

    def text_encoder_modules(self, pipe) -> dict[str, torch.nn.Module]:
        """{attr: module} of the pipeline's text encoders, in order (te1, te2)."""
        return {te.attr: getattr(pipe, te.attr) for te in self.text_encoders}

    def tokenizers(self, pipe) -> dict[str, object]:
        """{text encoder attr: its tokenizer}, in order."""
        return {te.attr: getattr(pipe, te.tokenizer) for te in self.text_encoders}

    def kohya_prefix(self, part: str) -> str:
        if part == "unet":
            return "lora_unet_"
        return next(te.kohya_prefix for te in self.text_encoders if te.attr == part)

    def encode_prompt(self, pipe, prompt: str, size: tuple[int, int] | None = None) -> PromptEmbeds:
        """`prompt` -> `PromptEmbeds` (fp32, batch 1) for an image of `size` (height, width)."""
        raise NotImplementedError

    def encode_negative(self, pipe, prompt: str, size: tuple[int, int] | None = None) -> PromptEmbeds:
        """The negative prompt's conditioning for classifier-free guidance (as the family's pipelines make it)."""
        return self.encode_prompt(pipe, prompt, size)

    def with_sizes(self, cond: PromptEmbeds, sizes: list[tuple[int, int]]) -> PromptEmbeds:
        """`cond` (from `encode_tokens`, one row per size) with the size conditioning of images of `sizes`
        (height, width) where the family has one (SDXL's time ids); as it is elsewhere."""
        return cond

    def added_cond_kwargs(self, cond: PromptEmbeds, dtype=None) -> dict | None:
        """The UNet's `added_cond_kwargs` for `cond` (None where the UNet takes none)."""
        return None

    def unet_config(self) -> dict:
        """The UNet config of the family's base model, as shipped in `config_folder` (no weights)."""
        import json

        return json.loads((self.config_folder / "unet" / "config.json").read_text(encoding="utf-8"))

    def kohya_unet_name(self, path: str, unet_config) -> str:
        """A diffusers UNet module path as the family's kohya files name it (without `lora_unet_`)."""
        return path.replace(".", "_")

    def __repr__(self) -> str:
        return f"<Family {self.name}>"
