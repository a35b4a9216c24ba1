"""`FILE:WEIGHT` LoRA specs, as the command line takes them. Shared by `morphkit.lora` and `morphkit.lora_files`
(which therefore need not import each other for it)."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import printable
from ..errors import ConfigError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # what a LoRA file's name ends with


def parse_lora_spec(spec: str | os.PathLike, default_weight: float = 1.0) -> tuple[Path, float]:
    """`"style.safetensors:0.8"` -> (Path("style.safetensors"), 0.8); without `:weight` the weight is `default_weight`."""
    text = str(spec)
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:  # a ':' that is part of the path, or a weight that is not a number
            if Path(path).suffix.lower() in WEIGHT_FILE_SUFFIXES and not Path(text).exists():
                raise ConfigError(f"The LoRA weight after ':' in {printable(text)} is not a number. Write the LoRA "
                                  "as path:weight (style.safetensors:0.8), or the path alone for weight "
                                  f"{default_weight:g}.") from None
    return Path(text), default_weight
