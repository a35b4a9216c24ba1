"""The per-image LoRA fit, the largest stage: LoRA steps against learning rate, by time and by the morph's quality.

    python benchmarks/bench_lora_fit.py                       # tiny model, 64 px, one thread, about 4 minutes
    python benchmarks/bench_lora_fit.py --model PATH --resolution 512 --device cuda   # real weights, on a GPU

Morphs the two dataset photos (16 frames, 50 steps, morphkit's defaults otherwise) with each of LoRA steps
50, 100, 200 (DiffMorpher's) at learning rates 2e-4 (DiffMorpher's), 5e-4 and 1e-3, nothing cached, and reports
the fit's seconds beside the morph's end fidelity (PSNR of the end frames against the inputs' VAE round trip),
PPL and PDV (l2 distance, as `bench_summary.py` measures them). Writes benchmarks/results/lora-fit-<model>-<device>.*

Read the tiny model's rows for the cost and for what the measure can see: its weights are random, so a LoRA that
fits it faster says little about SD 1.5. Whether fewer steps keep the quality is for real weights to show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from machine import describe, machine_line  # noqa: E402

GRID = [(steps, lr) for steps in (50, 100, 200) for lr in (2e-4, 5e-4, 1e-3)]


def main():
    import morphkit
    from bench_summary import PHOTOS, PROMPTS, pair_images, quality
    from morphkit.models import load_pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    pipe = load_pipeline(args.model, device=args.device)
    images = pair_images(args.resolution)
    rows = []
    for steps, lr in GRID:
        for name in ("img0", "img1"):
            if name in getattr(pipe.unet, "peft_config", {}):
                pipe.unet.delete_adapters(name)
        start = time.perf_counter()
        result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, prompt_a=PROMPTS[0],
                                prompt_b=PROMPTS[1], formats=(), cache=False, progress=False, frames=16, steps=50,
                                lora_steps=steps, lora_lr=lr, resolution=args.resolution)
        seconds = time.perf_counter() - start
        rows.append({"lora_steps": steps, "lora_lr": lr, "fit_s": round(result.timings["fit"], 2),
                     "morph_s": round(seconds, 2), **quality(result.frames, pipe, images)})
        print(rows[-1], flush=True)
    label = f"{Path(args.model).name}-{args.device}"
    report = {"command": "python benchmarks/bench_lora_fit.py" + (f" --model {args.model}" if args.model != "tiny" else ""),
              **describe(), "resolution": args.resolution, "rows": rows}
    out = HERE / "results"
    (out / f"lora-fit-{label}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# LoRA fit: steps against learning rate ({label})", "", machine_line(report) + "; "
             f"{args.resolution} px, 16 frames, 50 steps, morphkit's defaults otherwise.", "",
             "| LoRA steps | lr | fit s | morph s | end PSNR dB | PPL (l2) | PDV (l2) |", "|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['lora_steps']} | {r['lora_lr']:g} | {r['fit_s']} | {r['morph_s']} | {r['end_psnr_db']} | "
                     f"{r['ppl_l2']} | {r['pdv_l2']} |")
    (out / f"lora-fit-{label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
