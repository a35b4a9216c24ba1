"""`TrainSettings`: every setting of a training run, validated once; a JSON or TOML config file holds the same keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
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
OPTIMIZERS = ("adamw", "prodigy")
REPORT_TO = ("tensorboard",)
DEFAULT_STEPS = 200
PRODIGY_LR = 1.0  # Prodigy finds its own step size; the learning rate scales it, and 1.0 is its default
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Settings that do not change what is trained: a checkpoint made under others may still be resumed.
BOOKKEEPING = {"steps", "epochs", "output_dir", "name", "checkpointing_steps", "checkpoints_total_limit", "data",
               "validation_prompt", "num_validation_images", "validation_epochs", "validation_steps",
               "sample_steps", "report_to", "class_data_dir"}


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
    # the optimizer's kind (Prodigy: the prodigyopt package; its learning rate defaults to 1.0)
    optimizer: str = "adamw"
    prodigy_beta3: float | None = None  # None: the square root of beta2
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    prodigy_d0: float = 1e-6  # Prodigy's first step-size estimate (its default); higher starts short runs sooner
    # the text encoder(s): a LoRA on them, or new tokens (pivotal tuning), each with its own rate
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None: the learning rate (with Prodigy always the learning rate)
    adam_weight_decay_text_encoder: float = 1e-3
    text_encoder_targets: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    train_text_encoder_ti: bool = False
    token_abstraction: str = "TOK"
    num_new_tokens_per_abstraction: int = 2
    train_text_encoder_ti_frac: float = 0.5
    initializer_token: str | None = None  # the new tokens start from this word's embedding; None: the mean one
    # captions
    caption_column: str = "text"
    instance_prompt: str | None = None  # the caption of images that have none (a folder without metadata.jsonl)
    caption_dropout_rate: float = 0.0
    repeats: int = 1
    # prior preservation (DreamBooth): class images, generated where missing
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    # validation images and logs
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int | None = None
    validation_steps: int | None = None
    sample_steps: int = 25  # denoising steps of the images training renders: validation and class images
    report_to: str | None = None
    # DoRA (weight-decomposed LoRA)
    use_dora: bool = False

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
        for key in ("targets", "text_encoder_targets"):
            if isinstance(values.get(key), str):
                values[key] = [t.strip() for t in values[key].split(",") if t.strip()]
        if values.get("optimizer") == "prodigy" and "learning_rate" not in values:
            values["learning_rate"] = PRODIGY_LR
        try:
            settings = cls(**values)
        except TypeError as e:
            raise ConfigError(f"Bad training settings: {e}") from None
        settings.validate()
        return settings

    def validate(self):
        """Check every setting once, with messages that name the CLI options."""
        need, number = self._checkers()
        self._validate_core(need, number)
        self._validate_optimizer(need, number)
        self._validate_text(need, number)
        self._validate_data(need, number)
        self._validate_extras(need, number)

    def _checkers(self):
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        def number(name, kind=(int, float)):
            value = getattr(self, name)
            option = "--lr" if name == "learning_rate" else "--" + name.replace("_", "-")
            need(isinstance(value, kind) and not isinstance(value, bool), f"{option} must be a number; got {value!r}.")
            need(math.isfinite(value), f"{option} must be finite; got {value!r}.")
            return value

        return need, number

    def _validate_core(self, need, number):
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

    def _validate_optimizer(self, need, number):
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
        need(self.prodigy_beta3 is None or 0 <= number("prodigy_beta3") < 1, "--prodigy-beta3 must lie in [0, 1).")
        need(0 < number("prodigy_d0") <= 1, "--prodigy-d0 must be above 0 and at most 1 (1e-6 is Prodigy's default).")
        for flag in ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "train_text_encoder",
                     "train_text_encoder_ti", "with_prior_preservation", "use_dora", "random_flip"):
            need(isinstance(getattr(self, flag), bool), f"--{flag.replace('_', '-')} is on or off (true or false); "
                                                        f"got {getattr(self, flag)!r}.")
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            warnings.warn(f"With Prodigy the learning rate scales the step size it finds; 1.0 is usual, and "
                          f"{self.learning_rate} will hardly train.", stacklevel=4)

    def _validate_text(self, need, number):
        need(not (self.train_text_encoder and self.train_text_encoder_ti),
             "--train-text-encoder (a LoRA on the whole text encoder) and --train-text-encoder-ti (new tokens, pivotal "
             "tuning) are alternatives: choose one.")
        need(self.text_encoder_lr is None or 0 < number("text_encoder_lr") <= 1,
             f"--text-encoder-lr must be above 0 and at most 1; got {self.text_encoder_lr}.")
        need(number("adam_weight_decay_text_encoder") >= 0, "--adam-weight-decay-text-encoder must be 0 or more.")
        need(isinstance(self.text_encoder_targets, list) and self.text_encoder_targets and
             all(isinstance(t, str) and t for t in self.text_encoder_targets),
             "--text-encoder-targets must be a non-empty list of module names, like q_proj,k_proj,v_proj,out_proj.")
        need(isinstance(self.token_abstraction, str) and self.token_abstraction.strip() == self.token_abstraction
             and 0 < len(self.token_abstraction) <= 64,
             "--token-abstraction must be a short word with no spaces around it, like TOK.")
        need(1 <= number("num_new_tokens_per_abstraction", int) <= 32,
             "--num-new-tokens-per-abstraction must be from 1 to 32 (2 is usual).")
        need(0 < number("train_text_encoder_ti_frac") <= 1,
             "--train-text-encoder-ti-frac must be above 0 and at most 1 (0.5: the tokens train for the first half).")
        need(self.initializer_token is None or (isinstance(self.initializer_token, str) and self.initializer_token.strip()),
             "--initializer-token must be a word, like 'person'.")

    def _validate_data(self, need, number):
        need(isinstance(self.caption_column, str) and self.caption_column, "--caption-column must be a column name.")
        need(self.instance_prompt is None or (isinstance(self.instance_prompt, str) and self.instance_prompt.strip()),
             "--instance-prompt must be a caption, like 'a photo of TOK dog'.")
        need(0 <= number("caption_dropout_rate") < 1, "--caption-dropout-rate must lie in [0, 1) (0.1 is usual).")
        need(number("repeats", int) >= 1, f"--repeats must be 1 or more (each image is seen that many times an epoch); "
                                          f"got {self.repeats}.")
        if self.with_prior_preservation:
            need(self.class_data_dir, "--with-prior-preservation needs --class-data-dir, the folder of class images "
                                      "(missing ones are generated there).")
            need(self.class_prompt, "--with-prior-preservation needs --class-prompt, like 'a photo of a dog'.")
            need(self.crop != "none", "Prior preservation batches square class images with the instance images, so "
                                      "they must be square too: use --crop center or random (the default with prior "
                                      "preservation is center).")
        need(number("num_class_images", int) >= 1, "--num-class-images must be 1 or more.")
        need(number("prior_loss_weight") > 0, "--prior-loss-weight must be positive (1.0 is usual).")
        need(1 <= number("sample_batch_size", int) <= 256, "--sample-batch-size must be from 1 to 256.")

    def _validate_extras(self, need, number):
        need(self.validation_prompt is None or isinstance(self.validation_prompt, str), "--validation-prompt is a prompt.")
        need(1 <= number("num_validation_images", int) <= 64, "--num-validation-images must be from 1 to 64.")
        need(self.validation_epochs is None or number("validation_epochs", int) >= 1, "--validation-epochs must be 1 or more.")
        need(self.validation_steps is None or number("validation_steps", int) >= 1, "--validation-steps must be 1 or more.")
        need(self.validation_epochs is None or self.validation_steps is None,
             "Give --validation-epochs or --validation-steps, not both.")
        need(1 <= number("sample_steps", int) <= 1000, "--sample-steps must be from 1 to 1000.")
        need(self.report_to is None or self.report_to in REPORT_TO,
             f"--report-to must be {' or '.join(REPORT_TO)}; got {self.report_to!r}.")

    @property
    def shape(self) -> LoraShape:
        return LoraShape(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets), use_dora=self.use_dora)

    @property
    def text_encoder_shape(self) -> LoraShape:
        return LoraShape(rank=self.rank, alpha=self.alpha, targets=tuple(self.text_encoder_targets),
                         use_dora=self.use_dora)

    @property
    def text_lr(self) -> float:
        """The text encoder's learning rate (LoRA or new tokens): its own, except with Prodigy (the post's rule)."""
        if self.optimizer == "prodigy" or self.text_encoder_lr is None:
            return self.learning_rate
        return self.text_encoder_lr

    def trajectory(self, data_digest: str) -> dict:
        """What a checkpoint must agree on to be resumed: everything but length and bookkeeping."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in BOOKKEEPING}
        values["data_hash"] = data_digest
        return json.loads(json.dumps(values, sort_keys=True))

    def trajectory_hash(self, data_digest: str) -> str:
        return hashlib.sha256(json.dumps(self.trajectory(data_digest), sort_keys=True).encode()).hexdigest()[:16]


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
    trainables: object | None = None  # what was trained (`Trainables`), still attached to the pipeline
    embedding_path: Path | None = None  # the new tokens' embedding file (pivotal tuning)
    validation_grid: Path | None = None
