"""Two ways of blending two LoRAs frame by frame, each with its own weight per sample of a batch.

- ``adapters``: the two updates are added, weighted: ΔW(α) = (1-α)·s₀B₀A₀ + α·s₁B₁A₁. This is what
  diffusers' ``set_adapters`` does; ``morphkit.lora.adapter_weights`` gives every sample its own α.
- ``factors``: DiffMorpher's blend. The down (A) and up (B) factors are interpolated separately and then
  multiplied: ΔW(α) = ((1-α)·s₀B₀ + α·s₁B₁)·((1-α)A₀ + αA₁), the scales s = alpha/rank folded into B.
  Both ends are exact (α = 0 gives LoRA 0, α = 1 gives LoRA 1); in between it is not the weighted sum
  of the two updates. It needs the two LoRAs to have the same rank on every layer they share, and it is
  meaningful when their A factors are close, as they are for two LoRAs fitted from the same seed.

`factor_blend` computes the factors blend exactly and per sample at the cost of the adapters blend:
per LoRA layer, u = (1-α)·A₀x + α·A₁x, then (1-α)·s₀B₀u + α·s₁B₁u, added to the frozen layer's output
by a forward hook while PEFT's own LoRA path is switched off. (No cross products B₀A₁ are formed.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .lora import adapter_weights

BLEND_MODES = ("adapters", "factors")


def check_blend_mode(mode: str) -> str:
    if mode not in BLEND_MODES:
        raise ConfigError(f"Unknown LoRA blend {mode!r}; choose adapters (weighted sum of the two LoRA updates) "
                          "or factors (DiffMorpher's interpolation of the A and B factors).")
    return mode


def factor_layers(unet, adapters: tuple[str, str]) -> list:
    """The LoRA layers of `unet` that either adapter touches; raises `ConfigError` where `factors` cannot work.

    `factors` handles LoRAs on linear layers (SD's attention projections and feed-forward layers) whose
    two ranks agree; a layer that only one LoRA touches blends with zero factors for the other.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or not any(a in module.lora_A for a in adapters):
            continue
        if not isinstance(module, LoraLinear):
            raise ConfigError(f"--lora-blend factors handles LoRAs on linear layers only; {name} is a "
                              f"{type(module).__name__}. Use --lora-blend adapters with these LoRAs.")
        if any(a in getattr(module, "lora_variant", {}) for a in adapters):
            raise ConfigError(f"--lora-blend factors handles plain LoRAs only; {name} holds a variant (DoRA or "
                              "similar). Use --lora-blend adapters with these LoRAs.")
        ranks = {module.r[a] for a in adapters if a in module.lora_A}
        if len(ranks) > 1:
            raise ConfigError(f"--lora-blend factors needs two LoRAs of the same rank; at {name} they have ranks "
                              f"{' and '.join(str(module.r[a]) for a in adapters)}. Use --lora-blend adapters, "
                              "or fit both LoRAs with one --lora-rank.")
        layers.append(module)
    if not layers:
        raise ConfigError(f"The UNet holds no LoRA layers for the adapters {', '.join(adapters)}.")
    return layers


def factor_delta(x: torch.Tensor, alpha: torch.Tensor, ends: list) -> torch.Tensor:
    """((1-α)·s₀B₀ + α·s₁B₁)((1-α)A₀ + αA₁)·x, per sample.

    `x` is (S, ..., in); `alpha` (S,) or a 0-dim tensor; `ends` holds (A, B, scale) of each of the two LoRAs
    or None where a LoRA does not touch this layer. Returns (S, ..., out) in the LoRA weights' dtype.
    """
    weight_dtype = next(e[0].dtype for e in ends if e is not None)
    x = x.to(weight_dtype)
    a = alpha.to(x.device, weight_dtype).reshape(-1, *([1] * (x.dim() - 1)))
    coeffs = (1 - a, a)
    down = sum(c * F.linear(x, e[0]) for c, e in zip(coeffs, ends) if e is not None)
    return sum((c * e[2]) * F.linear(down, e[1]) for c, e in zip(coeffs, ends) if e is not None)


@contextlib.contextmanager
def factor_blend(unet, adapters: tuple[str, str], alpha: float | torch.Tensor):
    """Run `unet` with the two adapters blended by factors at `alpha`: a float, or one α per sample.

    With classifier-free guidance the batch is doubled; pass α doubled too (as for `adapter_weights`).
    """
    layers = factor_layers(unet, adapters)
    unet.set_adapters(list(adapters), [1.0, 1.0])  # so that `scaling` holds each LoRA's own alpha/rank
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    hooks = []

    def hook(module, args, output):
        x = args[0]
        if alpha.dim() and alpha.shape[0] != x.shape[0]:
            raise ValueError(f"LoRA blend weights for {alpha.shape[0]} samples, but the batch has {x.shape[0]}")
        ends = [(module.lora_A[n].weight, module.lora_B[n].weight, module.scaling[n]) if n in module.lora_A else None
                for n in adapters]
        return (output + factor_delta(x, alpha, ends)).to(output.dtype)  # added in fp32, rounded once, as PEFT does

    for module in layers:
        hooks.append(module.register_forward_hook(hook))
    try:
        with adapter_weights(unet, {}):  # PEFT's own LoRA path off: the frozen layers, plus the hooks' update
            yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def lora_blend(unet, adapters: tuple[str, str], alpha: float | torch.Tensor, mode: str = "adapters"):
    """Blend the two adapters at `alpha` (a float or one α per sample) the `mode` way: adapters or factors."""
    check_blend_mode(mode)
    if torch.is_tensor(alpha) and alpha.dim() == 0:
        alpha = float(alpha)
    if mode == "factors":
        with factor_blend(unet, adapters, alpha):
            yield
    else:
        w = alpha.float() if torch.is_tensor(alpha) else float(alpha)
        with adapter_weights(unet, {adapters[0]: 1 - w, adapters[1]: w}):
            yield
