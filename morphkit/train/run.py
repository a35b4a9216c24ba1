"""`train_lora`, what `morphkit train` runs: settings, files, checkpoints, resume, and the processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

from .. import __version__
from ..data import data_hash, load_examples
from ..errors import ConfigError, InputError, OutputExistsError
from ..images import fit_size
from ..io import atomic_write, check_room, check_writable, sweep_stale, write_json
from ..lora import adapter_metadata, check_targets, lora_state_dict, save_lora
from ..lora_files import DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, tag_frequency
from ..models import load_pipeline, resolve_device
from ..processes import Processes
from .checkpoints import list_checkpoints
from .encoding import encode_examples
from .loop import fit_lora
from .optim import _precision
from .parallel import Share
from .settings import TrainResult, TrainSettings


def lora_files(out: Path, name: str, lora_format: str) -> dict[Path, str]:
    """The LoRA files a run writes, each with its format: kohya, diffusers, or both (two files)."""
    if lora_format not in ("kohya", "diffusers", "both"):
        raise ConfigError(f"Unknown LoRA format {lora_format!r} (--format); choose kohya, diffusers or both.")
    if lora_format == "diffusers":
        warnings.warn(DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, stacklevel=3)
    files = {out / f"{name}.safetensors": "diffusers" if lora_format == "diffusers" else "kohya"}
    if lora_format == "both":
        files[out / f"{name}.diffusers.safetensors"] = "diffusers"
    return files


def check_train_outputs(s: TrainSettings, out: Path, files: dict[Path, str], overwrite: bool, resume: bool) -> list:
    """Refuse, before the model loads and before anything is written, what would lose or mix up work; sweep
    what killed runs left behind. Returns the checkpoints found (oldest first)."""
    checkpoints = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output folder {out} is a file.")
    found = list_checkpoints(checkpoints)
    existing = [p for p in files if p.exists()]
    if existing and not overwrite and not (resume and found):  # resuming continues, then replaces it
        raise OutputExistsError(f"The LoRA {existing[0]} already exists. Pass --overwrite to replace it, or --name / "
                                "--output-dir for a new one.")
    if found and not (resume or overwrite):
        raise OutputExistsError(f"{checkpoints} holds checkpoints of an earlier run. Pass --resume to continue it, or "
                                "--overwrite to start afresh.")
    check_writable(out, "output folder", "--output-dir")
    check_room(out, s.rank * 2**20 * (len(files) + (3 * s.checkpoints_total_limit if s.checkpointing_steps else 0)),
               "the LoRA and its checkpoints")
    for folder in (out, checkpoints):  # what runs killed mid-write left behind
        sweep_stale(folder)
    return found


def lora_header(s: TrainSettings, name: str, steps: int, examples, digest: str, metadata_prompt: bool) -> dict:
    """What a trained LoRA's header records (`save_lora` writes it as kohya's `ss_*` and morphkit's own keys)."""
    return {
        "version": __version__, "base_model": s.model, "rank": s.rank, "alpha": s.shape.effective_alpha,
        "targets": ",".join(s.targets), "steps": steps, "resolution": s.resolution, "seed": s.seed,
        "data_hash": digest,
        "settings": json.dumps({k: v for k, v in dataclasses.asdict(s).items() if metadata_prompt or k != "prompt"},
                               sort_keys=True),
        "tag_frequency": tag_frequency([ex.captions for ex in examples], s.data) if metadata_prompt else None,
        "name": name, "num_images": len(examples), "learning_rate": s.learning_rate,
        "lr_scheduler": s.lr_scheduler, "noise_offset": s.noise_offset,
    }


def train_lora(
    data: str | os.PathLike | None = None,
    prompt: str | None = None,
    *,
    config: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    model: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    lora_format: str = "kohya",
    metadata_prompt: bool = True,
    pipe=None,
    progress: bool = True,
    **settings,
) -> TrainResult:
    """Fit a LoRA to one image (with `prompt`) or to a folder with `metadata.jsonl`, and save it.

    Settings are the fields of `TrainSettings`, taken from `config` (JSON or TOML) and then from
    the keyword arguments. Writes into `output_dir` (default `outputs/lora/<name>`):
    `<name>.safetensors`, `train_log.jsonl`, `train_settings.json` and `checkpoints/step-N/`.
    `lora_format` is `kohya` (the default: loads in A1111, ComfyUI, diffusers and morphkit), `diffusers`,
    or `both` (`<name>.safetensors` in kohya format and `<name>.diffusers.safetensors`). The file's header
    records the captions' tags (`ss_tag_frequency`) and the prompt unless `metadata_prompt` is False.
    Pass a loaded `pipe` to reuse it; the trained adapter is then left active in `pipe.unet`.

    Under `accelerate launch` (or torchrun) the processes train data-parallel: `batch_size` is each
    process's, gradients are averaged, and only the main process writes files.
    """
    # 1. Settings, data and the files this run will write, all checked before the model loads
    s = TrainSettings.resolve(config, data=None if data is None else str(data), prompt=prompt, model=model,
                              output_dir=None if output_dir is None else str(output_dir), name=name, **settings)
    examples = load_examples(s.data, s.prompt)
    name = s.name or Path(s.data).stem or "lora"
    out = Path(s.output_dir or Path("outputs") / "lora" / name)
    files = lora_files(out, name, lora_format)
    checkpoints, log_path = out / "checkpoints", out / "train_log.jsonl"
    found = check_train_outputs(s, out, files, overwrite, resume)
    digest = data_hash(examples)
    fingerprint = s.trajectory_hash(digest)
    if resume and found and json.loads((found[-1] / "state.json").read_text())["fingerprint"] != fingerprint:
        raise ConfigError(f"The checkpoints in {checkpoints} were made with other settings or other data than this "
                          "run. Resume with the same settings (only steps/epochs may change), or drop --resume and "
                          "pass --overwrite to start afresh.")

    with Processes() as procs:
        share = Share(procs.rank, procs.count)
        # 2. The model, and the examples encoded once
        if pipe is None:
            dev = resolve_device(procs.device or device)
            pipe = load_pipeline(s.model, device=dev, dtype=_precision(s, dev), allow_pickle=allow_pickle)
        s = settle(s, pipe, examples)
        encoded = encode_examples(pipe, examples, s.resolution, s.crop, s.random_flip)

        # 3. The run's folder (main process only), then the fit
        start = json.loads((found[-1] / "state.json").read_text())["step"] if resume and found else 0
        if share.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite and not resume:
                shutil.rmtree(checkpoints, ignore_errors=True)
            _trim_log(log_path, start)
            write_json(out / "train_settings.json",
                       {**dataclasses.asdict(s), "data_hash": digest, "processes": share.count,
                        "morphkit_version": __version__})
        with open(log_path if share.is_main else os.devnull, "a", encoding="utf-8") as log_file:
            def log(row):
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()

            result = fit_lora(pipe, encoded, s, checkpoint_dir=checkpoints, resume=resume, fingerprint=fingerprint,
                              log=log, progress=progress, share=share)

        # 4. The LoRA file(s), written by the main process
        if share.is_main:
            info = lora_header(s, name, result.steps, examples, digest, metadata_prompt)
            state, peft_config = lora_state_dict(pipe.unet), adapter_metadata(pipe.unet)
            for path, fmt in files.items():
                save_lora(path, state, peft_config, info, overwrite=True, format=fmt)
    result.lora_path, result.lora_paths, result.output_dir = next(iter(files)), list(files), out
    result.processes, result.rank = share.count, share.rank
    return result


def settle(s: TrainSettings, pipe, examples) -> TrainSettings:
    """The settings with what depends on the model filled in (resolution, crop), checked against it."""
    resolution = s.resolution or 8 * pipe.unet.config.sample_size
    s = dataclasses.replace(s, resolution=resolution, crop=s.crop or ("none" if len(examples) == 1 else "center"))
    if s.crop == "random":
        for ex in examples:
            _, final = fit_size(ex.image.width, ex.image.height, resolution)
            if min(final) < resolution:
                raise InputError(f"{ex.path} is too small for a {resolution}px random crop.")
    check_targets(pipe.unet, s.targets)
    if "default" in getattr(pipe.unet, "peft_config", {}):  # a reused pipeline: this run's adapter replaces it
        pipe.unet.delete_adapters("default")
    return s


def _trim_log(path: Path, last_step: int):
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
