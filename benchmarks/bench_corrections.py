"""How far the inversion's fixed-point solve must go now that corrections keep the ends exact.

    python benchmarks/bench_corrections.py    # tiny model, 64 px, one thread, about 3 minutes

Each inversion step keeps its remaining residual as a correction that rendering adds back, so the end frames come
back exactly however loose the solve (`morphkit.inversion.invert_exact`). What the solve still decides is how much
correction the in-between frames carry (the two ends' lerped by α), so this measures, for several solves, on the
two dataset photos at DiffMorpher's settings (16 frames, 50 steps, LoRAs of 200 steps, shared by every row):

- the inversion's UNet calls (the pair in one batch) and seconds;
- the end frames' latent error against their inputs' latents, and their PSNR against the inputs' VAE round trip;
- the in-between frames against those of a fully converged solve (20 iterations, tolerance 1e-7): the lowest
  PSNR over the 14 frames (linear pacing, so that every row renders the same α);
- the size of the corrections (relative to the noise) and PPL / PDV (l2) of the frames.

Writes benchmarks/results/corrections-tiny-cpu.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from machine import describe, machine_line  # noqa: E402

PHOTOS = HERE.parent / "dataset" / "photos"
SETTINGS = dict(model="tiny", prompt_a="a photo of an astronaut", prompt_b="a photo of a cat", frames=16, steps=50,
                lora_steps=200, resolution=64, pacing="linear", formats=(), device="cpu")
CONVERGED = (20, 1e-7)
SOLVES = [(10, 1e-5), (10, 1e-4), (10, 1e-3), (3, 1e-3), (2, 0.0), (1, 0.0), (0, 0.0)]  # (iterations, tolerance)


def calls_counted(unet) -> list[int]:
    calls = [0]
    unet.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def one_solve(pipe, cache: str, iterations: int, tolerance: float, calls: list[int]) -> dict:
    from morphkit.inversion import latent_error
    from morphkit.morph import MorphSettings, prepare_pair, render_morph

    settings = MorphSettings(**SETTINGS, cache_dir=cache, inversion_iterations=iterations,
                             inversion_tolerance=tolerance).validate()
    before = calls[0]
    prepared = prepare_pair(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", settings, pipe=pipe, progress=False)
    inversion_calls = calls[0] - before  # the LoRAs come from the cache after the first row
    rendered = render_morph(prepared, settings, progress=False)
    end_latents = [rendered_end_latent(prepared, side) for side in (0, 1)]
    size = max((c.norm() / n.norm()).item() for c, n in zip(prepared.corrections, prepared.noises))
    return {"iterations": iterations, "tolerance": tolerance, "calls": inversion_calls,
            "invert_s": round(prepared.timings["invert"], 2),
            "end_latent_error": max(latent_error(e, z) for e, z in zip(end_latents, prepared.latents)),
            "corrections": size, "frames": rendered.frames}


def rendered_end_latent(prepared, side: int) -> torch.Tensor:
    from morphkit.morph.sampling import render_frames

    p = prepared
    alpha = torch.tensor([float(side)], dtype=torch.float64)
    return render_frames(p.pipe, p.noises[0], p.noises[1], p.embeds[0], p.embeds[1], alpha, p.schedule,
                         p.settings.guidance, p.negative, 8, p.adapters, corrections=p.corrections)


def main():
    from bench_summary import pair_images, quality

    from morphkit.images import to_tensor
    from morphkit.models import load_pipeline
    from morphkit.similarity import psnr

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    calls = calls_counted(pipe.unet)
    images = pair_images(64)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        reference = one_solve(pipe, cache, *CONVERGED, calls)  # fits the LoRAs (cached for every row after)
        print(f"converged solve and LoRA fit: {time.perf_counter() - start:.1f} s", flush=True)
        for iterations, tolerance in SOLVES:
            row = one_solve(pipe, cache, iterations, tolerance, calls)
            frames = row.pop("frames")
            inner = [float(psnr(to_tensor(a), to_tensor(b), data_range=2.0)[0])
                     for a, b in zip(frames[1:-1], reference["frames"][1:-1])]
            row.update(quality(frames, pipe, images), in_between_psnr_db=round(min(inner), 2))
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
    report = {"command": "python benchmarks/bench_corrections.py", **describe(threads=1),
              "settings": {k: v for k, v in SETTINGS.items() if k != "formats"}, "converged": CONVERGED, "rows": rows}
    out = HERE / "results"
    (out / "corrections-tiny-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Inversion solve against in-between fidelity, with exact ends by corrections (tiny, CPU, one thread)", "",
             machine_line(report) + "; 16 frames, 50 steps, linear pacing; "
             f"in-between frames against a solve of {CONVERGED[0]} iterations at tolerance {CONVERGED[1]:g}.", "",
             "| iterations | tolerance | UNet calls | invert s | end latent error | end PSNR dB | corrections | "
             "in-between PSNR dB (lowest) | PPL | PDV |", "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['iterations']} | {r['tolerance']:g} | {r['calls']} | {r['invert_s']} | "
                     f"{r['end_latent_error']:.1e} | {r['end_psnr_db']} | {r['corrections']:.1e} | "
                     f"{r['in_between_psnr_db']} | {r['ppl_l2']} | {r['pdv_l2']} |")
    (out / "corrections-tiny-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
