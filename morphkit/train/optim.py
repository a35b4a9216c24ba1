"""The optimizer, mixed precision and one optimizer step."""

from __future__ import annotations

import contextlib
import io

import torch

from ..errors import ConfigError
from ..models import resolve_dtype
from .settings import TrainSettings


def _precision(settings: TrainSettings, device: torch.device) -> torch.dtype:
    mode = settings.mixed_precision
    if mode == "auto":
        return resolve_dtype(None, device)
    if mode == "bf16" and device.type == "cpu":
        return resolve_dtype("bf16", device)  # where the CPU computes bf16 natively; a clear error elsewhere
    if mode != "no" and device.type != "cuda":
        raise ConfigError(f"--mixed-precision {mode} needs a CUDA GPU (bf16: or a CPU with AMX or AVX512-BF16); on "
                          f"{device.type} use 'no' (fp32).")
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def make_optimizer(params, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over `params` (tensors, or groups with their own `lr` and `weight_decay`).

    AdamW (fused: one kernel for all tensors, on CUDA and CPU), or Prodigy (the `prodigyopt` package) with the
    settings of the diffusers DreamBooth LoRA post: decoupled weight decay, bias correction and safeguarded
    warm-up on, and its learning rate (1.0 by default) a scale on the step size it estimates.
    """
    betas = (settings.adam_beta1, settings.adam_beta2)
    if settings.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("--optimizer prodigy needs the prodigyopt package, which is not installed: "
                              "pip install prodigyopt (or pip install 'morphkit[prodigy]'), or use --optimizer adamw."
                              ) from None
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(params, lr=settings.learning_rate, betas=betas, beta3=settings.prodigy_beta3,
                           weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon,
                           decouple=settings.prodigy_decouple, use_bias_correction=settings.prodigy_use_bias_correction,
                           safeguard_warmup=settings.prodigy_safeguard_warmup, d0=settings.prodigy_d0)
    return torch.optim.AdamW(params, lr=settings.learning_rate, betas=betas, weight_decay=settings.adam_weight_decay,
                             eps=settings.adam_epsilon, fused=device.type in ("cuda", "cpu"))


def set_learning_rates(optimizer, factor: float) -> None:
    """Every group's rate is its base rate (`base_lr`, else the first it had) times the schedule's `factor`."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * factor


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
