"""The run's log: `train_log.jsonl` (a row a step), and TensorBoard's event files with `--report-to tensorboard`.

Elapsed time continues across `--resume`: a resumed run starts its clock where the checkpoint's stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write


class TrainLog:
    """Rows to `train_log.jsonl`, scalars and images to TensorBoard; a no-op for processes other than the main one."""

    def __init__(self, folder: Path | None, report_to: str | None = None, elapsed: float = 0.0):
        self.folder, self.elapsed_before, self.t0 = folder, elapsed, time.perf_counter()
        self.file = open(folder / "train_log.jsonl", "a", encoding="utf-8") if folder else None
        self.board = tensorboard_writer(folder / "logs") if folder and report_to == "tensorboard" else None

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.t0, 3)

    def step(self, step: int, loss: float, rates: dict[str, float], **extra) -> None:
        if self.file is None:
            return
        row = {"step": step, "loss": loss, "lr": next(iter(rates.values())), **extra, "elapsed_s": self.elapsed()}
        if len(rates) > 1:
            row["lrs"] = rates
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board:
            self.board.add_scalar("loss", loss, step)
            for name, rate in rates.items():
                self.board.add_scalar(f"lr/{name}", rate, step)

    def images(self, step: int, images) -> None:
        """Validation images to TensorBoard (their files go in the step's row of the log)."""
        if self.board:
            import numpy as np

            self.board.add_images("validation", np.stack([np.asarray(img) for img in images]), step, dataformats="NHWC")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--report-to tensorboard needs the tensorboard package, which is not installed: "
                          "pip install tensorboard (or pip install 'morphkit[tensorboard]'), or leave --report-to out; "
                          "train_log.jsonl is always written.") from None
    return SummaryWriter(str(folder))


def check_tensorboard(report_to: str | None) -> None:
    """Say before the model loads that TensorBoard is missing, not after."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            tensorboard_writer(Path("."))


def trim_log(path: Path, last_step: int) -> None:
    """Keep the log rows up to `last_step` (the checkpoint resumed from); start empty otherwise."""
    rows = []
    if last_step and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    rows.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with atomic_write(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
