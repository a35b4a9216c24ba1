"""Preparing keyframes: everything a morph needs before its first frame, done once and rendered from many times.

    images A, B (, C, ...) ─► one frame size ─► latents, prompt embeddings
              ─► one LoRA per image (given, cached or fitted) ─► each image inverted under its own LoRA ─► noises

`prepare_keyframes` returns a `PreparedKeyframes` that holds all of it (and the pipeline, with one adapter per
image on its UNet: img0, img1, ...); `segment(i, j)` is the `PreparedPair` of two of them, which `render_morph`
draws frames from as often as the caller likes. `prepare_pair` is the same for two images.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cache import TensorCache, cache_key, model_fingerprint
from ..embeddings import embeddings_fingerprint, read_embeddings, use_embeddings
from ..errors import ConfigError
from ..images import cover_resize, open_image, resize_to_policy
from ..inversion import DDIMSchedule, ddim_schedule
from ..io import check_regular_file, sha256_file
from ..lora import adapter_metadata, load_lora, lora_state_dict, remove_adapters, save_lora
from ..lora_files import read_lora_file
from ..families import PromptEmbeds, family_of
from ..models import (PICKLE_SUFFIXES, encode_conditioning, encode_image, load_pipeline, module_precision,
                      resolve_device, stage_precision)
from ..stages import Stages
from .sampling import ADAPTERS, invert_under_loras
from .settings import MorphSettings

KEYFRAME_ADAPTER = re.compile(r"img\d+")  # the adapters a preparation puts on the UNet (and the next one removes)


@dataclass
class PreparedPair:
    """A pair ready to render: sized images, latents, prompt embeddings, adapters on the UNet, inverted noises.

    Its two adapters (`adapter_names`, "img0" and "img1" for a pair; neighbouring keyframes' in a chain) live
    on `pipe.unet`: preparing other images on the same pipeline replaces them, after which this pair must be
    prepared again.
    """

    pipe: object
    settings: MorphSettings
    images: tuple[Image.Image, Image.Image]
    latents: list[torch.Tensor]  # each (1, 4, h, w)
    embeds: list[PromptEmbeds]  # each one prompt: (1, tokens, dim), and SDXL's pooled embedding and time ids
    negative: PromptEmbeds | None  # the negative prompt's, when guidance is not 1
    noises: list[torch.Tensor]  # each (1, 4, h, w): the inverted noise of each image
    schedule: DDIMSchedule
    hits: dict[str, bool] = field(default_factory=dict)  # cache hits: lora_a, lora_b, inversion_a, inversion_b
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)  # the precision each stage ran in: fit, invert
    adapter_names: tuple[str, str] = ADAPTERS  # the adapters of its two images on the UNet
    corrections: tuple | None = None  # each image's `invert_exact` corrections (steps, 1, 4, h, w); None: plain DDIM
    paths: tuple | None = None  # each image's inversion path (steps, 1, 4, h, w): see `inversion.corrections_along`

    @property
    def adapters(self) -> tuple[str, ...]:
        """The two adapters the frames blend; none in a tuning-free morph."""
        return () if self.settings.tuning_free else self.adapter_names

    def matches(self, settings: MorphSettings) -> bool:
        """True when `settings` differ from the prepared ones only in render or export settings."""
        return settings.group("prepare") == self.settings.group("prepare")


@dataclass
class PreparedKeyframes:
    """Two or more keyframes ready to render, as `PreparedPair` holds two: adapter i ("img<i>") is image i's."""

    pipe: object
    settings: MorphSettings
    images: tuple[Image.Image, ...]
    latents: list[torch.Tensor]
    embeds: list[PromptEmbeds]
    negative: PromptEmbeds | None
    noises: list[torch.Tensor]
    schedule: DDIMSchedule
    hits: dict[str, bool] = field(default_factory=dict)  # lora_<label>, inversion_<label>: a, b for a pair; 1, 2, ...
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)
    corrections: list | None = None  # each image's `invert_exact` corrections; None: plain DDIM inversion
    paths: list | None = None  # each image's inversion path (steps, 1, 4, h, w), for a probe pass's corrections

    @property
    def adapters(self) -> tuple[str, ...]:
        return () if self.settings.tuning_free else keyframe_adapters(len(self.images))

    def matches(self, settings: MorphSettings) -> bool:
        return settings.group("prepare") == self.settings.group("prepare")

    def segment(self, i: int, j: int | None = None) -> PreparedPair:
        """Keyframes i and j (default: the next one, the first after the last) as a pair to render."""
        j = (i + 1) % len(self.images) if j is None else j
        names = keyframe_adapters(len(self.images))
        return PreparedPair(self.pipe, self.settings, (self.images[i], self.images[j]),
                            [self.latents[i], self.latents[j]], [self.embeds[i], self.embeds[j]], self.negative,
                            [self.noises[i], self.noises[j]], self.schedule, self.hits, self.timings,
                            self.peak_memory, self.precisions, (names[i], names[j]),
                            None if self.corrections is None else (self.corrections[i], self.corrections[j]),
                            None if self.paths is None else (self.paths[i], self.paths[j]))

    def segments(self, loop: bool = False) -> list[PreparedPair]:
        """The chain's segments in order: keyframe 0 to 1, 1 to 2, ... and, with `loop`, the last back to 0."""
        return [self.segment(i) for i in range(len(self.images) if loop else len(self.images) - 1)]


def keyframe_adapters(count: int) -> tuple[str, ...]:
    """The adapter names of `count` keyframes: img0, img1, ... (not "a"/"b": diffusers matches adapter names as
    substrings of module keys)."""
    return tuple(f"img{i}" for i in range(count))


def keyframe_labels(count: int) -> tuple[str, ...]:
    """How messages and cache-hit keys name the keyframes: A and B for a pair, 1, 2, 3, ... for a chain."""
    return ("a", "b") if count == 2 else tuple(str(i + 1) for i in range(count))


def image_key(img: Image.Image) -> str:
    """A key for an image's content (pixels and size), not its file name."""
    return hashlib.sha256(np.asarray(img).tobytes() + repr(img.size).encode()).hexdigest()[:24]


def check_keyframes(images, settings: MorphSettings) -> list[Image.Image]:
    """Check the inputs that can be checked without a model; return the images, opened."""
    settings.validate()
    if len(images) < 2:
        raise ConfigError(f"A morph needs two or more images; got {len(images)}.")
    settings.keyframe_prompts(len(images))  # one prompt per keyframe, or a clear message
    if len(images) > 2 and (settings.lora_a or settings.lora_b):
        raise ConfigError("--lora-a and --lora-b give the LoRAs of a two-image morph; a chain fits one LoRA per "
                          "keyframe (each cached). Leave them out, or morph two images.")
    originals = [open_image(image) for image in images]
    for option, lora in (("--lora-a", settings.lora_a), ("--lora-b", settings.lora_b)):
        if lora is not None:
            check_regular_file(lora, f"LoRA file ({option})")
            if Path(lora).suffix.lower() in PICKLE_SUFFIXES:  # morph's --allow-pickle is for --model only
                raise ConfigError(f"The LoRA file {lora} ({option}) is a pickle, and morph reads LoRA files as "
                                  ".safetensors only (unpickling can run code). Convert it where you trust it: "
                                  "morphkit lora convert FILE OUT.safetensors --allow-pickle.")
    if settings.cache:  # an unwritable --cache-dir is found now, not after the fit
        TensorCache.default(settings.cache, settings.cache_dir).check_writable()
    return originals


def check_pair(image_a, image_b, settings: MorphSettings) -> list[Image.Image]:
    """Check the inputs that can be checked without a model; return the two images, opened."""
    return check_keyframes([image_a, image_b], settings)


def prepare_pair(image_a, image_b, settings: MorphSettings | None = None, *, pipe=None, progress: bool = True,
                 originals: list[Image.Image] | None = None) -> PreparedPair:
    """Prepare images A and B for morphing under `settings`: the slow part of a morph (fitting and inverting).

    Images are paths or PIL images. A sets the frame (the size policy of `morphkit.images` at
    `settings.resolution`); B is scaled to cover that frame, aspect ratio kept, and center-cropped.
    `pipe`: a loaded pipeline to reuse (otherwise `settings.model` is loaded).
    """
    return prepare_keyframes([image_a, image_b], settings, pipe=pipe, progress=progress, originals=originals).segment(0)


def prepare_keyframes(images, settings: MorphSettings | None = None, *, pipe=None, progress: bool = True,
                      originals: list[Image.Image] | None = None) -> PreparedKeyframes:
    """Prepare two or more images (paths or PIL images) for morphing: one LoRA and one inversion each.

    The first image sets the frame (the size policy of `morphkit.images` at `settings.resolution`); each other
    one is scaled to cover that frame, aspect ratio kept, and center-cropped. Prompts per image come from
    `settings.keyframe_prompts`. `pipe`: a loaded pipeline to reuse (otherwise `settings.model` is loaded).
    """
    settings = settings or MorphSettings()
    # 1. check the inputs before anything heavy
    originals = originals or check_keyframes(images, settings)
    embeddings = read_embeddings(settings.embeddings, settings.allow_pickle)
    stages = Stages(pipe.unet.device if pipe is not None else resolve_device(settings.device))
    stages.begin()

    # 2. model, images at one size, latents and prompt embeddings
    given_pipe = pipe
    if pipe is None:
        pipe = load_pipeline(settings.model, device=settings.device, dtype=settings.dtype,
                             allow_pickle=settings.allow_pickle, vae=settings.vae)
    # an earlier preparation's adapters
    remove_adapters(pipe.unet, [n for n in getattr(pipe.unet, "peft_config", {}) if KEYFRAME_ADAPTER.fullmatch(n)])
    sized = frame_images(originals, settings.resolution or 8 * pipe.unet.config.sample_size)
    keys = [image_key(img) for img in sized]
    prompts = settings.keyframe_prompts(len(sized))
    check_distinct(keys, prompts, settings)
    in_prompt = use_embeddings(pipe, embeddings)  # their tokens known to the tokenizers; TOK spelled as them
    latents = [encode_image(pipe, img) for img in sized]
    size = (sized[0].height, sized[0].width)  # every frame's: SDXL's time ids (original = target size, no crop)
    embeds = [encode_conditioning(pipe, in_prompt(p), size) for p in prompts]
    negative = (encode_conditioning(pipe, in_prompt(settings.negative_prompt), size, negative=True)
                if settings.guidance != 1.0 else None)
    store, fingerprint = pair_cache(settings, pipe, given_pipe is not None)
    stages.end("load")

    # 3. one LoRA per image: given, cached, or fitted now (none in a tuning-free morph)
    hits: dict[str, bool] = {}
    precisions = {} if settings.tuning_free else {"fit": module_precision(pipe.unet)}
    lora_ids = (["none"] * len(sized) if settings.tuning_free else
                attach_loras(pipe, settings, keys, latents, embeds, store, fingerprint, hits, progress))
    stages.end("fit")

    # 4. each image inverted under its own LoRA and prompt (exactly, in fp32), several in one batch
    schedule = ddim_schedule(pipe.scheduler.config, settings.steps)
    with stage_precision(pipe.unet, enabled=settings.fp32_ends) as precisions["invert"]:
        inverted = invert_keyframes(pipe, settings, keys, lora_ids, latents, embeds, negative, schedule, store,
                                    fingerprint, hits, progress)
    stages.end("invert")
    corrected = settings.inversion != "ddim"
    return PreparedKeyframes(pipe, settings, tuple(sized), latents, embeds, negative, [e["noise"] for e in inverted],
                             schedule, hits, stages.seconds, stages.peak_bytes, precisions,
                             [e["corrections"] for e in inverted] if corrected else None,
                             [e["path"] for e in inverted] if corrected else None)


def check_distinct(keys: list[str], prompts: list[str], settings: MorphSettings) -> None:
    """Refuse neighbouring keyframes that are the same image with the same prompt (and LoRA): nothing to morph."""
    if len(keys) == 2:
        if keys[0] == keys[1] and prompts[0] == prompts[1] and settings.lora_a == settings.lora_b:
            raise ConfigError("Both inputs are the same image with the same prompt: there is nothing to morph. Give "
                              "two different images, or the same image with --prompt-a and --prompt-b.")
        return
    pairs = list(zip(range(len(keys)), range(1, len(keys)))) + ([(len(keys) - 1, 0)] if settings.loop else [])
    for i, j in pairs:
        if keys[i] == keys[j] and prompts[i] == prompts[j]:
            raise ConfigError(f"Keyframes {i + 1} and {j + 1} are the same image with the same prompt: there is "
                              "nothing to morph between them. Remove one, or give them different prompts with "
                              "--prompt-for.")


def frame_images(originals: list[Image.Image], resolution: int) -> list[Image.Image]:
    """The first image sized by the size policy; each other one scaled to cover its frame and center-cropped."""
    first = resize_to_policy(originals[0], resolution)
    return [first] + [cover_resize(img, first.size) for img in originals[1:]]


def pair_cache(settings: MorphSettings, pipe, given_pipe: bool) -> tuple[TensorCache, str]:
    """The cache and what its keys call "the model": the pipeline actually used, and its dtype (a bf16 LoRA or
    noise is not an fp32 one). A pipeline built in memory has no name to key on, so nothing of it is cached.
    A pipeline loaded by name (`morphkit_model`, as `morphkit batch` loads it) is keyed by that name."""
    store = TensorCache.default(settings.cache, settings.cache_dir)
    source = settings.model
    if given_pipe:
        source = getattr(pipe, "morphkit_model", None) or getattr(pipe, "name_or_path", None)
    if source is None:
        store = TensorCache(None)
    fingerprint = f"{model_fingerprint(str(source))}:{pipe.unet.dtype}"
    family = family_of(pipe)
    if family.name != "sd15" or settings.vae:  # SD 1.x keys stay as they were, so that its cache stays valid
        fingerprint += f":{family.name}:vae={model_fingerprint(str(settings.vae)) if settings.vae else 'own'}"
    if settings.embeddings:  # new tokens change what a prompt means
        fingerprint += f":embeddings={embeddings_fingerprint(settings.embeddings)}"
    return store, fingerprint


def attach_loras(pipe, settings: MorphSettings, keys, latents, embeds, store: TensorCache, fingerprint: str,
                 hits: dict, progress: bool) -> list[str]:
    """Put adapter "img<i>" on the UNet for image i: the given file, the cached fit, or a new fit.

    The LoRAs due are fitted two at a time (one batch of two per step, as a pair's are). Returns an id per image
    for the inversion's cache key (the file's hash, or the fit's cache key).
    """
    from .. import train  # looked up at call time: tests replace train.fit_lora

    unet, prompts = pipe.unet, settings.keyframe_prompts(len(keys))
    names, labels = keyframe_adapters(len(keys)), keyframe_labels(len(keys))
    fit_settings = train.TrainSettings(data="<morph>", model=settings.model, rank=settings.lora_rank,
                                       steps=settings.lora_steps, learning_rate=settings.lora_lr, seed=settings.seed,
                                       resolution=settings.resolution, crop="none", checkpointing_steps=0)
    given = [settings.lora_a, settings.lora_b] if len(keys) == 2 else [None] * len(keys)
    lora_ids, to_fit, copies = [], {}, {}
    for i, name in enumerate(names):
        if given[i] is not None:
            load_lora(unet, given[i], name)
            lora_ids.append(f"file:{sha256_file(given[i])}")
            continue
        key = cache_key("lora", image=keys[i], prompt=prompts[i], model=fingerprint, rank=settings.lora_rank,
                        steps=settings.lora_steps, lr=settings.lora_lr, seed=settings.seed,
                        targets=fit_settings.targets)
        cached = store.path("lora", key)
        hits[f"lora_{labels[i]}"] = store.usable("lora", key, read_lora_file) is not None  # damaged: refitted
        if hits[f"lora_{labels[i]}"]:
            load_lora(unet, cached, name)
        elif cached is not None and key in lora_ids:  # the same keyframe again: fitted once, then read back
            copies[name] = cached
        else:
            to_fit[name] = (i, cached)
        lora_ids.append(key)
    with contextlib.ExitStack() as held:  # each LoRA due is fitted once, whichever process sharing the cache gets it
        claim_fits(unet, store, to_fit, held, hits, labels)
        fit_due(pipe, train, to_fit, latents, embeds, fit_settings, settings.fit_together, progress)
        for name, (i, cached) in to_fit.items():
            if cached is not None:
                save_lora(cached, lora_state_dict(unet, name), adapter_metadata(unet, name),
                          {"base_model": settings.model, "prompt": prompts[i], "steps": settings.lora_steps,
                           "seed": settings.seed}, overwrite=True)
    for name, cached in copies.items():
        load_lora(unet, cached, name)
    return lora_ids


def claim_fits(unet, store: TensorCache, to_fit: dict, held: contextlib.ExitStack, hits: dict, labels) -> None:
    """Take the cache lock of each LoRA due (in key order, so two processes never wait on each other), and drop
    from `to_fit` those another process fitted while this one waited: they are read from the cache instead."""
    for name, (i, cached) in sorted(to_fit.items(), key=lambda item: str(item[1][1])):
        if cached is None:
            continue
        held.enter_context(store.lock("lora", cached.stem))
        if store.usable("lora", cached.stem, read_lora_file) is not None:
            load_lora(unet, cached, name)
            hits[f"lora_{labels[i]}"] = True
            del to_fit[name]


def fit_due(pipe, train, to_fit: dict, latents, embeds, fit_settings, together: bool, progress: bool) -> None:
    """Fit the adapters of `to_fit` ({name: (image index, cache path)}): two at a time in one batch when
    `together`, else one by one."""
    examples = {name: [train.EncodedExample([latents[i][0]], [fit_conditioning(train, pipe, embeds[i])])]
                for name, (i, _) in to_fit.items()}
    names, labels = list(examples), keyframe_labels(len(latents))
    groups = [names[k:k + 2] for k in range(0, len(names), 2)] if together else [[n] for n in names]
    for group in groups:
        sides = [to_fit[n][0] for n in group]
        desc = f"fitting LoRA{'s' if len(group) > 1 else ''} of {keyframe_words(labels, sides)}"
        if len(group) > 1:
            train.fit_loras(pipe, {n: examples[n] for n in group}, fit_settings, progress=progress, desc=desc)
        else:
            train.fit_lora(pipe, examples[group[0]], fit_settings, adapter_name=group[0], progress=progress, desc=desc)


def fit_conditioning(train, pipe, cond: PromptEmbeds):
    """A keyframe's prompt as the trainer takes it: SD 1.x's token embeddings (one sample, as before); for a family
    the trainer lists in `train.FAMILIES`, the whole `PromptEmbeds` row (SDXL: pooled embedding and time ids too)."""
    family = family_of(pipe)
    if family.name == "sd15":
        return cond.embeds[0]
    if family.name not in getattr(train, "FAMILIES", ("sd15",)):
        raise ConfigError(f"Fitting a LoRA per image on {family.label} needs the trainer's {family.label} support, "
                          "which this version does not have yet. Morph without fitting: --tuning-free (the base "
                          "model, exact inversion keeps the ends), or give each image's LoRA with --lora-a and "
                          "--lora-b.")
    return cond.rows(0)


def invert_keyframes(pipe, settings: MorphSettings, keys, lora_ids, latents, embeds, negative, schedule,
                     store: TensorCache, fingerprint: str, hits: dict, progress: bool) -> list[dict]:
    """Each image's inversion (`invert_exact`) as a dict of tensors: "noise" and, but for plain DDIM,
    "corrections" and "path" (on the CPU); from the cache or inverted now (up to `batch_size`, at least two, in
    one batch; the same image under the same LoRA and prompt only once).

    The cache key holds everything the noise depends on: the image, prompt, model, LoRA, steps, the inversion
    method and its settings, the guidance and negative prompt (guided inversion), and the precision it ran in.
    """
    prompts, device = settings.keyframe_prompts(len(keys)), pipe.unet.device
    labels = keyframe_labels(len(keys))
    guided = {} if settings.guidance == 1.0 else {"guidance": settings.guidance, "negative": settings.negative_prompt}
    inverted: list = [None] * len(keys)
    due: dict[str, list[int]] = {}  # cache key -> the images it is the noise of
    for i in range(len(keys)):
        key = cache_key("inversion", image=keys[i], prompt=prompts[i], model=fingerprint, lora=lora_ids[i],
                        steps=settings.steps, inversion=settings.inversion_method.key(),
                        precision=module_precision(pipe.unet), kept="noise, corrections and path", **guided)
        entry = store.get("inversion", key)
        hits[f"inversion_{labels[i]}"] = entry is not None
        if entry is None:
            due.setdefault(key, []).append(i)
        else:
            inverted[i] = _on_device(entry, device)
    with contextlib.ExitStack() as held:  # each noise due is inverted once, whichever process sharing the cache gets it
        for key in sorted(due):
            held.enter_context(store.lock("inversion", key))
            if (entry := store.get("inversion", key)) is not None:  # another process inverted it meanwhile
                for i in due.pop(key):
                    inverted[i], hits[f"inversion_{labels[i]}"] = _on_device(entry, device), True
        invert_due(pipe, settings, list(due.items()), latents, embeds, negative, schedule, store, inverted, progress)
    return inverted


def _on_device(entry: dict, device) -> dict:
    """A cached inversion with its noise and corrections on `device`; the path stays on the CPU."""
    return {k: v if k == "path" else v.to(device) for k, v in entry.items()}


def invert_due(pipe, settings: MorphSettings, todo: list, latents, embeds, negative, schedule, store: TensorCache,
               inverted: list, progress: bool) -> None:
    """Invert the images of `todo` ([(cache key, [image indices])]), up to `batch_size` (at least two) in one
    batch; each image's inversion goes into `inverted` and the cache."""
    names, labels = keyframe_adapters(len(inverted)), keyframe_labels(len(inverted))
    size = max(2, settings.frames_per_call(pipe.unet.device))
    for chunk in (todo[k:k + size] for k in range(0, len(todo), size)):
        sides = [images[0] for _, images in chunk]
        adapters = [None if settings.tuning_free else names[s] for s in sides]
        result = invert_under_loras(pipe, torch.cat([latents[s] for s in sides]),
                                    PromptEmbeds.cat([embeds[s] for s in sides]), adapters, schedule,
                                    progress=progress, desc=inverting(labels, sides),
                                    inversion=settings.inversion_method, guidance=settings.guidance, negative=negative)
        for k, (key, images) in enumerate(chunk):
            entry = {"noise": result.noise[k:k + 1]}
            if result.corrections is not None:  # (the path only serves a probe pass's corrections: kept on the CPU)
                entry.update(corrections=result.corrections[:, k:k + 1], path=result.path[:, k:k + 1].cpu())
            store.put("inversion", key, entry)
            for i in images:
                inverted[i] = entry


def inverting(labels, sides: list[int]) -> str:
    """The progress bar's words: "inverting A and B" for a pair, "inverting keyframes 1, 2, 3" for a chain."""
    return f"inverting {keyframe_words(labels, sides)}"


def keyframe_words(labels, sides: list[int]) -> str:
    """"A and B" (or "A") for a pair, "keyframes 1, 2, 3" (or "keyframe 2") for a chain."""
    if len(labels) == 2:
        return " and ".join(labels[s].upper() for s in sides)
    return f"keyframe{'s' if len(sides) > 1 else ''} {', '.join(labels[s] for s in sides)}"
