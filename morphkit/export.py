"""Writing frame sequences: GIF, MP4 and a folder of PNG frames, each atomically and checked complete.

A morph's output folder is planned before any work (`plan_outputs`): what would be replaced must be what
morphkit wrote there, as its manifest (`.morphkit.json`) lists, never a user's file and never through a
symbolic link. `write_outputs` then writes every format under a lock on the folder, so that two runs with
one `--output-dir --overwrite` take turns instead of tearing each other's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError, MorphkitError, OutputExistsError, brief
from .io import (atomic_write, check_can_write, check_room, check_writable, disk_full, free_bytes,
                 make_staging_dir, no_room_error, sweep_stale, write_json)

FORMATS = ("gif", "mp4", "png")
MANIFEST = ".morphkit.json"  # what morphkit wrote in an output folder: the only files --overwrite replaces
LOCK = ".morphkit.lock"
TARGETS = {"gif": "morph.gif", "mp4": "morph.mp4", "png": "frames"}
_FRAME = re.compile(r"^frame_\d+\.png$")
_HINT = "morphkit replaces only what it wrote there; move it away, or choose another --output-dir."


def boomerang(frames: list[Image.Image]) -> list[Image.Image]:
    """A → B → A: the sequence, then back to its first frame without showing the last one twice."""
    return frames + frames[-2::-1]


def frame_name(index: int, count: int) -> str:
    """`frame_007.png`: zero-padded to the frame count (at least 3 digits), so that names sort in frame order."""
    return f"frame_{index:0{max(3, len(str(count - 1)))}d}.png"


# ---------------------------------------------------------------------------------------------
# single files, each checked complete before it is renamed into place


def save_gif(frames: list[Image.Image], path: str | os.PathLike, duration_ms: int, loop: int = 0,
             overwrite: bool = False) -> Path:
    """An animated GIF with every frame shown `duration_ms`; `loop` 0 repeats forever."""
    path = check_can_write(path, overwrite, "GIF")
    with atomic_write(path, check=check_gif) as tmp:
        write_gif(frames, tmp, duration_ms, loop)
    return path


def save_mp4(frames: list[Image.Image], path: str | os.PathLike, fps: float, overwrite: bool = False) -> Path:
    """An H.264 MP4 (yuv420p, plays everywhere) through imageio's ffmpeg."""
    path = check_can_write(path, overwrite, "MP4")
    check_mp4_size(frames)
    with atomic_write(path, check=check_mp4) as tmp:
        write_mp4(frames, tmp, fps, path)
    return path


def write_gif(frames: list[Image.Image], tmp: Path, duration_ms: int, loop: int = 0) -> None:
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=loop,
                   optimize=False, disposal=1)


def check_mp4_size(frames: list[Image.Image]) -> None:
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ConfigError(f"An MP4 needs even frame sides; these frames are {width}x{height}.")


def write_mp4(frames: list[Image.Image], tmp: Path, fps: float, target: Path) -> None:
    import imageio.v2 as imageio

    try:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
    except (OSError, RuntimeError, ValueError) as e:  # ffmpeg stopped: a full disk, a size limit, a crash
        raise incomplete(target, "MP4", f"ffmpeg stopped: {brief(e)}") from None


def save_frames(frames: list[Image.Image], folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """`folder/frame_000.png`, ...: written into a temporary folder that is then swapped into place.

    With `overwrite`, an existing `folder` must hold only frames (or what the manifest lists); it is never
    followed through a symbolic link.
    """
    folder = Path(folder)
    if os.path.lexists(folder):
        if not overwrite:
            raise OutputExistsError(f"The frame folder {folder} already exists. Pass --overwrite to replace it.")
        _check_frames(folder, read_manifest(folder.parent))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(folder)
    try:
        for i, frame in enumerate(frames):
            target = staging / frame_name(i, len(frames))
            try:
                frame.save(target, format="PNG")
            except OSError as e:
                raise no_room_error(e, target) from None
            check_png(target)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the folder `staging` where `folder` is: the old one is moved aside first, then removed."""
    if not os.path.lexists(folder):
        os.replace(staging, folder)
        return
    aside = make_staging_dir(folder)
    os.replace(folder, aside)  # onto the empty folder just made; `aside` now holds the old frames
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


def incomplete(path: Path, what: str, detail: str) -> MorphkitError:
    """The error for a file that did not come out complete: a full disk when it is nearly full."""
    if free_bytes(path) < 16 * 2**20:
        return disk_full(path, detail)
    return MorphkitError(f"The {what} {path} did not come out complete ({detail}); nothing was put in its place. "
                         f"{free_bytes(path) / 2**20:.0f} MB are free there; if a file size limit (ulimit -f) or "
                         "quota applies, raise it, or choose another --output-dir.")


def check_gif(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(6)
        f.seek(0, os.SEEK_END)
        if f.tell() > 6:
            f.seek(-1, os.SEEK_END)
        tail = f.read(1)
    if head[:4] != b"GIF8" or tail != b";":
        raise incomplete(path, "GIF", "no GIF trailer: the file was cut short")


def check_png(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 12))
        tail = f.read()
    if head != b"\x89PNG\r\n\x1a\n" or tail[4:8] != b"IEND":
        raise incomplete(path, "PNG frame", "no IEND chunk: the file was cut short")


def check_mp4(path: Path) -> None:
    """The file's top-level boxes must add up to its size exactly, with the movie header and data present."""
    size, seen, offset = path.stat().st_size, set(), 0
    with open(path, "rb") as f:
        while offset < size:
            f.seek(offset)
            header = f.read(16)
            if len(header) < 8:
                break
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:
                length = int.from_bytes(header[8:16], "big")
            elif length == 0:
                length = size - offset
            if length < 8:
                break
            seen.add(kind)
            offset += length
    if offset != size or not {b"ftyp", b"moov", b"mdat"} <= seen:
        raise incomplete(path, "MP4", "its boxes do not add up to a whole movie: the file was cut short")


# ---------------------------------------------------------------------------------------------
# a morph's output folder: planned before any work, written under a lock, recorded in a manifest


@dataclass
class OutputPlan:
    """Where each format goes, checked: every target is free, or (with overwrite) something morphkit wrote."""

    folder: Path
    targets: dict[str, Path] = field(default_factory=dict)  # format -> path
    overwrite: bool = False


def plan_outputs(folder: str | os.PathLike, formats, overwrite: bool = False, need_bytes: int = 0,
                 option: str = "--output-dir") -> OutputPlan:
    """Check the whole output plan before any file is touched (and before the model loads).

    Refuses a folder that is a file or cannot be written, a disk without `need_bytes` free, existing outputs
    without `overwrite`, and (with it) anything morphkit did not write: a symbolic link, a folder where a file
    goes or a file where the frame folder goes, a frame folder holding other files, a file the manifest does not
    list.
    """
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputExistsError(f"The output folder {folder} is a file. Choose another {option}.")
    check_writable(folder, "output folder", option)
    sweep_stale(folder)  # what runs killed mid-write left: their temporaries (only those of dead processes)
    targets = {f: folder / TARGETS[f] for f in formats}
    taken = [str(p) for p in targets.values() if os.path.lexists(p)]
    if taken and not overwrite:
        raise OutputExistsError(f"{folder} already holds a morph ({', '.join(taken)}). Pass --overwrite to replace "
                                f"it, or choose another {option}.")
    manifest = read_manifest(folder)
    for fmt in targets:
        _check_replaceable(folder, fmt, manifest)
    if need_bytes:
        check_room(folder, need_bytes, "the morph's files", option)
    return OutputPlan(folder, targets, overwrite)


def estimate_bytes(formats, frames: int, pixels: int) -> int:
    """A generous guess at what the formats take for `frames` frames of `pixels` pixels (PNG worst case)."""
    per_pixel = {"png": 3.0, "gif": 1.0, "mp4": 0.25}
    return int(frames * pixels * sum(per_pixel[f] for f in formats))


def _check_replaceable(folder: Path, fmt: str, manifest: set[str] | None) -> None:
    path = folder / TARGETS[fmt]
    if not os.path.lexists(path):
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise OutputExistsError(f"{path} is a symbolic link; {_HINT}")
    if fmt != "png":
        if not stat.S_ISREG(mode):
            raise OutputExistsError(f"{path} is not a regular file (a folder or a special file); {_HINT}")
        if manifest is not None and TARGETS[fmt] not in manifest:
            raise OutputExistsError(f"{path} was not written by morphkit (its manifest {folder / MANIFEST} does "
                                    f"not list it); {_HINT}")
        return
    _check_frames(path, manifest)


def _check_frames(path: Path, manifest: set[str] | None) -> None:
    """A frame folder may be replaced when it is a real folder holding only morphkit's frames (never a link)."""
    if not os.path.lexists(path):
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a file"
        raise OutputExistsError(f"{path} is {kind}, not morphkit's frame folder; {_HINT}")
    with os.scandir(path) as entries:
        foreign = sorted(e.name for e in entries if not _our_frame(e, path.name, manifest))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"The frame folder {path} holds files morphkit did not write ({shown}); {_HINT}")


def _our_frame(entry: os.DirEntry, folder_name: str, manifest: set[str] | None) -> bool:
    if not entry.is_file(follow_symlinks=False):
        return False
    return f"{folder_name}/{entry.name}" in manifest if manifest is not None else bool(_FRAME.match(entry.name))


def read_manifest(folder: Path) -> set[str] | None:
    """The files the manifest in `folder` lists (relative paths), or None when there is none (or it is damaged)."""
    path = folder / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None


def _record(folder: Path, files: set[str]) -> None:
    write_json(folder / MANIFEST, {"written_by": "morphkit", "files": sorted(files)})


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on `folder` (a lock file inside it), held while the outputs are replaced."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; replacement stays atomic per file
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_outputs(folder: str | os.PathLike, frames: list[Image.Image], formats, duration_ms: int, loop: int = 0,
                  back_and_forth: bool = False, overwrite: bool = False) -> dict[str, Path]:
    """Write `frames` as each of `formats` into `folder`; returns {format: path}.

    Under the folder's lock: the plan is checked again (another run may have written meanwhile; stale
    temporaries of dead runs are swept), the manifest lists what is about to be written, then each file is written
    to a temporary name, checked complete, and renamed into place.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise no_room_error(e, folder) from None
    with folder_lock(folder):
        plan = plan_outputs(folder, formats, overwrite)  # again: another run may have written meanwhile
        old = read_manifest(folder) or set()
        names = {f"frames/{frame_name(i, len(frames))}" for i in range(len(frames))} if "png" in formats else set()
        kept = {f for f in old if not ("png" in formats and f.startswith("frames/"))}
        _record(folder, old | names | {TARGETS[f] for f in formats if f != "png"})  # all that may exist meanwhile
        paths = _write_all(plan, frames, boomerang(frames) if back_and_forth else frames, duration_ms, loop)
        written = kept | names | {TARGETS[f] for f in formats if f != "png"}
        _record(folder, {f for f in written if os.path.lexists(folder / f)})
    return paths


def _write_all(plan: OutputPlan, frames, sequence, duration_ms: int, loop: int) -> dict[str, Path]:
    """Every format to its temporary name first; only when all came out complete are they renamed into place,
    so a failure (a full disk in the MP4, say) replaces nothing and leaves nothing that blocks a rerun."""
    targets, paths = plan.targets, {}
    if "mp4" in targets:
        check_mp4_size(sequence)
    with contextlib.ExitStack() as renames:  # each atomic_write renames on a clean exit, deletes on an error
        if "gif" in targets:
            write_gif(sequence, renames.enter_context(atomic_write(targets["gif"], check=check_gif)), duration_ms,
                      loop)
            paths["gif"] = targets["gif"]
        if "mp4" in targets:
            tmp = renames.enter_context(atomic_write(targets["mp4"], check=check_mp4))
            write_mp4(sequence, tmp, 1000 / duration_ms, targets["mp4"])
            paths["mp4"] = targets["mp4"]
        if "png" in targets:
            paths["png"] = save_frames(frames, targets["png"], overwrite=True)
    return paths
