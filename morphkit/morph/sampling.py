"""Rendering frames and inverting images under per-sample LoRA weights: the UNet-facing part of a morph."""

from __future__ import annotations

import contextlib

import torch

from ..families import PromptEmbeds, as_prompt_embeds
from ..inversion import ExactInversion, Inversion, corrections_along, eps_model, invert_exact, sample_ddim
from ..lora import adapter_weights, one_hot_weights
from ..lora_blend import lora_blend as blend_loras
from .attention import AttentionStore, _AttentionRun, interpolated_self_attention
from .interpolation import lerp, start_latents

ADAPTERS = ("img0", "img1")  # not "a"/"b": diffusers matches adapter names as substrings of module keys


def ends_first(alphas: torch.Tensor) -> torch.Tensor:
    """Frame indices in rendering order: the end frames (α = 0 or 1) first, then the others, each in order."""
    is_end = (alphas == 0) | (alphas == 1)
    return torch.cat([is_end.nonzero().flatten(), (~is_end).nonzero().flatten()])


@torch.no_grad()
def render_frames(pipe, noise_a, noise_b, embeds_a, embeds_b, alphas: torch.Tensor, schedule, guidance: float = 1.0,
                  negative: torch.Tensor | None = None, batch_size: int = 8, adapters=ADAPTERS,
                  progress=None, *, adain: bool = False, blend: str = "adapters",
                  attention: AttentionStore | None = None, corrections: tuple | None = None) -> torch.Tensor:
    """Latents of the frames at `alphas`, `batch_size` frames per UNet call.

    Each frame has its own starting noise (slerp, and AdaIN with `adain`), prompt conditioning (lerp of the
    token embeddings and, for SDXL, of the pooled embeddings and time ids: `PromptEmbeds` or tensors) and
    LoRA blend at its α (`blend`: "adapters" or "factors", see `morphkit.lora_blend`), all given per
    sample inside one batch. The end frames (α = 0 or 1) render first. With `attention` (an
    `AttentionStore`), the in-between frames' self-attention in the up blocks interpolates the ends' for
    the store's first steps; frames whose ends are not among `alphas` read the ends from the store.
    `adapters`: the two adapters blended; empty for no LoRA at all (a tuning-free morph).
    `corrections`: the two images' `invert_exact` corrections (steps, 1, 4, h, w), or None; each frame adds
    their lerp at its α after every step, so the end frames land on their latents exactly and the others
    change continuously with α.
    Returns clean latents (F, 4, h, w) in the order of `alphas`.
    """
    unet, device = pipe.unet, pipe.unet.device
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    chunks = ends_first(alphas).split(batch_size)
    groups = 1 if guidance == 1.0 else 2  # the guided batch is [negative, positive]
    run = None if attention is None else _AttentionRun(attention, record=attention.keep or len(chunks) > 1)
    step_of = {int(t): i for i, t in enumerate(schedule.timesteps)}
    cond_a, cond_b = as_prompt_embeds(embeds_a), as_prompt_embeds(embeds_b)
    out = None
    with interpolated_self_attention(unet, run) if run is not None else contextlib.nullcontext():
        for idx in chunks:
            chunk = alphas[idx]
            x = start_latents(noise_a, noise_b, chunk, adain).to(device, torch.float32)
            embeds = cond_a.lerp(cond_b, chunk, lerp).to(device)
            weights = chunk.float().to(device).repeat(groups)
            neg = None if negative is None else as_prompt_embeds(negative).expand(len(chunk)).to(device)
            if run is not None:
                run.set_batch(chunk, groups, device)
            with blend_loras(unet, adapters, weights, blend) if adapters else adapter_weights(unet, {}):
                model = eps_model(unet, embeds, neg, guidance, pipe.scheduler.config.prediction_type,
                                  pipe.scheduler.alphas_cumprod)
                if run is not None:
                    model = _tracking_steps(model, run, step_of)
                latents = sample_ddim(model, x, schedule, corrections=frame_corrections(corrections, chunk, device))
            if out is None:
                out = latents.new_empty((len(alphas), *latents.shape[1:]))
            out[idx.to(latents.device)] = latents
            if progress is not None:
                progress.update(len(chunk))
    if attention is not None and not attention.keep:
        attention.clear()
    return out


def frame_corrections(corrections: tuple | None, alphas: torch.Tensor, device) -> torch.Tensor | None:
    """The corrections of frames at `alphas` (steps, F, 4, h, w): the lerp of the two images' at each α (exactly
    each image's own at α = 0 and 1), or None."""
    if corrections is None:
        return None
    a, b = (c.to(device, torch.float32) for c in corrections)
    w = alphas.to(device, torch.float32).view(1, -1, 1, 1, 1)
    return a * (1 - w) + b * w


def _tracking_steps(model, run: _AttentionRun, step_of: dict):
    def tracked(x, t):
        run.set_step(step_of[int(t)])
        return model(x, t)

    return tracked


def sample_weights(adapters: list[str | None], device, groups: int = 1) -> dict[str, torch.Tensor]:
    """Per-sample adapter weights that run sample i under adapter `adapters[i]` alone (None: the base model
    alone), for a batch repeated `groups` times (2 with classifier-free guidance)."""
    weights = one_hot_weights([a for a in adapters], device)
    return {name: w.repeat(groups) for name, w in weights.items() if name is not None}


@torch.no_grad()
def invert_under_loras(pipe, latents: torch.Tensor, embeds: torch.Tensor | PromptEmbeds, adapters: list[str | None],
                       schedule, progress: bool = False, desc: str = "inverting", *, inversion: Inversion = Inversion(),
                       guidance: float = 1.0, negative: torch.Tensor | PromptEmbeds | None = None) -> ExactInversion:
    """Invert latents (N, 4, h, w) in one batch, sample i under adapter `adapters[i]` alone (None: no LoRA) and
    its own prompt embedding `embeds[i]`: the same noises as N separate inversions, in N times fewer UNet calls.

    With `guidance` above 1 the inversion uses the guided ε against `negative` (one embedding, shared), the
    same ε that rendering samples with, so that sampling maps the noise back onto the latent.
    Returns the noises, their corrections (steps, N, 4, h, w; None for plain DDIM) and paths: see `invert_exact`.
    """
    with own_adapters_model(pipe, embeds, adapters, guidance, negative) as model:
        return invert_exact(model, latents, schedule, inversion, disable=not progress, desc=desc)


@contextlib.contextmanager
def own_adapters_model(pipe, embeds, adapters: list[str | None], guidance: float = 1.0, negative=None):
    """Inside the block, a `model(x, t) -> eps` that runs sample i under adapter `adapters[i]` alone (None: no
    LoRA) and its own prompt embedding `embeds[i]`, guided against `negative` (shared) when `guidance` is above 1:
    how each image is inverted, and how its corrections are made along a coarser schedule."""
    unet = pipe.unet
    groups = 1 if guidance == 1.0 else 2
    neg = None if negative is None else as_prompt_embeds(negative).expand(len(adapters))
    with adapter_weights(unet, sample_weights(adapters, unet.device, groups)):
        yield eps_model(unet, embeds, neg, guidance, pipe.scheduler.config.prediction_type,
                        pipe.scheduler.alphas_cumprod)


@torch.no_grad()
def coarse_corrections(pipe, paths, latents, embeds, adapters: list[str | None], schedule, coarse,
                       guidance: float = 1.0, negative=None) -> tuple[torch.Tensor, ...]:
    """Each image's corrections for sampling `coarse` (fewer steps of `schedule`) along its inversion's path
    (`inversion.corrections_along`), under the adapter and prompt it was inverted with, all in one batch per
    step: a probe pass at few steps then brings its end frames back exactly too. `paths`: each (steps, 1, ...),
    on any device."""
    device = pipe.unet.device
    cond = PromptEmbeds.cat([as_prompt_embeds(e) for e in embeds])
    with own_adapters_model(pipe, cond, adapters, guidance, negative) as model:
        path = torch.cat(list(paths), dim=1).to(device)  # (kept on the CPU between uses)
        out = corrections_along(model, path, torch.cat(list(latents)).to(device), schedule, coarse)
    return tuple(out.split(1, dim=1))
