"""Stylize: redraw photos with style LoRAs through ControlNet-Canny img2img.

    image ─► size policy ─► RGB ──OpenCV Canny──► edge map ──────────────┐
                             │                                           ▼
                             └─► VAE latent (posterior mean) ─► ControlNet-Canny img2img, UNet with LoRA(s)
                                                                at weight x scale ─► stylized image

The small pieces (`auto_canny_thresholds`, `canny_thresholds`, `canny_edges`) take and return arrays;
`controlnet_pipeline` builds the diffusers pipeline from a loaded one; `stylize` is the whole job over many
images: checked up front, the model loaded once, one image's failure reported without stopping the others.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, InputError, MorphkitError, NumericalError, OutputExistsError, brief
from .images import check_resolution, list_images, open_image, resize_to_policy, save_image
from .inversion import check_steps
from .embeddings import read_embeddings, use_embeddings
from .lora import adapter_weights, load_loras, merged_updates, parse_lora_spec, remove_adapters
from .lora_files import LoraFile, check_weight, read_lora_file
from .families import family_of
from .models import DEFAULT_MODEL, controlnet_for, encode_image, load_pipeline, resolve_device
from .stages import Stages

CANNY_SIGMA = 0.33  # automatic thresholds: (1 -/+ sigma) x the median brightness
ADAPTER_PREFIX = "style"  # adapters style0, style1, ...: names that are no substring of a UNet module key


# ---------------------------------------------------------------------------------------------
# edges


def to_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image (PIL, or an (H, W, 3) uint8 array) as an (H, W) uint8 array, by OpenCV's weights."""
    import cv2

    array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)


def auto_canny_thresholds(gray: np.ndarray, sigma: float = CANNY_SIGMA) -> tuple[int, int]:
    """Canny thresholds from the median brightness m of a grayscale image: ((1 - sigma) m, (1 + sigma) m), in 0..255."""
    median = float(np.median(gray))
    return int(max(0.0, (1.0 - sigma) * median)), int(min(255.0, (1.0 + sigma) * median))


def check_threshold(value, name: str = "A Canny threshold") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
        raise ConfigError(f"{name} must be an integer from 0 to 255; got {value!r}.")
    return int(value)


def check_thresholds(low: int, high: int) -> tuple[int, int]:
    """Raise `ConfigError` unless 0 <= low <= high <= 255."""
    check_threshold(low, "--canny-low")
    check_threshold(high, "--canny-high")
    if low > high:
        raise ConfigError(f"The Canny low threshold ({low}) is above the high one ({high}). Edges weaker than low are "
                          "dropped and those above high always kept, so low must be at most high (100/200 is usual).")
    return int(low), int(high)


def canny_thresholds(gray: np.ndarray, low: int | None = None, high: int | None = None) -> tuple[int, int]:
    """The thresholds to use: both given, as given; neither, from the median brightness; one, the other at 2:1.

    Canny's own advice is a high:low ratio of 2:1 to 3:1, so a lone `low` gets high = 2 x low (at most
    255) and a lone `high` gets low = high // 2: a pair that never contradicts itself on any image.
    """
    if low is None and high is None:
        return auto_canny_thresholds(gray)
    if high is None:
        high = min(255, 2 * check_threshold(low, "--canny-low"))
    if low is None:
        low = check_threshold(high, "--canny-high") // 2
    return check_thresholds(low, high)


def canny_edges(image: Image.Image | np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV's Canny edges of an RGB or grayscale image: an (H, W) uint8 array of 0 and 255."""
    import cv2

    low, high = check_thresholds(low, high)
    return cv2.Canny(to_gray(image), low, high)


def control_image(edges: np.ndarray) -> Image.Image:
    """An (H, W) edge map as the 3-channel image a ControlNet-Canny is conditioned on (white edges on black)."""
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


# ---------------------------------------------------------------------------------------------
# the pipeline


def controlnet_pipeline(pipe, controlnet):
    """The family's ControlNet img2img pipeline (`StableDiffusionControlNetImg2ImgPipeline`, or its SDXL
    counterpart) sharing the components (and scheduler) of `pipe`.

    `pipe` is a pipeline such as `load_pipeline` returns; its modules are shared, not copied, so LoRAs loaded
    into `pipe.unet` act in the new pipeline too.
    """
    import inspect

    family = family_of(pipe)
    check_controlnet_fits(controlnet, pipe.unet)
    cls = family.pipeline_class("controlnet_img2img")
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in accepted and k != "controlnet"}
    components.update({k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in accepted})
    settings = {k: v for k, v in family.pipeline_kwargs().items() if k in accepted}
    cn_pipe = cls(**{**components, **settings}, controlnet=controlnet)
    cn_pipe.set_progress_bar_config(disable=True)
    return cn_pipe


def check_controlnet_fits(controlnet, unet) -> None:
    """Raise `ConfigError` when `controlnet` was made for another UNet (its residuals would not add up)."""
    keys = ("in_channels", "block_out_channels", "cross_attention_dim", "layers_per_block", "addition_embed_type")
    theirs, ours = ({k: _plain(m.config.get(k)) for k in keys} for m in (controlnet, unet))
    if theirs != ours:
        differ = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in keys if theirs[k] != ours[k])
        family = family_of(unet)
        raise ConfigError(f"The ControlNet does not fit the base model ({differ}). Use a ControlNet made for it: "
                          f"{family.default_controlnet} for {family.label}, or 'tiny' with --model "
                          f"{family.tiny_name}.")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@torch.no_grad()
def render(cn_pipe, image: Image.Image, edges: np.ndarray, *, prompt: str = "", negative_prompt: str = "",
           strength: float = 0.5, guidance: float = 7.5, controlnet_scale: float = 0.5, steps: int = 50,
           seed: int = 0) -> Image.Image:
    """One ControlNet img2img pass over `image` (sides multiples of 8), conditioned on its `edges`.

    The image enters as its VAE posterior mean, as in every other morphkit command, so that the result
    depends on `seed` only through the noise that `strength` adds. LoRA weights are whatever adapters are
    active on `cn_pipe.unet` (see `morphkit.lora.adapter_weights`).
    """
    latent = encode_image(cn_pipe, image)
    generator = torch.Generator("cpu").manual_seed(seed)  # the same noise on every device
    out = cn_pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=latent,
        control_image=control_image(edges),
        height=image.height,
        width=image.width,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        controlnet_conditioning_scale=controlnet_scale,
        generator=generator,
        output_type="np",
    )
    pixels = out.images[0]  # (H, W, 3) in [0, 1]; turned into 8 bits as diffusers' own "pil" output does
    if not np.isfinite(pixels).all():
        raise NumericalError("Stylizing produced NaN or infinite values (a number overflowed): lower --guidance, "
                             "--lora-scale or the LoRA weights, or run in fp32 (--dtype fp32). Nothing was written.")
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# the command-level job: `morphkit stylize`


@dataclass
class Stylized:
    source: Path  # the input file
    image: Image.Image  # the stylized image, at the input's aspect ratio
    edges: Image.Image  # the Canny edge map it was conditioned on (mode L, 0 or 255)
    thresholds: tuple[int, int]  # the Canny (low, high) used
    paths: dict[str, Path] = field(default_factory=dict)  # {"image": ..., "edges": ...} when saved


@dataclass
class StylizeResult:
    stylized: list[Stylized]  # in input order, the images that worked
    failed: dict[Path, str]  # input file -> why it failed
    loras: list[tuple[Path, float]]  # each LoRA file and the weight it ran at (its own weight x lora_scale)
    output_dir: Path | None
    timings: dict[str, float]
    peak_memory: dict[str, int] = field(default_factory=dict)  # per stage, bytes of GPU memory (CUDA only)

    @property
    def images(self) -> list[Image.Image]:
        return [s.image for s in self.stylized]


def collect_images(inputs) -> list[Path]:
    """Paths and folders -> image files: a folder gives its images (not recursively); duplicates are dropped.

    A named path is kept even when it is missing or not an image, so that it is reported as a failure.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files, seen = [], set()
    for item in inputs:
        path = Path(item)
        found = list_images(path) if path.is_dir() else [path]
        if path.is_dir() and not found:
            raise InputError(f"The folder {path} holds no images (PNG, JPEG, WebP, BMP, TIFF, GIF).")
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    if not files:
        raise InputError("No image was given to stylize.")
    return files


def output_paths(files: list[Path], out: Path) -> dict[Path, dict[str, Path]]:
    """`<stem>.png` and `<stem>.edges.png` in `out` for each input; raise `ConfigError` when two would collide."""
    paths = {f: {"image": out / f"{f.stem}.png", "edges": out / f"{f.stem}.edges.png"} for f in files}
    owner: dict[Path, Path] = {}
    inputs = {f.resolve() for f in files}
    for file, targets in paths.items():
        for target in targets.values():
            if target.resolve() in inputs:
                raise ConfigError(f"Stylizing {file} would write {target}, which is one of the inputs. Choose another "
                                  "--output-dir.")
            if target in owner:
                raise ConfigError(f"{owner[target]} and {file} would both be written to {target}. Rename one, or "
                                  "stylize them in separate runs with different --output-dir.")
            owner[target] = file
    return paths


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_settings(strength, guidance, controlnet_scale, steps, lora_scale, seed, canny_low, canny_high,
                   resolution) -> None:
    check_steps(steps)
    if not (_is_number(strength) and 0 < strength <= 1):
        raise ConfigError(f"--strength must be above 0 and at most 1 (1 redraws from pure noise); got {strength!r}.")
    if int(steps * strength) < 1:
        raise ConfigError(f"strength {strength} of {steps} steps leaves no denoising step (img2img runs "
                          f"int(steps x strength) of them). Raise --strength or --steps.")
    if guidance is not None and not (_is_number(guidance) and math.isfinite(guidance) and 0 < guidance <= 100):
        raise ConfigError(f"--guidance must be above 0 and at most 100 (7.5 is usual; 1 turns classifier-free "
                          f"guidance off); got {guidance!r}.")
    if not (_is_number(controlnet_scale) and math.isfinite(controlnet_scale) and 0 <= controlnet_scale <= 100):
        raise ConfigError(f"--controlnet-scale must be from 0 to 100 (0 ignores the edges; 0.5 is usual); got "
                          f"{controlnet_scale!r}.")
    if not (_is_number(lora_scale) and math.isfinite(lora_scale) and abs(lora_scale) <= 100):
        raise ConfigError(f"--lora-scale must be a finite number within ±100 (usually 0 to 1); got {lora_scale!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be an integer from 0 to 2^63 - 1; got {seed!r}.")
    for value, name in ((canny_low, "--canny-low"), (canny_high, "--canny-high")):
        if value is not None:
            check_threshold(value, name)
    if canny_low is not None and canny_high is not None:
        check_thresholds(canny_low, canny_high)
    if resolution is not None:
        check_resolution(resolution)


def check_lora_files(loras, allow_pickle: bool = False) -> list[tuple[LoraFile, float]]:
    """`path` or `path:weight` specs -> (LoraFile, weight): each file read and checked once, before the model loads."""
    specs = []
    for item in loras:
        path, weight = item if isinstance(item, tuple) else parse_lora_spec(item)
        weight = check_weight(weight, f"the LoRA {path}")  # finite and not absurd
        specs.append((read_lora_file(path, allow_pickle), weight))  # LoRAError: missing, unreadable, not a LoRA
    return specs


def readable_images(images) -> tuple[list[Path], list[Path], dict[Path, str]]:
    """The image files named by `images`, those that open, and why each other one does not.

    Raises `InputError` when none opens: there is nothing to stylize."""
    files = collect_images(images)
    failed: dict[Path, str] = {}
    for file in files:
        try:
            open_image(file)
        except InputError as e:
            failed[file] = str(e)
    todo = [f for f in files if f not in failed]
    if not todo:
        raise InputError(" ".join(failed.values()) if len(failed) == 1 else
                         "None of the images could be read: " + " ".join(failed.values()))
    return files, todo, failed


def planned_outputs(todo: list[Path], out: Path, overwrite: bool) -> dict[Path, dict[str, Path]]:
    """The files each image will write into `out`; refused when they exist and `overwrite` is not given."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output folder {out} is a file. Choose another --output-dir.")
    targets = output_paths(todo, out)
    taken = [str(p) for t in targets.values() for p in t.values() if p.exists()]
    if taken and not overwrite:
        shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
        raise OutputExistsError(f"{shown} already exist{'s' if len(taken) == 1 else ''}. Pass --overwrite to "
                                "replace them, or choose another --output-dir.")
    return targets


def stylize_pipeline(pipe, model: str, controlnet: str | None, *, device=None, dtype=None, allow_pickle=False,
                     vae=None):
    """The ControlNet img2img pipeline: `pipe` itself if it is one, else `pipe` (or `model`, loaded) with the
    ControlNet added (`controlnet`, by default `tiny` for a tiny model and the family's ControlNet-Canny
    otherwise)."""
    if pipe is not None and isinstance(pipe, family_of(pipe).pipeline_class("controlnet_img2img")):
        check_controlnet_fits(pipe.controlnet, pipe.unet)
        return pipe
    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae)
    return controlnet_pipeline(pipe, controlnet_for(pipe, model, controlnet, allow_pickle))


def stylize(
    images,
    lora=(),
    *,
    prompt: str = "",
    negative_prompt: str = "",
    embedding=(),
    lora_scale: float = 1.0,
    strength: float = 0.5,
    guidance: float | None = None,
    controlnet_scale: float = 0.5,
    steps: int = 50,
    seed: int = 0,
    canny_low: int | None = None,
    canny_high: int | None = None,
    resolution: int | None = None,
    model: str = DEFAULT_MODEL,
    controlnet: str | None = None,
    output_dir: str | os.PathLike | None = None,
    save: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
    pipe=None,
    progress: bool = True,
) -> StylizeResult:
    """Redraw each image with the style LoRA(s) through ControlNet-Canny img2img.

    `images`: a path, a folder, or a list of them. `lora`: LoRA files as paths, `"path:weight"` strings or
    (path, weight) pairs; each runs at its weight x `lora_scale`. `embedding`: textual-inversion files whose
    tokens (and abstraction, for morphkit's own) the prompts may use. Each image keeps its aspect ratio (the
    size policy of `morphkit.images` at `resolution`, default the model's); its Canny edges use
    `canny_low`/`canny_high` (see `canny_thresholds`; neither: from its median brightness). With `save`,
    writes `<stem>.png` and `<stem>.edges.png` into `output_dir` (default `outputs/stylize`).

    Settings, LoRA files, inputs and outputs are checked before the model loads, and the LoRAs are loaded
    into it (and refused if they do not fit) before any image is drawn. After that, an image that fails is recorded in
    `result.failed` and the others are still done. `controlnet`: as `load_controlnet` takes it; by default
    `tiny` for a tiny model and the family's ControlNet-Canny otherwise (SD 1.5: lllyasviel/sd-controlnet-canny,
    SDXL: diffusers/controlnet-canny-sdxl-1.0). `pipe`: a loaded SD 1.x or SDXL pipeline (the ControlNet is
    added to it), or a ControlNet img2img pipeline used as it is. `vae`: another VAE for `model` (--vae).
    `guidance`: by default the family's (7.5 for SD 1.x, 5 for SDXL).
    """
    # 1. everything that can be checked before the model is loaded
    check_settings(strength, guidance, controlnet_scale, steps, lora_scale, seed, canny_low, canny_high, resolution)
    specs = check_lora_files(lora, allow_pickle)
    embeddings = read_embeddings([embedding] if isinstance(embedding, (str, os.PathLike)) else embedding, allow_pickle)
    files, todo, failed = readable_images(images)
    out = Path(output_dir or Path("outputs") / "stylize") if save else None
    targets = planned_outputs(todo, out, overwrite) if save else {}

    # 2. the model and its ControlNet, loaded once
    from .progress import bar_options

    stages = Stages(pipe.unet.device if pipe is not None else resolve_device(device))
    stages.begin()
    cn_pipe = stylize_pipeline(pipe, model, controlnet, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae)
    cn_pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoising", **bar_options())
    unet = cn_pipe.unet
    resolution = resolution or 8 * unet.config.sample_size
    guidance = family_of(cn_pipe).default_guidance if guidance is None else guidance  # 7.5 SD 1.x, 5 SDXL
    in_prompt = use_embeddings(cn_pipe, embeddings)
    prompt, negative_prompt = in_prompt(prompt), in_prompt(negative_prompt)
    stages.end("load")

    # 3. the LoRAs, into the UNet before any image is drawn (a LoRA that does not fit raises LoRAError here);
    # 4. each image: size policy, edges, img2img, files
    stylized = stylize_images(cn_pipe, specs, lora_scale, todo, targets, failed, resolution, canny_low, canny_high,
                              overwrite, progress, prompt=prompt, negative_prompt=negative_prompt, strength=strength,
                              guidance=guidance, controlnet_scale=controlnet_scale, steps=steps, seed=seed)
    stages.end("stylize")
    order = {f: i for i, f in enumerate(files)}
    failed = dict(sorted(failed.items(), key=lambda item: order[item[0]]))
    return StylizeResult(stylized, failed, [(f.path, w * lora_scale) for f, w in specs], out, stages.seconds,
                         stages.peak_bytes)


def stylize_images(cn_pipe, specs, lora_scale: float, todo: list[Path], targets: dict, failed: dict[Path, str],
                   resolution: int, canny_low, canny_high, overwrite: bool, progress: bool, **draw) -> list[Stylized]:
    """Draw each image of `todo` under the LoRAs `specs` (each at its weight x `lora_scale`); an image that fails
    goes into `failed` with its message and the others are still done. The UNet and text encoder come back as
    they were."""
    from .progress import tqdm

    unet, stylized = cn_pipe.unet, []
    try:
        # plain LoRAs run as adapters; other kinds (LoHa, LoKr, DoRA, diffs) and text-encoder parts are added to
        # the weights for the run by their own math, and put back bit for bit afterwards
        weights = load_loras(cn_pipe, specs, prefix=ADAPTER_PREFIX, plain_only=True)
        weights = {name: w * lora_scale for name, w in weights.items()}
        scaled = [(lora_file, w * lora_scale) for lora_file, w in specs]
        parts = family_of(cn_pipe).part_names()
        with adapter_weights(unet, weights), merged_updates(cn_pipe, scaled, parts, only_merged=True):
            for file in tqdm(todo, desc="stylizing", unit="image", disable=not progress):
                try:
                    stylized.append(_stylize_one(cn_pipe, file, targets.get(file), resolution, canny_low, canny_high,
                                                 overwrite, **draw))
                except MorphkitError as e:
                    failed[file] = str(e)
                except Exception as e:  # one image's trouble (say, out of memory) must not lose the others
                    first = brief(e, 300)
                    failed[file] = f"Unexpected {type(e).__name__}: {first}"
    finally:
        remove_adapters(unet, [f"{ADAPTER_PREFIX}{i}" for i in range(len(specs))])
    return stylized


def _stylize_one(cn_pipe, file: Path, targets: dict[str, Path] | None, resolution: int, canny_low, canny_high,
                 overwrite: bool, **settings) -> Stylized:
    image = resize_to_policy(open_image(file), resolution)
    gray = to_gray(image)
    low, high = canny_thresholds(gray, canny_low, canny_high)
    edges = canny_edges(gray, low, high)
    result = Stylized(file, render(cn_pipe, image, edges, **settings), Image.fromarray(edges), (low, high))
    if targets is not None:
        result.paths = {"image": save_image(result.image, targets["image"], overwrite),
                        "edges": save_image(result.edges, targets["edges"], overwrite)}
    return result
