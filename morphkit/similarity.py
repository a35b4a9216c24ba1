"""How alike two images are: PSNR and SSIM as functions of tensors.

A leaf module (it imports nothing from morphkit), so that both the metrics of a morph
(`morphkit.metrics`) and the round-trip figures of an inversion (`morphkit.inversion`) use one
implementation without importing each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_batch(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) as they are, one image (C, H, W) as a batch of one."""
    if x.dim() == 3:
        return x[None]
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W) or (C, H, W); got shape {tuple(x.shape)}")
    return x


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image pair, images (B, C, H, W) or (C, H, W) in [0, data_range]; inf where equal."""
    x, y = as_batch(x).double(), as_batch(y).double()
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
    x, y = as_batch(x).double(), as_batch(y).double()
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
