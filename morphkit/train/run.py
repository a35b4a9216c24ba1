"""`train_lora`, what `morphkit train` runs: settings, data, files, checkpoints, resume, and the processes.

A run reads top to bottom:
1. settings, data and the files it will write, all checked before the model loads;
2. the processes (data-parallel under accelerate) and the model;
3. class images for prior preservation (generated where missing, by the main process);
4. the examples encoded once (latents; embeddings too unless the text encoder trains);
5. the fit (`loop.fit_lora`), with logs, validation images and checkpoints;
6. the files: the LoRA (UNet, and text-encoder parts when trained), the new tokens' embedding file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..data import data_hash, load_class_images, load_examples
from ..embeddings import save_embedding
from ..errors import ConfigError, InputError, OutputExistsError
from ..families import family_of
from ..images import fit_size
from ..io import check_room, check_writable, sweep_stale, write_json
from ..lora import check_targets, remove_adapters, save_lora
from ..lora_files import DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, tag_frequency
from ..models import load_pipeline, resolve_device
from ..processes import Processes
from .checkpoints import list_checkpoints, read_state, refuse_other_run
from .encoding import encode_examples
from .logs import TrainLog, check_tensorboard, trim_log
from .loop import Extras, fit_lora
from .optim import _precision
from .parallel import Share
from .prior import class_examples, class_images
from .settings import TrainResult, TrainSettings
from .text import check_abstraction, new_token_names, with_tokens
from .trainables import Trainables

PRIVATE_SETTINGS = ("prompt", "instance_prompt", "class_prompt", "validation_prompt")


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
        "settings": json.dumps({k: v for k, v in dataclasses.asdict(s).items()
                                if metadata_prompt or k not in PRIVATE_SETTINGS}, sort_keys=True),
        "tag_frequency": tag_frequency([ex.captions for ex in examples], s.data) if metadata_prompt else None,
        "name": name, "num_images": len(examples), "learning_rate": s.learning_rate,
        "lr_scheduler": s.lr_scheduler, "noise_offset": s.noise_offset,
    }


@dataclass
class Plan:
    """A run's settings, data and files, checked before the model loads (step 1 of `train_lora`)."""

    settings: TrainSettings
    examples: list
    name: str
    out: Path
    files: dict[Path, str]
    found: list[Path]  # the checkpoints already there, oldest first
    requested: TrainSettings | None = None  # the settings as given, before the model filled in its sizes: what
    # checkpoints record (so a resume is checked before the model loads)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def plan_run(s: TrainSettings, lora_format: str, overwrite: bool, resume: bool) -> Plan:
    examples = load_examples(s.data, s.prompt, s.caption_column, s.instance_prompt)
    check_abstraction([c for ex in examples for c in ex.captions], s)
    for ex in examples:
        ex.captions = [with_tokens(c, s) for c in ex.captions]
    name = s.name or Path(s.data).stem or "lora"
    out = Path(s.output_dir or Path("outputs") / "lora" / name)
    files = lora_files(out, name, lora_format)
    found = check_train_outputs(s, out, files, overwrite, resume)
    check_tensorboard(s.report_to)
    if s.with_prior_preservation:
        load_class_images(s.class_data_dir)  # a folder holding other files is refused now, not after loading
    return Plan(s, examples, name, out, files, found, requested=s)


def data_digest(plan: Plan, class_paths: list[Path]) -> str:
    """The hash of what is trained on: the examples, and the class images with their prompt."""
    items = [(ex.path, ex.captions) for ex in plan.examples]
    return data_hash(items + [(p, [plan.settings.class_prompt]) for p in class_paths])


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
    """Fit a LoRA to one image (with `prompt`), a folder with `metadata.jsonl`, or a folder of images with
    `instance_prompt`, and save it.

    Settings are the fields of `TrainSettings`, taken from `config` (JSON or TOML) and then from
    the keyword arguments. Writes into `output_dir` (default `outputs/lora/<name>`): `<name>.safetensors`,
    `train_log.jsonl`, `train_settings.json`, `checkpoints/step-N/`, and as asked `<name>_emb.safetensors`
    (pivotal tuning), `validation/` and `logs/` (TensorBoard). `lora_format` is `kohya` (the default: loads in
    A1111, ComfyUI, diffusers and morphkit), `diffusers`, or `both`. The header records the captions' tags
    (`ss_tag_frequency`) and the prompts unless `metadata_prompt` is False. Pass a loaded `pipe` to reuse it;
    the trained adapter is then left active in it (and new tokens in its tokenizer).

    Under `accelerate launch` (or torchrun) the processes train data-parallel: `batch_size` is each
    process's, gradients are averaged, and only the main process writes files.
    """
    # 1. Settings, data and the files this run will write, all checked before the model loads
    s = TrainSettings.resolve(config, data=None if data is None else str(data), prompt=prompt, model=model,
                              output_dir=None if output_dir is None else str(output_dir), name=name, **settings)
    plan = plan_run(s, lora_format, overwrite, resume)
    if resume and plan.found:
        check_resumable(plan, data_digest(plan, load_class_images(s.class_data_dir) if s.with_prior_preservation else []))

    with Processes() as procs:
        share = Share(procs.rank, procs.count)
        # 2. The model
        if pipe is None:
            dev = resolve_device(procs.device or device)
            pipe = load_pipeline(s.model, device=dev, dtype=_precision(s, dev), allow_pickle=allow_pickle)
        s = plan.settings = settle(s, pipe, plan.examples)

        # 3. Class images (prior preservation), generated by the main process where missing
        class_paths = []
        if s.with_prior_preservation:
            if share.is_main:
                class_images(pipe, s, progress)
            procs.wait()
            class_paths = load_class_images(s.class_data_dir)[: s.num_class_images]

        # 4. The examples, encoded once
        text_trains = s.train_text_encoder or s.train_text_encoder_ti
        encode = dict(embed=not text_trains, dropout=s.caption_dropout_rate > 0)
        encoded = encode_examples(pipe, plan.examples, s.resolution, s.crop, s.random_flip, **encode)
        classes = encode_examples(pipe, class_examples(class_paths, s), s.resolution, "center", False, embed=not text_trains)

        # 5. The fit
        digest = data_digest(plan, class_paths)
        result = fit_in_folder(pipe, plan, encoded, classes, digest, share, overwrite, resume, progress)

        # 6. The files, written by the main process
        if share.is_main:
            write_results(pipe, plan, result, digest, metadata_prompt)
        result.trainables.settle()
    result.lora_path, result.lora_paths, result.output_dir = next(iter(plan.files)), list(plan.files), plan.out
    result.processes, result.rank = share.count, share.rank
    return result


def check_resumable(plan: Plan, digest: str) -> None:
    """Before the model loads: the newest checkpoint must come from these settings and this data."""
    newest = plan.found[-1]
    refuse_other_run(newest, read_state(newest), plan.settings.trajectory_hash(digest), plan.settings.trajectory(digest))


def fit_in_folder(pipe, plan: Plan, encoded, classes, digest: str, share: Share, overwrite: bool, resume: bool,
                  progress: bool) -> TrainResult:
    """The fit, with the output folder's log, settings record, validation images and checkpoints."""
    s, out = plan.settings, plan.out
    start = read_state(plan.found[-1])["step"] if resume and plan.found else 0
    log = None
    if share.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            shutil.rmtree(plan.checkpoints, ignore_errors=True)
        trim_log(out / "train_log.jsonl", start)
        write_json(out / "train_settings.json", {**dataclasses.asdict(s), "data_hash": digest, "processes": share.count,
                                                 "morphkit_version": __version__})
        log = TrainLog(out, s.report_to)
    extras = Extras(class_examples=classes, log=log, trajectory=plan.requested.trajectory(digest),
                    validation_dir=out / "validation" if s.validation_prompt else None)
    try:
        return fit_lora(pipe, encoded, s, checkpoint_dir=plan.checkpoints, resume=resume,
                        fingerprint=plan.requested.trajectory_hash(digest), progress=progress, share=share,
                        extras=extras)
    finally:
        if log is not None:
            log.close()


def write_results(pipe, plan: Plan, result: TrainResult, digest: str, metadata_prompt: bool) -> None:
    """The LoRA file(s) and, after pivotal tuning, the embedding file `<name>_emb.safetensors`."""
    s, trainables = plan.settings, result.trainables
    info = lora_header(s, plan.name, result.steps, plan.examples, digest, metadata_prompt)
    state, peft_config = trained_lora(trainables)
    family = family_of(pipe)
    for path, fmt in plan.files.items():
        save_lora(path, state, peft_config, info, overwrite=True, format=fmt, family=family,
                  unet_config=pipe.unet.config)
    if trainables.tokens:
        vectors = {part.embedding_key: trainables.tokens[part.name].vectors.detach().float().cpu()
                   for part in trainables.parts}
        result.embedding_path = save_embedding(plan.out / f"{plan.name}_emb.safetensors", vectors, new_token_names(s),
                                               s.token_abstraction, overwrite=True)
    if s.validation_prompt:
        grid = plan.out / "validation" / "grid.png"
        result.validation_grid = grid if grid.exists() else None


def trained_lora(trainables: Trainables) -> tuple[dict, dict]:
    """The trained LoRA tensors with diffusers' part prefixes (`unet.`, `text_encoder.`, …) and their PEFT configs."""
    from peft.utils import get_peft_model_state_dict

    from ..lora_files.writing import prefixed_peft_state

    name = trainables.adapter_name
    models = [("unet", trainables.unet_model)] + [(p.name, p.encoder) for p in trainables.parts
                                                   if p.name in trainables.text_lora]
    return prefixed_peft_state({part: (get_peft_model_state_dict(model, adapter_name=name),
                                       model.peft_config[name].to_dict()) for part, model in models})


def settle(s: TrainSettings, pipe, examples) -> TrainSettings:
    """The settings with what depends on the model filled in (resolution, crop), checked against it."""
    resolution = s.resolution or 8 * pipe.unet.config.sample_size
    whole = len(examples) == 1 and not s.with_prior_preservation  # one image alone keeps its shape by default
    s = dataclasses.replace(s, resolution=resolution, crop=s.crop or ("none" if whole else "center"))
    if s.crop == "random":
        for ex in examples:
            _, final = fit_size(ex.image.width, ex.image.height, resolution)
            if min(final) < resolution:
                raise InputError(f"{ex.path} is too small for a {resolution}px random crop.")
    check_targets(pipe.unet, s.targets)
    remove_adapters(pipe.unet, ["default"])  # a reused pipeline: this run's adapter replaces it
    return s
