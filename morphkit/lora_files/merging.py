"""Where a LoRA file's modules live in a model: the layer behind each canonical name, in a pipeline or a UNet.

UNet names in the original (LDM) layout (ComfyUI's LoraSave files, SDXL kohya files) are mapped onto the
given UNet's diffusers layout from its config; text-encoder names are found with or without transformers
4's `text_model.` wrapper, whichever the loaded text encoder has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoRAError
from .names import is_ldm_path, ldm_unet_names, shown, unet_path_for
from .updates import LoraFile


@dataclass
class ConvertResult:
    path: Path
    kinds: dict[str, int]  # what the source held, by kind
    lost_energy: float  # share of ‖ΔW‖² the SVD dropped, over all converted modules (0 for plain LoRAs)
    worst_module: tuple[str, float] | None
    exact: bool  # plain LoRA factors, copied bit for bit


def for_unet(lora: LoraFile, unet) -> LoraFile:
    """`lora` with its UNet module names in `unet`'s diffusers layout (LDM names renamed; others unchanged)."""
    if not any(is_ldm_path(p) for p in lora.part("unet")):
        return lora
    names = ldm_unet_names(unet.config, {n for n, _ in unet.named_modules()})
    modules = {}
    for key, m in lora.modules.items():
        part, _, path = key.partition(".")
        modules[f"unet.{unet_path_for(path, names)}" if part == "unet" else key] = m
    return LoraFile(modules, lora.metadata, lora.format, lora.path)


def check_family(model, lora: LoraFile, path) -> None:
    """Raise `LoRAError` when `lora` says it was made for another model family than `model`'s (a pipeline or UNet):
    an SD 1.x LoRA on SDXL, or an SDXL LoRA on SD 1.x. A LoRA that does not say is left to the layer check."""
    from ..families import family_of
    from .inspect import made_for

    family, base = family_of(model), made_for(lora)
    if base is None or base in family.lora_bases:
        return
    other = "stabilityai/stable-diffusion-xl-base-1.0" if base == "SDXL" else "stable-diffusion-v1-5/stable-diffusion-v1-5"
    raise LoRAError(f"The LoRA {shown(path)} was made for {base}, and the model it is applied to is {family.label}: "
                    f"its layers do not exist there or have other sizes. Use a LoRA trained on {family.label}, or "
                    f"choose a {base} base model with --model (such as {other}).")


def find_layer(model: torch.nn.Module, path: str, layers: dict | None = None):
    """The layer at `path` inside `model` (a text encoder's path with or without `text_model.`), or None."""
    layers = dict(model.named_modules()) if layers is None else layers
    return layers.get(path) or layers.get(path.removeprefix("text_model.")) or layers.get("text_model." + path)


def part_of(pipe, part: str):
    model = getattr(pipe, part, None)
    if model is None:
        raise LoRAError(f"The LoRA has a {part} part, which this model does not have.")
    return model


def weight_of(pipe, name: str) -> torch.Tensor:
    """The weight of the layer a canonical module name (`unet.<path>`, `text_encoder.<path>`) names in `pipe`."""
    part, _, path = name.partition(".")
    model = part_of(pipe, part)
    if part == "unet" and is_ldm_path(path):
        path = unet_path_for(path, ldm_unet_names(model.config, {n for n, _ in model.named_modules()}))
    layer = find_layer(model, path)
    if layer is None or not hasattr(layer, "weight"):
        raise LoRAError(f"The LoRA adapts {shown(name)}, which this model does not have.")
    return layer.weight.detach()
