"""The one-command GPU check: whoever has a CUDA GPU runs this first.

    python benchmarks/gpu_check.py                          # within 8 minutes (--budget 480) on an H100 / H200
    python benchmarks/gpu_check.py --budget 300 --out DIR   # a shorter budget; every result written into DIR
    python benchmarks/gpu_check.py --quick                  # the CUDA tests and the SD 1.5 benchmark only
    python benchmarks/gpu_check.py --dry-run                # on a CPU: the same steps on the tiny model

It runs, each in its own process, in order of what it is worth:
1. the test suite's CUDA-marked tests (`pytest -m cuda`: fp16/bf16 morphs with exact fp32 ends, the GPU against
   the CPU with the attention store on the device, LoRA fitting in half precision);
2. the full-size SD 1.5 benchmark at 512 px in bf16 at DiffMorpher's settings (`bench_morph.py --size sd15 --dtype
   bf16`: morphkit's plain morph, its default morph with the peak GPU memory of each stage, and the reference in
   fp32, the issue's headline ratio);
3. full-size SDXL at 1024 px in bf16, morphkit's default morph alone, at 25 steps and 100 LoRA steps (SDXL at
   DiffMorpher's full settings does not fit the budget beside the rest).

The parts share `--budget` seconds, in order: each gets its own limit or what is left of the budget, whichever is
less, and a part that would get less than its minimum is skipped, said so. After every part it writes
benchmarks/results/gpu-check.json and .md (device, versions, each part's status, time and output tail, and the
benchmark tables), so a run stopped from outside keeps what finished; the benchmarks write their own rows as they
go. benchmarks/results/summary.json gets `gpu_sd15_512_seconds`. `--out DIR` writes all of it (at most 7 files,
summary.json among them) into DIR instead: on a lent machine, the folder that comes back.

On a machine lent through this workplace's `device` tool, diffusers is missing from the image: see "The GPU check"
in benchmarks/README.md (`benchmarks/gpu_wheels.sh` first, here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from machine import describe, machine_line  # noqa: E402

DEFAULTS_ROW = "morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph"


def parts(results: Path, dry_run: bool, quick: bool) -> list[tuple[str, list[str], int, int, str | None]]:
    """(name, command, most seconds, least seconds worth starting, the result stem it writes)."""
    bench = [sys.executable, "benchmarks/bench_morph.py", "--out", str(results)]
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]
    if dry_run:  # the same steps on the tiny model on the CPU, in seconds: checks this script, not the GPU
        small = ["--size", "tiny", "--device", "cpu", "--threads", "1", "--frames", "3", "--steps", "4",
                 "--lora-steps", "2", "--no-stages"]
        chosen = [("cuda tests", tests, 240, 20, None),
                  ("sd15 512 bf16", bench + small + ["--dtype", "fp32", "--reference", "fp32"], 120, 10, "tiny-cpu-fp32"),
                  ("sdxl 1024 bf16", bench + small + ["--defaults-only", "--no-reference"], 120, 10, "tiny-cpu")]
    else:
        chosen = [("cuda tests", tests, 150, 30, None),
                  ("sd15 512 bf16", bench + ["--size", "sd15", "--dtype", "bf16", "--no-stages", "--reference",
                                             "fp32"], 300, 90, "sd15-cuda-bf16"),
                  ("sdxl 1024 bf16", bench + ["--size", "sdxl", "--dtype", "bf16", "--defaults-only", "--no-reference",
                                              "--steps", "25", "--lora-steps", "100"], 240, 90, "sdxl-cuda-bf16")]
    return chosen[:2] if quick else chosen


def run_part(name: str, command: list[str], limit: float, env: dict) -> dict:
    """One part in its own process, stopped at `limit` seconds; its status, time and the end of its output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"stopped at its limit of {round(limit)} s"
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    seconds = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {status} in {seconds} s", flush=True)
    return {"name": name, "command": " ".join(command[1:]), "status": status, "seconds": seconds,
            "limit_s": round(limit), "output_tail": output[-4000:]}


def read_table(path: Path) -> dict | None:
    """A benchmark's result file, or None where there is none (or a cut-off one: the part was stopped mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_report(report: dict, results: Path, stems: list[str], dry_run: bool) -> None:
    """gpu-check.json / .md, and the summary's GPU figure (not in a dry run), into `results`."""
    tables = {stem: table for stem in stems if (table := read_table(results / f"{stem}.json")) is not None}
    report["benchmarks"] = tables
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# GPU check" + (" (dry run on the CPU, tiny model)" if dry_run else ""), "", machine_line(report), "",
             "| part | status | seconds | limit s |", "|---|---|---:|---:|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p.get('limit_s', '')} |" for p in report["parts"]]
    for stem, table in tables.items():
        lines += ["", f"## {stem}", "", f"Settings {json.dumps(table.get('settings', {}))}", "",
                  "| stage | seconds | peak GPU GiB |", "|---|---:|---:|"]
        memory = table.get("peak_gpu_memory_gib")
        memory = memory if isinstance(memory, dict) else {}
        lines += [f"| {stage} | {seconds} | {memory.get(stage, '')} |" for stage, seconds in table["seconds"].items()]
    (results / "gpu-check.md").write_text("\n".join(lines) + "\n")
    sd15 = tables.get("sd15-cuda-bf16", {}).get("seconds", {})
    if not dry_run and DEFAULTS_ROW in sd15:
        summary_path = results / "summary.json"
        summary = read_table(summary_path) or read_table(RESULTS / "summary.json") or {}
        summary["gpu_sd15_512_seconds"] = sd15[DEFAULTS_ROW]
        summary["gpu_sd15_512_device"] = report.get("gpu")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480, help="Seconds for all parts together (default 480).")
    parser.add_argument("--quick", action="store_true", help="Only the CUDA tests and the SD 1.5 benchmark.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Write every result into this folder instead of benchmarks/results (on a lent machine: "
                             "$OUT, so that what a part measured comes back even if the call is stopped).")
    parser.add_argument("--dry-run", action="store_true",
                        help="Without a GPU: the same steps on the tiny model on the CPU, results in --out (or a "
                             "temporary folder), to check this script before a GPU session spends its time on it.")
    args = parser.parse_args()
    start = time.perf_counter()
    report = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]), **describe()}
    if "gpu" not in report and not args.dry_run:
        sys.exit("gpu_check: no CUDA device here. It is for machines with one; on the CPU run the test suite and "
                 "benchmarks/bench_summary.py (or this script with --dry-run, to check it).")
    results = (args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.dry_run else RESULTS)).resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    if args.dry_run:
        env["MORPHKIT_CUDA_TESTS_DEVICE"] = "cpu"
    chosen = parts(results, args.dry_run, args.quick)
    report["budget_s"], report["parts"] = args.budget, []
    stems = [stem for *_, stem in chosen if stem]
    for name, command, most, least, stem in chosen:
        for old in ([results / f"{stem}.json", results / f"{stem}.md"] if stem else []):
            old.unlink(missing_ok=True)  # an earlier run's table must not pass for this one's
        limit = min(most, args.budget - (time.perf_counter() - start))  # earlier parts are worth more
        if limit < least:
            report["parts"].append({"name": name, "command": " ".join(command[1:]), "seconds": 0,
                                    "status": f"skipped: {max(0, round(limit))} s of the budget left, it needs {least}"})
            print(f"[gpu_check] {name}: {report['parts'][-1]['status']}", flush=True)
        else:
            report["parts"].append(run_part(name, command, limit, env))
        write_report(report, results, stems, args.dry_run)
    print((results / "gpu-check.md").read_text())
    sys.exit(0 if all(p["status"] == "passed" for p in report["parts"]) else 1)


if __name__ == "__main__":
    main()
