"""What a training run trains, as optimizer groups: the UNet's LoRA, and the text encoders' LoRA or new tokens.

`Trainables.attach` adds them to a pipeline; the loop asks it for the optimizer's groups, the tensors whose
gradients count this step, and the conditioning of a batch's captions; checkpoints save and load its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import PromptEmbeds
from ..lora import add_lora
from .settings import TrainSettings
from .text import NewTokens, TextPart, add_new_tokens, add_text_lora, encode_captions, settle_new_tokens, text_parts


@dataclass
class Trainables:
    unet: list[torch.Tensor]
    parts: list[TextPart] = field(default_factory=list)
    text_lora: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # text encoder name -> LoRA tensors
    tokens: dict[str, NewTokens] = field(default_factory=dict)  # text encoder name -> its new tokens
    tokens_until: int = 0  # the step from which the new tokens are frozen
    adapter_name: str = "default"
    unet_model: torch.nn.Module | None = None  # the UNet the LoRA lives in
    pipe: object | None = None

    @classmethod
    def attach(cls, pipe, settings: TrainSettings, steps: int, adapter_name: str = "default") -> "Trainables":
        """Add this run's adapters (and new tokens) to `pipe`, seeded, the base weights frozen."""
        torch.manual_seed(settings.seed)  # the LoRA's initial weights
        made = cls(unet=add_lora(pipe.unet, settings.shape, adapter_name), adapter_name=adapter_name,
                   unet_model=pipe.unet, pipe=pipe)
        if settings.train_text_encoder or settings.train_text_encoder_ti:
            made.parts = text_parts(pipe)
        for part in made.parts:
            if settings.train_text_encoder:
                made.text_lora[part.name] = add_text_lora(part, settings.text_encoder_shape, adapter_name)
            else:
                part.encoder.requires_grad_(False)
                made.tokens[part.name] = add_new_tokens(part, settings)
        made.tokens_until = round(settings.train_text_encoder_ti_frac * steps) if made.tokens else 0
        return made

    @property
    def text_trains(self) -> bool:
        """Whether captions must go through the text encoders at every step (with gradients)."""
        return bool(self.text_lora or self.tokens)

    def groups(self, settings: TrainSettings) -> list[dict]:
        """The optimizer's parameter groups, each with its own learning rate and weight decay."""
        groups = [{"params": self.unet, "lr": settings.learning_rate, "weight_decay": settings.adam_weight_decay,
                   "name": "unet"}]
        text = [p for ps in self.text_lora.values() for p in ps] + [t.vectors for t in self.tokens.values()]
        if text:
            groups.append({"params": text, "lr": settings.text_lr, "name": "text_encoder",
                           "weight_decay": settings.adam_weight_decay_text_encoder})
        for group in groups:
            group["base_lr"] = group["lr"]
        return groups

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor that trains now (frozen new tokens no longer do)."""
        text = [p for ps in self.text_lora.values() for p in ps]
        return self.unet + text + [t.vectors for t in self.tokens.values() if t.vectors.requires_grad]

    def at_step(self, step: int) -> None:
        """Freeze the new tokens once their fraction of the run is done: without a gradient the optimizer skips
        them, so neither their moments nor the weight decay move them again."""
        if self.tokens and step >= self.tokens_until:
            for wrapped in self.tokens.values():
                wrapped.vectors.requires_grad_(False)
                wrapped.vectors.grad = None

    def conditioning(self, captions: list[str], sizes: list[tuple[int, int]]) -> PromptEmbeds:
        """The UNet's conditioning of `captions` for images of `sizes`, through the (training) text encoders."""
        return encode_captions(self.pipe, self.parts, captions, sizes)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.encoder.train(mode and part.name in self.text_lora)

    def release(self) -> None:
        """The end of training: nothing requires gradients, the encoders are in eval mode."""
        for p in self.unet + [p for ps in self.text_lora.values() for p in ps]:
            p.requires_grad_(False)
        for wrapped in self.tokens.values():
            wrapped.vectors.requires_grad_(False)
        self.train(False)

    def settle(self) -> None:
        """Write the new tokens into the encoders' tables (the pipeline then knows them as its own tokens)."""
        for part in self.parts:
            if part.name in self.tokens:
                settle_new_tokens(part, self.tokens.pop(part.name))

    # --------------------------------------------------------------------------------------- state

    def state(self) -> dict[str, torch.Tensor]:
        """Everything trained, by name: `unet.<peft key>`, `<text encoder>.<peft key>`, `tokens.<text encoder>`."""
        from peft.utils import get_peft_model_state_dict

        state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(self.unet_model, adapter_name=self.adapter_name).items()}
        for part in self.parts:
            if part.name in self.text_lora:
                peft_state = get_peft_model_state_dict(part.encoder, adapter_name=self.adapter_name)
                state.update({f"{part.name}.{k}": v for k, v in peft_state.items()})
            if part.name in self.tokens:
                state[f"tokens.{part.name}"] = self.tokens[part.name].vectors
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        def part_of(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        set_peft_model_state_dict(self.unet_model, part_of("unet."), adapter_name=self.adapter_name)
        for part in self.parts:
            if part.name in self.text_lora:
                set_peft_model_state_dict(part.encoder, part_of(part.name + "."), adapter_name=self.adapter_name)
            if part.name in self.tokens:
                with torch.no_grad():
                    self.tokens[part.name].vectors.copy_(state[f"tokens.{part.name}"])
