"""Training examples: one image with a prompt, a folder with `metadata.jsonl`, or a folder of images with one
instance prompt; and the class images of prior preservation.

The folder format is the Hugging Face `imagefolder` one: one JSON object a line,
`{"file_name": "cat.png", "text": "a photo of a cat"}`, where `text` (or the column named by
`caption_column`) may also be a list of captions (one is drawn per step). File names are relative to
the folder. A row without that column takes the instance prompt, when one is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ConfigError, InputError
from .images import IMAGE_SUFFIXES, list_images, natural_key, open_image
from .io import sha256_file

METADATA_FILE = "metadata.jsonl"


@dataclass
class Example:
    path: Path
    image: Image.Image  # RGB at its own size; the training resolution is applied later
    captions: list[str]


def load_examples(source: str | os.PathLike, prompt: str | None = None, caption_column: str = "text",
                  instance_prompt: str | None = None) -> list[Example]:
    """Read training examples: an image file (with `prompt`), a folder with `metadata.jsonl` (captions from
    `caption_column`, else `instance_prompt`), or a folder of images that all take `instance_prompt`."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"The training data {source} does not exist. Give an image file or a folder with {METADATA_FILE}.")
    if source.is_file():
        prompt = prompt or instance_prompt
        if not prompt:
            raise ConfigError("Training on one image needs a prompt: pass --prompt (for example --prompt 'a photo of sks').")
        return [Example(source, open_image(source), [prompt])]
    if prompt:
        raise ConfigError(f"--prompt is for a single image; for the folder {source} give --instance-prompt (one caption "
                          f"for every image) or captions in its {METADATA_FILE}.")
    metadata = source / METADATA_FILE
    if metadata.is_file():
        rows = _read_rows(metadata, caption_column, instance_prompt)
        return [Example(source / name, open_image(source / name), captions) for name, captions in rows]
    if not instance_prompt:
        raise InputError(
            f"The folder {source} has no {METADATA_FILE}, so its images have no captions. Give --instance-prompt (one "
            f"caption for all of them, like 'a photo of TOK dog'), or write a {METADATA_FILE} with one line per image: "
            '{"file_name": "cat.png", "text": "a photo of a cat"}.'
        )
    files = list_images(source)
    if not files:
        raise InputError(f"The folder {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return [Example(file, open_image(file), [instance_prompt]) for file in files]


def load_class_images(folder: str | os.PathLike) -> list[Path]:
    """The class images of prior preservation in `folder` (created when missing): every file must be an image."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"The class folder {folder} (--class-data-dir) is a file; give a folder.")
    if not folder.exists():
        return []
    files = []
    for path in sorted(folder.iterdir(), key=natural_key):
        if path.name.startswith("."):
            continue  # hidden files, and morphkit's own temporaries
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"The class folder {folder} (--class-data-dir) holds {path.name!r}, which is not an image. "
                             "It may hold only class images; move other files out, or choose another folder.")
        open_image(path)  # a broken image is named now, not in the middle of training
        files.append(path)
    return files


def _read_rows(metadata: Path, caption_column: str = "text", instance_prompt: str | None = None):
    rows = []
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{metadata} is not UTF-8 text.") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where} is not valid JSON ({e.msg}). Each line must be one object like "
                             '{"file_name": "cat.png", "text": "a photo of a cat"}.') from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise InputError(f'{where} has no "file_name" string.')
        text = row.get(caption_column, instance_prompt)
        captions = [text] if isinstance(text, str) else text
        if text is None:
            raise InputError(f'{where} has no "{caption_column}" column (--caption-column). Give each line a caption '
                             "there, name the column that holds them, or give --instance-prompt for lines without one.")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise InputError(f'{where}: "{caption_column}" must be a non-empty caption or a non-empty list of captions.')
        file = metadata.parent / row["file_name"]
        if not inside(file, metadata.parent):
            raise InputError(f'{where} names {row["file_name"]}, which lies outside the dataset folder '
                             f"{metadata.parent} (through '..', an absolute path or a symbolic link). Dataset "
                             "images must be inside their folder.")
        if not file.is_file():
            raise InputError(f'{where} names {row["file_name"]}, which is not a file in {metadata.parent}.')
        rows.append((row["file_name"], captions))
    if not rows:
        raise InputError(f"{metadata} has no rows: there is nothing to train on.")
    return rows


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every symbolic link resolved, lies inside `folder` (also resolved)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def data_hash(items: list[tuple[Path, list[str]]]) -> str:
    """A short hash of the training data, given as (image file, captions) pairs: every image's bytes and every
    caption (the images are not decoded)."""
    digest = hashlib.sha256()
    for path, captions in items:
        digest.update(sha256_file(path).encode())
        digest.update(json.dumps(captions).encode())
    return digest.hexdigest()[:16]
