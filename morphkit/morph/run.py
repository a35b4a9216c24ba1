"""The whole jobs: `morph` (two images) and `morph_chain` (two or more keyframes), each a short list of steps
over the stages of `pair`, `job` and `chain`: check everything, prepare, render, write the files."""

from __future__ import annotations

from pathlib import Path

from ..stages import Stages
from .chain import check_chain_frames, render_chain
from .job import MorphResult, export_morph, output_folder, render_morph
from .pair import check_keyframes, check_pair, prepare_keyframes, prepare_pair
from .settings import MorphSettings


def morph(image_a, image_b, settings: MorphSettings | None = None, *, config=None, pipe=None,
          progress: bool = True, **options) -> MorphResult:
    """Morph image A into image B and write a GIF, an MP4 and PNG frames (any of them, or none).

    Settings come from `settings` (a `MorphSettings`), then a `config` file (JSON or TOML), then keyword
    `options` named as the fields of `MorphSettings` (`frames=24, attn_lambda=0.6, ...`). Images are paths or
    PIL images; see `prepare_pair` for how they are sized. The stages, each callable alone: `prepare_pair`,
    `render_morph` (with `pace`), `export_morph`. With `loop`, A to B and back to A (see `morph_chain`).
    """
    from ..metrics import get_distance
    from ..models import resolve_device

    # 1. settings, inputs and outputs: everything that can be checked before the model loads
    settings = MorphSettings.resolve(config, base=settings, **options)
    if settings.loop:
        return morph_chain([image_a, image_b], settings, pipe=pipe, progress=progress)
    originals = check_pair(image_a, image_b, settings)
    distance = None  # built now, so that a distance asked for by name that cannot run fails before the fit
    if settings.paced:
        distance = get_distance(settings.distance, pipe.unet.device if pipe is not None else resolve_device(settings.device))
    out = output_folder([image_a, image_b], settings)

    # 2. the pair: LoRAs and inversions (from the cache where it has them)
    prepared = prepare_pair(image_a, image_b, settings, pipe=pipe, progress=progress, originals=originals)

    # 3. the frames, evenly paced
    rendered = render_morph(prepared, settings, progress=progress, distance=distance)

    # 4. the files
    return finish(prepared, rendered, settings, out)


def morph_chain(images, settings: MorphSettings | None = None, *, config=None, pipe=None, progress: bool = True,
                **options) -> MorphResult:
    """Morph through two or more keyframes (`images`: paths or PIL images) in order, and back to the first with
    `loop`; write a GIF, an MP4 and PNG frames. Settings as `morph` takes them; `prompt_for` gives each
    keyframe its prompt. Two images without `loop` are exactly `morph(image_a, image_b)`."""
    from ..metrics import get_distance
    from ..models import resolve_device

    # 1. settings, inputs and outputs: everything that can be checked before the model loads
    settings = MorphSettings.resolve(config, base=settings, **options)
    images = list(images)
    if len(images) == 2 and not settings.loop:
        return morph(images[0], images[1], settings, pipe=pipe, progress=progress)
    originals = check_keyframes(images, settings)
    check_chain_frames(settings, len(images))
    distance = None  # built now, so that a distance asked for by name that cannot run fails before the fit
    if settings.pacing == "even":
        distance = get_distance(settings.distance, pipe.unet.device if pipe is not None else resolve_device(settings.device))
    out = output_folder(images, settings)

    # 2. the keyframes: LoRAs and inversions (from the cache where it has them)
    prepared = prepare_keyframes(images, settings, pipe=pipe, progress=progress, originals=originals)

    # 3. the frames, evenly paced over the whole chain
    rendered = render_chain(prepared, settings, progress=progress, distance=distance)

    # 4. the files
    return finish(prepared, rendered, settings, out)


def finish(prepared, rendered, settings: MorphSettings, out: Path | None) -> MorphResult:
    """Step 4 of both jobs: write the files, and gather what every stage measured into a `MorphResult`."""
    stages = Stages(prepared.pipe.unet.device)
    stages.begin()
    paths = export_morph(rendered.frames, settings, out) if out is not None else {}
    stages.end("export")
    return MorphResult(rendered.frames, rendered.alphas, out, paths,
                       {**prepared.timings, **rendered.timings, **stages.seconds}, prepared.hits,
                       {**prepared.peak_memory, **rendered.peak_memory, **stages.peak_bytes},
                       rendered.attention_steps, rendered.attention_bytes, settings.pacing, rendered.distance,
                       rendered.rerendered, rendered.first_distances, rendered.distances,
                       {**prepared.precisions, **rendered.precisions}, settings.inversion_method.describe(),
                       rendered.keyframes, rendered.segments, rendered.probe_steps)
