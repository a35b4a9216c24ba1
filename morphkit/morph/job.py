"""The morph's stages after preparing: render a prepared pair, pace it, export it (`run.morph` composes them).

    prepare_pair(A, B, settings) ─► PreparedPair          (fit + invert: slow, cached, done once)
    render_morph(prepared, settings) ─► Rendered          (a first pass at evenly spaced α, then `pace`)
    pace(prepared, rendered, settings) ─► Rendered        (even pacing: α moved, only moved frames re-rendered)
    export_morph(frames, settings, folder) ─► paths       (GIF, MP4, PNG frames; each written atomically)

A caller that changes only render settings (λ, AdaIN, blend, frames, pacing) calls `render_morph` again on the
same `PreparedPair`; nothing is fitted or inverted again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import OutputExistsError
from ..export import estimate_bytes, plan_outputs, write_outputs
from ..images import to_pil
from ..lora_blend import factor_layers
from ..models import compiled, decode_latents, module_precision, stage_precision
from ..progress import tqdm
from ..stages import Stages, check_finite
from .attention import AttentionStore, attention_steps
from .interpolation import alpha_schedule, even_alphas, moved_frames
from .pair import PreparedPair
from .sampling import ADAPTERS, coarse_corrections, render_frames
from .settings import MorphSettings


@dataclass
class Rendered:
    """The frames of one render of a prepared pair, with what pacing measured and did."""

    frames: list[Image.Image]
    alphas: list[float]  # the α of each frame returned
    first_alphas: list[float]  # the α of the first pass (evenly spaced)
    first_distances: list[float] = field(default_factory=list)  # neighbour distances of the first pass (even pacing)
    distances: list[float] = field(default_factory=list)  # neighbour distances of the frames returned (even pacing)
    rerendered: list[int] = field(default_factory=list)  # frames rendered again at a new α (even pacing)
    distance: str | None = None  # the distance even pacing measured with (lpips, l2, ...)
    attention_steps: int = 0  # of the sampling steps, how many used interpolated self-attention
    attention_bytes: int = 0  # the most memory the kept end-frame self-attention inputs took
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)  # end frames, in-between frames
    keyframes: list[int] = field(default_factory=list)  # the index of each keyframe's frame (a pair: first, last)
    segments: list[int] = field(default_factory=list)  # each segment's steps (frame-to-frame gaps)
    probe_steps: int = 0  # the sampling steps of even pacing's probe pass (0: paced on the full first pass)


@dataclass
class MorphResult:
    frames: list[Image.Image]
    alphas: list[float]
    output_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)  # per stage, bytes of GPU memory (CUDA only)
    attention_steps: int = 0  # of the sampling steps, how many used interpolated self-attention
    attention_bytes: int = 0  # the most memory the kept end-frame self-attention inputs took
    pacing: str = "linear"
    distance: str | None = None  # the distance even pacing measured with (lpips, l2, ...)
    rerendered: list[int] = field(default_factory=list)  # frames rendered again at a new α (even pacing)
    first_distances: list[float] = field(default_factory=list)  # neighbour distances of the first pass (even pacing)
    distances: list[float] = field(default_factory=list)  # neighbour distances of the frames returned (even pacing)
    precisions: dict[str, str] = field(default_factory=dict)  # the precision each stage ran in
    inversion: str = ""  # how the images were inverted, in words
    keyframes: list[int] = field(default_factory=list)  # the index of each keyframe's frame (a pair: first, last)
    segments: list[int] = field(default_factory=list)  # each segment's steps (a chain's frames went by length)
    probe_steps: int = 0  # the sampling steps of even pacing's probe pass (0: paced on the full first pass)


# ---------------------------------------------------------------------------------------------
# rendering


def render_alphas(prepared: PreparedPair, alphas: torch.Tensor, settings: MorphSettings,
                  attention: AttentionStore | None = None, bar=None, schedule=None,
                  corrections: tuple | None = None) -> list[Image.Image]:
    """The frames at `alphas` (one pass, no pacing), decoded to images.

    With `fp32_ends` on a model in fp16 / bf16, the end frames (α = 0 or 1) render and decode in fp32, as they
    were inverted, so that they come back as exactly as the inversion allows; the others in the model's own
    precision. (`attention` must then keep the ends' inputs: `exact_ends_apart` says when.) A probe pass gives its
    own `schedule` and the `corrections` along it (`probe_corrections`).
    """
    if not exact_ends_apart(prepared) or schedule is not None:  # (a probe pass needs no fp32 ends)
        return _render_decode(prepared, alphas, settings, attention, bar, schedule, corrections)
    is_end = (alphas == 0) | (alphas == 1)
    frames: list = [None] * len(alphas)
    for part in (is_end, ~is_end):
        if part.any():
            with stage_precision(prepared.pipe.unet, enabled=bool(is_end[part].all())), \
                    stage_precision(prepared.pipe.vae, enabled=bool(is_end[part].all())):
                pictures = _render_decode(prepared, alphas[part], settings, attention, bar)
            for i, picture in zip(part.nonzero().flatten().tolist(), pictures):
                frames[i] = picture
    return frames


def ends_along(prepared: PreparedPair, settings: MorphSettings) -> bool:
    """Whether even pacing's second pass renders the end frames again with the moved ones (and throws them away):
    under `compile_unet`, when all frames fit one UNet call (`frames_per_call`) and the ends render in the model's
    own precision. Then no pass needs the ends' self-attention inputs kept, every batch interpolates from its own
    rows, and the compiled UNet runs the whole render as one graph. Eager, the two extra rows would only cost
    time (a full-size UNet on a CPU pays per row), so the ends' inputs are kept instead."""
    return (settings.compile_unet and settings.frames <= settings.frames_per_call(prepared.pipe.unet.device)
            and not exact_ends_apart(prepared))


def exact_ends_apart(prepared: PreparedPair) -> bool:
    """Whether the end frames render apart from the others, in fp32 (`fp32_ends` on a lower-precision model)."""
    return prepared.settings.fp32_ends and module_precision(prepared.pipe.unet) != "fp32"


def _render_decode(prepared: PreparedPair, alphas: torch.Tensor, settings: MorphSettings,
                   attention: AttentionStore | None, bar, schedule=None, corrections=None) -> list[Image.Image]:
    p = prepared
    per_call = settings.frames_per_call(p.pipe.unet.device)
    latents = render_frames(p.pipe, p.noises[0], p.noises[1], p.embeds[0], p.embeds[1], alphas, schedule or p.schedule,
                            p.settings.guidance, p.negative, per_call, p.adapters, progress=bar,
                            adain=settings.adain, blend=settings.lora_blend, attention=attention,
                            corrections=p.corrections if schedule is None else corrections)
    return to_pil(check_finite(decode_latents(p.pipe, check_finite(latents, "rendering")), "decoding"))


def render_morph(prepared: PreparedPair, settings: MorphSettings | None = None, *, progress: bool = True,
                 distance=None) -> Rendered:
    """All frames of the morph: a first pass at evenly spaced α, then (even pacing) `pace`; or, with even pacing
    and `pacing_probe_steps`, a quick probe pass that `probe_pace` measures, then every frame once at its α.

    `settings` may differ from the prepared ones in render settings only (`prepared.matches(settings)`).
    `distance`: even pacing's, from `metrics.get_distance`, when the caller has built it already.
    """
    from ..metrics import get_distance

    settings = (settings or prepared.settings).validate()
    if not prepared.matches(settings):
        raise ValueError("These settings change how the pair is prepared (model, prompts, LoRAs, steps, guidance, "
                         "seed or size): call prepare_pair again.")
    unet = prepared.pipe.unet
    if settings.lora_blend == "factors" and prepared.adapters:
        factor_layers(unet, ADAPTERS)  # two LoRAs of different ranks cannot blend by factors: say so now
    if distance is None and settings.paced:
        distance = get_distance(settings.distance, unet.device)
    distance = distance if settings.paced else None
    steps = attention_steps(settings.attn_lambda, settings.steps)
    # a later call reads the ends' self-attention inputs from the store: the in-between frames' own call when the
    # ends render apart, or even pacing's second pass, unless it renders the ends along (a probe's final pass does)
    second_pass = settings.paced and not settings.pacing_probe_steps
    keep = exact_ends_apart(prepared) or (second_pass and not ends_along(prepared, settings))
    attention = AttentionStore(steps, keep=keep) if settings.frames > 2 and steps else None
    stages = Stages(unet.device)
    stages.begin()
    alphas = alpha_schedule(settings.frames)
    bar = tqdm(total=settings.frames, desc="rendering frames", unit="frame", disable=not progress)
    probe = probe_pass(prepared, settings) if distance is not None and settings.pacing_probe_steps else None
    with compiled(unet, enabled=settings.compile_unet):  # (after the probe's corrections: other batch shapes)
        try:
            if probe is not None:
                rendered = probe_pace(prepared, settings, distance, attention, bar, probe)
            else:
                frames = render_alphas(prepared, alphas, settings, attention, bar)
                rendered = Rendered(frames, alphas.tolist(), alphas.tolist())
                if distance is not None:
                    rendered = pace(prepared, rendered, settings, distance, attention, bar)
        finally:
            bar.close()
            if attention is not None:
                attention.clear()
    stages.end("render")
    rendered.attention_steps = attention.steps if attention is not None else 0
    rendered.attention_bytes = attention.peak_bytes if attention is not None else 0
    rendered.timings, rendered.peak_memory = stages.seconds, stages.peak_bytes
    rendered.precisions = render_precisions(prepared)
    rendered.keyframes, rendered.segments = [0, len(rendered.frames) - 1], [len(rendered.frames) - 1]
    return rendered


def render_precisions(prepared: PreparedPair) -> dict[str, str]:
    own = module_precision(prepared.pipe.unet)
    return {"end frames": "fp32" if exact_ends_apart(prepared) else own, "in-between frames": own}


def probe_pace(prepared: PreparedPair, settings: MorphSettings, distance, attention: AttentionStore | None = None,
               bar=None, probe: tuple | None = None) -> Rendered:
    """Even pacing from a probe: render the frames at evenly spaced α with `pacing_probe_steps` coarse DDIM steps
    (the same path from the same noise, in larger steps), measure their neighbour distances, move each α so that
    consecutive frames would be equally far apart, and render every frame once, at full steps, at its α. The
    probe costs `pacing_probe_steps / steps` of a pass, where re-rendering the moved frames cost most of one.
    `probe`: `probe_pass`'s schedule and corrections, when the caller has made them already."""
    from ..metrics import images_to_tensor, neighbour_distances

    name, distance_fn, _ = distance
    alphas = alpha_schedule(settings.frames)
    probe, corrections = probe or probe_pass(prepared, settings)
    probe_attention = (AttentionStore(attention_steps(settings.attn_lambda, len(probe)), keep=False)
                       if attention is not None else None)
    if bar is not None:
        bar.total += settings.frames
        bar.refresh()
    try:
        quick = render_alphas(prepared, alphas, settings, probe_attention, bar, schedule=probe,
                              corrections=corrections)
    finally:
        if probe_attention is not None:
            probe_attention.clear()
    first = neighbour_distances(images_to_tensor(quick), distance_fn)
    target = even_alphas(alphas.double(), first)
    frames = render_alphas(prepared, target, settings, attention, bar)
    distances = neighbour_distances(images_to_tensor(frames), distance_fn)
    return Rendered(frames, target.tolist(), alphas.tolist(), [float(d) for d in first], [float(d) for d in distances],
                    [], name, probe_steps=len(probe))


def probe_pass(prepared: PreparedPair, settings: MorphSettings) -> tuple:
    """Even pacing's probe: `pacing_probe_steps` coarse steps of the prepared schedule, and the corrections along
    them (`probe_corrections`)."""
    from ..inversion import coarse_schedule

    probe = coarse_schedule(prepared.schedule, settings.pacing_probe_steps)
    return probe, probe_corrections(prepared, probe)


def probe_corrections(prepared: PreparedPair, probe) -> tuple | None:
    """The two images' corrections along the probe's coarse steps (`sampling.coarse_corrections`): its end frames
    then come back as the inputs, as the full render's do, so that the distances it measures near the ends are
    the full render's too. None where the inversion kept no corrections (plain DDIM)."""
    p = prepared
    if p.corrections is None or p.paths is None:
        return None
    adapters = list(p.adapters) or [None, None]
    return coarse_corrections(p.pipe, p.paths, p.latents, p.embeds, adapters, p.schedule, probe, p.settings.guidance,
                              p.negative)


def pace(prepared: PreparedPair, rendered: Rendered, settings: MorphSettings, distance,
         attention: AttentionStore | None = None, bar=None) -> Rendered:
    """Even pacing: move each frame's α so that consecutive frames are equally far apart by `distance`
    (a (name, function, note) from `morphkit.metrics.get_distance`), and render again only the frames whose α
    moved by more than `settings.pacing_tolerance` of the frame spacing. The ends never move."""
    from ..metrics import images_to_tensor, neighbour_distances

    name, distance_fn, _ = distance
    alphas = torch.tensor(rendered.alphas, dtype=torch.float64)
    frames = list(rendered.frames)
    first = neighbour_distances(images_to_tensor(frames), distance_fn)
    target = even_alphas(alphas, first)
    moved = moved_frames(alphas, target, settings.pacing_tolerance)
    rerendered = moved.nonzero().flatten().tolist()
    distances = first
    if rerendered:
        ends = (target == 0) | (target == 1)
        rows = moved | ends if attention is not None and ends_along(prepared, settings) else moved
        if bar is not None:
            bar.total += int(rows.sum())
            bar.refresh()
        for i, picture in zip(rows.nonzero().flatten().tolist(), render_alphas(prepared, target[rows], settings,
                                                                               attention, bar)):
            if moved[i]:
                frames[i] = picture
        alphas = torch.where(moved, target, alphas)
        distances = neighbour_distances(images_to_tensor(frames), distance_fn)
    return Rendered(frames, alphas.tolist(), rendered.first_alphas, [float(d) for d in first],
                    [float(d) for d in distances], rerendered, name)


# ---------------------------------------------------------------------------------------------
# files


def output_folder(images: list, settings: MorphSettings) -> Path | None:
    """Where the morph's files go (by default `outputs/morph/<the images' names, joined by ->`), checked before
    any work: None when no format is asked for."""
    if not settings.formats:
        return None
    if settings.output_dir is None and not all(isinstance(i, (str, Path)) for i in images):
        raise OutputExistsError("Images given as pictures, not files, have no names to make a folder from: "
                                "give an --output-dir.")
    out = Path(settings.output_dir or Path("outputs") / "morph" / "-".join(Path(i).stem for i in images))
    check_output_folder(out, settings)
    return out


def check_output_folder(out: Path, settings: MorphSettings) -> None:
    """The whole output plan, before any work: writable, room enough, and only morphkit's files to replace."""
    pixels = (settings.resolution or 512) ** 2
    plan_outputs(out, settings.formats, settings.overwrite,
                 estimate_bytes(settings.formats, settings.frames * (2 if settings.back_and_forth else 1), pixels))


def morph_files(out: Path) -> dict[str, Path]:
    return {"gif": out / "morph.gif", "mp4": out / "morph.mp4", "png": out / "frames"}


def export_morph(frames: list[Image.Image], settings: MorphSettings, output_dir: str | Path,
                 overwrite: bool | None = None) -> dict[str, Path]:
    """Write the frames as each of `settings.formats` into `output_dir`; returns {format: path}.

    Each file is written to a temporary name, checked complete and renamed; the folder is locked meanwhile,
    and only what morphkit wrote there (its manifest) is replaced.
    """
    overwrite = settings.overwrite if overwrite is None else overwrite
    return write_outputs(output_dir, frames, settings.formats, settings.frame_duration, settings.gif_loops,
                         settings.back_and_forth, overwrite)
