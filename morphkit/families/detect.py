"""Which family a pipeline, a diffusers folder or a single-file checkpoint belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelNotFoundError
from .base import Family
from .sd15 import SD15
from .sdxl import SDXL

_MODEL_HELP = ("--model takes an SD 1.x or SDXL base model: a hub id (like stabilityai/stable-diffusion-xl-base-1.0), "
               "a diffusers folder, a single-file .safetensors checkpoint, or 'tiny' / 'tiny-sdxl'")
_REFINER = ("is an SDXL refiner (one text encoder, the bigG one, and aesthetic-score time ids). morphkit draws with "
            "base models only; point --model at the SDXL base (stabilityai/stable-diffusion-xl-base-1.0) or a "
            "checkpoint made from it")
# LDM-layout key prefixes that tell the families apart in a single file
_UNET = "model.diffusion_model."
_SD1_TEXT = "cond_stage_model.transformer."
_SD2_TEXT = "cond_stage_model.model."
_XL_TEXT1 = "conditioner.embedders.0.transformer."
_XL_TEXT2 = "conditioner.embedders.1.model."
_REFINER_TEXT = "conditioner.embedders.0.model."


def family_named(name: str) -> Family:
    for family in (SD15, SDXL):
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}")


def family_of(pipe_or_unet) -> Family:
    """The family of a loaded pipeline (or UNet): SDXL when the UNet reads text and time embeddings."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if getattr(unet, "config", {}).get("addition_embed_type") == "text_time":
        if getattr(pipe_or_unet, "text_encoder", True) is None:
            raise ModelNotFoundError(f"This pipeline {_REFINER}.")
        return SDXL
    return SD15


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def family_of_folder(folder: Path) -> Family:
    """The family of a diffusers folder (one with model_index.json), from its components and UNet config."""
    from ..lora_files.names import shown  # strings from a file are shown escaped (imported here: no import circle)

    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    has = {part: isinstance(index.get(part), list) and index[part][0] is not None
           for part in ("unet", "text_encoder", "text_encoder_2")}
    if not has["unet"] or not unet:
        kind = shown(index.get("_class_name", "unknown"), 80)  # a string from the file: escaped, never raw
        raise ModelNotFoundError(f"The folder {folder} holds a '{kind}' model without a Stable Diffusion UNet: it is "
                                 f"neither SD 1.x nor SDXL. {_MODEL_HELP}.")
    if unet.get("addition_embed_type") == "text_time" or has["text_encoder_2"]:
        if index.get("requires_aesthetics_score") or not has["text_encoder"]:
            raise ModelNotFoundError(f"The folder {folder} {_REFINER}.")
        return SDXL
    if unet.get("addition_embed_type") not in (None, "") or not has["text_encoder"]:
        raise ModelNotFoundError(f"The folder {folder} holds a UNet with extra conditioning "
                                 f"('{shown(unet.get('addition_embed_type'), 40)}') that is neither SD 1.x nor SDXL. "
                                 f"{_MODEL_HELP}.")
    return SD15


def single_file_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, or `ModelNotFoundError` when its header cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:
        raise ModelNotFoundError(
            f"The checkpoint {path} cannot be read as safetensors: its header or its data is cut short or damaged "
            "(a truncated download?). Download it again, or check it with `sha256sum` against its source's hash."
        ) from None


def family_of_single_file(path: Path) -> Family:
    """The family of an LDM-layout single-file checkpoint, from its key names (SDXL: two text encoders under
    `conditioner.embedders`; SD 1.x: `cond_stage_model.transformer`)."""
    keys = single_file_keys(path)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(_UNET):
        raise ModelNotFoundError(f"{path} is not a Stable Diffusion checkpoint: it has no UNet weights "
                                 f"({_UNET}...). A LoRA or VAE file is passed with its own option. {_MODEL_HELP}.")
    if has(_XL_TEXT1) and has(_XL_TEXT2):
        return SDXL
    if has(_REFINER_TEXT):
        raise ModelNotFoundError(f"The checkpoint {path} {_REFINER}.")
    if has(_SD1_TEXT):
        return SD15
    what = "an SD 2.x checkpoint (an OpenCLIP text encoder)" if has(_SD2_TEXT) else "a checkpoint without the text " \
        "encoders of SD 1.x (cond_stage_model.transformer) or SDXL (conditioner.embedders.0 and .1)"
    raise ModelNotFoundError(f"The checkpoint {path} is {what}: it is neither SD 1.x nor SDXL. {_MODEL_HELP}.")
