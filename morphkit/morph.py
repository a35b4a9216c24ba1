"""Morphing two images: per-image LoRA, DDIM inversion, slerp, blended adapters (DiffMorpher's recipe).

    image A ─► latent ─► LoRA "img0" fitted ─► DDIM inversion under img0 ─► noise A ─┐
    image B ─► latent ─► LoRA "img1" fitted ─► DDIM inversion under img1 ─► noise B ─┤
                                                                                     ▼
    for each α:   noise = slerp(A, B, α)   prompt = lerp(eA, eB, α)   adapters = (1-α, α)
                  ─► DDIM sampling, several frames per UNet call ─► VAE decode ─► frame

The numeric pieces (`slerp`, `lerp`, `alpha_schedule`) are functions of tensors; `morph` is the
whole job with caching, progress and files.
"""

from __future__ import annotations

import hashlib
import time
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
from .lora import adapter_metadata, adapter_weights, load_lora, lora_state_dict, save_lora
from .models import DEFAULT_MODEL, decode_latents, encode_image, encode_prompt, load_pipeline

ADAPTERS = ("img0", "img1")  # not "a"/"b": diffusers matches adapter names as substrings of module keys


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


def cover_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `img` to cover `size` with its aspect ratio kept, then center-crop to exactly `size`."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    scaled = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    return center_crop(img.resize(scaled, Image.Resampling.LANCZOS), size)


# ---------------------------------------------------------------------------------------------
# rendering


@torch.no_grad()
def render_frames(pipe, noise_a, noise_b, embeds_a, embeds_b, alphas: torch.Tensor, schedule, guidance: float = 1.0,
                  negative: torch.Tensor | None = None, batch_size: int = 8, adapters=ADAPTERS,
                  progress=None) -> torch.Tensor:
    """Latents of the frames at `alphas`, `batch_size` frames per UNet call.

    Each frame has its own starting noise (slerp), prompt embedding (lerp) and adapter blend
    (1-α, α), the last given per sample inside one batch. Returns clean latents (F, 4, h, w).
    """
    device, out = pipe.unet.device, []
    for chunk in alphas.split(batch_size):
        x = slerp(noise_a[0], noise_b[0], chunk).to(device, torch.float32)
        embeds = lerp(embeds_a[0], embeds_b[0], chunk).to(device)
        weights = torch.stack([1 - chunk, chunk]).float().to(device)
        if guidance != 1.0:
            weights = torch.cat([weights, weights], dim=1)  # the guided batch is [negative, positive]
        neg = None if negative is None else negative.expand(len(chunk), -1, -1).to(device)
        with adapter_weights(pipe.unet, {adapters[0]: weights[0], adapters[1]: weights[1]}):
            model = eps_model(pipe.unet, embeds, neg, guidance, pipe.scheduler.config.prediction_type,
                              pipe.scheduler.alphas_cumprod)
            out.append(sample_ddim(model, x, schedule))
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(out)


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
    pipe=None,
    progress: bool = True,
) -> MorphResult:
    """Morph image A into image B and write a GIF, an MP4 and PNG frames (any of them, or none).

    Images of different sizes: A sets the frame (the size policy of `morphkit.images` at
    `resolution`); B is scaled to cover that frame, aspect ratio kept, and center-cropped. Nothing
    is squashed. The first and last frames reproduce the two inputs (with guidance 1).
    """
    from tqdm.auto import tqdm

    from .train import EncodedExample, TrainSettings, fit_lora

    # 1. check everything that can be checked before the model is loaded
    alphas = alpha_schedule(frames)
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

    timings: dict[str, float] = {}
    hits: dict[str, bool] = {}
    store = TensorCache.default(cache, cache_dir)
    clock = time.perf_counter()

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
    timings["load"] = time.perf_counter() - clock

    # 3. one LoRA per image: given, cached, or fitted now
    clock = time.perf_counter()
    lora_ids = []
    for side, name in enumerate(ADAPTERS):
        if loras[side] is not None:
            load_lora(unet, loras[side], name)
            lora_ids.append(f"file:{sha256_file(loras[side])}")
            continue
        settings = TrainSettings(data="<morph>", prompt=prompts[side], model=model, rank=lora_rank, steps=lora_steps,
                                 learning_rate=lora_lr, seed=seed, resolution=resolution, crop="none",
                                 checkpointing_steps=0)
        key = cache_key("lora", image=image_keys[side], prompt=prompts[side], model=fingerprint, rank=lora_rank,
                        steps=lora_steps, lr=lora_lr, seed=seed, targets=settings.targets)
        lora_ids.append(key)
        cached = store.path("lora", key)
        hits[f"lora_{'ab'[side]}"] = bool(cached and cached.is_file())
        if hits[f"lora_{'ab'[side]}"]:
            load_lora(unet, cached, name)
            continue
        fit_lora(pipe, [EncodedExample([latents[side][0]], [embeds[side][0]])], settings, adapter_name=name,
                 progress=progress)
        if cached is not None:
            save_lora(cached, lora_state_dict(unet, name), adapter_metadata(unet, name),
                      {"base_model": model, "prompt": prompts[side], "steps": lora_steps, "seed": seed}, overwrite=True)
    timings["fit"] = time.perf_counter() - clock

    # 4. each image inverted under its own LoRA and prompt
    clock = time.perf_counter()
    schedule = ddim_schedule(pipe.scheduler.config, steps)
    noises = []
    for side, name in enumerate(ADAPTERS):
        key = cache_key("inversion", image=image_keys[side], prompt=prompts[side], model=fingerprint,
                        lora=lora_ids[side], steps=steps)
        entry = store.get("inversion", key)
        hits[f"inversion_{'ab'[side]}"] = entry is not None
        if entry is None:
            with adapter_weights(unet, {name: 1.0}):
                model_fn = eps_model(unet, embeds[side], prediction_type=pipe.scheduler.config.prediction_type,
                                     alphas_cumprod=pipe.scheduler.alphas_cumprod)
                noise = invert_ddim(model_fn, latents[side], schedule, disable=not progress,
                                    desc=f"inverting {'AB'[side]}")
            store.put("inversion", key, {"noise": noise})
        else:
            noise = entry["noise"].to(unet.device)
        noises.append(noise)
    timings["invert"] = time.perf_counter() - clock

    # 5. the frames
    clock = time.perf_counter()
    bar = tqdm(total=frames, desc="rendering frames", unit="frame", disable=not progress)
    try:
        frame_latents = render_frames(pipe, noises[0], noises[1], embeds[0], embeds[1], alphas, schedule, guidance,
                                      negative, batch_size, progress=bar)
    finally:
        bar.close()
    pictures = to_pil(decode_latents(pipe, frame_latents))
    timings["render"] = time.perf_counter() - clock

    # 6. files
    clock = time.perf_counter()
    paths: dict[str, Path] = {}
    sequence = boomerang(pictures) if back_and_forth else pictures
    if "gif" in formats:
        paths["gif"] = save_gif(sequence, out / "morph.gif", duration, loop, overwrite=overwrite)
    if "mp4" in formats:
        paths["mp4"] = save_mp4(sequence, out / "morph.mp4", 1000 / duration, overwrite=overwrite)
    if "png" in formats:
        paths["png"] = save_frames(pictures, out / "frames", overwrite=overwrite)
    timings["export"] = time.perf_counter() - clock
    return MorphResult(pictures, alphas.tolist(), out, paths, timings, hits)
