"""A content-addressed cache for what a morph can reuse: fitted LoRAs and inverted latents.

An entry's key is a hash of everything that changes it: the image's bytes (not its file name), the
prompt, the model, every setting, and morphkit's cache version. A second run with the same inputs
therefore reuses the entry, and a changed image or setting can never hit a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write, cache_dir
from .tiny import TINY_NAME, TINY_VERSION

CACHE_VERSION = 1


def cache_key(kind: str, **parts) -> str:
    payload = json.dumps({"kind": kind, "cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def model_fingerprint(model: str) -> str:
    """Identifies a base model cheaply: tiny's version, a hub id, or a local path with size and time."""
    if model == TINY_NAME:
        return TINY_VERSION
    path = Path(model).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir():
        weights = sorted(path.glob("unet/*.safetensors")) + sorted(path.glob("unet/*.bin"))
        stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
        return f"dir:{path.resolve()}:{stamp}"
    return f"hub:{model}"


class TensorCache:
    """safetensors files under `root/kind/key.safetensors`; `root` None disables caching."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None

    @classmethod
    def default(cls, enabled: bool = True, root: str | os.PathLike | None = None) -> "TensorCache":
        return cls((Path(root) if root else cache_dir() / "morph") if enabled else None)

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.root is None else self.root / kind / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception:  # a damaged entry is a miss; it is rewritten
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        path = self.path(kind, key)
        if path is None:
            return None
        with atomic_write(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return path
