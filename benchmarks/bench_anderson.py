"""Fixed-point inversion with and without Anderson acceleration: UNet calls and round-trip error.

    python benchmarks/bench_anderson.py    # tiny model, 64 px, one thread, about a minute

Inverts the two dataset photos (B framed to A's 64x64) under their prompts at 4, 8, 25 and 50 steps with the
default solve (at most 1 + 10 calls per step, tolerance 1e-5), once with plain fixed-point iteration (history 0)
and once with Anderson acceleration over the last 3 iterates (the default), each started from the plain DDIM
guess made with the step before's eps. Samples the noise back with DDIM and reports the relative latent error
||z0' - z0|| / ||z0|| (the larger of the two photos') and the UNet calls of the inversion (batch of two).
Writes benchmarks/results/anderson-tiny-cpu.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_summary import PROMPTS, pair_images  # noqa: E402
from machine import describe, machine_line  # noqa: E402


def main():
    from morphkit.families import PromptEmbeds
    from morphkit.inversion import Inversion, counted, ddim_schedule, eps_model, invert_latents, sample_ddim
    from morphkit.models import encode_conditioning, encode_image, load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    images = pair_images(64)
    latents = torch.cat([encode_image(pipe, img) for img in images])
    embeds = PromptEmbeds.cat([encode_conditioning(pipe, p, (64, 64)) for p in PROMPTS])
    model = eps_model(pipe.unet, embeds)
    rows = []
    for steps in (4, 8, 25, 50):
        schedule = ddim_schedule(pipe.scheduler.config, steps)
        for history in (0, 3):
            counting, calls = counted(model)
            start = time.perf_counter()
            noise = invert_latents(counting, latents, schedule, Inversion(history=history))
            seconds = time.perf_counter() - start
            back = sample_ddim(model, noise, schedule)
            errors = ((back - latents).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)).tolist()
            rows.append({"steps": steps, "history": history, "calls": calls[0], "seconds": round(seconds, 2),
                         "error": max(errors)})
            print(rows[-1], flush=True)
    report = {"command": "python benchmarks/bench_anderson.py", **describe(threads=1), "rows": rows}
    out = HERE / "results"
    (out / "anderson-tiny-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Fixed-point inversion: plain iteration against Anderson acceleration (tiny, CPU, one thread)", "",
             machine_line(report) + "; the two photos in one batch, at most 1 + 10 "
             "calls per step, tolerance 1e-5.", "",
             "| steps | plain: calls | plain: error | Anderson (3): calls | Anderson (3): error |", "|---:|---:|---:|---:|---:|"]
    for plain, accelerated in zip(rows[::2], rows[1::2]):
        lines.append(f"| {plain['steps']} | {plain['calls']} | {plain['error']:.1e} | {accelerated['calls']} | "
                     f"{accelerated['error']:.1e} |")
    (out / "anderson-tiny-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
