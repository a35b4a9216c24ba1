"""What each of morphkit's default quality features costs, against the straightforward reference, side by side.

    python benchmarks/bench_feature_costs.py            # one thread, about 25 minutes (the SD 1.5 rows: 20)
    python benchmarks/bench_feature_costs.py --tiny-only

`bench_summary.py` compares morphkit at its defaults with `reference.reference_morph`, which does less: plain DDIM
inversion (ends not exact), linear pacing, no attention interpolation, no AdaIN. This runs, in one process on the
same pipelines and settings as bench_summary.py (the tiny model at DiffMorpher's settings; the full-size SD 1.5
architecture at 128 px with 4 frames, 4 steps, 4 LoRA steps), each a whole morph with its LoRAs fitted afresh:

- morphkit at its defaults;
- the defaults with one feature changed: linear pacing, plain DDIM inversion, or one fixed-point iteration per
  inversion step (ends still exact, by corrections);
- morphkit doing the reference's work: plain DDIM inversion, linear pacing, no attention interpolation, no AdaIN;
- the reference.

Each row has its seconds, its stages, the ratio reference / row, and the quality beside it: end PSNR (the end
frames against the inputs' VAE round trip), PPL and PDV (l2). The difference between "the reference's work" and the
reference is what morphkit's engineering buys; the rest is what the features cost. Writes
benchmarks/results/feature-costs-cpu.json and .md, after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from bench_summary import SD15_CPU, TINY, pair_images, run_morphkit, run_reference  # noqa: E402
from machine import describe, machine_line  # noqa: E402

REFERENCE_WORK = dict(inversion="ddim", pacing="linear", attn_lambda=0.0, adain=False)
ROWS = [  # (name, changes to morphkit's defaults)
    ("defaults (exact inversion 3 / 1e-3, attention interpolation, AdaIN, even pacing)", {}),
    ("defaults, linear pacing", dict(pacing="linear")),
    ("defaults, plain DDIM inversion (ends not exact)", dict(inversion="ddim")),
    ("defaults, 1 fixed-point iteration per inversion step", dict(inversion_iterations=1)),
    ("the reference's work: plain DDIM inversion, linear pacing, no attention interpolation, no AdaIN", REFERENCE_WORK),
]
RESULTS = HERE / "results"


def measure(report: dict, key: str, pipe, settings: dict, images) -> None:
    """The reference once, then every row, each written as soon as it is measured."""
    part = report.setdefault(key, {"settings": settings, "rows": []})
    run_morphkit(pipe, {**settings, "frames": 3, "steps": 2, "lora_steps": 1}, images)  # untimed: first-use costs
    part["reference"] = run_reference(pipe, settings, images)
    write(report)
    for name, changes in ROWS:
        row = {"name": name, "changes": changes, **run_morphkit(pipe, settings, images, **changes)}
        row["speedup"] = round(part["reference"]["seconds"] / row["seconds"], 3)
        part["rows"].append(row)
        write(report)


def shown(quality: dict) -> str:
    return f"{quality['end_psnr_db']} dB / {quality['ppl_l2']} / {quality['pdv_l2']}"


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = ["# What morphkit's default features cost, against the reference (CPU, one thread)", "",
             machine_line(report), ""]
    for key, part in report.items():
        if not isinstance(part, dict) or "rows" not in part:
            continue
        lines += [f"## {key}: {json.dumps(part['settings'])}", "",
                  "| morph | seconds | reference / it | fit s | invert s | render s | end PSNR / PPL / PDV |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        ref = part["reference"]
        lines.append(f"| reference (`benchmarks/reference.py`) | {ref['seconds']} | 1.0 |  |  |  | {shown(ref['quality'])} |")
        for row in part["rows"]:
            stages = row["stages_s"]
            lines.append(f"| morphkit: {row['name']} | {row['seconds']} | {row['speedup']} | {stages.get('fit', '')} | "
                         f"{stages.get('invert', '')} | {stages.get('render', '')} | {shown(row['quality'])} |")
        lines.append("")
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", "\n".join(lines))):
        path = RESULTS / f"feature-costs-cpu{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-only", action="store_true", help="Only the tiny model's rows (about 4 minutes).")
    args = parser.parse_args()
    from bench_morph import build_sd15

    from morphkit.models import load_pipeline

    torch.set_num_threads(1)
    command = "python benchmarks/bench_feature_costs.py" + (" --tiny-only" if args.tiny_only else "")
    report = {"command": command, **describe(threads=1)}
    measure(report, "tiny", load_pipeline("tiny", device="cpu"), TINY, pair_images(TINY["resolution"]))
    if not args.tiny_only:
        sd15 = build_sd15(torch.device("cpu"), torch.float32)
        measure(report, "sd15_128", sd15, SD15_CPU, pair_images(SD15_CPU["resolution"]))
    print((RESULTS / "feature-costs-cpu.md").read_text())


if __name__ == "__main__":
    main()
