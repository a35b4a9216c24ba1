"""Writing files so that nothing is ever half-written or silently replaced.

Every file morphkit writes goes through `atomic_write`: the content lands in a temporary file in
the same folder and is renamed over the target only once it is complete, so an interrupted run
leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def check_can_write(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Refuse early when `path` exists and `overwrite` is False, before any work is done."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"The {what} {path} already exists. Pass --overwrite (overwrite=True) to replace it, "
            "or choose another output path."
        )
    if path.is_dir():
        raise OutputExistsError(f"The {what} {path} is a directory; a file was expected there.")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    The temporary name keeps the target's suffix so that writers which look at the extension
    (PIL, imageio, safetensors) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_staging_dir(target: Path) -> Path:
    """A temporary folder beside `target`, to be renamed onto it when complete (usual permissions)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where morphkit keeps what it can rebuild: the tiny model, fitted LoRAs, inverted latents.

    `MORPHKIT_CACHE` overrides; otherwise `$XDG_CACHE_HOME/morphkit` or `~/.cache/morphkit`.
    """
    if env := os.environ.get("MORPHKIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "morphkit"
