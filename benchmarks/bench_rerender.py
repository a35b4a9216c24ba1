"""What a render-only change costs after Prepare: the morph's stages timed one by one, in one process.

    python benchmarks/bench_rerender.py          # tiny model, 64 px, the defaults (16 frames, 50 steps)

Prepares the two dataset photos once (LoRA fit + exact inversion), renders the morph, then renders it again
with another λ (`attn_lambda` 0.3): the second render fits and inverts nothing. This is what the web UI's
Render button does after Prepare. Writes benchmarks/results/rerender-<device>.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from morphkit.models import load_pipeline  # noqa: E402
from morphkit.morph import MorphSettings, prepare_pair, render_morph  # noqa: E402

from machine import describe, machine_line  # noqa: E402

PHOTOS = HERE.parent / "dataset" / "photos"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main():
    pipe = load_pipeline("tiny", device=None if torch.cuda.is_available() else "cpu")
    settings = MorphSettings(model="tiny", prompt="a photo", formats=(), cache=False, resolution=64)
    images = (PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg")
    prepared, prepare_s = timed(prepare_pair, *images, settings, pipe=pipe, progress=False)
    _, render_s = timed(render_morph, prepared, settings, progress=False)
    changed = settings.replace(attn_lambda=0.3)
    assert prepared.matches(changed)
    _, rerender_s = timed(render_morph, prepared, changed, progress=False)
    rows = [("Prepare (fit + invert)", prepare_s,
             f"fit {prepared.timings['fit']:.1f} s, invert {prepared.timings['invert']:.1f} s"),
            ("Render", render_s, "16 frames, even pacing"),
            ("Render again, λ 0.6 → 0.3", rerender_s, "nothing fitted or inverted")]
    device = pipe.unet.device.type
    lines = [f"# A render-only change after Prepare (tiny, 64 px, {device}, {torch.get_num_threads()} threads)", "",
             machine_line({"command": "python benchmarks/bench_rerender.py", **describe()}), "", "| stage | seconds | |",
             "|---|---:|---|"]
    lines += [f"| {name} | {seconds:.1f} | {what} |" for name, seconds, what in rows]
    (HERE / "results" / f"rerender-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
