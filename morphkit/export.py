"""Writing frame sequences: GIF, MP4 and a folder of PNG frames, each atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError, OutputExistsError
from .io import atomic_write, check_can_write, make_staging_dir

FORMATS = ("gif", "mp4", "png")


def boomerang(frames: list[Image.Image]) -> list[Image.Image]:
    """A → B → A: the sequence, then back to its first frame without showing the last one twice."""
    return frames + frames[-2::-1]


def save_gif(frames: list[Image.Image], path: str | os.PathLike, duration_ms: int, loop: int = 0,
             overwrite: bool = False) -> Path:
    """An animated GIF with every frame shown `duration_ms`; `loop` 0 repeats forever."""
    path = check_can_write(path, overwrite, "GIF")
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=loop,
                       optimize=False, disposal=1)
    return path


def save_mp4(frames: list[Image.Image], path: str | os.PathLike, fps: float, overwrite: bool = False) -> Path:
    """An H.264 MP4 (yuv420p, plays everywhere) through imageio's ffmpeg."""
    import imageio.v2 as imageio

    path = check_can_write(path, overwrite, "MP4")
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ConfigError(f"An MP4 needs even frame sides; these frames are {width}x{height}.")
    with atomic_write(path) as tmp:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
    return path


def save_frames(frames: list[Image.Image], folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """`folder/frame_000.png`, ...: written into a temporary folder that is then renamed into place."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"The frame folder {folder} already exists. Pass --overwrite to replace it.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(folder)
    try:
        for i, frame in enumerate(frames):
            frame.save(staging / f"frame_{i:03d}.png")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
