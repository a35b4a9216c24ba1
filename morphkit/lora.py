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
    """peft warns whenever a second adapter is added to a model, which morph does on purpose; and diffusers
    logs a failed LoRA load at ERROR level before raising, where morphkit raises its own clearer message."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


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
    """Load a diffusers-format LoRA file into `unet` as `adapter_name` (UNet part only), weights in fp32.

    The rank and alpha come from the file's `lora_adapter_metadata` header, so a LoRA trained with
    alpha != rank loads at its trained strength. A file with no UNet LoRA weights, or whose weights do
    not fit this UNet, raises `LoRAError` rather than loading nothing.
    """
    tensors, header = read_lora(path)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors):
        raise LoRAError(f"{path} is a kohya/A1111-format LoRA. morphkit reads LoRAs in diffusers format only so far; "
                        "kohya support is planned (see the README).")
    if not any(k.startswith(UNET_PREFIX) for k in tensors) and any(".lora_A." in k for k in tensors):
        tensors = {UNET_PREFIX + k: v for k, v in tensors.items()}  # PEFT keys without the `unet.` prefix
    unet_keys = [k for k in tensors if k.startswith(UNET_PREFIX) and "lora" in k]
    if not unet_keys:
        raise LoRAError(f"{path} holds no LoRA weights for a UNet (keys like 'unet.<module>.lora_A.weight'); it is not a "
                        "LoRA morphkit can apply.")
    metadata = None
    if raw := header.get(DIFFUSERS_METADATA_KEY):
        try:
            metadata = {k: v for k, v in json.loads(raw).items() if k.startswith(UNET_PREFIX)} or None  # diffusers strips it
        except ValueError:
            raise LoRAError(f"{path} has a malformed {DIFFUSERS_METADATA_KEY} header.") from None
    try:
        with _second_adapter_is_fine():
            unet.load_lora_adapter({k: tensors[k] for k in unet_keys}, prefix="unet", adapter_name=adapter_name,
                                   metadata=metadata)
    except Exception as e:
        raise LoRAError(f"The LoRA {path} does not fit this UNet: {str(e).splitlines()[0][:300]}") from None
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    if adapter_name not in getattr(unet, "peft_config", {}) or not params:
        raise LoRAError(f"No weight of the LoRA {path} matched a module of this UNet; it was made for another model.")
    for p in params:
        p.data = p.data.float()


def check_targets(unet, targets) -> None:
    """Raise `LoRAError` unless every target names at least one module of `unet`."""
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LoRAError(f"The LoRA targets {', '.join(missing)} match no module of this UNet. SD 1.5's attention "
                        "projections are to_q, to_k, to_v and to_out.0; feed-forward layers ff.net.0.proj and ff.net.2.")


@contextlib.contextmanager
def adapter_weights(unet, weights: dict[str, float | torch.Tensor]):
    """Activate the named adapters, each at a weight: a float, or one weight per sample of the batch.

    An empty dict runs the base model alone. Floats go through diffusers' `set_adapters` (the UNet's output is then the base plus the sum of
    weight x LoRA update). A 1-D tensor gives every sample of the batch its own weight, so that frames
    with different adapter blends render in one UNet call: each LoRA layer's scale is reshaped to
    broadcast over the batch dimension of its input. With classifier-free guidance the batch is
    doubled; pass the weights doubled too.
    """
    from peft.tuners.lora import LoraLayer

    if not weights:  # the base model alone, whatever adapters the UNet holds
        if getattr(unet, "peft_config", None):
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        else:
            yield
        return
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
