"""bf16 on a CPU that computes it natively (AMX or AVX512-BF16) against fp32: time and quality of a whole morph.

    python benchmarks/bench_cpu_bf16.py        # 1 thread; about 10 minutes

For the tiny model at DiffMorpher's settings (16 frames, 50 steps, 2 x 200 LoRA steps) and for the full-size SD
1.5 architecture (random weights) at 128 px with reduced settings (4 frames, 4 steps, 4 LoRA steps), morphkit's
default morph runs with the pipeline in fp32 and in bf16. In bf16 the LoRA fit and the in-between frames run in
bf16, the inversion and the end frames in fp32 (`fp32_ends`). Quality beside the times (tiny model only: random
full-size weights draw noise): each end frame's PSNR against its input's VAE round trip, PPL and PDV (l2).
Writes benchmarks/results/cpu-bf16.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench_summary import PHOTOS, PROMPTS, SD15_CPU, TINY, quality  # noqa: E402
from machine import describe, machine_line  # noqa: E402


def run(pipe, settings, images, measure_quality: bool) -> dict:
    import morphkit

    start = time.perf_counter()
    result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, prompt_a=PROMPTS[0],
                            prompt_b=PROMPTS[1], formats=(), cache=False, progress=False, **settings)
    seconds = time.perf_counter() - start
    for name in ("img0", "img1"):
        pipe.unet.delete_adapters(name)
    row = {"seconds": round(seconds, 2), "stages_s": {k: round(v, 2) for k, v in result.timings.items()},
           "precisions": result.precisions}
    if measure_quality:
        row["quality"] = quality(result.frames, pipe, images)
    return row


def main():
    from bench_morph import build_sd15

    from morphkit.images import cover_resize, load_image
    from morphkit.models import cpu_has_native_bf16, load_pipeline

    if not cpu_has_native_bf16():
        sys.exit("This CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, and morphkit refuses it.")
    torch.set_num_threads(1)
    report = {"command": "python benchmarks/bench_cpu_bf16.py", **describe(threads=1)}
    for size, settings, resolution in (("tiny", TINY, 64), ("sd15_128", SD15_CPU, 128)):
        images = [load_image(PHOTOS / "astronaut.jpg", resolution)]
        images.append(cover_resize(load_image(PHOTOS / "chelsea.jpg"), images[0].size))
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            pipe = (load_pipeline("tiny", device="cpu", dtype=dtype) if size == "tiny"
                    else build_sd15(torch.device("cpu"), dtype))
            rows[str(dtype).replace("torch.", "")] = run(pipe, settings, images, size == "tiny")
            del pipe
        rows["speedup"] = round(rows["float32"]["seconds"] / rows["bfloat16"]["seconds"], 3)
        report[size] = rows
    (HERE / "results" / "cpu-bf16.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# bf16 against fp32 on this CPU (1 thread)", "", machine_line(report), "", "| model | fp32 s | bf16 s | speed-up | fp32 end PSNR / PPL / PDV | "
             "bf16 end PSNR / PPL / PDV |", "|---|---:|---:|---:|---|---|"]
    for size in ("tiny", "sd15_128"):
        r = report[size]
        q = [r[d].get("quality") for d in ("float32", "bfloat16")]
        shown = ["" if x is None else f"{x['end_psnr_db']} dB / {x['ppl_l2']} / {x['pdv_l2']}" for x in q]
        lines.append(f"| {size} | {r['float32']['seconds']} | {r['bfloat16']['seconds']} | {r['speedup']} | "
                     f"{shown[0]} | {shown[1]} |")
    lines += ["", "Stages (s): " + json.dumps({s: {d: report[s][d]["stages_s"] for d in ("float32", "bfloat16")}
                                                for s in ("tiny", "sd15_128")})]
    (HERE / "results" / "cpu-bf16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
