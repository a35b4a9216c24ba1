"""Prior preservation (DreamBooth): class images beside the instance images, so that the model keeps what the
class looks like while it learns the subject.

`class_images` returns the `num_class_images` class images of `class_data_dir`, generating the missing ones with
the base model first (batched, seeded, with a progress bar). They stay in the folder, so the next run (and a
resumed one) reuses them.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from ..data import Example, load_class_images
from ..images import open_image, save_image
from ..io import check_room, check_writable
from ..progress import tqdm
from .draws import rng
from .settings import TrainSettings


def class_image_name(settings: TrainSettings, index: int) -> str:
    """`class-00007-<prompt hash>.png`: the index and what it shows, so that names never meet other prompts'."""
    digest = hashlib.sha256(settings.class_prompt.encode()).hexdigest()[:8]
    return f"class-{index:05d}-{digest}.png"


@torch.no_grad()
def generate_class_images(pipe, settings: TrainSettings, folder: Path, numbers: list[int],
                          progress: bool = True) -> list[Path]:
    """Generate the class images numbered `numbers`: image i from the seed (seed, 'class-image', i), so the same
    settings make the same images, in batches of `sample_batch_size`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(numbers), desc="generating class images", unit="image", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for first in range(0, len(numbers), settings.sample_batch_size):
            indices = numbers[first:first + settings.sample_batch_size]
            generators = [rng(settings.seed, "class-image", i) for i in indices]
            out = pipe([settings.class_prompt] * len(indices), num_inference_steps=settings.sample_steps,
                       height=settings.resolution, width=settings.resolution, generator=generators, output_type="pil")
            for i, img in zip(indices, out.images):
                written.append(save_image(img, folder / class_image_name(settings, i)))
            bar.update(len(indices))
    finally:
        bar.close()
    return written


def class_images(pipe, settings: TrainSettings, progress: bool = True) -> list[Path]:
    """The run's class images: those in the folder, topped up by generation to `num_class_images`."""
    folder = Path(settings.class_data_dir)
    have = load_class_images(folder)
    missing = settings.num_class_images - len(have)
    if missing > 0:
        check_writable(folder, "class folder", "--class-data-dir")
        check_room(folder, missing * 3 * settings.resolution**2, f"{missing} class images")
        numbers, i = [], 0
        while len(numbers) < missing:  # the first free numbers (an earlier run may have taken some)
            if not (folder / class_image_name(settings, i)).exists():
                numbers.append(i)
            i += 1
        generate_class_images(pipe, settings, folder, numbers, progress)
        have = load_class_images(folder)
    return have[: settings.num_class_images]


def class_examples(paths: list[Path], settings: TrainSettings) -> list[Example]:
    return [Example(p, open_image(p), [settings.class_prompt]) for p in paths]
