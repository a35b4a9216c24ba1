"""Training examples: one image with a prompt, or a folder with `metadata.jsonl`.

The folder format is the Hugging Face `imagefolder` one: one JSON object a line,
`{"file_name": "cat.png", "text": "a photo of a cat"}`, where `text` may also be a list of
captions (one is drawn per step). File names are relative to the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ConfigError, InputError
from .images import open_image
from .io import sha256_file

METADATA_FILE = "metadata.jsonl"


@dataclass
class Example:
    path: Path
    image: Image.Image  # RGB at its own size; the training resolution is applied later
    captions: list[str]


def load_examples(source: str | os.PathLike, prompt: str | None = None) -> list[Example]:
    """Read training examples from an image file (with `prompt`) or a folder with `metadata.jsonl`."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"The training data {source} does not exist. Give an image file or a folder with {METADATA_FILE}.")
    if source.is_file():
        if not prompt:
            raise ConfigError("Training on one image needs a prompt: pass --prompt (for example --prompt 'a photo of sks').")
        return [Example(source, open_image(source), [prompt])]
    metadata = source / METADATA_FILE
    if not metadata.is_file():
        raise InputError(
            f"The folder {source} has no {METADATA_FILE}. A training folder holds images and a {METADATA_FILE} "
            'with one line per image: {"file_name": "cat.png", "text": "a photo of a cat"}.'
        )
    if prompt:
        raise ConfigError(f"--prompt is for a single image; the folder {source} has its captions in {METADATA_FILE}.")
    return [Example(source / name, open_image(source / name), captions) for name, captions in _read_rows(metadata)]


def _read_rows(metadata: Path) -> list[tuple[str, list[str]]]:
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
        text = row.get("text")
        captions = [text] if isinstance(text, str) else text
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise InputError(f'{where}: "text" must be a non-empty caption or a non-empty list of captions.')
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


def data_hash(examples: list[Example]) -> str:
    """A short hash of the training data: every image's bytes and every caption."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(sha256_file(ex.path).encode())
        digest.update(json.dumps(ex.captions).encode())
    return digest.hexdigest()[:16]
