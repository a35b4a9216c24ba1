"""Validation images during training: the prompt rendered with the LoRA as it is, at chosen steps, with fixed
seeds so that steps (and runs) compare; and a grid of them all at the end.

Files: `OUTPUT/validation/step_NNNNNN/NN.png`, and `OUTPUT/validation/grid.png` (a row per step).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from ..images import list_images, save_image
from .settings import TrainSettings
from .text import with_tokens


def validation_every(settings: TrainSettings, steps_per_epoch: int) -> int | None:
    """Every how many optimizer steps validation runs (None: only at the end, when a prompt is given)."""
    if settings.validation_steps:
        return settings.validation_steps
    if settings.validation_epochs:
        return settings.validation_epochs * steps_per_epoch
    return None


def validation_due(settings: TrainSettings, done: int, steps: int, steps_per_epoch: int) -> bool:
    if not settings.validation_prompt:
        return False
    every = validation_every(settings, steps_per_epoch)
    return done == steps or (every is not None and done % every == 0)


@torch.no_grad()
def render_validation(pipe, settings: TrainSettings, step: int, folder: Path) -> tuple[list[Path], list[Image.Image]]:
    """Render the validation prompt `num_validation_images` times (seeds seed, seed + 1, …) into
    `folder/step_NNNNNN/`; the UNet and text encoders are put in eval mode for it and back after."""
    modules = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        images = []
        for i in range(settings.num_validation_images):
            generator = torch.Generator("cpu").manual_seed(settings.seed + i)
            out = pipe(with_tokens(settings.validation_prompt, settings), num_inference_steps=settings.sample_steps,
                       height=settings.resolution, width=settings.resolution, generator=generator, output_type="pil")
            images.append(out.images[0])
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    target = folder / f"step_{step:06d}"
    target.mkdir(parents=True, exist_ok=True)
    paths = [save_image(img, target / f"{i:02d}.png", overwrite=True) for i, img in enumerate(images)]
    return paths, images


def validation_grid(folder: Path) -> Path | None:
    """One image of every validation image so far: a row per step, oldest first (`folder/grid.png`)."""
    rows = [list_images(step) for step in sorted(folder.glob("step_*")) if step.is_dir()]
    rows = [r for r in rows if r]
    if not rows:
        return None
    cells = [[Image.open(p).convert("RGB") for p in row] for row in rows]
    width, height = cells[0][0].size
    columns = max(len(r) for r in cells)
    grid = Image.new("RGB", (columns * width, len(cells) * height), "white")
    for y, row in enumerate(cells):
        for x, img in enumerate(row):
            grid.paste(img.resize((width, height)), (x * width, y * height))
    return save_image(grid, folder / "grid.png", overwrite=True)


def steps_per_epoch(n_examples: int, settings: TrainSettings, processes: int) -> int:
    micro = math.ceil(n_examples * settings.repeats / (settings.batch_size * processes))
    return max(1, math.ceil(micro / settings.gradient_accumulation_steps))
