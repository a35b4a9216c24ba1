"""Even pacing measured on a cheap probe pass against pacing measured on a full first pass.

    python benchmarks/bench_pacing.py        # tiny model, 64 px, the defaults (16 frames, 50 steps), 1 thread

For three pairs (the two dataset photos, and two pairs of the style images), each prepared once (LoRA fit +
exact inversion), the morph is rendered with:
- linear pacing (α evenly spaced, one pass);
- even pacing as it was: a full first pass measured, the frames whose α moved rendered again
  (`pacing_probe_steps=0`);
- even pacing from a probe pass of K coarse DDIM steps, then every frame rendered once (K = 5, 10, 20).
Each row gives the render time and the PDV (the coefficient of variation of the neighbour distances, l2) of
the frames returned: the lower, the more even. Writes benchmarks/results/pacing-<device>.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from machine import describe, machine_line

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from morphkit.metrics import pdv  # noqa: E402
from morphkit.models import load_pipeline  # noqa: E402
from morphkit.morph import MorphSettings, prepare_pair, render_morph  # noqa: E402

DATA = HERE.parent / "dataset"
PAIRS = [(DATA / "photos" / "astronaut.jpg", DATA / "photos" / "chelsea.jpg"),
         (DATA / "style" / "red_circles.png", DATA / "style" / "blue_squares.png"),
         (DATA / "style" / "orange_sun.png", DATA / "style" / "purple_mix.png")]
CASES = [("linear", dict(pacing="linear")), ("even, full first pass (before)", dict(pacing_probe_steps=0))] + [
    (f"even, {k}-step probe", dict(pacing_probe_steps=k)) for k in (5, 10, 20)]


def main():
    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    base = MorphSettings(model="tiny", prompt="a photo", formats=(), cache=False, resolution=64, distance="l2")
    rows = {name: {"seconds": [], "pdv": []} for name, _ in CASES}
    for a, b in PAIRS:
        prepared = prepare_pair(a, b, base, pipe=pipe, progress=False)
        for name, changes in CASES:
            settings = base.replace(**changes)
            start = time.perf_counter()
            rendered = render_morph(prepared, settings, progress=False)
            rows[name]["seconds"].append(time.perf_counter() - start)
            if rendered.distances:
                rows[name]["pdv"].append(float(pdv(torch.tensor(rendered.distances))))
            else:  # linear pacing measures nothing: measure its frames the same way
                from morphkit.metrics import get_distance, images_to_tensor, neighbour_distances

                _, fn, _ = get_distance("l2", torch.device("cpu"))
                rows[name]["pdv"].append(float(pdv(neighbour_distances(images_to_tensor(rendered.frames), fn))))
    before = rows["even, full first pass (before)"]
    report = {
        "command": "python benchmarks/bench_pacing.py",
        **describe(threads=1),
        "settings": {"frames": base.frames, "steps": base.steps, "attn_lambda": base.attn_lambda, "distance": "l2",
                     "pairs": [f"{a.name} -> {b.name}" for a, b in PAIRS]},
        "rows": {name: {"render_s": [round(s, 2) for s in r["seconds"]], "pdv": [round(p, 4) for p in r["pdv"]],
                        "render_s_total": round(sum(r["seconds"]), 2),
                        "pdv_vs_before": [round(p / q, 3) for p, q in zip(r["pdv"], before["pdv"])]}
                 for name, r in rows.items()},
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "pacing-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Even pacing: probe pass against full first pass (tiny model, CPU, 1 thread)", "",
             machine_line(report) + f"; settings {json.dumps(report['settings'])}", "",
             "| pacing | render s (3 pairs) | PDV per pair | PDV / before |", "|---|---:|---|---|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['render_s_total']} | {', '.join(map(str, r['pdv']))} | "
                     f"{', '.join(map(str, r['pdv_vs_before']))} |")
    (out / "pacing-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
