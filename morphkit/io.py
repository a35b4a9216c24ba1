"""Writing files so that nothing is ever half-written or silently replaced.

Every file morphkit writes goes through `atomic_write`: the content lands in a temporary file in
the same folder and is renamed over the target only once it is complete, so an interrupted run
leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import DiskFullError, InputError, OutputExistsError

# errors that mean "no room": a full disk, a full quota, a file past the size limit (ulimit -f)
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def check_can_write(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Refuse early when `path` exists and `overwrite` is False, before any work is done."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"The {what} {path} already exists. Pass --overwrite to replace it, "
            "or choose another output path."
        )
    if path.is_dir():
        raise OutputExistsError(f"The {what} {path} is a directory; a file was expected there.")
    check_writable(path.parent, f"folder for the {what}")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    The temporary name keeps the target's suffix so that writers which look at the extension
    (PIL, imageio, safetensors) behave as for the real name, and holds this process's id so that
    `sweep_stale` can tell a dead run's leftovers from a live run's work. `check(tmp)`, when given,
    verifies the written file is complete before it is renamed (and raises if not). A full disk
    becomes `DiskFullError` saying how much room is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.stem), suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        raise no_room_error(e, path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise no_room_error(e, path) from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def temp_prefix(name: str) -> str:
    """The start of a temporary name beside `name`: hidden, and marked with this process's id."""
    return f".{name}.{os.getpid()}."


def make_staging_dir(target: Path) -> Path:
    """A temporary folder beside `target`, to be renamed onto it when complete (usual permissions)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    except OSError as e:
        raise no_room_error(e, target) from None
    os.chmod(staging, 0o777 & ~_umask())
    return staging


# ---------------------------------------------------------------------------------------------
# room on the disk, and folders we can write


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(existing_parent(Path(path))).free


def existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def no_room_error(error: OSError, path: Path) -> OSError | DiskFullError:
    """`DiskFullError` for an OSError that means "no room" (full disk, quota, file size limit); else `error`."""
    if error.errno not in NO_ROOM:
        return error
    return disk_full(path, "file size limit reached" if error.errno == errno.EFBIG else None)


def disk_full(path: Path | None, detail: str | None = None) -> DiskFullError:
    """The error for a write that found no room: how much is free where, and what to do."""
    where = existing_parent(Path(path) if path else Path.cwd())
    free = free_bytes(where) / 2**20
    detail = f"; {detail}" if detail else ""
    return DiskFullError(f"The disk is full ({free:.0f} MB free at {where}{detail}): {path or 'a file'} could not be "
                         "written completely, so nothing was put in its place. Free some space (or raise the limit), "
                         "or choose another output folder (--output-dir, --out, --cache-dir), and run again.")


def check_room(folder: str | os.PathLike, need: int, what: str = "the outputs", option: str = "--output-dir") -> None:
    """Refuse early when the file system that will hold `folder` has less than `need` bytes free."""
    where = existing_parent(Path(folder))
    free = free_bytes(where)
    if free < need:
        raise DiskFullError(f"The disk is full: {what} need about {need / 2**20:.0f} MB, and only "
                            f"{free / 2**20:.0f} MB are free at {where}. Free some space or choose another {option}.")


def check_writable(folder: str | os.PathLike, what: str = "output folder", option: str | None = None) -> Path:
    """Check, before any work, that `folder` can be created (if missing) and written; raise `OutputExistsError`
    naming `option` (the CLI option that chose the folder) when given."""
    folder = Path(folder)
    where = existing_parent(folder)
    named = f" ({option})" if option else ""
    if not where.is_dir():
        raise OutputExistsError(f"The {what} {folder}{named} cannot be made: {where} is a file, not a folder.")
    try:  # the real test: make something there (os.access is fooled by read-only mounts, ACLs and root)
        if where == folder.absolute():
            with tempfile.TemporaryFile(dir=folder):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(prefix=temp_prefix("probe"), dir=where))
        return folder
    except OSError as e:
        reason = e.strerror or str(e)
    raise OutputExistsError(f"The {what} {folder}{named} cannot be written ({reason} at {where}). Choose a folder "
                            f"you can write to{f' with {option}' if option else ''}.")


# ---------------------------------------------------------------------------------------------
# what dead runs left behind

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}(\.tmp.*)?$")
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp.*$|^\.(frames|step-\d+)\.[a-z0-9_]{8}$")  # before ids were marked
LEGACY_AGE_S = 24 * 3600


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in `folder` that runs killed mid-write left (their process is gone).

    Only names morphkit's own temporaries have are looked at; nothing is followed through a symbolic link.
    Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder)) if folder.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not _is_stale(entry):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue  # another run got there first, or it is not ours to remove
    return removed


def _is_stale(entry: os.DirEntry) -> bool:
    if match := _TEMP.match(entry.name):
        return not process_alive(int(match["pid"]))
    if _LEGACY.match(entry.name):
        try:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_AGE_S
        except OSError:
            return False
    return False


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not ours to judge: keep its files
    return True


# ---------------------------------------------------------------------------------------------
# inputs that are not regular files


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file (after symbolic links); otherwise what `path` is, in words."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"not readable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def is_plain_name(name: str) -> bool:
    """True for a plain file name: no folder part, not '.' or '..', no NUL, nothing absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and "/" not in name
            and "\\" not in name and Path(name).name == name)


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file; otherwise `InputError` saying what it is (missing, a FIFO, a device...)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "missing":
        raise InputError(f"The {what} {path} does not exist. Check the path.")
    if kind is not None:
        raise InputError(f"The {what} {path} is {kind}, not a regular file; give the path of a file.")
    return path


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
