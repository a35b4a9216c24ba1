"""Even pacing measured on a cheap probe pass against pacing measured on a full first pass.

    python benchmarks/bench_pacing.py        # tiny model, 64 px, the defaults (16 frames, 50 steps), 1 thread

For three pairs (the two dataset photos, and two pairs of the style images), each prepared once (LoRA fit +
exact inversion), the morph is rendered with:
- linear pacing (α evenly spaced, one pass);
- even pacing as it was: a full first pass measured, the frames whose α moved rendered again
  (`pacing_probe_steps=0`);
- even pacing from a probe pass of K coarse DDIM steps, then every frame rendered once (K = 5, 10, 20);
- a 10-step probe's pacing, then paced again on the full frames it rendered, as the full first pass is (not a
  morphkit mode: it measures whether starting near even spacing leaves few frames to render again).
Each row gives the render time, the frames rendered a second time, and the PDV (the coefficient of variation of the neighbour distances, l2) of
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
    (f"even, {k}-step probe", dict(pacing_probe_steps=k)) for k in (5, 10, 20)] + [
    ("even, 10-step probe, then paced again on its full frames", dict(pacing_probe_steps=10, refine=True))]


def probe_then_pace(prepared, settings):
    """A probe's pacing, then `pace` on the full frames it rendered (the frames whose α moves by more than the
    tolerance rendered again): does starting near even spacing leave few frames to move? (Not a morphkit mode.)"""
    from morphkit.metrics import get_distance
    from morphkit.morph.attention import AttentionStore, attention_steps
    from morphkit.morph.job import pace, probe_pace

    distance = get_distance("l2", torch.device("cpu"))
    store = AttentionStore(attention_steps(settings.attn_lambda, settings.steps), keep=True)
    try:
        return pace(prepared, probe_pace(prepared, settings, distance, store), settings, distance, store)
    finally:
        store.clear()


def main():
    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    base = MorphSettings(model="tiny", prompt="a photo", formats=(), cache=False, resolution=64, distance="l2")
    rows = {name: {"seconds": [], "pdv": [], "rerendered": []} for name, _ in CASES}
    for a, b in PAIRS:
        prepared = prepare_pair(a, b, base, pipe=pipe, progress=False)
        for name, changes in CASES:
            changes = dict(changes)
            refine = changes.pop("refine", False)
            settings = base.replace(**changes)
            start = time.perf_counter()
            rendered = (probe_then_pace if refine else lambda p, s: render_morph(p, s, progress=False))(
                prepared, settings)
            rows[name]["seconds"].append(time.perf_counter() - start)
            rows[name]["rerendered"].append(len(rendered.rerendered))
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
                        "rerendered": r["rerendered"],
                        "render_s_total": round(sum(r["seconds"]), 2),
                        "pdv_vs_before": [round(p / q, 3) for p, q in zip(r["pdv"], before["pdv"])]}
                 for name, r in rows.items()},
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "pacing-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Even pacing: probe pass against full first pass (tiny model, CPU, 1 thread)", "",
             machine_line(report) + f"; settings {json.dumps(report['settings'])}", "",
             "| pacing | render s (3 pairs) | frames rendered again | PDV per pair | PDV / before |",
             "|---|---:|---|---|---|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['render_s_total']} | {', '.join(map(str, r['rerendered']))} | "
                     f"{', '.join(map(str, r['pdv']))} | {', '.join(map(str, r['pdv_vs_before']))} |")
    (out / "pacing-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
