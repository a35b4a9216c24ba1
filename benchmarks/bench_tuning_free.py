"""A tuning-free morph (no LoRA) against the default morph, side by side: time, PPL, PDV and end fidelity.

    python benchmarks/bench_tuning_free.py            # tiny model, 64 px, the defaults (16 frames, 50 steps)

Both morph the same two photos from dataset/photos with exact (fixed-point) inversion and no cache. End
fidelity is the PSNR of the end frames against the VAE's own round trip of each input (the best a
latent-diffusion morph can do; the latent error itself is tested in tests/test_exact_ends.py). PPL and
PDV use the l2 distance (no LPIPS weights here). Writes benchmarks/results/tuning-free-<device>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from morphkit.images import to_tensor  # noqa: E402
from morphkit.inversion import image_psnr  # noqa: E402
from morphkit.metrics import evaluate  # noqa: E402
from morphkit.models import decode_latents, load_pipeline  # noqa: E402
from morphkit.morph import MorphSettings, prepare_pair, render_morph  # noqa: E402

from machine import describe, machine_line  # noqa: E402

PHOTOS = HERE.parent / "dataset" / "photos"


def run(mode: str, pipe, settings: MorphSettings, images) -> dict:
    start = time.perf_counter()
    prepared = prepare_pair(*images, settings, pipe=pipe, progress=False)
    rendered = render_morph(prepared, settings, progress=False)
    seconds = time.perf_counter() - start
    metrics = evaluate(rendered.frames, *prepared.images, distance="l2")
    round_trips = [decode_latents(pipe, z) for z in prepared.latents]
    return {
        "mode": mode, "seconds": round(seconds, 2), "fit_seconds": round(prepared.timings.get("fit", 0.0), 2),
        "ppl": metrics.ppl, "pdv": metrics.pdv,
        "end_psnr_vs_vae_round_trip": [image_psnr(to_tensor(rendered.frames[i]), rt)
                                       for i, rt in zip((0, -1), round_trips)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu" if not torch.cuda.is_available() else None)
    images = (PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg")
    base = MorphSettings(model=args.model, prompt="a photo", resolution=args.resolution, formats=(), cache=False)
    rows = [run("default (LoRA per image)", pipe, base, images),
            run("tuning-free (--tuning-free)", pipe, base.replace(tuning_free=True), images)]
    device = str(pipe.unet.device)
    out = HERE / "results" / f"tuning-free-{pipe.unet.device.type}"
    meta = {"command": "python benchmarks/bench_tuning_free.py", "model": args.model, "resolution": args.resolution,
            "device": device, **describe()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Tuning-free against default morph ({args.model}, {args.resolution} px, {device})", "",
             machine_line(meta) + ". Defaults: 16 frames, 50 steps, even "
             "pacing, fixed-point inversion; PPL/PDV by l2.", "",
             "| mode | time (s) | of which LoRA fit (s) | PPL | PDV | end PSNR vs VAE round trip, A and B (dB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seconds']:.1f} | {r['fit_seconds']:.1f} | {r['ppl']:.4f} | {r['pdv']:.3g} | "
                     + ", ".join(f"{p:.1f}" for p in r["end_psnr_vs_vae_round_trip"]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
