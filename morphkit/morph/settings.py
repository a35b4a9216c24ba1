"""`MorphSettings`: every setting of a morph, in one dataclass, validated once.

The fields fall into three groups, marked on each field, that decide what a change costs:

- **prepare**: what the prepared pair depends on (model, prompts, LoRAs, steps, guidance, seed, size, cache):
  a change means fitting or inverting again (the cache may still hold the result);
- **render**: how frames are drawn from a prepared pair (frames, λ, AdaIN, blend, pacing): a change means
  rendering again, nothing more;
- **export**: which files are written, and how.

`MorphSettings.resolve(config, **overrides)` reads a JSON or TOML file with the same keys (the CLI's option
names with `_`) and applies overrides on top, as `TrainSettings` does. Messages name the CLI options.

`loop` closes a chain of keyframes back to its first image (`--loop`); in earlier versions it was the GIF's loop count,
which is `gif_loops` (`--gif-loops`) now. A whole number given as `loop` (not true or false) is still read as
`gif_loops`, with a `FutureWarning`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..export import FORMATS
from ..images import check_resolution
from ..inversion import Inversion, check_steps
from ..lora_blend import check_blend_mode
from ..models import DEFAULT_MODEL

PACINGS = ("even", "linear")
# A morph's inversion solve is looser than `morphkit invert`'s (10 iterations, 1e-5): the corrections kept with each
# noise bring the end frames back exactly however far the solve got, so the solve only decides how much correction
# the in-between frames carry. At 3 / 1e-3 the tiny pair inverts in 100 UNet calls instead of 166, its in-between
# frames within 51.6 dB of a fully converged solve's and its ends unchanged (benchmarks/bench_corrections.py); the
# cap of 3 bounds the cost at few steps, where a step's solve converges slowest.
MORPH_INVERSION_ITERATIONS = 3
MORPH_INVERSION_TOLERANCE = 1e-3
MAX_FRAMES = 2000  # a morph holds every frame in memory; 2000 frames of 512 px are about 1.5 GB
MAX_SEED = 2**63


def _group(name: str, default=dataclasses.MISSING, **kwargs):
    if default is dataclasses.MISSING:
        return field(metadata={"group": name}, **kwargs)
    return field(default=default, metadata={"group": name}, **kwargs)


def prepare(default=dataclasses.MISSING, **kwargs):
    return _group("prepare", default, **kwargs)


def render(default=dataclasses.MISSING, **kwargs):
    return _group("render", default, **kwargs)


def export(default=dataclasses.MISSING, **kwargs):
    return _group("export", default, **kwargs)


@dataclass
class MorphSettings:
    """Every setting of a morph; a JSON or TOML `--config` file holds the same keys."""

    # the keyframes: model, prompts, LoRAs (prepare)
    model: str = prepare(DEFAULT_MODEL)
    vae: str | None = prepare(None)  # another VAE for the model (SDXL: madebyollin/sdxl-vae-fp16-fix for fp16)
    prompt: str = prepare("")
    prompt_a: str | None = prepare(None)
    prompt_b: str | None = prepare(None)
    prompt_for: tuple[str, ...] | None = prepare(None)  # one prompt per keyframe, in order (--prompt-for, repeated)
    negative_prompt: str = prepare("")
    embeddings: tuple[str, ...] | None = prepare(None)  # textual-inversion files whose tokens prompts may use
    guidance: float = prepare(1.0)
    steps: int = prepare(50)
    seed: int = prepare(0)
    resolution: int | None = prepare(None)
    lora_a: str | None = prepare(None)
    lora_b: str | None = prepare(None)
    lora_rank: int = prepare(16)
    lora_steps: int = prepare(200)
    lora_lr: float = prepare(2e-4)
    fit_together: bool = prepare(True)
    tuning_free: bool = prepare(False)  # no LoRA at all: the base model, with exact inversion keeping the ends
    inversion: str = prepare("fixed-point")
    inversion_iterations: int = prepare(MORPH_INVERSION_ITERATIONS)
    inversion_tolerance: float = prepare(MORPH_INVERSION_TOLERANCE)
    fp32_ends: bool = prepare(True)  # inversion and end frames in fp32 when the model runs in fp16 / bf16
    cache: bool = prepare(True)
    cache_dir: str | None = prepare(None)
    device: str | None = prepare(None)
    dtype: str | None = prepare(None)
    allow_pickle: bool = prepare(False)
    # the frames (render)
    frames: int = render(16)
    batch_size: int | None = render(None)  # frames per UNet call; None: `frames_per_call` chooses by device
    attn_lambda: float = render(0.6)
    adain: bool = render(True)
    lora_blend: str = render("adapters")
    pacing: str = render("even")
    distance: str = render("auto")
    pacing_tolerance: float = render(0.05)
    pacing_probe_steps: int = render(0)  # > 0: even pacing measures a quick pass of this many steps (0: a full one)
    compile_unet: bool = render(False)
    loop: bool = render(False)  # a chain closes back to its first keyframe
    # the files (export)
    output_dir: str | None = export(None)
    formats: tuple[str, ...] = export(FORMATS)
    fps: float = export(10.0)
    frame_duration_ms: int | None = export(None)
    gif_loops: int = export(0)  # how often the GIF plays; 0 repeats forever
    back_and_forth: bool = export(False)
    overwrite: bool = export(False)

    def __post_init__(self):
        if isinstance(self.loop, int) and not isinstance(self.loop, bool):  # earlier versions: the GIF's loop count
            warnings.warn("The setting loop (--loop) closes a chain of keyframes now; the GIF's loop count is "
                          f"gif_loops (--gif-loops). Reading loop = {self.loop} as gif_loops = {self.loop}.",
                          FutureWarning, stacklevel=3)
            self.gif_loops, self.loop = self.loop, False

    # -----------------------------------------------------------------------------------------
    # building

    @classmethod
    def field_names(cls, group: str | None = None) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if group is None or f.metadata.get("group") == group]

    @classmethod
    def resolve(cls, config: str | os.PathLike | None = None, base: "MorphSettings | None" = None,
                **overrides) -> "MorphSettings":
        """`base` (or the defaults), then the `config` file, then every override that is not None; validated."""
        from ..config import read_config

        values = dataclasses.asdict(base) if base is not None else {}
        if config is not None:
            values.update(read_config(config, set(cls.field_names()) | {"prompts"}))
            if "prompts" in values:  # a config file's name for the keyframes' prompts (--prompt-for)
                values["prompt_for"] = values.pop("prompts")
        known = set(cls.field_names())
        if unknown := sorted(set(overrides) - known):
            raise ConfigError(f"Unknown morph settings: {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("formats"), str):
            values["formats"] = [f.strip() for f in values["formats"].split(",") if f.strip()]
        for name in ("output_dir", "cache_dir", "lora_a", "lora_b"):  # paths may come as Path objects
            if isinstance(values.get(name), os.PathLike):
                values[name] = os.fspath(values[name])
        if isinstance(values.get("embeddings"), (str, os.PathLike)):
            values["embeddings"] = [values["embeddings"]]
        if isinstance(values.get("embeddings"), (list, tuple)):
            values["embeddings"] = [os.fspath(e) if isinstance(e, os.PathLike) else e for e in values["embeddings"]]
        for name in ("formats", "prompt_for", "embeddings"):  # lists from a file or a command line, kept as tuples
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values).validate()

    def replace(self, **changes) -> "MorphSettings":
        """A copy with `changes`, validated."""
        return dataclasses.replace(self, **changes).validate()

    def group(self, name: str) -> dict:
        """The values of one group ("prepare", "render" or "export"), as a dict."""
        return {k: getattr(self, k) for k in self.field_names(name)}

    @property
    def prompts(self) -> tuple[str, str]:
        """The prompts of a two-image morph: A's and B's."""
        return tuple(self.keyframe_prompts(2))

    def keyframe_prompts(self, count: int) -> list[str]:
        """One prompt per keyframe: `prompt_for` when given (one each), else `prompt` for all (a pair: A's and B's
        from `prompt_a` / `prompt_b` where given)."""
        if self.prompt_for is not None:
            if len(self.prompt_for) != count:
                raise ConfigError(f"--prompt-for gives {len(self.prompt_for)} prompt"
                                  f"{'s' if len(self.prompt_for) != 1 else ''} for {count} images; give it once per "
                                  "image, in order (or use --prompt for all of them).")
            return list(self.prompt_for)
        if count == 2:
            return [self.prompt if self.prompt_a is None else self.prompt_a,
                    self.prompt if self.prompt_b is None else self.prompt_b]
        if self.prompt_a is not None or self.prompt_b is not None:
            raise ConfigError(f"--prompt-a and --prompt-b name the two images of a pair; for {count} keyframes give "
                              "--prompt-for once per image, in order.")
        return [self.prompt] * count

    def frames_per_call(self, device) -> int:
        """--batch-size, or by default 16 frames per UNet call on a CPU and 8 elsewhere. On a CPU a frame's cost
        keeps falling with the batch (the tiny morph renders 23 % faster at 16 than at 8: benchmarks/README.md), and
        a morph's 16 frames in one batch need no attention store; on a GPU 8 keeps SDXL's memory in bounds."""
        if self.batch_size is not None:
            return self.batch_size
        import torch

        return 16 if torch.device(device).type == "cpu" else 8

    @property
    def inversion_method(self) -> Inversion:
        return Inversion(self.inversion, self.inversion_iterations, self.inversion_tolerance)

    @property
    def frame_duration(self) -> int:
        """Milliseconds per frame of the GIF and MP4."""
        return round(1000 / self.fps) if self.frame_duration_ms is None else self.frame_duration_ms

    @property
    def paced(self) -> bool:
        return self.pacing == "even" and self.frames > 2

    # -----------------------------------------------------------------------------------------
    # checking

    def validate(self) -> "MorphSettings":
        """Check every value; raise `ConfigError` naming the CLI option. Returns self."""
        self._check_prepare()
        self._check_render()
        self._check_export()
        return self

    def _check_prepare(self):
        for name in ("model", "prompt", "negative_prompt"):
            _need(isinstance(getattr(self, name), str), f"--{_opt(name)} must be text; got {getattr(self, name)!r}.")
        for name in ("prompt_a", "prompt_b", "lora_a", "lora_b", "cache_dir", "device", "dtype"):
            value = getattr(self, name)
            _need(value is None or isinstance(value, str), f"--{_opt(name)} must be text; got {value!r}.")
        if self.prompt_for is not None:
            _need(isinstance(self.prompt_for, tuple) and all(isinstance(p, str) for p in self.prompt_for),
                  f"--prompt-for (prompts in a config file) must be texts, one per image; got {self.prompt_for!r}.")
            _need(self.prompt_a is None and self.prompt_b is None,
                  "--prompt-for gives every image its prompt; leave out --prompt-a and --prompt-b.")
        if self.embeddings is not None:
            _need(isinstance(self.embeddings, tuple) and all(isinstance(e, str) and e for e in self.embeddings),
                  f"--embedding takes embedding files (.safetensors); got {self.embeddings!r}.")
        check_steps(self.steps)
        _number(self.guidance, "guidance", low=0, low_open=True, high=100)
        _integer(self.seed, "seed", 0, MAX_SEED - 1)
        if self.resolution is not None:
            check_resolution(self.resolution)
        _integer(self.lora_rank, "lora-rank", 1, 1024)
        _integer(self.lora_steps, "lora-steps", 1, 100_000)
        _number(self.lora_lr, "lora-lr", low=0, low_open=True, high=1.0)
        self.inversion_method.check()
        _need(not (self.tuning_free and (self.lora_a or self.lora_b)),
              "--tuning-free morphs without any LoRA, but --lora-a or --lora-b gives one: choose one of the two.")
        for name in ("fit_together", "tuning_free", "fp32_ends", "cache", "allow_pickle"):
            _need(isinstance(getattr(self, name), bool), f"{name} must be true or false; got {getattr(self, name)!r}.")
        if self.cache and self.cache_dir is not None and Path(self.cache_dir).exists():
            _need(Path(self.cache_dir).is_dir(), f"The cache folder {self.cache_dir} (--cache-dir) is a file.")

    def _check_render(self):
        from ..metrics import check_distance
        from .attention import check_attn_lambda

        _need(not isinstance(self.frames, int) or isinstance(self.frames, bool) or self.frames >= 2,
              f"A morph needs at least 2 frames (--frames); got {self.frames}.")
        _integer(self.frames, "frames", 2, MAX_FRAMES)
        if self.batch_size is not None:
            _integer(self.batch_size, "batch-size", 1, 4096)
        check_attn_lambda(self.attn_lambda)
        _need(isinstance(self.adain, bool), f"adain must be true or false; got {self.adain!r}.")
        check_blend_mode(self.lora_blend)
        check_pacing(self.pacing)
        check_distance(self.distance)
        _number(self.pacing_tolerance, "pacing-tolerance", low=0, high=1.0)
        _integer(self.pacing_probe_steps, "pacing-probe-steps", 0, 1000)
        _need(isinstance(self.compile_unet, bool), f"compile_unet must be true or false; got {self.compile_unet!r}.")
        _need(isinstance(self.loop, bool), f"loop (--loop) must be true or false; got {self.loop!r}.")

    def _check_export(self):
        _need(self.output_dir is None or isinstance(self.output_dir, str),
              f"--output-dir must be a folder path; got {self.output_dir!r}.")
        _need(isinstance(self.formats, (list, tuple)), "--formats must be a list of gif, mp4 and png (in a config "
              f"file: formats = [\"gif\", \"png\"]); got {self.formats!r}.")
        if bad := [f for f in self.formats if f not in FORMATS]:
            raise ConfigError(f"Unknown output format {', '.join(map(str, bad))} in --formats; choose from "
                              f"{', '.join(FORMATS)}.")
        _number(self.fps, "fps", low=0, low_open=True, high=100,
                hint="GIF frames last at least 10 ms, so at most 100 frames per second")
        if self.frame_duration_ms is not None:
            _integer(self.frame_duration_ms, "frame-duration", 10, 60_000)
        _integer(self.gif_loops, "gif-loops", 0, 65535)
        for name in ("back_and_forth", "overwrite"):
            _need(isinstance(getattr(self, name), bool), f"{name} must be true or false; got {getattr(self, name)!r}.")


def check_pacing(pacing: str) -> str:
    if pacing not in PACINGS:
        raise ConfigError(f"Unknown pacing {pacing!r} (--pacing); choose even (consecutive frames equally far apart) "
                          "or linear (α evenly spaced).")
    return pacing


def _opt(name: str) -> str:
    return name.replace("_", "-")


def _need(condition, message: str):
    if not condition:
        raise ConfigError(message)


def _integer(value, option: str, low: int, high: int):
    _need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
          f"--{option} must be a whole number from {low} to {high}; got {value!r}.")


def _number(value, option: str, low: float, high: float, low_open: bool = False, hint: str = ""):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    bound = f"above {low}" if low_open else f"from {low}"
    _need(ok, f"--{option} must be a finite number {bound} to {high}; got {value!r}" + (f" ({hint})." if hint else "."))
