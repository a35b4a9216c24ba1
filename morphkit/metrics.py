"""How good is a morph: the measures the morphing papers report, as functions of tensors.

Frames are float tensors (F, 3, H, W) with values in [0, 1]. A distance is a callable
`distance(x, y) -> (B,)` between two batches of images; `neighbour_distances` applies one to each pair
of consecutive frames, and from those:

- PPL (perceptual path length): the sum of the neighbour distances, the length of the path the morph
  walks. Shorter is a more direct morph.
- PDV (perceptual distance variance): their variance. 0 is perfectly even pacing; a morph that jumps in
  the middle has a large one.
- endpoint fidelity: PSNR and SSIM of the first and last frames against the two inputs.

Distances live in a registry (`DISTANCES`, `register_distance`, `get_distance`): `lpips` when the
`lpips` package and its weights are there (morphkit does not depend on it), else `l2`, the RMS pixel
difference, which needs no weights. `get_distance("auto")` picks the first that works and says which.

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

from .errors import ConfigError, InputError

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# image similarity


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image pair, images (B, C, H, W) or (C, H, W) in [0, data_range]; inf where equal."""
    x, y = _batch(x).double(), _batch(y).double()
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)  # mse 0 gives inf


def gaussian_window(size: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    """A normalised 2-D Gaussian (size, size)."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each image pair, images (B, C, H, W) or (C, H, W) in [0, data_range].

    The usual settings: an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, each channel on its own,
    the map averaged over the valid (unpadded) positions and the channels. Images smaller than the
    window use the largest odd window that fits.
    """
    x, y = _batch(x).double(), _batch(y).double()
    channels, height, width = x.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2
    kernel = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def _batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x[None]
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W) or (C, H, W); got shape {tuple(x.shape)}")
    return x


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
        raise DistanceUnavailable(f"LPIPS could not be loaded ({str(e).splitlines()[0][:120]})") from None
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
    """The frames of a morph: a folder of images (sorted by name) or an animated GIF, as PIL RGB images.

    A GIF written with --back-and-forth (A → B → A, a palindrome) gives only its A → B half. Raises
    `InputError` for a missing path, an empty folder, an unreadable GIF, frames of different sizes, or
    fewer than 2 frames.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    from .images import list_images, open_image, to_rgb

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist. Give a folder of frames or a GIF.")
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise InputError(f"The folder {path} holds no images (PNG, JPEG, WebP, BMP, TIFF, GIF).")
        frames, names = [open_image(f) for f in files], [f.name for f in files]
    else:
        try:
            with Image.open(path) as img:
                frames = [to_rgb(frame.copy()) for frame in ImageSequence.Iterator(img)]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{path} could not be read as a GIF or image ({str(e).splitlines()[0][:160]}).") from None
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

    def to_dict(self) -> dict:
        """Plain data for JSON: an infinite PSNR (identical images) becomes null, as JSON has no infinity."""
        data = asdict(self)
        data["size"] = list(self.size)
        for key in ("psnr_a", "psnr_b"):
            if not math.isfinite(data[key]):
                data[key] = None
        return data


def evaluate(frames, image_a, image_b, distance: str = "auto", device=None) -> EvalResult:
    """Measure a morph: PPL and PDV of its neighbour distances, PSNR and SSIM of its ends against the inputs.

    `frames`: a folder of frames, a GIF, a list of PIL images or a tensor (F, 3, H, W) in [0, 1].
    `image_a`, `image_b`: paths or PIL images, scaled to cover the frame size (aspect ratio kept) and
    center-cropped, as `morph` frames them.
    """
    from PIL import Image

    from .images import open_image
    from .morph import cover_resize

    check_distance(distance)
    source = None
    if isinstance(frames, (str, os.PathLike)):
        source = str(frames)
        frames = read_frames(frames)
    if not torch.is_tensor(frames) and len({img.size for img in frames}) > 1:
        raise InputError("The frames differ in size; a morph's frames share one size.")
    tensor = frames if torch.is_tensor(frames) else images_to_tensor(frames)
    if tensor.dim() != 4 or tensor.shape[1] != 3 or len(tensor) < 2:
        raise InputError(f"A morph to evaluate needs at least 2 RGB frames; got shape {tuple(tensor.shape)}.")
    size = (tensor.shape[3], tensor.shape[2])
    ends = [cover_resize(img if isinstance(img, Image.Image) else open_image(img), size) for img in (image_a, image_b)]
    ends = images_to_tensor(ends)
    name, fn, note = get_distance(distance, device)
    d = neighbour_distances(tensor, fn)
    firsts, lasts = tensor[[0, -1]], ends
    psnrs, ssims = psnr(firsts, lasts), ssim(firsts, lasts)
    return EvalResult(len(tensor), size, name, d.tolist(), ppl(d), pdv(d), float(psnrs[0]), float(psnrs[1]),
                      float(ssims[0]), float(ssims[1]), note, source)
