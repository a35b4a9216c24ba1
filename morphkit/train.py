"""Fitting a LoRA to one image or to a captioned folder.

The path of the data:

    images ──VAE (once)──► latents          captions ──text encoder (once)──► embeddings
                                  │
                  fit_lora: for each step, draw examples, noise and timesteps from a generator
                  seeded by (seed, step), so a resumed run repeats exactly what an unbroken one does
                                  │
                     LoRA weights ──save_lora──► <name>.safetensors (diffusers format)

`train_lora` is what `morphkit train` runs: settings, files, checkpoints and resume.
`fit_lora` is the loop alone, over a loaded pipeline, for callers that keep their pipeline
(`morph` fits two LoRAs on one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import __version__
from .data import Example, data_hash, load_examples
from .errors import ConfigError, InputError, NumericalError, OutputExistsError
from .images import MAX_RESOLUTION, center_crop, fit_size, resize_to_policy
from .io import (atomic_write, check_room, check_writable, is_plain_name, make_staging_dir, no_room_error,
                 sweep_stale, write_json)
from .lora import DEFAULT_TARGETS, LoraShape, adapter_metadata, add_lora, check_targets, lora_state_dict, save_lora
from .lora_files import DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, tag_frequency, warn_kohya_dropped
from .models import DEFAULT_MODEL, encode_image, encode_prompt, load_pipeline, resolve_device, resolve_dtype
from .progress import tqdm

LR_SCHEDULES = ("constant", "cosine", "linear")
CROPS = ("center", "random", "none")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
DEFAULT_STEPS = 200


@dataclass
class TrainSettings:
    """Every setting of a training run. A JSON or TOML config file holds the same keys."""

    # what to train on, and where the result goes
    data: str | None = None
    prompt: str | None = None
    model: str = DEFAULT_MODEL
    output_dir: str | None = None
    name: str | None = None
    # the LoRA
    rank: int = 16
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # how long
    steps: int | None = None
    epochs: int | None = None
    # the optimiser
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # the loss
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    # the data
    seed: int = 0
    resolution: int | None = None
    crop: str | None = None
    random_flip: bool = False
    # the machine
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    # checkpoints
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 2

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> dict:
        """Read a JSON or TOML config file into a dict of settings, checking every key."""
        from .config import read_config

        path = Path(path)
        values = read_config(path, {f.name for f in dataclasses.fields(cls)})
        if values.get("data") and not Path(values["data"]).is_absolute():  # relative to the config file
            values["data"] = str(path.parent / values["data"])
        return values

    @classmethod
    def resolve(cls, config: str | os.PathLike | None = None, **overrides) -> "TrainSettings":
        """Defaults, then the config file, then every override that is not None."""
        values = cls.from_file(config) if config else {}
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(overrides) - known):
            raise ConfigError(f"Unknown training settings: {', '.join(unknown)}.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("targets"), str):
            values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
        try:
            settings = cls(**values)
        except TypeError as e:
            raise ConfigError(f"Bad training settings: {e}") from None
        settings.validate()
        return settings

    def validate(self):
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        def number(name, kind=(int, float)):
            value = getattr(self, name)
            option = "--lr" if name == "learning_rate" else "--" + name.replace("_", "-")
            need(isinstance(value, kind) and not isinstance(value, bool), f"{option} must be a number; got {value!r}.")
            need(math.isfinite(value), f"{option} must be finite; got {value!r}.")
            return value

        need(self.data, "No training data: give an image file or a folder with metadata.jsonl.")
        need(self.name is None or is_plain_name(self.name), f"--name must be a plain file name (no folders, no '..'); "
             f"got {self.name!r}. Use --output-dir to choose the folder.")
        need(number("rank", int) >= 1, f"The LoRA rank must be at least 1; got {self.rank}.")
        need(self.alpha is None or number("alpha") > 0, f"The LoRA alpha must be positive; got {self.alpha}.")
        need(isinstance(self.targets, list) and self.targets and all(isinstance(t, str) and t for t in self.targets),
             "--targets must be a non-empty list of module names, like to_q,to_k,to_v,to_out.0.")
        warn_kohya_dropped(self.targets)  # conv_in, conv_out, time_embedding: kohya's sd-scripts skips them
        need(self.steps is None or number("steps", int) >= 1, f"--steps must be at least 1; got {self.steps}.")
        need(self.epochs is None or number("epochs", int) >= 1, f"--epochs must be at least 1; got {self.epochs}.")
        need(self.steps is None or self.epochs is None, "Give --steps or --epochs, not both.")
        need(0 < number("learning_rate") <= 1, f"The learning rate (--lr) must be above 0 and at most 1 (1e-4 is "
                                                 f"usual); got {self.learning_rate}.")
        need(self.lr_scheduler in LR_SCHEDULES, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_scheduler!r}.")
        need(number("lr_warmup_steps", int) >= 0, "--lr-warmup-steps must be 0 or more.")
        need(0 <= number("adam_beta1") < 1 and 0 <= number("adam_beta2") < 1, "Adam betas must lie in [0, 1).")
        need(number("adam_weight_decay") >= 0, "--adam-weight-decay must be 0 or more.")
        need(number("adam_epsilon") > 0, "--adam-epsilon must be positive.")
        need(number("batch_size", int) >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        need(number("gradient_accumulation_steps", int) >= 1, "--gradient-accumulation-steps must be at least 1.")
        need(number("max_grad_norm") > 0, "--max-grad-norm must be positive.")
        need(number("noise_offset") >= 0, "--noise-offset must be 0 or more.")
        need(self.snr_gamma is None or number("snr_gamma") > 0, "--snr-gamma must be positive (5.0 is the usual value).")
        need(0 <= number("seed", int) < 2**63, f"--seed must be an integer from 0 to 2^63 - 1; got {self.seed}.")
        need(self.resolution is None or (8 <= number("resolution", int) <= MAX_RESOLUTION and self.resolution % 8 == 0),
             f"--resolution must be a multiple of 8 from 8 to {MAX_RESOLUTION}; got {self.resolution}.")
        need(self.crop is None or self.crop in CROPS, f"--crop must be one of {', '.join(CROPS)}; got {self.crop!r}.")
        need(self.mixed_precision in MIXED_PRECISIONS, f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}.")
        need(number("checkpointing_steps", int) >= 0, "--checkpointing-steps must be 0 (none) or more.")
        need(number("checkpoints_total_limit", int) >= 1, "--checkpoints-total-limit must be at least 1.")

    @property
    def shape(self) -> LoraShape:
        return LoraShape(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))

    def trajectory_hash(self, data_digest: str) -> str:
        """What a checkpoint must agree on to be resumed: everything but length and bookkeeping."""
        skip = {"steps", "epochs", "output_dir", "name", "checkpointing_steps", "checkpoints_total_limit", "data"}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        values["data_hash"] = data_digest
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    lora_path: Path | None
    steps: int
    losses: list[float]
    output_dir: Path | None = None
    resumed_from: int = 0
    lora_paths: list[Path] = dataclasses.field(default_factory=list)  # every file written (`--format both`: two)


# ---------------------------------------------------------------------------------------------
# pure pieces: the learning-rate schedule, the random draws, the loss


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


def batch_indices(micro_step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Which examples micro-batch `micro_step` holds: each epoch is a fresh permutation."""
    per_epoch = math.ceil(n / batch_size)
    epoch, within = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=rng(seed, "epoch", epoch)).tolist()
    picked = order[within * batch_size:(within + 1) * batch_size]
    return picked + order[: batch_size - len(picked)]  # a short last batch wraps around


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) / SNR for ε, / (SNR + 1) for v."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# ---------------------------------------------------------------------------------------------
# the cache: latents and embeddings, computed once


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


def draw_batch(encoded: list[EncodedExample], micro_step: int, settings: TrainSettings, latent_size: int):
    """The latents and embeddings of micro-batch `micro_step`: flips, crops and captions drawn by seed."""
    gen = rng(settings.seed, "batch", micro_step)
    latents, embeds = [], []
    for index in batch_indices(micro_step, len(encoded), settings.batch_size, settings.seed):
        ex = encoded[index]
        variant = int(torch.randint(len(ex.latents), (1,), generator=gen))
        z = ex.latents[variant]
        if settings.crop == "random":
            top = int(torch.randint(z.shape[1] - latent_size + 1, (1,), generator=gen))
            left = int(torch.randint(z.shape[2] - latent_size + 1, (1,), generator=gen))
            z = z[:, top:top + latent_size, left:left + latent_size]
        latents.append(z)
        embeds.append(ex.embeddings[int(torch.randint(len(ex.embeddings), (1,), generator=gen))])
    return torch.stack(latents), torch.stack(embeds)


def draw_noise(latents: torch.Tensor, gen: torch.Generator, settings: TrainSettings, num_train_timesteps: int):
    """The noise and timesteps of one micro-batch, drawn from `gen` (on the CPU, so every device draws alike)."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=gen).to(latents.device)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=gen).to(latents.device)
    return noise, timesteps


def diffusion_loss(unet, scheduler, latents, embeds, noise, timesteps, settings: TrainSettings, autocast,
                   per_sample: bool = False) -> torch.Tensor:
    """The denoising loss of `latents` noised with `noise` at `timesteps`: the batch mean, or with
    `per_sample` one loss per sample (what `fit_loras` sums, so that each adapter learns from its own)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    dtype = next(iter(unet.parameters())).dtype  # not `unet.dtype`, which walks every module on each call
    with autocast:
        pred = unet(noisy.to(dtype), timesteps, embeds.to(dtype)).sample
    losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if settings.snr_gamma is not None:
        losses = losses * min_snr_weights(scheduler.alphas_cumprod.to(latents.device), timesteps, settings.snr_gamma,
                                          prediction_type)
    return losses if per_sample else losses.mean()


def total_steps(settings: TrainSettings, n_examples: int) -> int:
    if settings.steps is not None:
        return settings.steps
    if settings.epochs is not None:
        micro_per_epoch = math.ceil(n_examples / settings.batch_size)
        return math.ceil(settings.epochs * micro_per_epoch / settings.gradient_accumulation_steps)
    return DEFAULT_STEPS


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(folder: Path, step: int, unet, adapter_name: str, optimizer, scaler, fingerprint: str, keep: int):
    """Write `folder/step-NNNNNN/` atomically (a temp folder renamed), then drop all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    lora = lora_state_dict(unet, adapter_name)
    if not all(bool(torch.isfinite(t).all()) for t in lora.values()):
        raise NumericalError(f"The fit diverged: at step {step} the LoRA holds NaN or infinite values, so no checkpoint "
                             "was written. Lower --lr (or --max-grad-norm), or train in fp32 (--mixed-precision no).")
    staging = make_staging_dir(target)
    try:
        save_file(lora, str(staging / "lora.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {"step": step, "fingerprint": fingerprint, "param_groups": opt["param_groups"],
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
        (staging / "state.json").write_text(json.dumps(state, default=str))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as e:
        raise no_room_error(e, target) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, unet, adapter_name: str, optimizer, scaler, fingerprint: str) -> int:
    """Restore LoRA weights, optimizer and scaler from a checkpoint; return its step."""
    from peft.utils import set_peft_model_state_dict

    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise ConfigError(
            f"The checkpoint {path} was made with other settings or other data than this run. Resume with the "
            "same settings (only steps/epochs may change), or pass --overwrite to start afresh."
        )
    lora = {k[len("unet."):]: v for k, v in load_file(str(path / "lora.safetensors")).items()}
    set_peft_model_state_dict(unet, lora, adapter_name=adapter_name)
    device = next(unet.parameters()).device
    flat = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    groups = state["param_groups"]
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# the loop


def _precision(settings: TrainSettings, device: torch.device) -> torch.dtype:
    mode = settings.mixed_precision
    if mode == "auto":
        return resolve_dtype(None, device)
    if mode != "no" and device.type != "cuda":
        raise ConfigError(f"mixed_precision {mode} needs a CUDA GPU; on {device.type} use 'no' (fp32).")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def make_optimizer(params, settings: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the LoRA tensors; fused (one kernel for all of them) on CUDA and CPU."""
    return torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
        fused=device.type in ("cuda", "cpu"),
    )


def mixed_precision(unet):
    """The gradient scaler (fp16 on CUDA only, else None or disabled) and autocast context for `unet`'s dtype."""
    dtype, device = unet.dtype, unet.device
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16) if device.type == "cuda" else None
    return scaler, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def optimizer_step(optimizer, scaler, clip_groups: list[list[torch.Tensor]], max_grad_norm: float):
    """Unscale, clip each group of tensors to `max_grad_norm` on its own, step, and clear the gradients."""
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        scaler.unscale_(optimizer)
    for group in clip_groups:
        torch.nn.utils.clip_grad_norm_(group, max_grad_norm)
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
) -> TrainResult:
    """Add a LoRA adapter named `adapter_name` to `pipe.unet` and train it on `encoded`.

    The adapter stays in the UNet, active, when this returns. Every random draw of step `s` comes
    from `rng(seed, ..., s)`, so a run resumed from a checkpoint at step k continues exactly as an
    unbroken run would.
    """
    from diffusers import DDPMScheduler

    unet = pipe.unet
    device = unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = total_steps(settings, len(encoded))
    accum = settings.gradient_accumulation_steps
    latent_size = (settings.resolution or 8 * unet.config.sample_size) // 8
    shapes = {tuple(z.shape) for ex in encoded for z in ex.latents}
    if settings.crop != "random" and settings.batch_size > 1 and len(shapes) > 1:
        raise ConfigError("With crop 'none' the images keep their own sizes, which differ here, so they cannot be "
                          "batched: use batch_size 1, or crop 'center' or 'random'.")

    torch.manual_seed(settings.seed)  # the LoRA's initial weights
    params = add_lora(unet, settings.shape, adapter_name)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, settings, device)
    scaler, autocast = mixed_precision(unet)

    start = 0
    if resume and checkpoint_dir and (found := list_checkpoints(checkpoint_dir)):
        start = load_checkpoint(found[-1], unet, adapter_name, optimizer, scaler, fingerprint)
    if start > steps:
        raise ConfigError(f"The newest checkpoint is at step {start}, past the {steps} steps asked for. Ask for more steps.")

    losses: list[float] = []
    bar = tqdm(total=steps, initial=start, desc=f"fitting LoRA {adapter_name}", disable=not progress, unit="step",
               file=sys.stderr, dynamic_ncols=True)
    unet.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            lr = lr_at(step, settings.learning_rate, settings.lr_scheduler, settings.lr_warmup_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(accum):
                index = step * accum + micro
                latents, embeds = draw_batch(encoded, index, settings, latent_size)
                noise, timesteps = draw_noise(latents, rng(settings.seed, "noise", index), settings,
                                              scheduler.config.num_train_timesteps)
                loss = diffusion_loss(unet, scheduler, latents, embeds, noise, timesteps, settings, autocast)
                (scaler.scale(loss / accum) if scaler and scaler.is_enabled() else loss / accum).backward()
                step_loss += loss.item() / accum
            optimizer_step(optimizer, scaler, [params], settings.max_grad_norm)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if log:
                log({"step": step + 1, "loss": step_loss, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 3)})
            done = step + 1
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
    """
    from diffusers import DDPMScheduler

    from .lora import adapter_weights, one_hot_weights

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
    bar = tqdm(total=steps, desc=f"fitting LoRAs {', '.join(names)}", disable=not progress, unit="step",
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
                latents = torch.cat([z for z, _ in draws])
                embeds = torch.cat([e for _, e in draws])
                noise, timesteps = zip(*(draw_noise(z, rng(settings.seed, "noise", step), settings,
                                                    scheduler.config.num_train_timesteps) for z, _ in draws))
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


def lora_files(out: Path, name: str, lora_format: str) -> dict[Path, str]:
    """The LoRA files a run writes, each with its format: kohya, diffusers, or both (two files)."""
    if lora_format not in ("kohya", "diffusers", "both"):
        raise ConfigError(f"Unknown LoRA format {lora_format!r} (--format); choose kohya, diffusers or both.")
    if lora_format == "diffusers":
        warnings.warn(DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, stacklevel=3)
    files = {out / f"{name}.safetensors": "diffusers" if lora_format == "diffusers" else "kohya"}
    if lora_format == "both":
        files[out / f"{name}.diffusers.safetensors"] = "diffusers"
    return files


def check_train_outputs(s: TrainSettings, out: Path, files: dict[Path, str], overwrite: bool, resume: bool) -> list:
    """Refuse, before the model loads and before anything is written, what would lose or mix up work; sweep
    what killed runs left behind. Returns the checkpoints found (oldest first)."""
    checkpoints = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output folder {out} is a file.")
    found = list_checkpoints(checkpoints)
    existing = [p for p in files if p.exists()]
    if existing and not overwrite and not (resume and found):  # resuming continues, then replaces it
        raise OutputExistsError(f"The LoRA {existing[0]} already exists. Pass --overwrite to replace it, or --name / "
                                "--output-dir for a new one.")
    if found and not (resume or overwrite):
        raise OutputExistsError(f"{checkpoints} holds checkpoints of an earlier run. Pass --resume to continue it, or "
                                "--overwrite to start afresh.")
    check_writable(out, "output folder", "--output-dir")
    check_room(out, s.rank * 2**20 * (len(files) + (3 * s.checkpoints_total_limit if s.checkpointing_steps else 0)),
               "the LoRA and its checkpoints")
    for folder in (out, checkpoints):  # what runs killed mid-write left behind
        sweep_stale(folder)
    return found


def lora_header(s: TrainSettings, name: str, steps: int, examples, digest: str, metadata_prompt: bool) -> dict:
    """What a trained LoRA's header records (`save_lora` writes it as kohya's `ss_*` and morphkit's own keys)."""
    return {
        "version": __version__, "base_model": s.model, "rank": s.rank, "alpha": s.shape.effective_alpha,
        "targets": ",".join(s.targets), "steps": steps, "resolution": s.resolution, "seed": s.seed,
        "data_hash": digest,
        "settings": json.dumps({k: v for k, v in dataclasses.asdict(s).items() if metadata_prompt or k != "prompt"},
                               sort_keys=True),
        "tag_frequency": tag_frequency([ex.captions for ex in examples], s.data) if metadata_prompt else None,
        "name": name, "num_images": len(examples), "learning_rate": s.learning_rate,
        "lr_scheduler": s.lr_scheduler, "noise_offset": s.noise_offset,
    }


def train_lora(
    data: str | os.PathLike | None = None,
    prompt: str | None = None,
    *,
    config: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    model: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    lora_format: str = "kohya",
    metadata_prompt: bool = True,
    pipe=None,
    progress: bool = True,
    **settings,
) -> TrainResult:
    """Fit a LoRA to one image (with `prompt`) or to a folder with `metadata.jsonl`, and save it.

    Settings are the fields of `TrainSettings`, taken from `config` (JSON or TOML) and then from
    the keyword arguments. Writes into `output_dir` (default `outputs/lora/<name>`):
    `<name>.safetensors`, `train_log.jsonl`, `train_settings.json` and `checkpoints/step-N/`.
    `lora_format` is `kohya` (the default: loads in A1111, ComfyUI, diffusers and morphkit), `diffusers`,
    or `both` (`<name>.safetensors` in kohya format and `<name>.diffusers.safetensors`). The file's header
    records the captions' tags (`ss_tag_frequency`) and the prompt unless `metadata_prompt` is False.
    Pass a loaded `pipe` to reuse it; the trained adapter is then left active in `pipe.unet`.
    """
    s = TrainSettings.resolve(config, data=None if data is None else str(data), prompt=prompt, model=model,
                              output_dir=None if output_dir is None else str(output_dir), name=name, **settings)
    examples = load_examples(s.data, s.prompt)
    name = s.name or Path(s.data).stem or "lora"
    out = Path(s.output_dir or Path("outputs") / "lora" / name)
    files = lora_files(out, name, lora_format)
    lora_path, checkpoints, log_path = next(iter(files)), out / "checkpoints", out / "train_log.jsonl"
    found = check_train_outputs(s, out, files, overwrite, resume)

    digest = data_hash(examples)
    fingerprint = s.trajectory_hash(digest)
    if resume and found and json.loads((found[-1] / "state.json").read_text())["fingerprint"] != fingerprint:
        raise ConfigError(f"The checkpoints in {checkpoints} were made with other settings or other data than this "
                          "run. Resume with the same settings (only steps/epochs may change), or drop --resume and "
                          "pass --overwrite to start afresh.")
    if pipe is None:
        dev = resolve_device(device)
        pipe = load_pipeline(s.model, device=dev, dtype=_precision(s, dev), allow_pickle=allow_pickle)
    resolution = s.resolution or 8 * pipe.unet.config.sample_size
    s = dataclasses.replace(s, resolution=resolution, crop=s.crop or ("none" if len(examples) == 1 else "center"))
    if s.crop == "random":
        for ex in examples:
            _, final = fit_size(ex.image.width, ex.image.height, resolution)
            if min(final) < resolution:
                raise InputError(f"{ex.path} is too small for a {resolution}px random crop.")
    check_targets(pipe.unet, s.targets)
    if "default" in getattr(pipe.unet, "peft_config", {}):  # a reused pipeline: this run's adapter replaces it
        pipe.unet.delete_adapters("default")
    encoded = encode_examples(pipe, examples, resolution, s.crop, s.random_flip)

    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    start = json.loads((found[-1] / "state.json").read_text())["step"] if resume and found else 0
    _trim_log(log_path, start)
    write_json(out / "train_settings.json", {**dataclasses.asdict(s), "data_hash": digest, "morphkit_version": __version__})

    with open(log_path, "a", encoding="utf-8") as log_file:
        def log(row):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        result = fit_lora(pipe, encoded, s, checkpoint_dir=checkpoints, resume=resume, fingerprint=fingerprint,
                          log=log, progress=progress)

    info = lora_header(s, name, result.steps, examples, digest, metadata_prompt)
    state, peft_config = lora_state_dict(pipe.unet), adapter_metadata(pipe.unet)
    for path, fmt in files.items():
        save_lora(path, state, peft_config, info, overwrite=True, format=fmt)
    result.lora_path, result.lora_paths, result.output_dir = lora_path, list(files), out
    return result


def _trim_log(path: Path, last_step: int):
    """Keep the log rows up to `last_step` (the checkpoint resumed from); start empty otherwise."""
    rows = []
    if last_step and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    rows.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with atomic_write(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
