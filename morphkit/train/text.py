"""The text side of training: captions to the UNet's conditioning, and what of the text encoders trains.

Three ways, chosen by the settings:
- nothing trains (the default): each caption is encoded once, and a step looks its embedding up;
- `train_text_encoder`: a LoRA on every text encoder's attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`);
- `train_text_encoder_ti` (pivotal tuning): new tokens `<s0><s1>…` stand for the token abstraction (`TOK`) in
  every caption, and only their embeddings train, for the first `train_text_encoder_ti_frac` of the steps.
In the last two a step encodes its captions through the text encoders, with gradients.

New tokens are added the way peft adds adapters: the encoder's input embedding is wrapped (`NewTokens`), the
base table stays frozen and untouched, and only the new rows are a parameter. `settle` writes them into the
encoder's table once training ends, so the pipeline then works like any with a loaded embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..families import PromptEmbeds, family_of
from ..lora import LoraShape
from .settings import TrainSettings

@dataclass
class TextPart:
    """One text encoder of a pipeline, with its tokenizer and its name in files (from the model's family)."""

    name: str  # "text_encoder", "text_encoder_2"
    tokenizer: object
    encoder: torch.nn.Module
    embedding_key: str  # "clip_l", "clip_g": where its new tokens' vectors go in an embedding file


def text_parts(pipe) -> list[TextPart]:
    """The pipeline's text encoders, in the family's order."""
    return [TextPart(te.attr, getattr(pipe, te.tokenizer), getattr(pipe, te.attr), te.embedding_key)
            for te in family_of(pipe).text_encoders]


def new_token_names(settings: TrainSettings) -> list[str]:
    """The tokens pivotal tuning adds: `<s0>`, `<s1>`, … (diffusers' advanced trainer names them so)."""
    return [f"<s{i}>" for i in range(settings.num_new_tokens_per_abstraction)]


def with_tokens(caption: str, settings: TrainSettings) -> str:
    """`caption` with the token abstraction replaced by the new tokens (plain text, never a pattern)."""
    if not settings.train_text_encoder_ti:
        return caption
    return caption.replace(settings.token_abstraction, "".join(new_token_names(settings)))


def check_abstraction(captions: list[str], settings: TrainSettings) -> None:
    """Pivotal tuning teaches tokens that stand for the abstraction; captions without it would teach nothing."""
    if settings.train_text_encoder_ti and not any(settings.token_abstraction in c for c in captions):
        raise ConfigError(
            f"--train-text-encoder-ti teaches new tokens that stand for {settings.token_abstraction!r} "
            "(--token-abstraction), but no caption holds it. Put it in the captions or --instance-prompt (like 'a "
            f"photo of {settings.token_abstraction} dog'), or give the --token-abstraction your captions use.")


class NewTokens(torch.nn.Module):
    """An input embedding with trainable rows for ids `first_id …`, the base table frozen beneath."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base, self.first_id = base, first_id
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = self.base(ids.clamp(max=self.first_id - 1))
        new = ids >= self.first_id
        rows = self.vectors.to(known.dtype)[(ids - self.first_id).clamp(0, len(self.vectors) - 1)]
        return torch.where(new[..., None], rows, known)


def add_new_tokens(part: TextPart, settings: TrainSettings) -> NewTokens:
    """Add the new tokens to `part`'s tokenizer and wrap its input embedding; they start from the initializer
    word's embedding (its tokens' mean), or from the mean of every embedding."""
    names = new_token_names(settings)
    if any(n in part.tokenizer.get_vocab() for n in names):
        raise ConfigError(f"The tokenizer of {part.name} already has the tokens {', '.join(names)} (a pipeline reused "
                          "after pivotal tuning, or an embedding loaded). Load the model afresh to train new ones.")
    base = part.encoder.get_input_embeddings()
    part.tokenizer.add_tokens(names)
    ids = part.tokenizer.convert_tokens_to_ids(names)
    first = ids[0]
    if ids != list(range(first, first + len(names))):
        raise ConfigError(f"The tokenizer of {part.name} gave the new tokens the ids {ids}, not consecutive ones; they "
                          "cannot be trained. Load the model afresh.")
    with torch.no_grad():
        table = base.weight.float()
        start = table.mean(0)
        if settings.initializer_token:
            word = part.tokenizer(settings.initializer_token, add_special_tokens=False).input_ids
            if not word:
                raise ConfigError(f"--initializer-token {settings.initializer_token!r} has no tokens.")
            start = table[word].mean(0)
    wrapped = NewTokens(base, first, start.expand(len(names), -1))
    part.encoder.set_input_embeddings(wrapped)
    return wrapped


def settle_new_tokens(part: TextPart, wrapped: NewTokens) -> None:
    """Write the trained rows into `part`'s embedding table and unwrap it: the encoder is a plain one again."""
    part.encoder.set_input_embeddings(wrapped.base)
    needed = wrapped.first_id + len(wrapped.vectors)
    if needed > wrapped.base.num_embeddings:  # (a table may have spare rows already)
        part.encoder.resize_token_embeddings(needed)
    with torch.no_grad():
        table = part.encoder.get_input_embeddings().weight
        table[wrapped.first_id:wrapped.first_id + len(wrapped.vectors)] = wrapped.vectors.to(table.dtype)


def add_text_lora(part: TextPart, shape: LoraShape, adapter_name: str = "default") -> list[torch.Tensor]:
    """A trainable LoRA on `part`'s encoder (its base weights frozen); the LoRA's tensors, fp32."""
    from peft import LoraConfig

    part.encoder.requires_grad_(False)
    config = LoraConfig(r=shape.rank, lora_alpha=shape.effective_alpha, init_lora_weights="gaussian",
                        target_modules=list(shape.targets), use_dora=shape.use_dora)
    try:
        part.encoder.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        raise ConfigError(f"The text-encoder targets {', '.join(shape.targets)} (--text-encoder-targets) do not fit "
                          f"{part.name}: {e}") from None
    params = [p for n, p in part.encoder.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def encode_captions(pipe, parts: list[TextPart], captions: list[str], sizes: list[tuple[int, int]]) -> PromptEmbeds:
    """The conditioning of `captions` for images of `sizes`, as the family's pipeline computes it, here with
    gradients to whatever of the text encoders trains."""
    family = family_of(pipe)
    ids = [part.tokenizer(captions, padding="max_length", max_length=part.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids for part in parts]
    return family.with_sizes(family.encode_tokens([part.encoder for part in parts], ids), sizes)
