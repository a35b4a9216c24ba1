"""The training loop: `fit_lora` trains a LoRA (and, when asked, the text encoders' LoRA or new tokens) on encoded
examples, with prior preservation, validation images, logs, checkpoints and exact resume."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError
from ..families import PromptEmbeds
from ..progress import tqdm
from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .draws import draw_batch, draw_noise, lr_at, rng, total_steps
from .encoding import EncodedExample
from .loss import diffusion_loss
from .optim import make_optimizer, mixed_precision, optimizer_step, set_learning_rates
from .parallel import ALONE, Share, average_gradients, mean_across
from .settings import TrainResult, TrainSettings
from .trainables import Trainables
from .validation import render_validation, steps_per_epoch, validation_due, validation_grid


@dataclass
class Extras:
    """What a full training run adds to the bare loop (`train_lora` fills it; `morph` leaves it empty)."""

    class_examples: list[EncodedExample] = field(default_factory=list)  # prior preservation
    validation_dir: Path | None = None
    log: object | None = None  # a `TrainLog` (main process) or None
    trajectory: dict = field(default_factory=dict)  # what a checkpoint records, to name what changed on resume


def check_batchable(encoded: list[EncodedExample], settings: TrainSettings, share: Share) -> None:
    shapes = {tuple(z.shape) for ex in encoded for z in ex.latents}
    if settings.crop != "random" and settings.batch_size * share.count > 1 and len(shapes) > 1:
        raise ConfigError("With crop 'none' the images keep their own sizes, which differ here, so they cannot be "
                          "batched: use batch_size 1 (on one process), or crop 'center' or 'random'.")


def draw_micro_batch(encoded, class_examples, settings: TrainSettings, index: int, latent_size: int, share: Share,
                     num_train_timesteps: int):
    """This process's rows of micro-batch `index`: instance rows, then as many class rows (prior preservation).
    Returns latents, cached embeddings (None when captions are encoded per step), captions, noise, timesteps."""
    rows, global_batch = share.rows(settings.batch_size), settings.batch_size * share.count
    drawn = [(draw_batch(encoded, index, settings, latent_size, global_batch), "noise")]
    if class_examples:
        drawn.append((draw_batch(class_examples, index, settings, latent_size, global_batch, stream="class",
                                 repeats=1), "class-noise"))
    latents, embeds, captions, noise, timesteps = [], [], [], [], []
    for (z, e, c), stream in drawn:
        n, t = draw_noise(z, rng(settings.seed, stream, index), settings, num_train_timesteps)
        latents.append(z[rows]), noise.append(n[rows]), timesteps.append(t[rows]), captions.extend(c[rows])
        embeds.append(None if e is None else e.rows(rows))
    cached = None if any(e is None for e in embeds) else PromptEmbeds.cat(embeds)
    return torch.cat(latents), cached, captions, torch.cat(noise), torch.cat(timesteps)


def train_step(unet, scheduler, encoded, settings: TrainSettings, step: int, latent_size: int, autocast, scaler,
               share: Share, trainables: Trainables, class_examples=()) -> float:
    """Forward and backward passes of optimizer step `step` (its micro-batches); returns the step's loss.

    Each process runs its rows of every micro-batch; the loss returned is the mean over all processes. With
    prior preservation the loss is the instance rows' mean plus `prior_loss_weight` times the class rows' mean."""
    accum, n = settings.gradient_accumulation_steps, settings.batch_size
    step_loss = 0.0
    for micro in range(accum):
        index = step * accum + micro
        latents, embeds, captions, noise, timesteps = draw_micro_batch(
            encoded, class_examples, settings, index, latent_size, share, scheduler.config.num_train_timesteps)
        if trainables.text_trains:
            with autocast:
                embeds = trainables.conditioning(captions, sizes=[tuple(8 * s for s in z.shape[-2:]) for z in latents])
        per_sample = diffusion_loss(unet, scheduler, latents, embeds, noise, timesteps, settings, autocast,
                                    per_sample=True)
        loss = per_sample[:n].mean()
        if len(per_sample) > n:
            loss = loss + settings.prior_loss_weight * per_sample[n:].mean()
        (scaler.scale(loss / accum) if scaler and scaler.is_enabled() else loss / accum).backward()
        step_loss += loss.item() / accum
    return mean_across(step_loss, share)


def resume_from(checkpoint_dir: Path | None, resume: bool, trainables, optimizer, scaler, fingerprint: str,
                extras: Extras) -> dict:
    """Load the newest checkpoint when resuming; its state ({} when starting afresh)."""
    if not (resume and checkpoint_dir and (found := list_checkpoints(checkpoint_dir))):
        return {}
    return load_checkpoint(found[-1], trainables, optimizer, scaler, fingerprint, extras.trajectory)


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
    extras: Extras | None = None,
    desc: str | None = None,
) -> TrainResult:
    """Add a LoRA adapter named `adapter_name` to `pipe.unet` (and what else the settings train) and train it.

    The adapter stays in the UNet, active, when this returns. Every random draw of step `s` comes
    from `rng(seed, ..., s)`, so a run resumed from a checkpoint at step k continues exactly as an
    unbroken run would. With a `share` of several processes, each trains on its rows of the global
    batch and gradients are averaged (see `parallel`); only the main process logs and saves.
    `log` (simple callers) receives a dict a step; `extras` carries what `train_lora` adds. `desc`: the
    progress bar's words.
    """
    from diffusers import DDPMScheduler

    extras = extras or Extras()
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    n_examples = len(encoded)
    steps = total_steps(settings, n_examples, share.count)
    latent_size = (settings.resolution or 8 * unet.config.sample_size) // 8
    check_batchable(encoded, settings, share)

    # 1. What trains, the optimizer and the precision
    trainables = Trainables.attach(pipe, settings, steps, adapter_name)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(trainables.groups(settings), settings, unet.device)
    scaler, autocast = mixed_precision(unet)

    # 2. Resume from the newest checkpoint
    state = resume_from(checkpoint_dir, resume, trainables, optimizer, scaler, fingerprint, extras)
    start = state.get("step", 0)
    if start > steps:
        raise ConfigError(f"The newest checkpoint is at step {start}, past the {steps} steps asked for. Ask for more steps.")
    if extras.log is not None:
        extras.log.elapsed_before = state.get("elapsed_s", 0.0)

    # 3. The steps
    losses: list[float] = []
    desc = desc or ("training the LoRA" if adapter_name == "default" else f"fitting LoRA {adapter_name}")
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and share.is_main), unit="step",
               file=sys.stderr, dynamic_ncols=True)
    unet.train()
    trainables.train()
    per_epoch = steps_per_epoch(n_examples, settings, share.count)
    try:
        for step in range(start, steps):
            trainables.at_step(step)
            set_learning_rates(optimizer, lr_at(step, 1.0, settings.lr_scheduler, settings.lr_warmup_steps, steps))
            step_loss = train_step(unet, scheduler, encoded, settings, step, latent_size, autocast, scaler, share,
                                   trainables, extras.class_examples)
            average_gradients(trainables.tensors(), share)
            optimizer_step(optimizer, scaler, [trainables.tensors()], settings.max_grad_norm)
            losses.append(step_loss)
            rates = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{next(iter(rates.values())):.2e}")
            if share.is_main:
                after_step(pipe, settings, step + 1, steps, per_epoch, step_loss, rates, log, extras,
                           (checkpoint_dir, trainables, optimizer, scaler, fingerprint))
    finally:
        bar.close()
        unet.eval()
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        trainables.release()
    if extras.validation_dir is not None and share.is_main:
        validation_grid(extras.validation_dir)
    return TrainResult(lora_path=None, steps=steps, losses=losses, resumed_from=start, trainables=trainables)


def after_step(pipe, settings: TrainSettings, done: int, steps: int, per_epoch: int, loss: float, rates: dict,
               log, extras: Extras, saving) -> None:
    """The main process's work after a step: validation images, the log's row, a checkpoint when due."""
    checkpoint_dir, trainables, optimizer, scaler, fingerprint = saving
    extra = {}
    if extras.validation_dir is not None and validation_due(settings, done, steps, per_epoch):
        paths, images = render_validation(pipe, settings, done, extras.validation_dir)
        extra["validation"] = [str(p) for p in paths]
        if extras.log is not None:
            extras.log.images(done, images)
    if extras.log is not None:
        extras.log.step(done, loss, rates, **extra)
    if log:
        log({"step": done, "loss": loss, "lr": next(iter(rates.values())), **extra})
    if checkpoint_dir and settings.checkpointing_steps and (done % settings.checkpointing_steps == 0 or done == steps):
        elapsed = extras.log.elapsed() if extras.log is not None else 0.0
        save_checkpoint(checkpoint_dir, done, trainables, optimizer, scaler, fingerprint,
                        settings.checkpoints_total_limit, {"trajectory": extras.trajectory, "elapsed_s": elapsed})
