"""`morphkit batch`: a thin layer over `morphkit.batch.run_batch`.

The options below are defaults for every job (each job applies those its command has: `--frames` to morphs,
`--strength` to stylizations); a job line's own keys override them. Each defaults to None, "not given".
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import DTYPE_HELP, MODEL_HELP, call


def batch(
    jobs: Path = typer.Argument(..., help=(
        "A job file: one JSON object per line, keys as the option names of its command, e.g. "
        '{"images": ["a.jpg", "b.jpg"], "frames": 24} or {"command": "stylize", "images": ["p.jpg"], '
        '"lora": ["oil.safetensors"]}; relative paths are relative to the file. Or a folder of image pairs '
        "(paired in name order), or of subfolders (one morph of each subfolder's images).")),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where jobs without their own output_dir write (<output-dir>/<job name>), and the report. [default: outputs/batch]"),
    report: Optional[Path] = typer.Option(None, "--report", help="The JSON report: each job's status, outputs, timings, error and the process that ran it. [default: <output-dir>/batch_report.json]"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON or TOML file of defaults for every job (keys as the option names); flags override it, a job's own keys override both."),
    processes: Optional[int] = typer.Option(None, "--processes", help="Split the jobs across N processes through accelerate launch (one per GPU; on a machine without one, CPU processes). Same as: accelerate launch --multi_gpu --num_processes N -m morphkit batch ..."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run finished jobs again and replace their files (otherwise a rerun skips every job that finished with the same settings)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Loaded once for all the jobs that use it."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt of every job."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt of every job."),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Frames of each morph (a chain's total)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps of every job."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance of every job."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every job."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Shorter side in pixels, a multiple of 8."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Rank of the LoRAs morphs fit."),
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="Training steps of the LoRAs morphs fit."),
    lora_lr: Optional[float] = typer.Option(None, "--lora-lr", help="Learning rate of the LoRAs morphs fit."),
    pacing: Optional[str] = typer.Option(None, "--pacing", help="even or linear, for every morph."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated: gif, mp4, png, for every morph."),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="Share fitted LoRAs and inversions across jobs and runs through the cache. [default: on]"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the cache lives."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", "-l", help="A style LoRA (PATH[:WEIGHT]) for every stylize job; repeat for several."),
    strength: Optional[float] = typer.Option(None, "--strength", help="How far stylize jobs redraw (0-1]."),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="The ControlNet-Canny of stylize jobs."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto; under accelerate, each process's own device]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help="Allow pickled .ckpt/.pt/.bin models (weights_only=True). Only for files you trust."),
):
    """Run many morphs and stylizations from one job file: the model loaded once, LoRAs and inversions shared.

    A failing job is reported and the others still run; a rerun skips the jobs that finished. Prints a table
    of the jobs and writes a JSON report; the exit status is 1 when any job failed. Under accelerate launch
    (or with --processes) the jobs are split across the processes and the report merges them all.
    """
    from cli.common import without_processes
    from morphkit.processes import launch, launched_processes

    if processes is not None and processes > 1 and launched_processes() == 1:
        raise typer.Exit(call(launch, processes, without_processes(sys.argv[1:])))
    from morphkit.batch import command_options, run_batch
    from morphkit.config import read_config

    defaults = {}
    if config is not None:
        defaults = call(read_config, config, command_options("morph") | command_options("stylize"))
    given = dict(model=model, prompt=prompt, negative_prompt=negative_prompt, frames=frames, steps=steps,
                 guidance=guidance, seed=seed, resolution=resolution, lora_rank=lora_rank, lora_steps=lora_steps,
                 lora_lr=lora_lr, pacing=pacing, formats=formats, cache=cache,
                 cache_dir=None if cache_dir is None else str(cache_dir), lora=lora or None, strength=strength,
                 controlnet=controlnet, device=device, dtype=dtype, allow_pickle=allow_pickle)
    defaults.update({k: v for k, v in given.items() if v is not None})
    result = call(run_batch, jobs, defaults, output_dir=output_dir, report=report, overwrite=overwrite,
                  progress=not quiet)
    if result.rank == 0:
        for line in summary(result):
            typer.echo(line)
    if result.failed:
        raise typer.Exit(1)


def summary(result) -> list[str]:
    """The table of jobs, then the counts and where the report is."""
    from morphkit.errors import brief

    rows = [(r.name, r.command, r.status, str(r.rank), f"{r.seconds:.1f} s",
             brief(r.error or "", 120) if r.status == "failed" else common_folder(r.outputs))
            for r in result.records]
    header = ("job", "command", "status", "rank", "time", "outputs / error")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in [header, *rows]]
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("done", "skipped", "failed"))
    jobs = len(result.records)
    lines.append(f"{jobs} job{'s' if jobs != 1 else ''} in {result.seconds:.1f} s over {result.processes} "
                 f"process{'es' if result.processes > 1 else ''}: {counts}. Report: {result.report}")
    return lines


def common_folder(outputs: dict) -> str:
    paths = [Path(p) for p in outputs.values()]
    if not paths:
        return ""
    folders = {p.parent for p in paths}
    return str(folders.pop()) if len(folders) == 1 else ", ".join(str(p) for p in paths)
