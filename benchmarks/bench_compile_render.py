"""The default morph's render, eager and through torch.compile: time, graph breaks, graphs compiled.

    python benchmarks/bench_compile_render.py    # tiny model, one thread, about 3 minutes

Prepares the two photos once (16 frames, 50 steps, 200 LoRA steps: DiffMorpher's settings, morphkit's defaults:
attention interpolation, AdaIN, even pacing), then renders the morph three times from that preparation: eager;
through `torch.compile` on an empty inductor cache (the first run compiles); and compiled again (its graphs
made). Reports each render's seconds, the graph breaks and graphs dynamo made, and how far the compiled frames
are from the eager ones (PSNR). Writes benchmarks/results/compile-render-tiny-cpu.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="morphkit-inductor-")  # cold: nothing compiled yet

import torch  # noqa: E402

from machine import describe, machine_line  # noqa: E402


def main():
    from torch._dynamo.utils import counters

    from morphkit.images import to_tensor
    from morphkit.models import load_pipeline
    from morphkit.morph import MorphSettings, prepare_pair, render_morph
    from morphkit.similarity import psnr

    torch.set_num_threads(1)
    photos = REPO / "dataset" / "photos"
    settings = MorphSettings(model="tiny", prompt_a="a photo of an astronaut", prompt_b="a photo of a cat", frames=16,
                             steps=50, lora_steps=200, resolution=64, cache=False, formats=())
    pipe = load_pipeline("tiny", device="cpu")
    prepared = prepare_pair(photos / "astronaut.jpg", photos / "chelsea.jpg", settings, pipe=pipe, progress=False)
    rows, frames = {}, {}
    for label, compile_unet in (("eager", False), ("compiled, first run (compiling)", True), ("compiled, again", True)):
        counters.clear()
        start = time.perf_counter()
        rendered = render_morph(prepared, settings.replace(compile_unet=compile_unet), progress=False)
        rows[label] = {"render_s": round(time.perf_counter() - start, 2), "rerendered": len(rendered.rerendered),
                       "graph_breaks": sum(counters["graph_break"].values()),
                       "graphs": counters["stats"].get("unique_graphs", 0)}
        frames[label] = rendered.frames
        print(label, rows[label], flush=True)
    for label in rows:
        rows[label]["psnr_vs_eager_db"] = round(min(float(psnr(to_tensor(a), to_tensor(b), data_range=2.0)[0])
                                                    for a, b in zip(frames[label], frames["eager"])), 1)
    report = {"command": "python benchmarks/bench_compile_render.py", **describe(threads=1), "rows": rows}
    (HERE / "results" / "compile-render-tiny-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The default morph's render, eager and compiled (tiny, CPU, one thread)", "",
             machine_line(report) + "; 16 frames, 50 steps, defaults (attention interpolation, AdaIN, "
             "even pacing)", "",
             "| render | seconds | frames re-rendered | graph breaks | graphs | worst frame PSNR vs eager, dB |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {r['render_s']} | {r['rerendered']} | {r['graph_breaks']} | {r['graphs']} | "
              f"{r['psnr_vs_eager_db']} |" for k, r in rows.items()]
    (HERE / "results" / "compile-render-tiny-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
