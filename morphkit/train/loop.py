"""The training loop: `fit_lora` trains one LoRA adapter on encoded examples, with checkpoints and resume."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError
from ..lora import add_lora
from ..progress import tqdm
from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .draws import draw_batch, draw_noise, lr_at, rng, total_steps
from .encoding import EncodedExample
from .loss import diffusion_loss
from .optim import make_optimizer, mixed_precision, optimizer_step
from .parallel import ALONE, Share, average_gradients, mean_across
from .settings import TrainResult, TrainSettings


def check_batchable(encoded: list[EncodedExample], settings: TrainSettings, share: Share) -> None:
    shapes = {tuple(z.shape) for ex in encoded for z in ex.latents}
    if settings.crop != "random" and settings.batch_size * share.count > 1 and len(shapes) > 1:
        raise ConfigError("With crop 'none' the images keep their own sizes, which differ here, so they cannot be "
                          "batched: use batch_size 1 (on one process), or crop 'center' or 'random'.")


def train_step(unet, scheduler, encoded, settings: TrainSettings, step: int, latent_size: int, autocast, scaler,
               share: Share) -> float:
    """Forward and backward passes of optimizer step `step` (its micro-batches); returns the step's loss.

    Each process runs its rows of every micro-batch; the loss returned is the mean over all processes."""
    accum, per_process = settings.gradient_accumulation_steps, settings.batch_size
    rows = share.rows(per_process)
    step_loss = 0.0
    for micro in range(accum):
        index = step * accum + micro
        latents, embeds = draw_batch(encoded, index, settings, latent_size, global_batch=per_process * share.count)
        noise, timesteps = draw_noise(latents, rng(settings.seed, "noise", index), settings,
                                      scheduler.config.num_train_timesteps)
        loss = diffusion_loss(unet, scheduler, latents[rows], embeds[rows], noise[rows], timesteps[rows], settings,
                              autocast)
        (scaler.scale(loss / accum) if scaler and scaler.is_enabled() else loss / accum).backward()
        step_loss += loss.item() / accum
    return mean_across(step_loss, share)


def fit_lora(
    pipe,
    encoded: list[EncodedExample],
    settings: TrainSettings,
    adapter_name: str = "default",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    share: Share = ALONE,
) -> TrainResult:
    """Add a LoRA adapter named `adapter_name` to `pipe.unet` and train it on `encoded`.

    The adapter stays in the UNet, active, when this returns. Every random draw of step `s` comes
    from `rng(seed, ..., s)`, so a run resumed from a checkpoint at step k continues exactly as an
    unbroken run would. With a `share` of several processes, each trains on its rows of the global
    batch and gradients are averaged (see `parallel`); only the main process logs and saves.
    """
    from diffusers import DDPMScheduler

    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = total_steps(settings, len(encoded), share.count)
    latent_size = (settings.resolution or 8 * unet.config.sample_size) // 8
    check_batchable(encoded, settings, share)

    # 1. The adapter, the optimizer and the precision
    torch.manual_seed(settings.seed)  # the LoRA's initial weights
    params = add_lora(unet, settings.shape, adapter_name)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, settings, unet.device)
    scaler, autocast = mixed_precision(unet)

    # 2. Resume from the newest checkpoint
    start = 0
    if resume and checkpoint_dir and (found := list_checkpoints(checkpoint_dir)):
        start = load_checkpoint(found[-1], unet, adapter_name, optimizer, scaler, fingerprint)
    if start > steps:
        raise ConfigError(f"The newest checkpoint is at step {start}, past the {steps} steps asked for. Ask for more steps.")

    # 3. The steps
    losses: list[float] = []
    bar = tqdm(total=steps, initial=start, desc=f"fitting LoRA {adapter_name}", disable=not (progress and share.is_main),
               unit="step", file=sys.stderr, dynamic_ncols=True)
    unet.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            lr = lr_at(step, settings.learning_rate, settings.lr_scheduler, settings.lr_warmup_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = train_step(unet, scheduler, encoded, settings, step, latent_size, autocast, scaler, share)
            average_gradients(params, share)
            optimizer_step(optimizer, scaler, [params], settings.max_grad_norm)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            done = step + 1
            if not share.is_main:
                continue
            if log:
                log({"step": done, "loss": step_loss, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 3)})
            if checkpoint_dir and settings.checkpointing_steps and (done % settings.checkpointing_steps == 0 or done == steps):
                save_checkpoint(checkpoint_dir, done, unet, adapter_name, optimizer, scaler, fingerprint,
                                settings.checkpoints_total_limit)
    finally:
        bar.close()
        unet.eval()
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        for p in params:
            p.requires_grad_(False)
    return TrainResult(lora_path=None, steps=steps, losses=losses, resumed_from=start)
