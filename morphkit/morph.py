"""Morphing two images: per-image LoRA, DDIM inversion, slerp, blended adapters (DiffMorpher's recipe).

    image A ─► latent ─► LoRA "img0" fitted ─► DDIM inversion under img0 ─► noise A ─┐
    image B ─► latent ─► LoRA "img1" fitted ─► DDIM inversion under img1 ─► noise B ─┤
                                                                                     ▼
    for each α:   noise = AdaIN(slerp(A, B, α))   prompt = lerp(eA, eB, α)   LoRAs blended at α
                  ─► DDIM sampling, several frames per UNet call ─► VAE decode ─► frame
    then (even pacing) measure the distance between neighbours, move α so that the steps are equal,
    and render again only the frames whose α moved.

DiffMorpher's three refinements, each switchable:

- **Self-attention interpolation** (`attn_lambda`): the end frames (α = 0 and 1) render first, and the
  inputs of their self-attention in the UNet's up blocks are kept for the first λ of the steps; during
  those steps an in-between frame's self-attention takes its keys and values from the interpolation of
  the two ends' inputs (by its own α), computed through the layer's own to_k / to_v so that the
  frame's LoRA blend applies. The ends render in the first batch, and a batch that holds them uses
  their inputs directly; inputs are kept (fp16) only for later batches or a later pacing pass.
- **AdaIN** (`adain`): the slerped starting noise gets the per-channel mean and std interpolated from
  the two inverted noises.
- **Even pacing** (`pacing="even"`): α is re-chosen so that consecutive frames are equally far apart
  (by the inverse of the cumulative neighbour distance of a first pass), and only the frames whose α
  moved are rendered again.

The numeric pieces (`slerp`, `lerp`, `channel_stats`, `adain`, `start_latents`, `alpha_schedule`,
`even_alphas`) are functions of tensors; `render_frames` renders latents; `morph` is the whole job with
caching, progress and files.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cache import TensorCache, cache_key, model_fingerprint
from .errors import ConfigError, OutputExistsError
from .export import FORMATS, boomerang, save_frames, save_gif, save_mp4
from .images import center_crop, check_resolution, open_image, resize_to_policy, to_pil
from .inversion import check_steps, ddim_schedule, eps_model, invert_ddim, sample_ddim
from .io import sha256_file
from .lora import adapter_metadata, adapter_weights, load_lora, lora_state_dict, one_hot_weights, save_lora
from .lora_blend import check_blend_mode, factor_layers
from .lora_blend import lora_blend as blend_loras
from .models import DEFAULT_MODEL, compiled, decode_latents, encode_image, encode_prompt, load_pipeline
from .stages import Stages

ADAPTERS = ("img0", "img1")  # not "a"/"b": diffusers matches adapter names as substrings of module keys
PACINGS = ("even", "linear")


# ---------------------------------------------------------------------------------------------
# numbers


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation between `a` and `b` (any shape, seen as flat vectors).

    `t` a float gives one tensor shaped like `a`; `t` a 1-D tensor gives a batch (len(t), *a.shape).
    The ends are exact (t = 0 gives `a`, t = 1 gives `b`). Nearly parallel inputs (|cos| above
    `dot_threshold`) fall back to linear interpolation, where slerp's division would blow up.
    """
    t_batch = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * a.dim()))
    a64, b64 = a.double(), b.double()
    cos = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm()).clamp_min(1e-30)
    if cos.abs() > dot_threshold:
        out = (1 - t_batch) * a64 + t_batch * b64
    else:
        theta = torch.arccos(cos.clamp(-1, 1))
        sin_theta = torch.sin(theta)
        out = torch.sin((1 - t_batch) * theta) / sin_theta * a64 + torch.sin(t_batch * theta) / sin_theta * b64
    out = out.to(a.dtype)
    return out[0] if not torch.is_tensor(t) or torch.as_tensor(t).dim() == 0 else out


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation, batched over a 1-D `t`: returns (len(t), *a.shape), exact at the ends."""
    t = t.to(a.dtype).reshape(-1, *([1] * a.dim()))
    return (1 - t) * a + t * b


def alpha_schedule(frames: int) -> torch.Tensor:
    """α of each frame: evenly spaced from 0 (image A) to 1 (image B)."""
    if frames < 2:
        raise ConfigError(f"A morph needs at least 2 frames; got {frames}.")
    return torch.linspace(0, 1, frames, dtype=torch.float64)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over the spatial dims of (..., C, H, W): each (..., C, 1, 1)."""
    x64 = x.double()
    return x64.mean(dim=(-2, -1), keepdim=True), x64.std(dim=(-2, -1), keepdim=True, correction=0)


def adain(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Adaptive instance normalisation: `x` (..., C, H, W) with each channel moved to the given mean and std.

    `mean` and `std` broadcast against (..., C, 1, 1). The result's per-channel statistics (as
    `channel_stats` measures them) equal `mean` and `std`, up to the rounding of `x`'s dtype.
    """
    own_mean, own_std = channel_stats(x)
    out = (x.double() - own_mean) / own_std.clamp_min(eps) * std.double() + mean.double()
    return out.to(x.dtype)


def start_latents(noise_a: torch.Tensor, noise_b: torch.Tensor, alphas: torch.Tensor, use_adain: bool = True):
    """Starting noise of the frames at `alphas`: slerp of the two inverted noises (each (1, C, h, w)).

    With `use_adain`, each in-between frame's channels get the mean and std interpolated linearly from the
    two noises (DiffMorpher's AdaIN). The end frames (α = 0 or 1) are the inverted noises exactly.
    Returns (len(alphas), C, h, w).
    """
    x = slerp(noise_a[0], noise_b[0], alphas)
    if not use_adain:
        return x
    (mean_a, std_a), (mean_b, std_b) = channel_stats(noise_a[0]), channel_stats(noise_b[0])
    normalised = adain(x, lerp(mean_a, mean_b, alphas), lerp(std_a, std_b, alphas))
    inside = ((alphas > 0) & (alphas < 1)).to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(inside, normalised, x)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation, as `numpy.interp`: the values at `x` of the polyline through (xp, fp).

    `xp` must be non-decreasing; flat stretches of `xp` are stepped over. Outside [xp[0], xp[-1]] the end
    values hold.
    """
    x, xp, fp = x.double(), xp.double(), fp.double()
    right = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[right - 1], xp[right], fp[right - 1], fp[right]
    width = x1 - x0
    t = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, torch.ones_like(width)), torch.ones_like(x))
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], f0 + t.clamp(0, 1) * (f1 - f0)))


def even_alphas(alphas: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """α of each frame such that consecutive frames are equally far apart, from one measured pass.

    `alphas` (F,) are where the frames were rendered and `distances` (F - 1,) how far each frame is from
    the next. The cumulative distance, as a function of α, is taken to be piecewise linear between the
    rendered frames; the new α are its inverse at F evenly spaced fractions of the total. The ends stay
    where they are; with no distance at all, nothing moves.
    """
    alphas, distances = alphas.double(), distances.double().clamp_min(0)
    if len(distances) != len(alphas) - 1:
        raise ValueError(f"{len(alphas)} frames need {len(alphas) - 1} neighbour distances; got {len(distances)}")
    cumulative = torch.cat([distances.new_zeros(1), distances.cumsum(0)])
    total = cumulative[-1]
    if not total > 0:
        return alphas.clone()
    targets = torch.linspace(0, 1, len(alphas), dtype=torch.float64) * total
    new = interp(targets, cumulative, alphas)
    new[0], new[-1] = alphas[0], alphas[-1]
    return new


def moved_frames(old: torch.Tensor, new: torch.Tensor, tolerance: float = 0.05) -> torch.Tensor:
    """Which frames moved by more than `tolerance` times the even spacing 1 / (F - 1): a bool mask (F,)."""
    spacing = 1 / max(len(old) - 1, 1)
    return (new.double() - old.double()).abs() > tolerance * spacing


def attention_steps(attn_lambda: float, steps: int) -> int:
    """How many of the first sampling steps use interpolated self-attention: ⌈λ·steps⌉ (DiffMorpher's i < λ·N)."""
    return max(0, math.ceil(attn_lambda * steps - 1e-9))


def check_attn_lambda(attn_lambda) -> float:
    if isinstance(attn_lambda, bool) or not isinstance(attn_lambda, (int, float)) or not 0 <= attn_lambda <= 1:
        raise ConfigError(f"attn_lambda (--attn-lambda) must be from 0 (no attention interpolation) to 1 (all steps); "
                          f"got {attn_lambda!r}. DiffMorpher uses 0.6.")
    return float(attn_lambda)


def check_pacing(pacing: str) -> str:
    if pacing not in PACINGS:
        raise ConfigError(f"Unknown pacing {pacing!r}; choose even (consecutive frames equally far apart) or linear "
                          "(α evenly spaced).")
    return pacing


def cover_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `img` to cover `size` with its aspect ratio kept, then center-crop to exactly `size`."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    scaled = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    return center_crop(img.resize(scaled, Image.Resampling.LANCZOS), size)


# ---------------------------------------------------------------------------------------------
# rendering


@dataclass
class AttentionStore:
    """The end frames' self-attention inputs that the in-between frames interpolate, per layer and step.

    `steps`: how many of the first sampling steps interpolate (`attention_steps(λ, N)`); with 0 the
    processors are in place but change nothing. Inputs are kept only for those steps, only for the
    up blocks' self-attention layers, in `dtype` (fp16). `keep`: hold them after `render_frames` returns,
    for a later call that renders more in-between frames (even pacing); otherwise `render_frames` keeps
    them only while its own later batches need them and drops them at its end. `peak_bytes` is the most
    they took at any time.
    """

    steps: int
    dtype: torch.dtype = torch.float16
    keep: bool = False
    states: dict = field(default_factory=dict)  # (layer name, step, end 0 or 1) -> (groups, tokens, channels)
    nbytes: int = 0
    peak_bytes: int = 0

    def put(self, layer: str, step: int, end: int, inputs: torch.Tensor):
        old = self.states.get((layer, step, end))
        self.nbytes += inputs.numel() * inputs.element_size() - (0 if old is None else old.numel() * old.element_size())
        self.states[(layer, step, end)] = inputs
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def get(self, layer: str, step: int, end: int) -> torch.Tensor:
        try:
            return self.states[(layer, step, end)]
        except KeyError:
            raise ValueError(f"No self-attention inputs of end frame {end} at step {step} in {layer}: render the "
                             "end frames (α = 0 and 1) first, in the same call or in an earlier one with "
                             "keep=True.") from None

    def clear(self):
        self.states.clear()
        self.nbytes = 0


@dataclass
class _AttentionRun:
    """What the processors of one `render_frames` call share: the store, the step, and the batch's roles."""

    store: AttentionStore
    record: bool
    step: int = 0
    end_rows: tuple = ()  # for end 0 and end 1: the rows of the batch that hold it, in group order
    inner: torch.Tensor | None = None  # rows of the in-between frames
    group: torch.Tensor | None = None  # of each in-between row: 0, or 0/1 for the [negative, positive] halves
    alpha: torch.Tensor | None = None  # of each in-between row, (rows, 1, 1)

    def set_batch(self, alphas: torch.Tensor, groups: int, device):
        """The roles in a UNet batch of `groups` halves of the frames at `alphas` (the guided batch is doubled)."""
        alphas = alphas.repeat(groups)
        group = torch.arange(groups).repeat_interleave(len(alphas) // groups)
        self.end_rows = tuple((alphas == a).nonzero().flatten().to(device) for a in (0, 1))
        inner = ((alphas > 0) & (alphas < 1)).nonzero().flatten()
        self.inner, self.group = inner.to(device), group[inner].to(device)
        self.alpha = alphas[inner].float().view(-1, 1, 1).to(device)

    @torch.compiler.disable  # the step and the store are Python state: under torch.compile they must not
    def interpolated_inputs(self, layer: str, hidden: torch.Tensor) -> torch.Tensor | None:  # become guards
        """`key_value_inputs` during the interpolated steps; None (plain self-attention) after them."""
        return self.key_value_inputs(layer, hidden) if self.step < self.store.steps else None

    def key_value_inputs(self, layer: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """The tensor the keys and values are computed from: for the in-between samples, the interpolation of
        the two ends' inputs at their α; for the ends, their own inputs. None where the batch has no
        in-between frame (plain self-attention)."""
        ends = {}
        for e, rows in enumerate(self.end_rows):
            if len(rows):
                ends[e] = hidden[rows].to(self.store.dtype)  # (groups, tokens, channels)
                if self.record:
                    self.store.put(layer, self.step, e, ends[e])
        if not len(self.inner):
            return None
        s0, s1 = (ends[e] if e in ends else self.store.get(layer, self.step, e) for e in (0, 1))
        mixed = (1 - self.alpha) * s0[self.group].float() + self.alpha * s1[self.group].float()
        out = hidden.clone()
        out[self.inner] = mixed.to(hidden.dtype)
        return out


class InterpolatedSelfAttnProcessor:
    """An attention processor for a self-attention (`attn1`) layer that lets in-between frames attend to the ends.

    During the interpolated steps it hands the wrapped processor (diffusers' own, usually
    `AttnProcessor2_0`) the interpolated inputs as `encoder_hidden_states`, so the keys and values come
    from the layer's own `to_k` / `to_v`, LoRA included; queries stay the frame's own. Otherwise it calls
    the wrapped processor unchanged.
    """

    def __init__(self, name: str, original, run: _AttentionRun):
        self.name, self.original, self.run = name, original, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None and hidden_states.dim() == 3:
            encoder_hidden_states = self.run.interpolated_inputs(self.name, hidden_states)
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


def up_block_self_attention(unet) -> list[tuple[str, object]]:
    """(name, module) of the self-attention layers of the UNet's up blocks (the ones DiffMorpher interpolates)."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules()
            if name.startswith("up_blocks.") and name.endswith("attn1") and isinstance(m, Attention)
            and not m.is_cross_attention and m.group_norm is None and m.spatial_norm is None]


@contextlib.contextmanager
def interpolated_self_attention(unet, run: _AttentionRun):
    """Install `InterpolatedSelfAttnProcessor` on the up blocks' self-attention; the old processors come back after."""
    installed = []
    try:
        for name, module in up_block_self_attention(unet):
            installed.append((module, module.processor))
            module.set_processor(InterpolatedSelfAttnProcessor(name, module.processor, run))
        yield [module for module, _ in installed]
    finally:
        for module, processor in installed:
            module.set_processor(processor)


def ends_first(alphas: torch.Tensor) -> torch.Tensor:
    """Frame indices in rendering order: the end frames (α = 0 or 1) first, then the others, each in order."""
    is_end = (alphas == 0) | (alphas == 1)
    return torch.cat([is_end.nonzero().flatten(), (~is_end).nonzero().flatten()])


@torch.no_grad()
def render_frames(pipe, noise_a, noise_b, embeds_a, embeds_b, alphas: torch.Tensor, schedule, guidance: float = 1.0,
                  negative: torch.Tensor | None = None, batch_size: int = 8, adapters=ADAPTERS,
                  progress=None, *, adain: bool = False, blend: str = "adapters",
                  attention: AttentionStore | None = None) -> torch.Tensor:
    """Latents of the frames at `alphas`, `batch_size` frames per UNet call.

    Each frame has its own starting noise (slerp, and AdaIN with `adain`), prompt embedding (lerp) and
    LoRA blend at its α (`blend`: "adapters" or "factors", see `morphkit.lora_blend`), all given per
    sample inside one batch. The end frames (α = 0 or 1) render first. With `attention` (an
    `AttentionStore`), the in-between frames' self-attention in the up blocks interpolates the ends' for
    the store's first steps; frames whose ends are not among `alphas` read the ends from the store.
    Returns clean latents (F, 4, h, w) in the order of `alphas`.
    """
    unet, device = pipe.unet, pipe.unet.device
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    chunks = ends_first(alphas).split(batch_size)
    groups = 1 if guidance == 1.0 else 2  # the guided batch is [negative, positive]
    run = None if attention is None else _AttentionRun(attention, record=attention.keep or len(chunks) > 1)
    step_of = {int(t): i for i, t in enumerate(schedule.timesteps)}
    out = None
    with interpolated_self_attention(unet, run) if run is not None else contextlib.nullcontext():
        for idx in chunks:
            chunk = alphas[idx]
            x = start_latents(noise_a, noise_b, chunk, adain).to(device, torch.float32)
            embeds = lerp(embeds_a[0], embeds_b[0], chunk).to(device)
            weights = chunk.float().to(device).repeat(groups)
            neg = None if negative is None else negative.expand(len(chunk), -1, -1).to(device)
            if run is not None:
                run.set_batch(chunk, groups, device)
            with blend_loras(unet, adapters, weights, blend):
                model = eps_model(unet, embeds, neg, guidance, pipe.scheduler.config.prediction_type,
                                  pipe.scheduler.alphas_cumprod)
                if run is not None:
                    model = _tracking_steps(model, run, step_of)
                latents = sample_ddim(model, x, schedule)
            if out is None:
                out = latents.new_empty((len(alphas), *latents.shape[1:]))
            out[idx.to(latents.device)] = latents
            if progress is not None:
                progress.update(len(chunk))
    if attention is not None and not attention.keep:
        attention.clear()
    return out


def _tracking_steps(model, run: _AttentionRun, step_of: dict):
    def tracked(x, t):
        run.step = step_of[int(t)]
        return model(x, t)

    return tracked


@torch.no_grad()
def invert_under_loras(pipe, latents: torch.Tensor, embeds: torch.Tensor, adapters: list[str], schedule,
                       progress: bool = False, desc: str = "inverting") -> torch.Tensor:
    """DDIM-invert latents (N, 4, h, w) in one batch, sample i under adapter `adapters[i]` alone and its
    own prompt embedding `embeds[i]`: the same noises as N separate inversions, in N times fewer UNet calls."""
    unet = pipe.unet
    with adapter_weights(unet, one_hot_weights(adapters, unet.device)):
        model = eps_model(unet, embeds, prediction_type=pipe.scheduler.config.prediction_type,
                          alphas_cumprod=pipe.scheduler.alphas_cumprod)
        return invert_ddim(model, latents, schedule, disable=not progress, desc=desc)


# ---------------------------------------------------------------------------------------------
# the whole job


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


def _image_key(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img).tobytes() + repr(img.size).encode()).hexdigest()[:24]


def morph(
    image_a,
    image_b,
    *,
    prompt: str = "",
    prompt_a: str | None = None,
    prompt_b: str | None = None,
    model: str = DEFAULT_MODEL,
    frames: int = 16,
    steps: int = 50,
    guidance: float = 1.0,
    negative_prompt: str = "",
    seed: int = 0,
    lora_a: str | None = None,
    lora_b: str | None = None,
    lora_rank: int = 16,
    lora_steps: int = 200,
    lora_lr: float = 2e-4,
    resolution: int | None = None,
    batch_size: int = 8,
    output_dir: str | None = None,
    formats: tuple[str, ...] | list[str] = FORMATS,
    fps: float = 10.0,
    frame_duration_ms: int | None = None,
    loop: int = 0,
    back_and_forth: bool = False,
    cache: bool = True,
    cache_dir: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    attn_lambda: float = 0.6,
    adain: bool = True,
    pacing: str = "even",
    distance: str = "auto",
    pacing_tolerance: float = 0.05,
    lora_blend: str = "adapters",
    fit_together: bool = True,
    compile_unet: bool = False,
    pipe=None,
    progress: bool = True,
) -> MorphResult:
    """Morph image A into image B and write a GIF, an MP4 and PNG frames (any of them, or none).

    Images of different sizes: A sets the frame (the size policy of `morphkit.images` at
    `resolution`); B is scaled to cover that frame, aspect ratio kept, and center-cropped. Nothing
    is squashed. The first and last frames reproduce the two inputs (with guidance 1).

    DiffMorpher's refinements: `attn_lambda` (the fraction of the steps, from the start, in which the
    in-between frames' self-attention interpolates the ends'; 0 is off), `adain` (the starting noise
    gets statistics interpolated from the two inverted noises), `pacing` ("even": α re-chosen after a
    first pass so that consecutive frames are equally far apart by `distance`, and only frames whose α
    moved by more than `pacing_tolerance` of the frame spacing are rendered again; "linear": α evenly
    spaced), `lora_blend` ("adapters" or "factors", see `morphkit.lora_blend`).

    `fit_together` fits the two LoRAs in one batch per step (`morphkit.train.fit_loras`): the same
    LoRAs as fitting them one after the other, within fp32 rounding, in fewer UNet calls.
    `compile_unet` renders through `torch.compile` (`morphkit.models.compiled`): the first batch waits
    for the compiler, so it pays only for long renders (many frames, many steps, or a warm compile cache).
    """
    from tqdm.auto import tqdm

    from .metrics import check_distance, get_distance, images_to_tensor, neighbour_distances
    from .models import resolve_device
    from .train import EncodedExample, TrainSettings, fit_lora, fit_loras

    # 1. check everything that can be checked before the model is loaded
    alphas = alpha_schedule(frames)
    attn_lambda = check_attn_lambda(attn_lambda)
    check_pacing(pacing)
    check_blend_mode(lora_blend)
    check_distance(distance)
    if isinstance(pacing_tolerance, bool) or not isinstance(pacing_tolerance, (int, float)) or pacing_tolerance < 0:
        raise ConfigError(f"pacing_tolerance must be a number of at least 0; got {pacing_tolerance!r}.")
    paced = pacing == "even" and frames > 2
    run_device = pipe.unet.device if pipe is not None else resolve_device(device)
    if paced:  # a distance asked for by name that cannot run here fails now, not after the LoRAs are fitted
        distance_name, distance_fn, _ = get_distance(distance, run_device)
    formats = tuple(formats)
    if bad := [f for f in formats if f not in FORMATS]:
        raise ConfigError(f"Unknown output format {', '.join(bad)}; choose from {', '.join(FORMATS)}.")
    check_steps(steps)
    for name, value, low in (("batch_size", batch_size, 1), ("lora_steps", lora_steps, 1), ("lora_rank", lora_rank, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer of at least {low}; got {value!r}.")
    if not guidance > 0 or not lora_lr > 0:
        raise ConfigError("guidance and lora_lr must be positive.")
    if not 0 < fps <= 100:
        raise ConfigError(f"fps must be above 0 and at most 100 (GIF frames last at least 10 ms); got {fps}.")
    duration = round(1000 / fps) if frame_duration_ms is None else frame_duration_ms
    if not 10 <= duration <= 60_000:
        raise ConfigError(f"The frame duration must be from 10 ms to 60 s; got {duration} ms.")
    if not 0 <= loop <= 65535:
        raise ConfigError(f"loop must be from 0 (forever) to 65535; got {loop}.")
    if cache and cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ConfigError(f"The cache folder {cache_dir} is a file.")
    if resolution is not None:
        check_resolution(resolution)
    originals = [open_image(image_a), open_image(image_b)]
    prompts = [prompt if prompt_a is None else prompt_a, prompt if prompt_b is None else prompt_b]
    loras = [lora_a, lora_b]
    for lora in loras:
        if lora is not None and not Path(lora).is_file():
            raise ConfigError(f"The LoRA file {lora} does not exist.")
    out = None
    if formats:
        out = Path(output_dir or Path("outputs") / "morph" / f"{Path(image_a).stem}-{Path(image_b).stem}")
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"The output folder {out} is a file. Choose another --output-dir.")
        targets = {"gif": out / "morph.gif", "mp4": out / "morph.mp4", "png": out / "frames"}
        if (taken := [str(targets[f]) for f in formats if targets[f].exists()]) and not overwrite:
            raise OutputExistsError(f"{out} already holds a morph ({', '.join(taken)}). Pass --overwrite to replace "
                                    "it, or choose another --output-dir.")

    hits: dict[str, bool] = {}
    store = TensorCache.default(cache, cache_dir)
    stages = Stages(run_device)
    stages.begin()

    # 2. model, images at one size, latents and prompt embeddings
    given_pipe = pipe
    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    unet = pipe.unet
    for name in ADAPTERS:
        if name in getattr(unet, "peft_config", {}):
            unet.delete_adapters(name)
    resolution = resolution or 8 * unet.config.sample_size
    img_a = resize_to_policy(originals[0], resolution)
    img_b = cover_resize(originals[1], img_a.size)
    images = [img_a, img_b]
    image_keys = [_image_key(img) for img in images]
    if image_keys[0] == image_keys[1] and prompts[0] == prompts[1] and loras[0] == loras[1]:
        raise ConfigError("Both inputs are the same image with the same prompt: there is nothing to morph. Give "
                          "two different images, or the same image with --prompt-a and --prompt-b.")
    latents = [encode_image(pipe, img) for img in images]
    embeds = [encode_prompt(pipe, p) for p in prompts]
    negative = encode_prompt(pipe, negative_prompt) if guidance != 1.0 else None
    # What the cache keys call "the model": the pipeline actually used, and its dtype (a bf16 LoRA or noise is
    # not an fp32 one). A pipeline built in memory has no name to key on, so nothing of it is cached.
    source = model if given_pipe is None else getattr(pipe, "name_or_path", None)
    if source is None:
        store = TensorCache(None)
    fingerprint = f"{model_fingerprint(str(source))}:{unet.dtype}"
    stages.end("load")

    # 3. one LoRA per image: given, cached, or fitted now
    fit_settings = TrainSettings(data="<morph>", model=model, rank=lora_rank, steps=lora_steps,
                                 learning_rate=lora_lr, seed=seed, resolution=resolution, crop="none",
                                 checkpointing_steps=0)
    lora_ids, to_fit = [], {}
    for side, name in enumerate(ADAPTERS):
        if loras[side] is not None:
            load_lora(unet, loras[side], name)
            lora_ids.append(f"file:{sha256_file(loras[side])}")
            continue
        key = cache_key("lora", image=image_keys[side], prompt=prompts[side], model=fingerprint, rank=lora_rank,
                        steps=lora_steps, lr=lora_lr, seed=seed, targets=fit_settings.targets)
        lora_ids.append(key)
        cached = store.path("lora", key)
        hits[f"lora_{'ab'[side]}"] = bool(cached and cached.is_file())
        if hits[f"lora_{'ab'[side]}"]:
            load_lora(unet, cached, name)
        else:
            to_fit[name] = (side, cached)
    examples = {name: [EncodedExample([latents[side][0]], [embeds[side][0]])] for name, (side, _) in to_fit.items()}
    if fit_together and len(examples) > 1:
        fit_loras(pipe, examples, fit_settings, progress=progress)
    else:
        for name, encoded in examples.items():
            fit_lora(pipe, encoded, fit_settings, adapter_name=name, progress=progress)
    for name, (side, cached) in to_fit.items():
        if cached is not None:
            save_lora(cached, lora_state_dict(unet, name), adapter_metadata(unet, name),
                      {"base_model": model, "prompt": prompts[side], "steps": lora_steps, "seed": seed}, overwrite=True)
    if lora_blend == "factors":
        factor_layers(unet, ADAPTERS)  # two LoRAs of different ranks cannot blend by factors: say so now
    stages.end("fit")

    # 4. each image inverted under its own LoRA and prompt; the two together, in one batch, when both are due
    schedule = ddim_schedule(pipe.scheduler.config, steps)
    noises, due = [None, None], []
    for side in range(2):
        key = cache_key("inversion", image=image_keys[side], prompt=prompts[side], model=fingerprint,
                        lora=lora_ids[side], steps=steps)
        entry = store.get("inversion", key)
        hits[f"inversion_{'ab'[side]}"] = entry is not None
        if entry is None:
            due.append((side, key))
        else:
            noises[side] = entry["noise"].to(unet.device)
    if due:
        sides = [side for side, _ in due]
        inverted = invert_under_loras(pipe, torch.cat([latents[s] for s in sides]), torch.cat([embeds[s] for s in sides]),
                                      [ADAPTERS[s] for s in sides], schedule, progress=progress,
                                      desc=f"inverting {' and '.join('AB'[s] for s in sides)}")
        for (side, key), noise in zip(due, inverted.split(1)):
            store.put("inversion", key, {"noise": noise})
            noises[side] = noise
    stages.end("invert")

    # 5. the frames: all of them at evenly spaced α, then (even pacing) again those whose α moves
    attn_store = None
    if frames > 2 and attention_steps(attn_lambda, steps):
        attn_store = AttentionStore(attention_steps(attn_lambda, steps), keep=paced)

    def render(at: torch.Tensor, bar) -> list[Image.Image]:
        latents = render_frames(pipe, noises[0], noises[1], embeds[0], embeds[1], at, schedule, guidance, negative,
                                batch_size, progress=bar, adain=adain, blend=lora_blend, attention=attn_store)
        return to_pil(decode_latents(pipe, latents))

    bar = tqdm(total=frames, desc="rendering frames", unit="frame", disable=not progress)
    rerendered, first_distances, distances = [], [], []
    with compiled(unet, enabled=compile_unet):
        try:
            pictures = render(alphas, bar)
            if paced:
                first_distances = neighbour_distances(images_to_tensor(pictures), distance_fn)
                target = even_alphas(alphas, first_distances)
                moved = moved_frames(alphas, target, pacing_tolerance)
                rerendered = moved.nonzero().flatten().tolist()
                distances = first_distances
                if rerendered:
                    bar.total += len(rerendered)
                    bar.refresh()
                    for i, picture in zip(rerendered, render(target[moved], bar)):
                        pictures[i] = picture
                    alphas = torch.where(moved, target, alphas)
                    distances = neighbour_distances(images_to_tensor(pictures), distance_fn)
        finally:
            bar.close()
            if attn_store is not None:
                attn_store.clear()
    stages.end("render")

    # 6. files
    paths: dict[str, Path] = {}
    sequence = boomerang(pictures) if back_and_forth else pictures
    if "gif" in formats:
        paths["gif"] = save_gif(sequence, out / "morph.gif", duration, loop, overwrite=overwrite)
    if "mp4" in formats:
        paths["mp4"] = save_mp4(sequence, out / "morph.mp4", 1000 / duration, overwrite=overwrite)
    if "png" in formats:
        paths["png"] = save_frames(pictures, out / "frames", overwrite=overwrite)
    stages.end("export")
    return MorphResult(pictures, alphas.tolist(), out, paths, stages.seconds, hits, peak_memory=stages.peak_bytes,
                       attention_steps=attn_store.steps if attn_store is not None else 0,
                       attention_bytes=attn_store.peak_bytes if attn_store is not None else 0,
                       pacing=pacing, distance=distance_name if paced else None, rerendered=rerendered,
                       first_distances=[float(d) for d in first_distances], distances=[float(d) for d in distances])
