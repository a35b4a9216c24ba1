"""The numbers of a morph, as functions of tensors: slerp, lerp, AdaIN, the α schedule and even pacing.

Nothing here knows about a pipeline; each function takes tensors and returns tensors, and is tested alone.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


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

