"""Preparing a pair: everything a morph needs before its first frame, done once and rendered from many times.

    image A, B ─► one frame size ─► latents, prompt embeddings
              ─► one LoRA per image (given, cached or fitted) ─► each image inverted under its own LoRA ─► noises

`prepare_pair` returns a `PreparedPair` that holds all of it (and the pipeline, with the two adapters on its
UNet); `render_morph` draws frames from it as often as the caller likes, with any render settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cache import TensorCache, cache_key, model_fingerprint
from ..errors import ConfigError
from ..images import cover_resize, open_image, resize_to_policy
from ..inversion import DDIMSchedule, ddim_schedule
from ..io import sha256_file
from ..lora import adapter_metadata, load_lora, lora_state_dict, save_lora
from ..models import encode_image, encode_prompt, load_pipeline, module_precision, resolve_device, stage_precision
from ..stages import Stages
from .sampling import ADAPTERS, invert_under_loras
from .settings import MorphSettings


@dataclass
class PreparedPair:
    """A pair ready to render: sized images, latents, prompt embeddings, adapters on the UNet, inverted noises.

    The adapters `ADAPTERS` ("img0", "img1") live on `pipe.unet`: preparing another pair on the same pipeline
    replaces them, after which this one must be prepared again.
    """

    pipe: object
    settings: MorphSettings
    images: tuple[Image.Image, Image.Image]
    latents: list[torch.Tensor]  # each (1, 4, h, w)
    embeds: list[torch.Tensor]  # each (1, tokens, dim)
    negative: torch.Tensor | None  # the negative prompt's embedding, when guidance is not 1
    noises: list[torch.Tensor]  # each (1, 4, h, w): the inverted noise of each image
    schedule: DDIMSchedule
    hits: dict[str, bool] = field(default_factory=dict)  # cache hits: lora_a, lora_b, inversion_a, inversion_b
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)  # the precision each stage ran in: fit, invert

    @property
    def adapters(self) -> tuple[str, ...]:
        """The two adapters the frames blend; none in a tuning-free morph."""
        return () if self.settings.tuning_free else ADAPTERS

    def matches(self, settings: MorphSettings) -> bool:
        """True when `settings` differ from the prepared ones only in render or export settings."""
        return settings.group("prepare") == self.settings.group("prepare")


def image_key(img: Image.Image) -> str:
    """A key for an image's content (pixels and size), not its file name."""
    return hashlib.sha256(np.asarray(img).tobytes() + repr(img.size).encode()).hexdigest()[:24]


def check_pair(image_a, image_b, settings: MorphSettings) -> list[Image.Image]:
    """Check the inputs that can be checked without a model; return the two images, opened."""
    settings.validate()
    originals = [open_image(image_a), open_image(image_b)]
    for option, lora in (("--lora-a", settings.lora_a), ("--lora-b", settings.lora_b)):
        if lora is not None and not Path(lora).is_file():
            raise ConfigError(f"The LoRA file {lora} ({option}) does not exist.")
    return originals


def prepare_pair(image_a, image_b, settings: MorphSettings | None = None, *, pipe=None, progress: bool = True,
                 originals: list[Image.Image] | None = None) -> PreparedPair:
    """Prepare images A and B for morphing under `settings`: the slow part of a morph (fitting and inverting).

    Images are paths or PIL images. A sets the frame (the size policy of `morphkit.images` at
    `settings.resolution`); B is scaled to cover that frame, aspect ratio kept, and center-cropped.
    `pipe`: a loaded pipeline to reuse (otherwise `settings.model` is loaded).
    """
    settings = settings or MorphSettings()
    # 1. check the inputs before anything heavy
    originals = originals or check_pair(image_a, image_b, settings)
    stages = Stages(pipe.unet.device if pipe is not None else resolve_device(settings.device))
    stages.begin()

    # 2. model, images at one size, latents and prompt embeddings
    given_pipe = pipe
    if pipe is None:
        pipe = load_pipeline(settings.model, device=settings.device, dtype=settings.dtype,
                             allow_pickle=settings.allow_pickle)
    for name in ADAPTERS:
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    images = frame_images(originals, settings.resolution or 8 * pipe.unet.config.sample_size)
    keys = [image_key(img) for img in images]
    prompts = settings.prompts
    if keys[0] == keys[1] and prompts[0] == prompts[1] and settings.lora_a == settings.lora_b:
        raise ConfigError("Both inputs are the same image with the same prompt: there is nothing to morph. Give "
                          "two different images, or the same image with --prompt-a and --prompt-b.")
    latents = [encode_image(pipe, img) for img in images]
    embeds = [encode_prompt(pipe, p) for p in prompts]
    negative = encode_prompt(pipe, settings.negative_prompt) if settings.guidance != 1.0 else None
    store, fingerprint = pair_cache(settings, pipe, given_pipe is not None)
    stages.end("load")

    # 3. one LoRA per image: given, cached, or fitted now (none in a tuning-free morph)
    hits: dict[str, bool] = {}
    precisions = {} if settings.tuning_free else {"fit": module_precision(pipe.unet)}
    lora_ids = (["none", "none"] if settings.tuning_free else
                attach_loras(pipe, settings, keys, latents, embeds, store, fingerprint, hits, progress))
    stages.end("fit")

    # 4. each image inverted under its own LoRA and prompt (exactly, in fp32); both in one batch when both are due
    schedule = ddim_schedule(pipe.scheduler.config, settings.steps)
    with stage_precision(pipe.unet, enabled=settings.fp32_ends) as precisions["invert"]:
        noises = invert_pair(pipe, settings, keys, lora_ids, latents, embeds, negative, schedule, store,
                             fingerprint, hits, progress)
    stages.end("invert")
    return PreparedPair(pipe, settings, tuple(images), latents, embeds, negative, noises, schedule, hits,
                        stages.seconds, stages.peak_bytes, precisions)


def frame_images(originals: list[Image.Image], resolution: int) -> list[Image.Image]:
    """A sized by the size policy; B scaled to cover A's frame and center-cropped."""
    img_a = resize_to_policy(originals[0], resolution)
    return [img_a, cover_resize(originals[1], img_a.size)]


def pair_cache(settings: MorphSettings, pipe, given_pipe: bool) -> tuple[TensorCache, str]:
    """The cache and what its keys call "the model": the pipeline actually used, and its dtype (a bf16 LoRA or
    noise is not an fp32 one). A pipeline built in memory has no name to key on, so nothing of it is cached."""
    store = TensorCache.default(settings.cache, settings.cache_dir)
    source = getattr(pipe, "name_or_path", None) if given_pipe else settings.model
    if source is None:
        store = TensorCache(None)
    return store, f"{model_fingerprint(str(source))}:{pipe.unet.dtype}"


def attach_loras(pipe, settings: MorphSettings, keys, latents, embeds, store: TensorCache, fingerprint: str,
                 hits: dict, progress: bool) -> list[str]:
    """Put adapter `ADAPTERS[i]` on the UNet for image i: the given file, the cached fit, or a new fit.

    Returns an id per side for the inversion's cache key (the file's hash, or the fit's cache key).
    """
    from .. import train  # looked up at call time: tests replace train.fit_lora

    unet, prompts = pipe.unet, settings.prompts
    fit_settings = train.TrainSettings(data="<morph>", model=settings.model, rank=settings.lora_rank,
                                       steps=settings.lora_steps, learning_rate=settings.lora_lr, seed=settings.seed,
                                       resolution=settings.resolution, crop="none", checkpointing_steps=0)
    given = [settings.lora_a, settings.lora_b]
    lora_ids, to_fit = [], {}
    for side, name in enumerate(ADAPTERS):
        if given[side] is not None:
            load_lora(unet, given[side], name)
            lora_ids.append(f"file:{sha256_file(given[side])}")
            continue
        key = cache_key("lora", image=keys[side], prompt=prompts[side], model=fingerprint, rank=settings.lora_rank,
                        steps=settings.lora_steps, lr=settings.lora_lr, seed=settings.seed,
                        targets=fit_settings.targets)
        lora_ids.append(key)
        cached = store.path("lora", key)
        hits[f"lora_{'ab'[side]}"] = bool(cached and cached.is_file())
        if hits[f"lora_{'ab'[side]}"]:
            load_lora(unet, cached, name)
        else:
            to_fit[name] = (side, cached)
    examples = {name: [train.EncodedExample([latents[side][0]], [embeds[side][0]])]
                for name, (side, _) in to_fit.items()}
    if settings.fit_together and len(examples) > 1:
        train.fit_loras(pipe, examples, fit_settings, progress=progress)
    else:
        for name, encoded in examples.items():
            train.fit_lora(pipe, encoded, fit_settings, adapter_name=name, progress=progress)
    for name, (side, cached) in to_fit.items():
        if cached is not None:
            save_lora(cached, lora_state_dict(unet, name), adapter_metadata(unet, name),
                      {"base_model": settings.model, "prompt": prompts[side], "steps": settings.lora_steps,
                       "seed": settings.seed}, overwrite=True)
    return lora_ids


def invert_pair(pipe, settings: MorphSettings, keys, lora_ids, latents, embeds, negative, schedule,
                store: TensorCache, fingerprint: str, hits: dict, progress: bool) -> list[torch.Tensor]:
    """The inverted noise of each image, from the cache or inverted now (both in one batch when both are due).

    The cache key holds everything the noise depends on: the image, prompt, model, LoRA, steps, the inversion
    method and its settings, the guidance and negative prompt (guided inversion), and the precision it ran in.
    """
    prompts, device = settings.prompts, pipe.unet.device
    inversion = settings.inversion_method
    guided = {} if settings.guidance == 1.0 else {"guidance": settings.guidance, "negative": settings.negative_prompt}
    noises, due = [None, None], []
    for side in range(2):
        key = cache_key("inversion", image=keys[side], prompt=prompts[side], model=fingerprint,
                        lora=lora_ids[side], steps=settings.steps, inversion=inversion.key(),
                        precision=module_precision(pipe.unet), **guided)
        entry = store.get("inversion", key)
        hits[f"inversion_{'ab'[side]}"] = entry is not None
        if entry is None:
            due.append((side, key))
        else:
            noises[side] = entry["noise"].to(device)
    if due:
        sides = [side for side, _ in due]
        adapters = [None if settings.tuning_free else ADAPTERS[s] for s in sides]
        inverted = invert_under_loras(pipe, torch.cat([latents[s] for s in sides]),
                                      torch.cat([embeds[s] for s in sides]), adapters, schedule, progress=progress,
                                      desc=f"inverting {' and '.join('AB'[s] for s in sides)}", inversion=inversion,
                                      guidance=settings.guidance, negative=negative)
        for (side, key), noise in zip(due, inverted.split(1)):
            store.put("inversion", key, {"noise": noise})
            noises[side] = noise
    return noises
