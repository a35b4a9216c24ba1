"""Model families: what SD 1.x and SDXL are, asked in one place.

    family_of(pipe)              the family of a loaded pipeline (or of a bare UNet)
    family_of_folder(folder)     of a diffusers folder, from its model_index.json and unet/config.json
    family_of_single_file(path)  of an LDM-layout .safetensors checkpoint, from its key names

A refiner (one bigG text encoder, aesthetic-score time ids), a checkpoint of another architecture (SD 2.x
single files, SD3, Flux, ...), and a single file that cannot be read (truncated) raise `ModelNotFoundError`
with a message that says what the file is and what `--model` takes.
"""

from __future__ import annotations

from .base import Family, PromptEmbeds, TextEncoder, as_prompt_embeds
from .detect import family_of, family_of_folder, family_of_single_file, family_named
from .sd15 import SD15
from .sdxl import SDXL, time_ids

FAMILIES = (SD15, SDXL)

__all__ = ["FAMILIES", "SD15", "SDXL", "Family", "PromptEmbeds", "TextEncoder", "as_prompt_embeds", "family_named",
           "family_of", "family_of_folder", "family_of_single_file", "time_ids"]
