"""`FILE:WEIGHT` LoRA specs, as the command line takes them. Shared by `morphkit.lora` and `morphkit.lora_files`
(which therefore need not import each other for it)."""

from __future__ import annotations

import os
from pathlib import Path


def parse_lora_spec(spec: str | os.PathLike, default_weight: float = 1.0) -> tuple[Path, float]:
    """`"style.safetensors:0.8"` -> (Path("style.safetensors"), 0.8); without `:weight` the weight is `default_weight`."""
    text = str(spec)
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass  # a ':' that is part of the path
    return Path(text), default_weight
