"""The denoising loss, with min-SNR-γ weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import as_prompt_embeds, family_of
from .settings import TrainSettings


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) / SNR for ε, / (SNR + 1) for v."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(unet, scheduler, latents, cond, noise, timesteps, settings: TrainSettings, autocast,
                   per_sample: bool = False) -> torch.Tensor:
    """The denoising loss of `latents` noised with `noise` at `timesteps`, under the conditioning `cond` (a
    `PromptEmbeds`, or SD 1.x's token embeddings): the batch mean, or with `per_sample` one loss per sample
    (what `fit_loras` sums, so that each adapter learns from its own)."""
    cond = as_prompt_embeds(cond)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    dtype = next(iter(unet.parameters())).dtype  # not `unet.dtype`, which walks every module on each call
    added = family_of(unet).added_cond_kwargs(cond, dtype)  # SDXL: pooled embeddings and time ids
    with autocast:
        pred = unet(noisy.to(dtype), timesteps, cond.embeds.to(dtype),
                    **({} if added is None else {"added_cond_kwargs": added})).sample
    losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if settings.snr_gamma is not None:
        losses = losses * min_snr_weights(scheduler.alphas_cumprod.to(latents.device), timesteps, settings.snr_gamma,
                                          prediction_type)
    return losses if per_sample else losses.mean()
