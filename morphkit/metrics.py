"""How good is a morph: the measures the morphing papers report, as functions of tensors.

Frames are float tensors (F, 3, H, W) with values in [0, 1]. A distance is a callable
`distance(x, y) -> (B,)` between two batches of images; `neighbour_distances` applies one to each pair
of consecutive frames, and from those:

- PPL (perceptual path length): the sum of the neighbour distances, the length of the path the morph
  walks. Shorter is a more direct morph.
- PDV (perceptual distance variance): their variance. 0 is perfectly even pacing; a morph that jumps in
  the middle has a large one.
- endpoint fidelity: PSNR and SSIM of the first and last frames against the two inputs, and, given a
  model, against each input's VAE round trip (encoded and decoded: the best a latent-diffusion morph
  can reproduce).

Distances live in a registry (`DISTANCES`, `register_distance`, `get_distance`): `lpips` when the
`lpips` package and its weights are there (morphkit does not depend on it), else `l2`, the RMS pixel
difference, which needs no weights. `get_distance("auto")` picks the first that works and says which.

A protocol (`PROTOCOLS`) fixes how PPL and PDV are measured: "morphkit" (the chosen distance on the
frames as they are) or "diffmorpher" (the DiffMorpher authors' own: LPIPS with AlexNet on frames resized
to 512x512, values in [-1, 1]), so that numbers compare with their paper's.

PSNR and SSIM themselves live in `morphkit.similarity` (re-exported here).

`evaluate` (and `morphkit eval`) reads a morph from a frame folder or a GIF and measures all of it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError, brief
from .similarity import as_batch as _batch
from .similarity import gaussian_window, psnr, ssim  # noqa: F401  (part of this module's API)

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# distances between frames


def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RMS pixel difference of each image pair (values in [0, 1]): no weights, the fallback for LPIPS."""
    return (_batch(x).double() - _batch(y).double()).pow(2).mean(dim=(1, 2, 3)).sqrt()


class DistanceUnavailable(Exception):
    """A distance that cannot run here (a package or its weights are missing); the reason is the message."""


def _lpips_factory(device=None) -> Distance:
    """LPIPS (AlexNet), used only when the `lpips` package and the AlexNet weights are already on this machine."""
    try:
        import lpips
    except ImportError as e:
        missing = "" if e.name in (None, "lpips") else f" (it needs {e.name})"
        raise DistanceUnavailable(f"the lpips package is not installed{missing}") from None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not list(checkpoints.glob("alexnet-*.pth")):  # never download: morphkit works offline
        raise DistanceUnavailable(f"the AlexNet weights LPIPS needs are not in {checkpoints}")
    try:
        model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:
        raise DistanceUnavailable(f"LPIPS could not be loaded ({brief(e, 120)})") from None
    if device is not None:
        model = model.to(device)

    @torch.no_grad()
    def distance(x, y):
        dev = next(model.parameters()).device
        return model(_batch(x).float().to(dev) * 2 - 1, _batch(y).float().to(dev) * 2 - 1).flatten().double().cpu()

    return distance


# name -> factory(device) -> distance; "auto" tries them in this order
DISTANCES: dict[str, Callable[..., Distance]] = {"lpips": _lpips_factory, "l2": lambda device=None: l2_distance}
DISTANCE_HELP = {"lpips": "LPIPS (AlexNet), perceptual", "l2": "RMS pixel difference, no weights"}


def register_distance(name: str, factory: Callable[..., Distance], help: str = "") -> None:
    """Add a distance: `factory(device=None)` returns `distance(x, y) -> (B,)` or raises `DistanceUnavailable`."""
    DISTANCES[name] = factory
    DISTANCE_HELP[name] = help or name


def distance_names() -> list[str]:
    return ["auto", *DISTANCES]


def check_distance(name: str) -> str:
    if name != "auto" and name not in DISTANCES:
        raise ConfigError(f"Unknown distance {name!r}; choose from {', '.join(distance_names())}.")
    return name


def get_distance(name: str = "auto", device=None) -> tuple[str, Distance, str]:
    """(the name that runs, the distance, a note on what was skipped). "auto": lpips if it can run, else l2.

    A distance asked for by name that cannot run raises `ConfigError` saying why.
    """
    check_distance(name)
    if name != "auto":
        try:
            return name, DISTANCES[name](device=device), ""
        except DistanceUnavailable as e:
            raise ConfigError(f"The distance {name} cannot run here: {e}. Use --distance l2 (no weights needed), "
                              "or auto.") from None
    skipped = []
    for candidate, factory in DISTANCES.items():
        try:
            return candidate, factory(device=device), "; ".join(skipped)
        except DistanceUnavailable as e:
            skipped.append(f"{candidate}: {e}")
    raise ConfigError("No frame distance can run here: " + "; ".join(skipped))


@torch.no_grad()
def neighbour_distances(frames: torch.Tensor, distance: Distance, batch_size: int = 16) -> torch.Tensor:
    """Distance between each frame and the next: (F - 1,) float64 for frames (F, C, H, W)."""
    if frames.dim() != 4 or len(frames) < 2:
        raise ValueError(f"expected at least 2 frames (F, C, H, W); got shape {tuple(frames.shape)}")
    pairs = len(frames) - 1
    out = [distance(frames[i:min(i + batch_size, pairs)], frames[i + 1:min(i + batch_size, pairs) + 1]).double().cpu()
           for i in range(0, pairs, batch_size)]
    return torch.cat([d.reshape(-1) for d in out])


def ppl(distances: torch.Tensor) -> float:
    """Perceptual path length: the sum of the neighbour distances."""
    return float(distances.double().sum())


def pdv(distances: torch.Tensor) -> float:
    """Perceptual distance variance: the (population) variance of the neighbour distances; 0 is even pacing."""
    return float(distances.double().var(correction=0))


# ---------------------------------------------------------------------------------------------
# frames as tensors, and the command-level job: `morphkit eval`


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (all one size) -> (F, 3, H, W) float32 in [0, 1]."""
    import numpy as np

    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def read_frames(path: str | os.PathLike) -> list:
    """The frames of a morph: a folder of images (sorted naturally: frame_2 before frame_10) or an animated GIF,
    as PIL RGB images.

    A GIF written with --back-and-forth (A → B → A, a palindrome) gives only its A → B half. Raises
    `InputError` for a missing path, an empty folder, an unreadable GIF, frames of different sizes, or
    fewer than 2 frames.
    """
    from .images import list_images, open_frames, open_images

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist. Give a folder of frames or a GIF.")
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise InputError(f"The folder {path} holds no images (PNG, JPEG, WebP, BMP, TIFF, GIF).")
        frames, names = open_images(files, path), [f.name for f in files]  # pixel limits checked first
    else:
        frames = open_frames(path)  # every frame's pixels checked before decoding; a FIFO is refused, not read
        names = [f"frame {i}" for i in range(len(frames))]
        if len(frames) >= 3 and len(frames) % 2 and _is_palindrome(frames):
            frames = frames[: len(frames) // 2 + 1]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        odd = next(n for n, f in zip(names, frames) if f.size != frames[0].size)
        raise InputError(f"The frames in {path} differ in size ({names[0]} is {frames[0].width}x{frames[0].height}, "
                         f"{odd} is not); a morph's frames share one size.")
    if len(frames) < 2:
        raise InputError(f"{path} holds {len(frames)} frame; a morph has at least 2.")
    return frames


def _is_palindrome(frames) -> bool:
    import numpy as np

    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, frames[::-1]))


@dataclass(frozen=True)
class Protocol:
    """How PPL and PDV are measured: which distance, on frames resized to what."""

    name: str
    distance: str | None  # the distance it always uses; None: the one asked for (--distance)
    size: tuple[int, int] | None  # (width, height) the frames are resized to before the distances; None: as they are
    help: str


PROTOCOLS = {
    "morphkit": Protocol("morphkit", None, None, "the chosen --distance on the frames as they are"),
    # The DiffMorpher authors' script (their issue #33): lpips.LPIPS() (AlexNet) on frames resized to 512x512
    # (torchvision's bilinear Resize) and normalised to [-1, 1].
    "diffmorpher": Protocol("diffmorpher", "lpips", (512, 512),
                            "LPIPS (AlexNet) on frames resized to 512x512, values in [-1, 1], as the DiffMorpher "
                            "authors measure PPL and PDV"),
}


def check_protocol(protocol: str, distance: str = "auto") -> Protocol:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown --protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}.")
    chosen = PROTOCOLS[protocol]
    if chosen.distance is not None and distance not in ("auto", chosen.distance):
        raise ConfigError(f"--protocol {protocol} always measures with {chosen.distance}, so --distance {distance} "
                          f"contradicts it. Leave out --distance, or use --protocol morphkit with --distance {distance}.")
    return chosen


def protocol_distance(protocol: Protocol, distance: str = "auto", device=None) -> tuple[str, Distance, str]:
    """(name, distance, note) for a protocol: its own distance, on frames resized to its size."""
    if protocol.distance is None:
        name, fn, note = get_distance(distance, device)
    else:
        try:
            name, fn, note = protocol.distance, DISTANCES[protocol.distance](device=device), ""
        except DistanceUnavailable as e:
            checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
            raise ConfigError(
                f"--protocol {protocol.name} ({protocol.help}) cannot run here: {e}. It needs the lpips package "
                f"(pip install lpips, which needs torchvision) and the AlexNet weights in {checkpoints} "
                "(alexnet-owt-7be5be79.pth; lpips downloads them on first use, morphkit never does). Or use "
                "--protocol morphkit, which measures with --distance l2 where LPIPS cannot run."
            ) from None
    if protocol.size is None:
        return name, fn, note
    width, height = protocol.size

    def resized(x, y):
        def fit(t):
            return F.interpolate(_batch(t).float(), size=(height, width), mode="bilinear", antialias=True,
                                 align_corners=False).clamp(0, 1)

        return fn(fit(x), fit(y))

    return name, resized, note


@dataclass
class EvalResult:
    frames: int
    size: tuple[int, int]  # (width, height)
    distance: str  # the distance that ran: lpips, l2, ...
    distances: list[float]  # between each frame and the next
    ppl: float
    pdv: float
    psnr_a: float  # first frame against image A, dB (inf where identical)
    psnr_b: float  # last frame against image B
    ssim_a: float
    ssim_b: float
    note: str = ""  # distances skipped by "auto", and why
    source: str | None = None
    protocol: str = "morphkit"
    # The ends against each input's VAE round trip (encode, decode: the best a latent-diffusion morph can do):
    # {"model", "psnr_a", "psnr_b", "ssim_a", "ssim_b"}; None when no model was given.
    vae: dict | None = None
    # A chain's keyframes: for each, {"image", "frame" (the index of its frame), "psnr", "ssim"}; None for a pair.
    keyframes: list[dict] | None = None

    def to_dict(self) -> dict:
        """Plain data for JSON: an infinite PSNR (identical images) becomes null, as JSON has no infinity."""
        data = asdict(self)
        data["size"] = list(self.size)
        for where in (data, data["vae"] or {}, *(data["keyframes"] or [])):
            for key in ("psnr_a", "psnr_b", "psnr"):
                if key in where and not math.isfinite(where[key]):
                    where[key] = None
        return data


def evaluate(frames, image_a=None, image_b=None, distance: str = "auto", device=None, protocol: str = "morphkit",
             model: str | None = None, pipe=None, allow_pickle: bool = False, keyframes=None) -> EvalResult:
    """Measure a morph: PPL and PDV of its neighbour distances, PSNR and SSIM of its ends against the inputs.

    `frames`: a folder of frames, a GIF, a list of PIL images or a tensor (F, 3, H, W) in [0, 1].
    `image_a`, `image_b`: paths or PIL images, scaled to cover the frame size (aspect ratio kept) and
    center-cropped, as `morph` frames them. `protocol`: "morphkit" (`distance` on the frames as they are)
    or "diffmorpher" (the DiffMorpher authors' LPIPS protocol; see `PROTOCOLS`). With `model` (or a loaded
    `pipe`), the ends are also compared with each input's VAE round trip (`result.vae`).

    A chain: `keyframes` (two or more images, in order) instead of A and B. The first keyframe is frame 0;
    each later one is found as the frame most like it (highest PSNR) after the one before, and measured
    there (`result.keyframes`); A and B are then the first and last keyframes.
    """
    chosen = check_protocol(protocol, check_distance(distance))
    if keyframes is not None and (len(keyframes) < 2 or image_a is not None or image_b is not None):
        raise ConfigError("Give a chain's keyframes (two or more, with --keyframe) or the two ends of a morph "
                          "(--a and --b), not both.")
    if keyframes is None and (image_a is None or image_b is None):
        raise ConfigError("Give the morph's two ends (--a and --b), or a chain's keyframes (--keyframe, repeated).")
    tensor, source = _frames_tensor(frames)
    size = (tensor.shape[3], tensor.shape[2])
    if (model is not None or pipe is not None) and (size[0] % 8 or size[1] % 8):
        raise InputError(f"The frames are {size[0]}x{size[1]}; the VAE round trip needs sides that are multiples "
                         "of 8, as morph writes them. Leave out --model to measure the rest.")
    inputs = [_as_image(img, size) for img in (keyframes or [image_a, image_b])]
    where = _keyframe_frames(tensor, images_to_tensor(inputs)) if keyframes else [0, len(tensor) - 1]
    name, fn, note = protocol_distance(chosen, distance, device)  # before the model loads: it may not run here
    d = neighbour_distances(tensor, fn)
    shown = tensor[where]
    psnrs, ssims = psnr(shown, images_to_tensor(inputs)), ssim(shown, images_to_tensor(inputs))
    found = None if keyframes is None else [
        {"image": str(k) if isinstance(k, (str, os.PathLike)) else f"keyframe {i + 1}", "frame": int(f),
         "psnr": float(p), "ssim": float(q)} for i, (k, f, p, q) in enumerate(zip(keyframes, where, psnrs, ssims))]
    vae = None
    if model is not None or pipe is not None:
        vae = vae_fidelity(shown[[0, -1]], [inputs[0], inputs[-1]], model=model, pipe=pipe, device=device,
                           allow_pickle=allow_pickle)
    return EvalResult(len(tensor), size, name, d.tolist(), ppl(d), pdv(d), float(psnrs[0]), float(psnrs[-1]),
                      float(ssims[0]), float(ssims[-1]), note, source, chosen.name, vae, found)


def _keyframe_frames(frames: torch.Tensor, keyframes: torch.Tensor) -> list[int]:
    """Where each keyframe is among the frames: the first at 0, each later one at the frame most like it (PSNR)
    after the one before, leaving a frame for each keyframe still to come."""
    if len(keyframes) > len(frames):
        raise InputError(f"{len(keyframes)} keyframes cannot all be among {len(frames)} frames.")
    where = [0]
    for k in range(1, len(keyframes)):
        low, high = where[-1] + 1, len(frames) - (len(keyframes) - 1 - k)
        scores = psnr(frames[low:high], keyframes[k:k + 1].expand(high - low, -1, -1, -1))
        where.append(low + int(torch.argmax(torch.nan_to_num(scores, posinf=1e9))))
    return where


def _frames_tensor(frames) -> tuple[torch.Tensor, str | None]:
    """Frames from a path, PIL images or a tensor, as (F, 3, H, W) in [0, 1]; and the path if there was one."""
    source = None
    if isinstance(frames, (str, os.PathLike)):
        source = str(frames)
        frames = read_frames(frames)
    if not torch.is_tensor(frames) and len({img.size for img in frames}) > 1:
        raise InputError("The frames differ in size; a morph's frames share one size.")
    tensor = frames if torch.is_tensor(frames) else images_to_tensor(frames)
    if tensor.dim() != 4 or tensor.shape[1] != 3 or len(tensor) < 2:
        raise InputError(f"A morph to evaluate needs at least 2 RGB frames; got shape {tuple(tensor.shape)}.")
    return tensor, source


def _as_image(image, size: tuple[int, int]):
    from PIL import Image

    from .images import cover_resize, open_image

    return cover_resize(image if isinstance(image, Image.Image) else open_image(image), size)


@torch.no_grad()
def vae_fidelity(ends: torch.Tensor, inputs: list, model: str | None = None, pipe=None, device=None,
                 allow_pickle: bool = False) -> dict:
    """PSNR and SSIM of the end frames (2, 3, H, W) in [0, 1] against the VAE round trips of the two input
    images (PIL, at the frames' size). The VAE runs in fp32 (the round trip is a reference, not a render)."""
    from .images import to_pil
    from .models import decode_latents, encode_image, load_pipeline

    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=torch.float32, allow_pickle=allow_pickle)
    round_trips = torch.cat([decode_latents(pipe, encode_image(pipe, img)) for img in inputs])
    round_trips = images_to_tensor(to_pil(round_trips))  # quantised to 8 bits, as a saved frame is
    psnrs, ssims = psnr(ends, round_trips), ssim(ends, round_trips)
    return {"model": str(model if model is not None else getattr(pipe, "name_or_path", "pipeline")),
            "psnr_a": float(psnrs[0]), "psnr_b": float(psnrs[1]), "ssim_a": float(ssims[0]), "ssim_b": float(ssims[1])}
