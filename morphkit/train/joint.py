"""Several LoRAs fitted at once in one batched UNet pass per step: what `morph` does with its images."""

from __future__ import annotations

import sys

import torch

from ..errors import ConfigError
from ..families import PromptEmbeds
from ..lora import add_lora
from ..progress import tqdm
from .draws import draw_batch, draw_noise, lr_at, rng, total_steps
from .encoding import EncodedExample
from .loss import diffusion_loss
from .optim import make_optimizer, mixed_precision, optimizer_step
from .settings import TrainResult, TrainSettings


def joint_steps(examples: dict[str, list[EncodedExample]], settings: TrainSettings) -> int:
    """The one step count of LoRAs fitted together; refuses what `fit_loras` cannot batch."""
    if settings.batch_size != 1 or settings.gradient_accumulation_steps != 1:
        raise ConfigError("Fitting several LoRAs together takes batch_size 1 and no gradient accumulation; "
                          "fit them one by one with fit_lora instead.")
    shapes = {tuple(z.shape) for name in examples for ex in examples[name] for z in ex.latents}
    if len(shapes) > 1:
        raise ConfigError(f"Fitting several LoRAs together needs latents of one shape; these have {sorted(shapes)}.")
    steps = {total_steps(settings, len(group)) for group in examples.values()}
    if len(steps) > 1:
        raise ConfigError("Fitting several LoRAs together needs one step count for all of them; give steps.")
    return steps.pop()


def fit_loras(
    pipe,
    examples: dict[str, list[EncodedExample]],
    settings: TrainSettings,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, TrainResult]:
    """Fit one LoRA adapter per entry of `examples`, all at once: what `morph` does with its two images.

    Each step is one UNet batch holding every adapter's draw, and each sample runs through its own
    adapter only (per-sample adapter weights, one-hot). The per-sample losses are summed, so each
    adapter's gradient is that of its own sample; gradients are clipped adapter by adapter, and AdamW
    works element by element. Every draw is the one `fit_lora` would make for that adapter alone,
    so the result equals calling `fit_lora` for each entry in turn (within fp32 rounding) for the cost
    of one batched step per step instead of one step per adapter. (In fp16 the one gradient scaler is
    shared: a step skipped for an overflow in either adapter's gradients is skipped for all of them.)

    Needs batch_size 1, no gradient accumulation, and latents of one shape; it writes no checkpoints.
    `desc`: the progress bar's words (default: the adapters' names).
    """
    from diffusers import DDPMScheduler

    from ..lora import adapter_weights, one_hot_weights

    names, steps = list(examples), joint_steps(examples, settings)
    unet = pipe.unet
    device = unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latent_size = (settings.resolution or 8 * unet.config.sample_size) // 8

    params = {}
    for name in names:
        torch.manual_seed(settings.seed)  # each LoRA starts where fit_lora would start it
        params[name] = add_lora(unet, settings.shape, name)
    optimizer = make_optimizer([p for group in params.values() for p in group], settings, device)
    scaler, autocast = mixed_precision(unet)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    losses = {name: [] for name in names}
    bar = tqdm(total=steps, desc=desc or f"fitting LoRAs {', '.join(names)}", disable=not progress, unit="step",
               file=sys.stderr, dynamic_ncols=True)
    unet.train()
    try:
        with adapter_weights(unet, one_hot_weights(names, device)):
            for group in params.values():  # activating adapters may mark them frozen; all of them train here
                for p in group:
                    p.requires_grad_(True)
            for step in range(steps):
                lr = lr_at(step, settings.learning_rate, settings.lr_scheduler, settings.lr_warmup_steps, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                draws = [draw_batch(examples[name], step, settings, latent_size) for name in names]
                latents = torch.cat([z for z, _, _ in draws])
                embeds = PromptEmbeds.cat([e for _, e, _ in draws])
                noise, timesteps = zip(*(draw_noise(z, rng(settings.seed, "noise", step), settings,
                                                    scheduler.config.num_train_timesteps) for z, _, _ in draws))
                per_sample = diffusion_loss(unet, scheduler, latents, embeds, torch.cat(noise), torch.cat(timesteps),
                                            settings, autocast, per_sample=True)
                loss = per_sample.sum()
                (scaler.scale(loss) if scaler and scaler.is_enabled() else loss).backward()
                optimizer_step(optimizer, scaler, list(params.values()), settings.max_grad_norm)
                for name, value in zip(names, per_sample.tolist()):
                    losses[name].append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(per_sample.tolist()) / len(names):.4f}", lr=f"{lr:.2e}")
    finally:
        bar.close()
        unet.eval()
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        for group in params.values():
            for p in group:
                p.requires_grad_(False)
    return {name: TrainResult(lora_path=None, steps=steps, losses=losses[name], resumed_from=0) for name in names}
