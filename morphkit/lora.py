"""LoRA adapters on the UNet: add, read out, save and load.

Files are written in the diffusers format that `pipe.load_lora_weights(path)` reads: keys
`unet.<module path>.lora_A.weight` / `.lora_B.weight`, and the adapter's PEFT config (rank, alpha,
targets) in the safetensors header under `lora_adapter_metadata`. Without that header entry a
LoRA trained with alpha != rank reloads at the wrong strength. morphkit's own training record sits
beside it under `morphkit.*` keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoRAError
from .io import atomic_write, check_can_write

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads alpha and rank from
UNET_PREFIX = "unet."


@contextlib.contextmanager
def _second_adapter_is_fine():
    """peft warns whenever a second adapter is added to a model, which morph does on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


@dataclass(frozen=True)
class LoraShape:
    """What makes two LoRAs interchangeable: rank, alpha and the modules they touch."""

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank, a scale of 1
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.effective_alpha,
            init_lora_weights="gaussian",
            target_modules=list(self.targets),
        )


def add_lora(unet, shape: LoraShape, adapter_name: str = "default"):
    """Add a trainable LoRA adapter to `unet`; the base weights stay frozen and the LoRA weights are fp32."""
    unet.requires_grad_(False)
    try:
        with _second_adapter_is_fine():
            unet.add_adapter(shape.peft_config(), adapter_name=adapter_name)
    except ValueError as e:
        raise LoRAError(f"The LoRA targets {', '.join(shape.targets)} do not fit this UNet: {e}") from None
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' `unet.` keys, fp32, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {UNET_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def adapter_metadata(unet, adapter_name: str = "default") -> dict:
    """The PEFT config of an adapter, as diffusers stores it (keys prefixed with `unet.`)."""
    config = unet.peft_config[adapter_name].to_dict()
    return {UNET_PREFIX + k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    peft_metadata: dict,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers-format LoRA file atomically.

    `peft_metadata` is `adapter_metadata(unet)`; `info` is morphkit's training record, stored as
    strings under `morphkit.<key>`.
    """
    path = check_can_write(path, overwrite, "LoRA file")
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(peft_metadata, sort_keys=True, default=str)}
    for key, value in (info or {}).items():
        header[f"morphkit.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    with atomic_write(path) as tmp:
        save_file(state_dict, str(tmp), metadata=header)
    return path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file: (tensors, header metadata). Raises `LoRAError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"The LoRA file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoRAError(f"{path} is not a readable safetensors LoRA file ({str(e).splitlines()[0]}).") from None
    return tensors, metadata


def load_lora(unet, path: str | os.PathLike, adapter_name: str):
    """Load a diffusers-format LoRA file into `unet` as `adapter_name` (UNet only)."""
    try:
        with _second_adapter_is_fine():
            unet.load_lora_adapter(str(path), prefix="unet", adapter_name=adapter_name)
    except Exception as e:
        raise LoRAError(f"The LoRA {path} could not be loaded into this UNet: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def adapter_weights(unet, weights: dict[str, float | torch.Tensor]):
    """Activate the named adapters, each at a weight: a float, or one weight per sample of the batch.

    Floats go through diffusers' `set_adapters` (the UNet's output is then the base plus the sum of
    weight x LoRA update). A 1-D tensor gives every sample of the batch its own weight, so that frames
    with different adapter blends render in one UNet call: each LoRA layer's scale is reshaped to
    broadcast over the batch dimension of its input. With classifier-free guidance the batch is
    doubled; pass the weights doubled too.
    """
    from peft.tuners.lora import LoraLayer

    names = list(weights)
    unet.set_adapters(names, [1.0 if torch.is_tensor(w) else float(w) for w in weights.values()])
    per_sample = {n: w for n, w in weights.items() if torch.is_tensor(w)}
    hooks, saved = [], []
    for module in unet.modules():
        if not isinstance(module, LoraLayer) or not per_sample:
            continue
        scales = {n: module.scaling[n] for n in per_sample if n in module.scaling}
        saved.append((module, dict(module.scaling)))

        def hook(mod, args, scales=scales):
            x = args[0]
            for name, base in scales.items():
                w = per_sample[name].to(x.device, torch.float32)
                if w.shape[0] != x.shape[0]:
                    raise ValueError(f"adapter weights for {w.shape[0]} samples, but the batch has {x.shape[0]}")
                mod.scaling[name] = base * w.view(-1, *([1] * (x.dim() - 1)))

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for module, scaling in saved:
            module.scaling.update(scaling)
