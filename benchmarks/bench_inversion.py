"""Round-trip error and cost of DDIM inversion, plain and fixed-point, to choose the defaults by measurement.

    python benchmarks/bench_inversion.py --model tiny          # 64 px, 50 steps (~8 min, one thread)

For each of three cases, on the two dataset photos (A framed at 64 px, B covered and cropped to A's frame,
as morph frames them):

- no LoRA: the base model, the photo's prompt;
- LoRA: a LoRA fitted to the photo with morph's defaults (rank 16, 200 steps, lr 2e-4, seed 0,
  `morphkit.train.fit_lora` as morph calls it);
- guided: that LoRA, guidance 7.5 with a negative prompt; the inversion uses the same guided eps.

it inverts the photo's latent with plain DDIM (K = 0) and with K = 1, 2, 3, 5, 10 fixed-point iterations per
step (tolerance 0: every iteration runs), then at a few tolerances (early stop), samples the noise back
with DDIM, and records the relative latent error ||z0' - z0|| / ||z0||, the time of the inversion alone and
its UNet calls. The error reported is the larger of the two photos'; time and calls are their mean.

A second table gives the precision floor: the tiny model loaded in bf16 (and fp16 on CUDA), inverted with
K = 10 iterations with the UNet as loaded and with it raised to fp32 for the stage
(`morphkit.models.stage_precision`).

Results go to benchmarks/results/inversion-<model>-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from machine import describe, machine_line  # noqa: E402
import morphkit  # noqa: E402
from morphkit.images import cover_resize, load_image  # noqa: E402
from morphkit.inversion import (DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, Inversion, counted, ddim_schedule,  # noqa: E402
                                eps_model, invert_latents, latent_error, sample_ddim)
from morphkit.lora import adapter_weights  # noqa: E402
from morphkit.models import encode_image, encode_prompt, load_pipeline, resolve_device, stage_precision  # noqa: E402
from morphkit.train import EncodedExample, TrainSettings, fit_lora  # noqa: E402

PHOTOS = HERE.parent / "dataset" / "photos"
IMAGES = {"astronaut": "a photo of an astronaut", "chelsea": "a photo of a cat"}
NEGATIVE = "blurry, low quality"
CASES = {"no LoRA": (False, 1.0), "LoRA": (True, 1.0), "guided": (True, 7.5)}
ITERATIONS = (0, 1, 2, 3, 5, 10)
EARLY_STOP = ((5, 1e-5), (5, 1e-6), (10, 1e-5), (10, 1e-6))
FLOOR = Inversion("fixed-point", 10, 0.0)  # the precision table: a converged solve, so only the precision limits it


def inversions():
    """(label, Inversion) for every row of the main table."""
    rows = [("0 (plain DDIM)", Inversion("ddim"))]
    rows += [(f"{k}", Inversion("fixed-point", k, 0.0)) for k in ITERATIONS if k]
    rows += [(f"{k}, tolerance {tol:g}", Inversion("fixed-point", k, tol)) for k, tol in EARLY_STOP]
    return rows


def prepare(pipe, resolution):
    """The two photos as morph frames them, their latents and prompt embeddings, and a LoRA fitted to each."""
    frame = load_image(PHOTOS / "astronaut.jpg", resolution)
    photos = {}
    for i, (name, prompt) in enumerate(IMAGES.items()):
        img = frame if i == 0 else cover_resize(load_image(PHOTOS / f"{name}.jpg"), frame.size)
        latent, embeds = encode_image(pipe, img), encode_prompt(pipe, prompt)
        settings = TrainSettings(data="<morph>", model="tiny", rank=16, steps=200, learning_rate=2e-4, seed=0,
                                 resolution=resolution, crop="none", checkpointing_steps=0)
        start = time.perf_counter()
        fit_lora(pipe, [EncodedExample([latent[0]], [embeds[0]])], settings, adapter_name=f"img{i}", progress=False)
        print(f"fitted the LoRA of {name} in {time.perf_counter() - start:.1f} s", flush=True)
        photos[name] = dict(latent=latent, embeds=embeds, adapter=f"img{i}")
    return photos, frame.size


def round_trip(pipe, photo, schedule, inversion, lora: bool, guidance: float, negative, repeats: int = 1):
    """(relative latent error, seconds of the inversion, UNet calls) of one photo, one inversion."""
    weights = {photo["adapter"]: 1.0} if lora else {}
    with adapter_weights(pipe.unet, weights):
        model = eps_model(pipe.unet, photo["embeds"], negative if guidance != 1.0 else None, guidance,
                          pipe.scheduler.config.prediction_type, pipe.scheduler.alphas_cumprod)
        best = float("inf")
        for _ in range(repeats):
            inverting, calls = counted(model)
            start = time.perf_counter()
            noise = invert_latents(inverting, photo["latent"], schedule, inversion)
            if photo["latent"].device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        regenerated = sample_ddim(model, noise, schedule)
    return latent_error(regenerated, photo["latent"]), best, calls[0]


def measure_iterations(pipe, photos, schedule, repeats):
    negative = encode_prompt(pipe, NEGATIVE)
    rows = []
    for label, inversion in inversions():
        row = {"iterations": label, "inversion": inversion.key()}
        for case, (lora, guidance) in CASES.items():
            runs = [round_trip(pipe, photo, schedule, inversion, lora, guidance, negative, repeats)
                    for photo in photos.values()]
            row[case] = {"error": max(r[0] for r in runs), "errors": [r[0] for r in runs],
                         "seconds": sum(r[1] for r in runs) / len(runs), "calls": sum(r[2] for r in runs) / len(runs)}
        rows.append(row)
        print(label, {case: f"{row[case]['error']:.2e} {row[case]['seconds']:.2f}s" for case in CASES}, flush=True)
    return rows


def measure_precision(device, resolution, steps):
    """The floor each dtype puts under a fixed-point round trip (no LoRA), with and without the fp32 stage.
    fp16 only on CUDA (a CPU has no fast fp16 kernels)."""
    rows = []
    for dtype in ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16"):
        pipe = load_pipeline("tiny", device=device, dtype=morphkit.models.DTYPES[dtype])
        schedule = ddim_schedule(pipe.scheduler.config, steps)
        img = load_image(PHOTOS / "astronaut.jpg", resolution)
        photo = dict(latent=encode_image(pipe, img), embeds=encode_prompt(pipe, IMAGES["astronaut"]), adapter=None)
        for raised in ((False, True) if dtype != "fp32" else (False,)):
            with stage_precision(pipe.unet, enabled=raised) as precision:
                error, seconds, calls = round_trip(pipe, photo, schedule, FLOOR, False, 1.0, None)
            rows.append({"loaded": dtype, "inversion ran in": precision, "error": error, "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def write_report(report, out: Path, stem: str):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Inversion round trip: {report['model']} on {report['device']}", "",
             machine_line(report) + "  ", f"settings {json.dumps(report['settings'])}  ",
             f"versions {json.dumps(report['versions'])}", "",
             "Relative latent error ||z0' - z0|| / ||z0|| of invert-then-sample (the larger of the two photos'), "
             "the time of the inversion alone (s, mean of the two) and its UNet calls (a guided call runs a "
             "doubled batch). K: fixed-point iterations per step, all run (tolerance 0) unless a tolerance is "
             "given.", ""]
    head = "| K | " + " | ".join(f"{c}: error | s | calls" for c in CASES) + " |"
    lines += [head, "|---|" + "---:|---:|---:|" * len(CASES)]
    for row in report["iterations"]:
        cells = [f"{row[c]['error']:.2e} | {row[c]['seconds']:.2f} | {row[c]['calls']:.0f}" for c in CASES]
        lines.append(f"| {row['iterations']} | " + " | ".join(cells) + " |")
    if report.get("precision"):
        lines += ["", "Precision floor (no LoRA, astronaut, K = 10 with tolerance 0; the pipeline loaded in a dtype, "
                  "inverted with the UNet as loaded or raised to fp32 by `models.stage_precision`):", "",
                  "| pipeline loaded in | inversion ran in | error | s |", "|---|---|---:|---:|"]
        lines += [f"| {r['loaded']} | {r['inversion ran in']} | {r['error']:.2e} | {r['seconds']:.2f} |"
                  for r in report["precision"]]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny"], default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 by default: on a shared 2-core machine 2 threads ran 10x slower).")
    parser.add_argument("--repeats", type=int, default=1, help="Time each inversion this many times; keep the best.")
    parser.add_argument("--no-precision", action="store_true", help="Skip the precision-floor table.")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=device)
    photos, size = prepare(pipe, args.resolution)
    schedule = ddim_schedule(pipe.scheduler.config, args.steps)
    report = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "settings": {"steps": args.steps, "frame size": list(size), "lora": "rank 16, 200 steps, lr 2e-4, seed 0",
                     "guided": f"guidance 7.5, negative prompt {NEGATIVE!r}", "images": IMAGES,
                     "defaults": {"iterations": DEFAULT_ITERATIONS, "tolerance": DEFAULT_TOLERANCE}},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "peft": __import__("peft").__version__, "morphkit": morphkit.__version__,
                     "python": platform.python_version()},
        "command": "python benchmarks/bench_inversion.py " + " ".join(sys.argv[1:]),
        **describe(),
        "iterations": measure_iterations(pipe, photos, schedule, args.repeats),
    }
    if not args.no_precision:
        report["precision"] = measure_precision(device, args.resolution, args.steps)
    write_report(report, args.out, f"inversion-{args.model}-{device.type}")


if __name__ == "__main__":
    main()
