"""A content-addressed cache for what a morph can reuse: fitted LoRAs and inverted latents.

An entry's key is a hash of everything that changes it: the image's bytes (not its file name), the
prompt, the model, every setting, and morphkit's cache version. A second run with the same inputs
therefore reuses the entry, and a changed image or setting can never hit a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import NumericalError, brief
from .io import atomic_write, cache_dir, check_writable, sweep_stale
from .tiny import TINY_NAME, TINY_VERSION

CACHE_VERSION = 1
log = logging.getLogger(__name__)


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

    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        """Hold one entry's lock while it is built, so that processes sharing the cache build it once: another
        process asking for the same entry waits here, then finds it built. The lock is the operating system's
        (flock) on `key.lock`, so a killed process never leaves it held. Without fcntl (Windows) there is no lock:
        two processes may both build an entry, and each still writes it atomically."""
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if self.root is None or fcntl is None:
            yield
            return
        path = self.root / kind / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_writable(self, kinds=("lora", "inversion")) -> None:
        """Before any work: the cache folder can be made and written (else `OutputExistsError` naming
        --cache-dir); temporaries that killed runs left in it are swept."""
        if self.root is None:
            return
        check_writable(self.root, "cache folder", "--cache-dir")
        for kind in kinds:
            sweep_stale(self.root / kind)

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None: missing, damaged and non-finite entries are misses (and are removed)."""
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception as e:  # a damaged entry is a miss; it is rewritten
            return self.discard(kind, key, f"it cannot be read ({type(e).__name__})")
        if not all_finite(tensors):
            return self.discard(kind, key, "it holds NaN or infinite values")
        return tensors

    def usable(self, kind: str, key: str, check: Callable[[Path], object]) -> Path | None:
        """The entry's path when `check(path)` accepts it (e.g. reading it as a LoRA file); otherwise the entry
        is logged, removed and None returned, so that it is built again."""
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            check(path)
        except Exception as e:
            return self.discard(kind, key, brief(e))
        return path

    def discard(self, kind: str, key: str, why: str) -> None:
        """Drop a bad entry (logged), so that it is a miss and is written again."""
        path = self.path(kind, key)
        log.warning("The cached %s %s is not usable (%s); it is removed and built again.", kind, path, why)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        """Write an entry atomically; `NumericalError` (and nothing written) when a tensor is not finite."""
        path = self.path(kind, key)
        if not all_finite(tensors):
            raise NumericalError(f"The {kind} came out with NaN or infinite values, so it was not cached or used. "
                                 "Lower --guidance or the LoRA weights (or --lora-lr), or run in fp32 (--dtype fp32).")
        if path is None:
            return None
        with atomic_write(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return path


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
