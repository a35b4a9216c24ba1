"""Reading, validating and sizing images: the one loader every command uses.

Size policy (the same everywhere, so a LoRA fitted by `train` sees exactly the framing that
`invert`, `morph` and `stylize` work on):

1. EXIF orientation is applied; RGBA/LA/palette images are composited on white; grayscale,
   CMYK and 16-bit images are converted to 8-bit RGB.
2. The image is scaled (Lanczos) so that its *shorter* side equals `resolution`; the aspect
   ratio is kept. A long side beyond `MAX_ASPECT` times the short side is center-cropped.
3. Each side is rounded down to a multiple of 8 (the VAE's factor) by a center crop of at most
   7 pixels.

No image is ever squashed to a new aspect ratio.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, brief
from .io import atomic_write, check_can_write, file_kind

MULTIPLE = 8
MAX_ASPECT = 2.0
MAX_RESOLUTION = 2048  # SD 1.5 is trained at 512; beyond this, attention alone needs tens of GB
MAX_PIXELS = 64_000_000  # 8000 x 8000: far above anything SD 1.5 can use
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_SEQUENCE_FRAMES = 2000  # morph's --frames cap
MAX_SEQUENCE_PIXELS = MAX_SEQUENCE_FRAMES * 512 * 512  # a sequence read whole (eval): about 1.5 GB as RGB
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` as an 8-bit RGB image at its own size, or raise `InputError` saying why not.

    Only the header is read until the pixel limit is checked: no image is decoded before it is known to fit.
    """
    path = Path(path)
    probe_size(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"The image {path} is corrupt or truncated and could not be decoded ({e}).") from None


def probe_size(path: Path, frames: bool = False) -> tuple[int, int, int]:
    """(width, height, frame count) from the header alone; `InputError` for anything that is not a readable image
    within the pixel limit (a FIFO, device or folder says what it is instead of hanging)."""
    kind = file_kind(path)
    if kind == "missing":
        raise InputError(f"The image {path} does not exist. Check the path.")
    if kind == "a folder":
        raise InputError(f"{path} is a directory, but an image file was expected here.")
    if kind is not None:
        raise InputError(f"The image {path} is {kind}, not a regular file; give the path of an image file.")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"The image {path} is empty (0 bytes). It may have been cut off while copying.")
    if size > MAX_FILE_BYTES:
        raise InputError(
            f"The image {path} is {size / 2**20:.0f} MiB, larger than morphkit accepts "
            f"({MAX_FILE_BYTES // 2**20} MiB). Downscale it first."
        )
    try:
        with warnings.catch_warnings():  # our own pixel limit below is the one that speaks
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                (width, height), count = probe.size, (getattr(probe, "n_frames", 1) if frames else 1)
    except Image.DecompressionBombError:
        raise InputError(f"The image {path} has more pixels than morphkit accepts "
                         f"({MAX_PIXELS // 1_000_000} megapixels). Downscale it first.") from None
    except UnidentifiedImageError:
        raise InputError(f"{path} could not be read: it is not an image morphkit can read (PNG, JPEG, WebP, BMP, TIFF, "
                         "GIF).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"The image {path} is corrupt or truncated and could not be read ({e}).") from None
    if width * height > MAX_PIXELS:
        raise InputError(
            f"The image {path} is {width}x{height} pixels, more than morphkit accepts "
            f"({MAX_PIXELS // 1_000_000} megapixels). Downscale it first; Stable Diffusion 1.5 works at 512 px."
        )
    if width < 1 or height < 1:
        raise InputError(f"The image {path} has no pixels ({width}x{height}).")
    return width, height, count


def check_sequence_pixels(where, pixels: int) -> None:
    """Refuse a sequence of frames whose pixels together pass `MAX_SEQUENCE_PIXELS`, before any is decoded."""
    if pixels > MAX_SEQUENCE_PIXELS:
        raise InputError(f"The frames of {where} hold {pixels / 1e6:.0f} megapixels together, more than morphkit "
                         f"reads ({MAX_SEQUENCE_PIXELS / 1e6:.0f}: {MAX_SEQUENCE_FRAMES} frames of 512x512). Use "
                         "fewer or smaller frames.")


def open_images(files: list[Path], where) -> list[Image.Image]:
    """Open many images (a folder of frames) after checking every header and their pixels together."""
    check_sequence_pixels(where, sum(w * h for w, h, _ in (probe_size(Path(f)) for f in files)))
    return [open_image(f) for f in files]


def open_frames(path: str | os.PathLike) -> list[Image.Image]:
    """Every frame of an animated image (a GIF, for one) as RGB, the pixel limits checked before any frame is
    decoded: each frame's and all of them together (a small file can declare a huge canvas many times)."""
    path = Path(path)
    width, height, count = probe_size(path, frames=True)
    check_sequence_pixels(path, width * height * count)
    frames = []
    try:
        with Image.open(path) as img:
            for index in range(count):
                img.seek(index)
                if img.size != (width, height):  # a frame larger than the canvas: checked again
                    check_sequence_pixels(path, img.width * img.height * count)
                frames.append(to_rgb(img.copy()))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"{path} could not be read as a GIF or image ({brief(e, 160)}).") from None
    return frames


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that puts frame_2 before frame_10 (numbers compared as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", Path(path).name)]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited on white; 16-bit is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution < MULTIPLE or resolution % MULTIPLE or resolution > MAX_RESOLUTION:
        raise InputError(f"The resolution must be a multiple of {MULTIPLE} from {MULTIPLE} to {MAX_RESOLUTION}; "
                         f"got {resolution}. Stable Diffusion 1.5 works best at 512.")
    return resolution


def fit_size(width: int, height: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The size policy as arithmetic: returns (scaled size, final size) for an image of (width, height).

    The scaled image has its shorter side equal to `resolution`; the final size is the center crop
    of it whose long side is at most `MAX_ASPECT` times the short one and whose sides are multiples of 8.
    """
    check_resolution(resolution)
    scale = resolution / min(width, height)
    scaled = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    longest = int(resolution * MAX_ASPECT)
    final = tuple(min(side, longest) // MULTIPLE * MULTIPLE for side in scaled)
    return scaled, final


def resize_to_policy(img: Image.Image, resolution: int) -> Image.Image:
    scaled, final = fit_size(img.width, img.height, resolution)
    if scaled != img.size:
        img = img.resize(scaled, Image.Resampling.LANCZOS)
    return center_crop(img, final)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = size
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def cover_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `img` to cover `size` with its aspect ratio kept, then center-crop to exactly `size`.

    How `morph` frames image B to image A's size, and how `eval` frames the inputs to the frames' size.
    """
    width, height = size
    scale = max(width / img.width, height / img.height)
    scaled = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    return center_crop(img.resize(scaled, Image.Resampling.LANCZOS), size)


def load_image(path: str | os.PathLike, resolution: int | None = None) -> Image.Image:
    """Open an image and, when `resolution` is given, apply the size policy of this module."""
    img = open_image(path)
    return resize_to_policy(img, resolution) if resolution else img


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (1, 3, H, W) in [-1, 1], the VAE's input range."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 127.5 - 1.0
    return arr.permute(2, 0, 1).unsqueeze(0)


def to_pil(tensor: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    arr = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def save_image(img: Image.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `img` atomically; refuse to replace an existing file unless `overwrite`."""
    path = check_can_write(path, overwrite, "image")
    with atomic_write(path) as tmp:
        img.save(tmp)
    return path
