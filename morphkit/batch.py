"""Batch jobs: many morphs and stylizations from one job file, the model loaded once, split across processes.

    jobs.jsonl, or a folder of image pairs ─► jobs, each with its settings (the command line's as defaults)
        ─► this process's share (`PartialState.split_between_processes` under `accelerate launch`)
        ─► each job: skipped when a record says it finished with the same settings, else run; its record is
           written as soon as it ends (`<report>.jobs/<name>.json`), so a killed run loses at most one job
        ─► every process's records gathered on the main process ─► the JSON report

A job file holds one JSON object per line, its keys the command's option names (`-` or `_`):

    {"images": ["a.jpg", "b.jpg", "c.jpg"], "frames": 24, "prompt": "a photo", "output_dir": "out/abc"}
    {"command": "stylize", "images": ["photo.jpg"], "lora": ["oil.safetensors:0.8"], "strength": 0.6}

`command` is `morph` (the default) or `stylize`; `name` names the job (default: from its images); relative
paths are relative to the job file's folder. A failing job is recorded with its message and the others run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InputError, MorphkitError, brief
from .images import IMAGE_SUFFIXES, list_images
from .io import write_json

COMMANDS = ("morph", "stylize")
STATUSES = ("done", "failed", "skipped")
JOB_KEYS = ("command", "name", "images")  # every other key is a setting of the job's command
NOT_SETTINGS = ("images", "lora", "pipe", "progress", "save")  # stylize() parameters a job line does not set
UNKEYED = ("overwrite",)  # settings that do not change a job's result: a rerun without them still skips it
PATH_SETTINGS = ("output_dir", "cache_dir", "lora_a", "lora_b")  # in a job line, relative to the job file


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    """One line of a job file: a command, its images and its settings (option names with `_`)."""

    name: str
    command: str
    images: list[str]
    options: dict = field(default_factory=dict)
    line: int | None = None  # 1-based line of the job file; None for a folder's jobs
    error: str | None = None  # why the line could not be read as a job (it is then reported, not run)

    def key(self) -> str:
        """A hash of everything the job's result depends on that a rerun can see: command, settings, and each
        image's path, size and modification time."""
        stamps = []
        for image in self.images:
            path = Path(image)
            stat = path.stat() if path.exists() else None
            stamps.append([image, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
        settings = {k: v for k, v in self.options.items() if k not in UNKEYED}
        payload = json.dumps([self.command, stamps, settings], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def command_options(command: str) -> set[str]:
    """The settings a job of `command` may have: `MorphSettings`' fields, or `stylize`'s keyword parameters."""
    if command == "morph":
        from .morph import MorphSettings

        return set(MorphSettings.field_names()) | {"prompts"}
    from .stylize import stylize

    return {n for n in inspect.signature(stylize).parameters if n not in NOT_SETTINGS} | {"lora"}


def read_jobs(source: str | os.PathLike, defaults: dict | None = None, output_root: str | os.PathLike | None = None,
              ) -> list[Job]:
    """The jobs of a job file (`.jsonl`) or a folder of image pairs, with `defaults` under each job's own settings.

    `defaults` are option values (the command line's), applied to the jobs whose command has that option;
    `output_root` is where a job without an `output_dir` writes (into `output_root/<name>`). A line that is not
    a job (bad JSON, unknown keys, no images) becomes a job with an `error`, reported without running.
    """
    source = Path(source)
    if source.is_dir():
        jobs, base = folder_jobs(source), Path.cwd()
    elif source.is_file():
        jobs, base = file_jobs(source), source.parent
    else:
        raise InputError(f"The job file {source} does not exist. Give a .jsonl file (one job per line) or a folder "
                         "of image pairs.")
    if not jobs:
        raise InputError(f"{source} holds no jobs.")
    unique_names(jobs)
    root = Path(output_root) if output_root is not None else Path("outputs") / "batch"
    for job in jobs:
        if job.error is None:
            try:
                finish_job(job, defaults or {}, base, root)
                check_job(job)
            except MorphkitError as e:
                job.error = str(e)
            except Exception as e:  # a check that did not expect this value: the job fails, the batch goes on
                job.error = f"Unexpected {type(e).__name__}: {brief(e, 300)}"
    return jobs


def check_job(job: Job):
    """Everything of a job that can be checked before its model loads: its settings, its images, its LoRA files.
    Returns a morph's `MorphSettings` (None for a stylization)."""
    settings = check_settings_of(job.command, job.options)
    if job.command == "morph":
        from .morph.pair import check_keyframes

        check_keyframes(job.images, settings)
    else:
        from .stylize import check_lora_files

        check_lora_files(job.options.get("lora", []), job.options.get("allow_pickle", False))
    return settings


STYLIZE_CHECKED = (("strength", 0.5), ("guidance", 7.5), ("controlnet_scale", 0.5), ("steps", 50), ("lora_scale", 1.0),
                   ("seed", 0), ("canny_low", None), ("canny_high", None), ("resolution", None))


def check_settings_of(command: str, options: dict):
    """`options` checked as `command`'s settings (the `MorphSettings` of a morph; `stylize`'s own checks)."""
    if command == "morph":
        from .morph import MorphSettings

        return MorphSettings.resolve(None, **options)
    from .stylize import check_settings

    check_settings(*(options.get(k, d) for k, d in STYLIZE_CHECKED))
    return None


def file_jobs(path: Path) -> list[Job]:
    """One job per non-empty line of a JSON-lines file (lines starting with `#` are comments)."""
    jobs = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise ValueError("a job is a JSON object, {...}")
            jobs.append(job_from_dict(values, number))
        except json.JSONDecodeError as e:
            jobs.append(Job(f"line-{number}", "morph", [], line=number,
                            error=f"Line {number} of {path.name} is not valid JSON ({e.msg}, at column {e.colno}). "
                                  'Each line is one job, a JSON object such as {"images": ["a.jpg", "b.jpg"]}.'))
        except (ValueError, MorphkitError) as e:
            jobs.append(Job(f"line-{number}", "morph", [], line=number,
                            error=f"Line {number} of {path.name} is not a job: {e}"))
    return jobs


def job_from_dict(values: dict, line: int | None = None) -> Job:
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    command = values.pop("command", "morph")
    if command not in COMMANDS:
        raise ConfigError(f"command must be morph or stylize; got {command!r}")
    images = values.pop("images", None)
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise ConfigError('"images" must list the image files, e.g. "images": ["a.jpg", "b.jpg"]')
    if command == "morph" and len(images) < 2:
        raise ConfigError(f"a morph needs two or more images; got {len(images)}")
    if unknown := sorted(set(values) - command_options(command) - {"name"}):
        raise ConfigError(f"unknown {command} settings: {', '.join(unknown)}")
    name = values.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f'"name" must be text; got {name!r}')
    return Job(name or default_name(command, images), command, images, values, line)


def folder_jobs(folder: Path) -> list[Job]:
    """A folder of image pairs: each subfolder with two or more images is a morph of them (a chain, in name order);
    images directly in the folder are paired in name order (a_1.jpg with a_2.jpg, b_1.jpg with b_2.jpg, ...)."""
    jobs = [Job(sub.name, "morph", [str(p) for p in list_images(sub)]) for sub in sorted(folder.iterdir())
            if sub.is_dir() and len(list_images(sub)) >= 2]
    loose = list_images(folder)
    if len(loose) % 2:
        raise InputError(f"{folder} holds {len(loose)} images directly inside, an odd number: they are morphed in "
                         f"pairs, in name order. Add the missing partner or move {loose[-1].name} out.")
    for a, b in zip(loose[::2], loose[1::2]):
        jobs.append(Job(f"{a.stem}-{b.stem}", "morph", [str(a), str(b)]))
    if not jobs:
        raise InputError(f"{folder} holds no image pairs: put pairs of images in it (paired in name order), or "
                         f"subfolders of two or more images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return jobs


def default_name(command: str, images: list[str]) -> str:
    stems = [Path(i).stem or Path(i).name for i in images]
    return "-".join(stems[:4]) + (f"-and-{len(stems) - 4}-more" if len(stems) > 4 else "")


def unique_names(jobs: list[Job]) -> None:
    """Names safe as file names and unique in the batch (a repeated name gets -2, -3, ... in file order)."""
    seen: dict[str, int] = {}
    for job in jobs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", job.name).strip("._") or "job"
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen[name] = 1
        job.name = name


def finish_job(job: Job, defaults: dict, base: Path, root: Path) -> None:
    """Resolve the job line's paths against `base` (the job file's folder), put `defaults` under its settings,
    and give it an output folder (`root/<name>`) unless it names one."""
    own = dict(job.options)
    if "prompts" in own:  # the config file's name for --prompt-for
        own["prompt_for"] = own.pop("prompts")
    for name in PATH_SETTINGS:
        if isinstance(own.get(name), str):
            own[name] = str(resolve(base, own[name]))
    if "lora" in own:
        own["lora"] = [lora_spec(base, spec) for spec in ([own["lora"]] if isinstance(own["lora"], str) else own["lora"])]
    known = command_options(job.command)
    job.images = [str(resolve(base, i)) for i in job.images]
    job.options = {**{k: v for k, v in defaults.items() if k in known and v is not None}, **own}
    job.options.setdefault("output_dir", str(root / job.name))


def resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def lora_spec(base: Path, spec) -> str:
    """A job file's `path[:weight]` with the path made relative to the job file's folder."""
    from .lora import parse_lora_spec

    path, weight = parse_lora_spec(str(spec))
    return f"{resolve(base, str(path))}:{weight}"


# ---------------------------------------------------------------------------------------------
# records and the report


@dataclass
class JobRecord:
    """What became of one job: its status, files, stage timings, error, and the process (rank) that ran it."""

    name: str
    command: str
    status: str  # done, failed or skipped (done before, with the same settings)
    images: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    rank: int = 0
    line: int | None = None
    key: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class BatchResult:
    records: list[JobRecord]  # every job of the batch, in job-file order (on the main process; its own elsewhere)
    report: Path | None
    processes: int
    seconds: float
    rank: int = 0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status == "failed"]

    def to_dict(self) -> dict:
        return {"jobs": [r.to_dict() for r in self.records], "processes": self.processes,
                "seconds": round(self.seconds, 3), **{s: self.count(s) for s in STATUSES}}


def records_folder(report: Path) -> Path:
    """Where each job's record is written as it ends: beside the report, `.<report name>.jobs/`."""
    return report.parent / f".{report.stem}.jobs"


def previous_record(job: Job, report: Path) -> JobRecord | None:
    """The record of an earlier run of this job, when it finished with the same settings and its files are all
    still there."""
    path = records_folder(report) / f"{job.name}.json"
    try:
        record = JobRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if record.status != "done" or record.key != job.key() or not record.outputs:
        return None
    return record if all(Path(p).exists() for p in record.outputs.values()) else None


# ---------------------------------------------------------------------------------------------
# running


class Pipelines:
    """The loaded model, kept across jobs: one base pipeline at a time (a job with another model replaces it),
    and its ControlNet img2img pipelines for stylize jobs."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.key = None
        self.pipe = None
        self.controlnets: dict = {}
        self.load_seconds = 0.0  # time spent loading models since the last `take_load_seconds`

    def take_load_seconds(self) -> float:
        seconds, self.load_seconds = self.load_seconds, 0.0
        return seconds

    def base(self, model: str, device=None, dtype=None, allow_pickle: bool = False):
        from .models import load_pipeline

        key = (str(model), device or self.device, dtype, allow_pickle)
        if key != self.key:
            start = time.perf_counter()
            self.pipe = self.controlnets = None  # free the old one first
            self.pipe = load_pipeline(model, device=key[1], dtype=dtype, allow_pickle=allow_pickle)
            self.pipe.morphkit_model = str(model)  # the cache keys name the model as the command line does
            self.key, self.controlnets = key, {}
            self.load_seconds += time.perf_counter() - start
        return self.pipe

    def controlnet(self, model: str, controlnet: str | None, device=None, dtype=None, allow_pickle: bool = False):
        from .models import controlnet_for
        from .stylize import controlnet_pipeline

        pipe = self.base(model, device, dtype, allow_pickle)
        if controlnet not in self.controlnets:
            start = time.perf_counter()
            net = controlnet_for(pipe, model, controlnet, allow_pickle)
            self.controlnets[controlnet] = controlnet_pipeline(pipe, net)
            self.load_seconds += time.perf_counter() - start
        return self.controlnets[controlnet]


def run_job(job: Job, pipelines: Pipelines, rank: int = 0) -> JobRecord:
    """Run one job; every error becomes the record's message (the batch goes on)."""
    record = JobRecord(job.name, job.command, "failed", job.images, rank=rank, line=job.line, key=job.key())
    start = time.perf_counter()
    try:
        if job.error is not None:
            raise ConfigError(job.error)
        if job.command == "morph":
            record.outputs, record.timings = _run_morph(job, pipelines)
        else:
            record.outputs, record.timings, failures = _run_stylize(job, pipelines)
            if failures:
                raise InputError(" ".join(failures))
        record.status = "done"
    except MorphkitError as e:
        record.error = str(e)
    except Exception as e:  # one job's trouble (a bug, out of memory) must not lose the others
        first = brief(e, 300)
        record.error = f"Unexpected {type(e).__name__}: {first}"
    if loading := pipelines.take_load_seconds():
        record.timings = {"model load": round(loading, 3), **record.timings}
    record.seconds = round(time.perf_counter() - start, 3)
    return record


def _run_morph(job: Job, pipelines: Pipelines) -> tuple[dict, dict]:
    from .morph import morph_chain

    settings = check_job(job)  # again: an image may have changed since the jobs were read
    pipe = pipelines.base(settings.model, settings.device, settings.dtype, settings.allow_pickle)
    result = morph_chain(job.images, settings, pipe=pipe, progress=False)
    return {k: str(v) for k, v in result.paths.items()}, _rounded(result.timings)


def _run_stylize(job: Job, pipelines: Pipelines) -> tuple[dict, dict, list[str]]:
    from .models import DEFAULT_MODEL
    from .stylize import stylize

    check_job(job)  # again: a LoRA file may have changed since the jobs were read
    options = dict(job.options)
    lora = options.pop("lora", [])
    cn_pipe = pipelines.controlnet(options.get("model", DEFAULT_MODEL), options.pop("controlnet", None),
                                   options.get("device"), options.get("dtype"), options.get("allow_pickle", False))
    result = stylize(job.images, lora, pipe=cn_pipe, progress=False, **options)
    outputs = {f"{item.source.stem}.{kind}": str(path) for item in result.stylized for kind, path in item.paths.items()}
    return outputs, _rounded(result.timings), list(result.failed.values())


def _rounded(timings: dict) -> dict:
    return {k: round(v, 3) for k, v in timings.items()}


# ---------------------------------------------------------------------------------------------
# the whole batch, over one or many processes


def run_batch(source: str | os.PathLike, defaults: dict | None = None, *, output_dir: str | os.PathLike | None = None,
              report: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True) -> BatchResult:
    """Run every job of `source` (a job file or a folder of image pairs); see the module's docstring.

    `defaults`: option values for every job (the command line's); `output_dir`: where jobs without their own
    `output_dir` write (`outputs/batch/<name>` by default); `report`: the JSON report (default
    `<output_dir>/batch_report.json`). `overwrite` runs finished jobs again and replaces their files.

    Under `accelerate launch` (or torchrun) each process runs its share of the jobs, on its own device, and
    the main process writes the merged report; every process returns the merged records.
    """
    from .processes import Processes

    # 1. the jobs, read and checked before any model loads
    start = time.perf_counter()
    root = Path(output_dir) if output_dir is not None else Path("outputs") / "batch"
    report = Path(report) if report is not None else root / "batch_report.json"
    jobs = read_jobs(source, {**(defaults or {}), **({"overwrite": True} if overwrite else {})}, root)
    with Processes() as procs:
        # 2. this process's share, each job skipped when finished before, or run
        mine = procs.share(list(range(len(jobs))))
        records = run_share([jobs[i] for i in mine], report, overwrite, procs, progress)

        # 3. every process's records, in job-file order, and the report (main process only)
        gathered = procs.gather([(i, r.to_dict()) for i, r in zip(mine, records)])
        merged = [JobRecord.from_dict(d) for _, d in sorted(gathered, key=lambda item: item[0])]
        result = BatchResult(merged, report, procs.count, time.perf_counter() - start, procs.rank)
        if procs.is_main:
            write_json(report, result.to_dict())
    return result


def run_share(jobs: list[Job], report: Path, overwrite: bool, procs, progress: bool) -> list[JobRecord]:
    """Run `jobs` in this process, writing each record as soon as its job ends. Jobs that share a model run
    one after the other, so that it loads once."""
    from .progress import tqdm

    pipelines = Pipelines(procs.device)
    by_model = sorted(range(len(jobs)), key=lambda i: str(jobs[i].options.get("model", "")))
    records: list[JobRecord | None] = [None] * len(jobs)
    desc = "jobs" if procs.count == 1 else f"jobs (process {procs.rank + 1} of {procs.count})"
    for i in tqdm(by_model, desc=desc, unit="job", disable=not progress, position=procs.rank):
        job = jobs[i]
        earlier = None if overwrite else previous_record(job, report)
        if earlier is not None:
            records[i] = dataclasses.replace(earlier, status="skipped", rank=procs.rank, line=job.line, seconds=0.0)
            continue
        records[i] = run_job(job, pipelines, procs.rank)
        write_json(records_folder(report) / f"{job.name}.json", records[i].to_dict())
    return records
