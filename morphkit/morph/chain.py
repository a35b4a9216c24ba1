"""Keyframe chains: one continuous morph through two or more images (A → B → C ..., back to A with `loop`).

    keyframes ─► prepare_keyframes: one LoRA per image (adapters img0 ... imgN-1, all on the UNet) and one
                 inversion per image, each from the cache when it is there
    segments  ─► A→B, B→C, ... (C→A with `loop`): each a `PreparedPair` of two neighbouring keyframes, so that
                 segment i blends adapters i and i+1 and ends exactly on both keyframes
    first pass ─► the frames shared out evenly among the segments, α evenly spaced in each
    even pacing ─► the neighbour distances of the whole chain; the frames shared out again by each segment's
                 perceptual length (so that every step is about as long), α moved within each segment, and
                 only the frames that moved rendered again

A keyframe is one frame of the chain: segment i's last frame is segment i+1's first, shown once. `frames` is
the total, keyframes included. A frame's position is `i + α` (segment i, at α): keyframe k sits at k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import ConfigError
from ..lora_blend import factor_layers
from ..models import compiled
from ..progress import tqdm
from ..stages import Stages
from .attention import AttentionStore, attention_steps
from .interpolation import interp
from .job import Rendered, exact_ends_apart, render_alphas, render_precisions
from .pair import PreparedKeyframes, PreparedPair
from .settings import MorphSettings

# ---------------------------------------------------------------------------------------------
# the numbers: sharing out frames, spacing α


def allot_steps(lengths: torch.Tensor, total: int) -> list[int]:
    """Share `total` steps (frame-to-frame gaps) among segments of these lengths, at least one each, so that the
    longest step is as short as it can be (D'Hondt's rule: each further step goes to the segment whose steps
    are longest now). Equal lengths share evenly, the first segments taking any remainder."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64).clamp_min(0)
    if total < len(lengths):
        raise ValueError(f"{len(lengths)} segments need at least {len(lengths)} steps; got {total}")
    if not lengths.sum() > 0:
        lengths = torch.ones_like(lengths)
    steps = torch.ones(len(lengths), dtype=torch.long)
    for _ in range(total - len(lengths)):
        steps[int(torch.argmax(lengths / steps))] += 1  # argmax takes the first of equals
    return steps.tolist()


def respace(alphas: torch.Tensor, distances: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps + 1` values of α from 0 to 1 that cut one segment's measured path into `steps` equal lengths.

    `alphas` (F,) are where its frames were rendered and `distances` (F - 1,) how far each is from the next;
    the cumulative distance is taken to be piecewise linear in α (as `even_alphas` does, for another count).
    """
    cumulative = torch.cat([distances.new_zeros(1), distances.double().clamp_min(0).cumsum(0)])
    if not cumulative[-1] > 0:
        return torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    new = interp(torch.linspace(0, 1, steps + 1, dtype=torch.float64) * cumulative[-1], cumulative, alphas.double())
    new[0], new[-1] = 0.0, 1.0
    return new


def segment_distances(distances: list[float], steps: list[int]) -> list[torch.Tensor]:
    """The chain's neighbour distances cut into its segments' (segment i has `steps[i]` of them)."""
    return list(torch.tensor(distances, dtype=torch.float64).split(steps))


# ---------------------------------------------------------------------------------------------
# rendering


@dataclass
class Pass:
    """One rendering of the chain, segment by segment: each segment's α (ends included) and frames."""

    alphas: list[torch.Tensor]
    frames: list[list[Image.Image]]

    def chain(self, loop: bool) -> list[Image.Image]:
        """The frames in order, each keyframe once (a loop does not show its first frame again at the end)."""
        out = list(self.frames[0])
        for frames in self.frames[1:]:
            out += frames[1:]
        return out[:-1] if loop else out

    def positions(self, loop: bool) -> list[float]:
        out = self.alphas[0].tolist()
        for i, alphas in enumerate(self.alphas[1:], start=1):
            out += (alphas[1:] + i).tolist()
        return out[:-1] if loop else out

    def keyframes(self, loop: bool) -> list[int]:
        """The index of each keyframe's frame in `chain`."""
        starts = [0]
        for alphas in self.alphas:
            starts.append(starts[-1] + len(alphas) - 1)
        return starts[:-1] if loop else starts


def render_segment(segment: PreparedPair, alphas: torch.Tensor, settings: MorphSettings, bar=None,
                   stats: dict | None = None) -> list:
    """The frames of one segment at `alphas` (its two ends among them, for the self-attention they lend).
    `stats["attention_bytes"]` keeps the most memory the ends' kept self-attention inputs took."""
    steps = attention_steps(settings.attn_lambda, settings.steps)
    attention = AttentionStore(steps, keep=exact_ends_apart(segment)) if steps and len(alphas) > 2 else None
    try:
        return render_alphas(segment, alphas, settings, attention, bar)
    finally:
        if attention is not None:
            if stats is not None:
                stats["attention_bytes"] = max(stats.get("attention_bytes", 0), attention.peak_bytes)
            attention.clear()


def first_pass(segments: list[PreparedPair], steps: list[int], settings: MorphSettings, bar, stats: dict) -> Pass:
    alphas = [torch.linspace(0, 1, n + 1, dtype=torch.float64) for n in steps]
    return Pass(alphas, [render_segment(s, a, settings, bar, stats) for s, a in zip(segments, alphas)])


def pace_chain(segments: list[PreparedPair], first: Pass, distances: list[float], settings: MorphSettings,
               bar, stats: dict) -> tuple[Pass, list[int]]:
    """Even pacing over the whole chain: the steps shared out again by segment length, α respaced in each
    segment, and only the frames whose α moved by more than `pacing_tolerance` of the new spacing rendered
    again (with the segment's two ends, whose self-attention they interpolate). Returns the new pass and the
    chain index of every frame rendered again."""
    old_steps = [len(a) - 1 for a in first.alphas]
    parts = segment_distances(distances, old_steps)
    steps = allot_steps(torch.stack([p.sum() for p in parts]), sum(old_steps))
    alphas, frames, redone, start = [], [], [], 0
    for segment, old, pictures, part, n in zip(segments, first.alphas, first.frames, parts, steps):
        target = respace(old, part, n)
        nearest = (target[:, None] - old[None, :]).abs().argmin(dim=1)
        kept = (target - old[nearest]).abs() <= settings.pacing_tolerance / n
        kept[0] = kept[-1] = True
        new = torch.where(kept, old[nearest], target)
        moved = (~kept).nonzero().flatten()
        out = [pictures[int(j)] if keep else None for j, keep in zip(nearest, kept)]
        if len(moved):
            if bar is not None:
                bar.total += len(moved) + 2
                bar.refresh()
            with_ends = torch.cat([new[:1], new[moved], new[-1:]])  # the ends lend their self-attention again
            for i, picture in zip(moved.tolist(), render_segment(segment, with_ends, settings, bar, stats)[1:-1]):
                out[i] = picture
        alphas.append(new)
        frames.append(out)
        redone += (moved + start).tolist()
        start += n
    return Pass(alphas, frames), redone


def render_chain(prepared: PreparedKeyframes, settings: MorphSettings | None = None, *,
                 progress: bool = True, distance=None) -> Rendered:
    """Every frame of the chain: a first pass with the frames shared out evenly, then (even pacing) `pace_chain`.

    `rendered.alphas` holds each frame's position (segment i at α: i + α), `rendered.keyframes` each keyframe's
    frame index, `rendered.segments` each segment's number of steps. `distance`: even pacing's, from
    `metrics.get_distance`, when the caller has built it already.
    """
    from ..metrics import get_distance, images_to_tensor, neighbour_distances

    # 1. settings, segments, and the share of frames each gets in the first pass
    settings = (settings or prepared.settings).validate()
    if not prepared.matches(settings):
        raise ValueError("These settings change how the keyframes are prepared (model, prompts, LoRAs, steps, "
                         "guidance, seed or size): call prepare_keyframes again.")
    segments = prepared.segments(settings.loop)
    total = check_chain_frames(settings, len(prepared.images))
    unet = prepared.pipe.unet
    if settings.lora_blend == "factors" and prepared.adapters:
        factor_layers(unet, prepared.adapters)  # LoRAs of different ranks cannot blend by factors: say so now
    if distance is None and settings.pacing == "even":
        distance = get_distance(settings.distance, unet.device)
    distance = distance if settings.pacing == "even" else None

    def measure(frames):
        frames = frames + frames[:1] if settings.loop else frames  # a loop's last step goes back to the start
        return [float(d) for d in neighbour_distances(images_to_tensor(frames), distance[1])]

    stages, stats = Stages(unet.device), {}
    stages.begin()
    bar = tqdm(total=total + len(segments), desc="rendering frames", unit="frame", disable=not progress)
    with compiled(unet, enabled=settings.compile_unet):
        try:
            # 2. the first pass: steps shared out evenly, α evenly spaced within each segment
            done = first_pass(segments, allot_steps(torch.ones(len(segments)), total), settings, bar, stats)
            first_positions, first_distances, distances, rerendered = done.positions(settings.loop), [], [], []
            # 3. even pacing over the whole chain
            if distance is not None:
                first_distances = measure(done.chain(settings.loop))
                done, rerendered = pace_chain(segments, done, first_distances, settings, bar, stats)
                distances = measure(done.chain(settings.loop))
        finally:
            bar.close()
    stages.end("render")
    frames = done.chain(settings.loop)
    positions = done.positions(settings.loop)
    rendered = Rendered(frames, positions, first_positions, first_distances, distances, rerendered,
                        distance[0] if distance is not None else None)
    rendered.keyframes = done.keyframes(settings.loop)
    rendered.segments = [len(a) - 1 for a in done.alphas]
    rendered.attention_steps = attention_steps(settings.attn_lambda, settings.steps) if settings.frames > 2 else 0
    rendered.attention_bytes = stats.get("attention_bytes", 0)
    rendered.timings, rendered.peak_memory = stages.seconds, stages.peak_bytes
    rendered.precisions = render_precisions(segments[0])
    return rendered


def check_chain_frames(settings: MorphSettings, keyframes: int) -> int:
    """The chain's number of steps (frame-to-frame gaps, a loop's return included); `frames` must show every
    keyframe."""
    if settings.frames < keyframes:
        raise ConfigError(f"--frames {settings.frames} is fewer than the {keyframes} keyframes; each keyframe is one "
                          f"frame, so give at least {keyframes} (and more for the frames between them).")
    segments = keyframes if settings.loop else keyframes - 1
    return settings.frames - keyframes + segments
