"""bf16 on a CPU that computes it natively (AMX or AVX512-BF16) against fp32: time and quality of a whole morph.

    python benchmarks/bench_cpu_bf16.py        # 1 thread; about 10 minutes (without native bf16: 1 minute)

For the tiny model at DiffMorpher's settings (16 frames, 50 steps, 2 x 200 LoRA steps) and for the full-size SD
1.5 architecture (random weights) at 128 px with reduced settings (4 frames, 4 steps, 4 LoRA steps), morphkit's
default morph runs with the pipeline in fp32 and in bf16. In bf16 the LoRA fit and the in-between frames run in
bf16, the inversion and the end frames in fp32 (`fp32_ends`). Quality beside the times (tiny model only: random
full-size weights draw noise): each end frame's PSNR against its input's VAE round trip, PPL and PDV (l2).
Writes benchmarks/results/cpu-bf16.json and .md.

On a CPU without native bf16 morphkit refuses bf16; this then measures what emulation would cost instead: one
UNet call of each model in fp32 and under bf16 autocast (results/cpu-bf16-emulated.json and .md).
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

from bench_summary import SD15_CPU, TINY, pair_images, run_morphkit  # noqa: E402
from machine import describe, machine_line  # noqa: E402


def main():
    from bench_morph import build_sd15

    from morphkit.models import cpu_has_native_bf16, load_pipeline

    if not cpu_has_native_bf16():
        print("This CPU has neither AMX nor AVX512-BF16: bf16 would be emulated, and morphkit refuses it. "
              "Measuring what emulation would cost instead.")
        return emulated()
    torch.set_num_threads(1)
    report = {"command": "python benchmarks/bench_cpu_bf16.py", **describe(threads=1)}
    for size, settings, resolution in (("tiny", TINY, 64), ("sd15_128", SD15_CPU, 128)):
        images = pair_images(resolution)
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            pipe = (load_pipeline("tiny", device="cpu", dtype=dtype) if size == "tiny"
                    else build_sd15(torch.device("cpu"), dtype))
            rows[str(dtype).replace("torch.", "")] = run_morphkit(pipe, settings, images, size == "tiny")
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


def emulated():
    """On a CPU without native bf16: one UNet call of the tiny model (8 frames, 64 px) and of the full-size SD 1.5
    architecture (1 frame, 128 px), in fp32 and under bf16 autocast, each the mean of a few calls after a warm-up.
    Writes benchmarks/results/cpu-bf16-emulated.json and .md."""
    from bench_morph import build_sd15

    from morphkit.models import load_pipeline

    torch.set_num_threads(1)
    report = {"command": "python benchmarks/bench_cpu_bf16.py", **describe(threads=1), "rows": {}}
    for name, batch, latent, calls in (("tiny UNet, 8 frames, 64 px", 8, 8, 10),
                                       ("SD 1.5 UNet, 1 frame, 128 px", 1, 16, 2)):
        pipe = load_pipeline("tiny", device="cpu") if name.startswith("tiny") else build_sd15(torch.device("cpu"),
                                                                                              torch.float32)
        unet = pipe.unet
        x = torch.randn(batch, 4, latent, latent)
        embeds = torch.randn(batch, 77, unet.config.cross_attention_dim)
        seconds = {}
        with torch.no_grad():
            for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    unet(x, 500, embeds)
                    start = time.perf_counter()
                    for _ in range(calls):
                        unet(x, 500, embeds)
                    seconds[label] = round((time.perf_counter() - start) / calls, 3)
        seconds["bf16 / fp32"] = round(seconds["bf16 autocast"] / seconds["fp32"], 2)
        report["rows"][name] = seconds
        del pipe
    (HERE / "results" / "cpu-bf16-emulated.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# bf16 emulated on a CPU without native bf16 (1 thread)", "", machine_line(report), "",
             "| one UNet call | fp32 s | bf16 autocast s | bf16 / fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['fp32']} | {r['bf16 autocast']} | {r['bf16 / fp32']} |" for name, r in report["rows"].items()]
    (HERE / "results" / "cpu-bf16-emulated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
