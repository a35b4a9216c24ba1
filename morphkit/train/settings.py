"""`TrainSettings`: every setting of a training run, validated once; a JSON or TOML config file holds the same keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..images import MAX_RESOLUTION
from ..io import is_plain_name
from ..lora import DEFAULT_TARGETS, LoraShape
from ..lora_files import warn_kohya_dropped
from ..models import DEFAULT_MODEL


LR_SCHEDULES = ("constant", "cosine", "linear")
CROPS = ("center", "random", "none")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
DEFAULT_STEPS = 200


@dataclass
class TrainSettings:
    """Every setting of a training run. A JSON or TOML config file holds the same keys."""

    # what to train on, and where the result goes
    data: str | None = None
    prompt: str | None = None
    model: str = DEFAULT_MODEL
    output_dir: str | None = None
    name: str | None = None
    # the LoRA
    rank: int = 16
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # how long
    steps: int | None = None
    epochs: int | None = None
    # the optimiser
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # the loss
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    # the data
    seed: int = 0
    resolution: int | None = None
    crop: str | None = None
    random_flip: bool = False
    # the machine
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    # checkpoints
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 2

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> dict:
        """Read a JSON or TOML config file into a dict of settings, checking every key."""
        from ..config import read_config

        path = Path(path)
        values = read_config(path, {f.name for f in dataclasses.fields(cls)})
        if values.get("data") and not Path(values["data"]).is_absolute():  # relative to the config file
            values["data"] = str(path.parent / values["data"])
        return values

    @classmethod
    def resolve(cls, config: str | os.PathLike | None = None, **overrides) -> "TrainSettings":
        """Defaults, then the config file, then every override that is not None."""
        values = cls.from_file(config) if config else {}
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(overrides) - known):
            raise ConfigError(f"Unknown training settings: {', '.join(unknown)}.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("targets"), str):
            values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
        try:
            settings = cls(**values)
        except TypeError as e:
            raise ConfigError(f"Bad training settings: {e}") from None
        settings.validate()
        return settings

    def validate(self):
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        def number(name, kind=(int, float)):
            value = getattr(self, name)
            option = "--lr" if name == "learning_rate" else "--" + name.replace("_", "-")
            need(isinstance(value, kind) and not isinstance(value, bool), f"{option} must be a number; got {value!r}.")
            need(math.isfinite(value), f"{option} must be finite; got {value!r}.")
            return value

        need(self.data, "No training data: give an image file or a folder with metadata.jsonl.")
        need(self.name is None or is_plain_name(self.name), f"--name must be a plain file name (no folders, no '..'); "
             f"got {self.name!r}. Use --output-dir to choose the folder.")
        need(number("rank", int) >= 1, f"The LoRA rank must be at least 1; got {self.rank}.")
        need(self.alpha is None or number("alpha") > 0, f"The LoRA alpha must be positive; got {self.alpha}.")
        need(isinstance(self.targets, list) and self.targets and all(isinstance(t, str) and t for t in self.targets),
             "--targets must be a non-empty list of module names, like to_q,to_k,to_v,to_out.0.")
        warn_kohya_dropped(self.targets)  # conv_in, conv_out, time_embedding: kohya's sd-scripts skips them
        need(self.steps is None or number("steps", int) >= 1, f"--steps must be at least 1; got {self.steps}.")
        need(self.epochs is None or number("epochs", int) >= 1, f"--epochs must be at least 1; got {self.epochs}.")
        need(self.steps is None or self.epochs is None, "Give --steps or --epochs, not both.")
        need(0 < number("learning_rate") <= 1, f"The learning rate (--lr) must be above 0 and at most 1 (1e-4 is "
                                                 f"usual); got {self.learning_rate}.")
        need(self.lr_scheduler in LR_SCHEDULES, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_scheduler!r}.")
        need(number("lr_warmup_steps", int) >= 0, "--lr-warmup-steps must be 0 or more.")
        need(0 <= number("adam_beta1") < 1 and 0 <= number("adam_beta2") < 1, "Adam betas must lie in [0, 1).")
        need(number("adam_weight_decay") >= 0, "--adam-weight-decay must be 0 or more.")
        need(number("adam_epsilon") > 0, "--adam-epsilon must be positive.")
        need(number("batch_size", int) >= 1, f"--batch-size must be at least 1; got {self.batch_size}.")
        need(number("gradient_accumulation_steps", int) >= 1, "--gradient-accumulation-steps must be at least 1.")
        need(number("max_grad_norm") > 0, "--max-grad-norm must be positive.")
        need(number("noise_offset") >= 0, "--noise-offset must be 0 or more.")
        need(self.snr_gamma is None or number("snr_gamma") > 0, "--snr-gamma must be positive (5.0 is the usual value).")
        need(0 <= number("seed", int) < 2**63, f"--seed must be an integer from 0 to 2^63 - 1; got {self.seed}.")
        need(self.resolution is None or (8 <= number("resolution", int) <= MAX_RESOLUTION and self.resolution % 8 == 0),
             f"--resolution must be a multiple of 8 from 8 to {MAX_RESOLUTION}; got {self.resolution}.")
        need(self.crop is None or self.crop in CROPS, f"--crop must be one of {', '.join(CROPS)}; got {self.crop!r}.")
        need(self.mixed_precision in MIXED_PRECISIONS, f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}.")
        need(number("checkpointing_steps", int) >= 0, "--checkpointing-steps must be 0 (none) or more.")
        need(number("checkpoints_total_limit", int) >= 1, "--checkpoints-total-limit must be at least 1.")

    @property
    def shape(self) -> LoraShape:
        return LoraShape(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets))

    def trajectory_hash(self, data_digest: str) -> str:
        """What a checkpoint must agree on to be resumed: everything but length and bookkeeping."""
        skip = {"steps", "epochs", "output_dir", "name", "checkpointing_steps", "checkpoints_total_limit", "data"}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        values["data_hash"] = data_digest
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    lora_path: Path | None
    steps: int
    losses: list[float]
    output_dir: Path | None = None
    resumed_from: int = 0
    lora_paths: list[Path] = dataclasses.field(default_factory=list)  # every file written (`--format both`: two)
    processes: int = 1  # how many processes trained data-parallel
    rank: int = 0  # this process's place among them (0: the main process, which wrote the files)
