"""Timing the stages of a job: wall time of each, and on CUDA the peak GPU memory allocated during it."""

from __future__ import annotations

import time

import torch

from .errors import NumericalError

FINITE_HINT = ("Lower --guidance or the LoRA weights (or --lora-lr), or run in fp32 (--dtype fp32); nothing of it was "
               "written or cached.")


class Stages:
    """`begin()`, then `end("fit")` records the fit stage; the next stage begins where one ends.

    On CUDA each boundary synchronizes (so a stage's time includes its queued kernels) and resets the
    peak-memory counter, so `peak_bytes[name]` is the most memory allocated at any moment of that stage:
    the weights held plus what the stage itself needed.
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._start = time.perf_counter()

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def begin(self, device: str | torch.device | None = None) -> None:
        if device is not None:
            self.device = torch.device(device)
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()

    def end(self, name: str) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes[name] = torch.cuda.max_memory_allocated(self.device)
        self.seconds[name] = time.perf_counter() - self._start
        self.begin()


def check_finite(tensor: torch.Tensor, stage: str, hint: str = FINITE_HINT) -> torch.Tensor:
    """`tensor`, if every value is finite; otherwise `NumericalError` naming the stage that overflowed."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NumericalError(f"The {stage} produced NaN or infinite values (a number overflowed). {hint}")
    return tensor
