"""The pure pieces of a step: its learning rate and its random draws, each a function of (seed, step) alone."""

from __future__ import annotations

import hashlib
import math

import torch

from ..families import PromptEmbeds, as_prompt_embeds
from .encoding import EncodedExample
from .settings import DEFAULT_STEPS, TrainSettings


def lr_at(step: int, base_lr: float, schedule: str, warmup: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr


def rng(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent CPU generator for (seed, stream, index): draws depend on nothing else."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def batch_indices(micro_step: int, n: int, batch_size: int, seed: int, stream: str = "epoch") -> list[int]:
    """Which examples micro-batch `micro_step` holds: each epoch is a fresh permutation."""
    per_epoch = math.ceil(n / batch_size)
    epoch, within = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=rng(seed, stream, epoch)).tolist()
    picked = order[within * batch_size:(within + 1) * batch_size]
    return picked + order[: batch_size - len(picked)]  # a short last batch wraps around


def draw_batch(encoded: list[EncodedExample], micro_step: int, settings: TrainSettings, latent_size: int,
               global_batch: int | None = None, stream: str = "batch", repeats: int | None = None):
    """The latents, conditioning and captions of micro-batch `micro_step`: flips, crops, captions and caption
    dropout drawn by seed. Returns (latents, a `PromptEmbeds` or None when captions are not encoded ahead, captions).

    `global_batch` (default `settings.batch_size`) is the batch of every process together: processes that
    train data-parallel each draw the whole of it and keep their own rows, so that together they see the
    batch that one process with that batch size would see. With `repeats` (default `settings.repeats`) an
    epoch holds every example that many times. `stream` names an independent stream of draws (class images
    draw their own).
    """
    gen = rng(settings.seed, stream, micro_step)
    repeats = settings.repeats if repeats is None else repeats
    dropout = settings.caption_dropout_rate if stream == "batch" else 0.0
    order_stream = "epoch" if stream == "batch" else stream + "-epoch"
    latents, embeds, captions = [], [], []
    for index in batch_indices(micro_step, len(encoded) * repeats, global_batch or settings.batch_size, settings.seed,
                               order_stream):
        ex = encoded[index % len(encoded)]
        variant = int(torch.randint(len(ex.latents), (1,), generator=gen))
        z = ex.latents[variant]
        if settings.crop == "random":
            top = int(torch.randint(z.shape[1] - latent_size + 1, (1,), generator=gen))
            left = int(torch.randint(z.shape[2] - latent_size + 1, (1,), generator=gen))
            z = z[:, top:top + latent_size, left:left + latent_size]
        latents.append(z)
        pick = int(torch.randint(max(len(ex.embeddings), len(ex.captions)), (1,), generator=gen))
        dropped = bool(dropout) and float(torch.rand(1, generator=gen)) < dropout
        captions.append("" if dropped else (ex.captions[pick] if ex.captions else None))
        if ex.embeddings:
            embeds.append(one_row(ex.empty if dropped else ex.embeddings[pick]))
    return torch.stack(latents), (PromptEmbeds.cat(embeds) if len(embeds) == len(latents) else None), captions


def one_row(cond) -> PromptEmbeds:
    """A cached conditioning as one row: SD 1.x's (tokens, dim) embeddings gain the batch dimension."""
    return as_prompt_embeds(cond[None] if isinstance(cond, torch.Tensor) else cond)


def draw_noise(latents: torch.Tensor, gen: torch.Generator, settings: TrainSettings, num_train_timesteps: int):
    """The noise and timesteps of one micro-batch, drawn from `gen` (on the CPU, so every device draws alike)."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=gen).to(latents.device)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=gen).to(latents.device)
    return noise, timesteps


def total_steps(settings: TrainSettings, n_examples: int, processes: int = 1) -> int:
    """Optimizer steps of the run: `steps`, or enough for `epochs` passes over the data by every process together."""
    if settings.steps is not None:
        return settings.steps
    if settings.epochs is not None:
        micro_per_epoch = math.ceil(n_examples * settings.repeats / (settings.batch_size * processes))
        return math.ceil(settings.epochs * micro_per_epoch / settings.gradient_accumulation_steps)
    return DEFAULT_STEPS
