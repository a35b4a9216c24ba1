"""The headline speed ratios, measured side by side in one run against the straightforward reference.

    python benchmarks/bench_summary.py            # about 6 minutes on one CPU thread

- `tiny_defaults_speedup`: the whole morph in-process on the tiny model at DiffMorpher's settings (16 frames, 50
  steps, 2 x 200 LoRA steps), morphkit at its defaults (attention interpolation, AdaIN, even pacing, exact
  inversion) against `reference.reference_morph`;
- `tiny_cli_speedup`: the same as whole processes, `morphkit morph ... --model tiny` against
  `python benchmarks/reference.py` (imports, model load, morph, GIF);
- `sd15_128_defaults_speedup`: the full-size SD 1.5 architecture (random weights) at 128 px with the reduced
  CPU settings of `bench_morph.py --size sd15` (4 frames, 4 steps, 4 LoRA steps), in-process;
- `gpu_sd15_512_seconds`: written by `benchmarks/gpu_check.py` where a GPU was used (kept from earlier runs).

One thread (`torch.set_num_threads(1)`, OMP_NUM_THREADS=1 for the processes), so that runs compare; keep the
machine otherwise idle. Quality beside the times: each morph's end fidelity (PSNR of its end frames against its
inputs as the VAE reproduces them), PPL and PDV (l2 distance). Writes benchmarks/results/summary.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from machine import describe, machine_line  # noqa: E402

PHOTOS = REPO / "dataset" / "photos"
PROMPTS = ("a photo of an astronaut", "a photo of a cat")
TINY = dict(frames=16, steps=50, lora_steps=200, resolution=64)
SD15_CPU = dict(frames=4, steps=4, lora_steps=4, resolution=128)


def pair_images(size: int) -> list:
    """The benchmarks' pair: the astronaut sized to `size` by morphkit's policy, the cat covering its frame."""
    from morphkit.images import cover_resize, load_image

    first = load_image(PHOTOS / "astronaut.jpg", size)
    return [first, cover_resize(load_image(PHOTOS / "chelsea.jpg"), first.size)]


def quality(frames, pipe, images) -> dict:
    """End fidelity (PSNR of the end frames against the inputs' VAE round trip), PPL and PDV by l2 distance."""
    from morphkit.images import to_tensor
    from morphkit.metrics import get_distance, images_to_tensor, neighbour_distances, pdv
    from morphkit.models import decode_latents, encode_image
    from morphkit.similarity import psnr

    _, l2, _ = get_distance("l2", torch.device("cpu"))
    distances = neighbour_distances(images_to_tensor(frames), l2)
    ends = []
    for frame, img in ((frames[0], images[0]), (frames[-1], images[1])):
        ref = decode_latents(pipe, encode_image(pipe, img.resize(frame.size))).clamp(-1, 1).float()
        ends.append(round(float(psnr(to_tensor(frame), ref, data_range=2.0)[0]), 2))
    n = len(frames) - 1
    return {"end_psnr_db": ends, "ppl_l2": round(float(distances.sum() * n), 4), "pdv_l2": round(float(pdv(distances)), 4)}


def run_morphkit(pipe, settings: dict, images, measure_quality: bool = True, **overrides) -> dict:
    """One whole morphkit morph in-process (LoRAs fitted afresh, nothing cached): seconds, stages, the precision
    of each stage and (`measure_quality`) quality."""
    import morphkit

    for name in ("img0", "img1", "ref0", "ref1"):
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    options = dict(prompt_a=PROMPTS[0], prompt_b=PROMPTS[1], formats=(), cache=False, progress=False, **settings)
    start = time.perf_counter()
    result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, **{**options, **overrides})
    seconds = time.perf_counter() - start
    row = {"seconds": round(seconds, 2), "stages_s": {k: round(v, 2) for k, v in result.timings.items()},
           "precisions": result.precisions}
    if measure_quality:
        row["quality"] = quality(result.frames, pipe, images)
    return row


def run_reference(pipe, settings: dict, images) -> dict:
    """The straightforward morph (`reference.reference_morph`) at the same settings: seconds, quality."""
    from morphkit.images import to_tensor
    from reference import reference_morph

    for name in ("img0", "img1"):
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    tensors = [to_tensor(img) for img in images]
    start = time.perf_counter()
    frames = reference_morph(pipe, *tensors, *PROMPTS, settings["frames"], settings["steps"], settings["lora_steps"])
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "quality": quality(frames, pipe, images)}


def in_process(pipe, settings: dict, images) -> dict:
    """morphkit at its defaults, then the reference, on the same pipeline."""
    ours, theirs = run_morphkit(pipe, settings, images), run_reference(pipe, settings, images)
    return {"morphkit_s": ours["seconds"], "reference_s": theirs["seconds"],
            "speedup": round(theirs["seconds"] / ours["seconds"], 3), "morphkit_stages_s": ours["stages_s"],
            "morphkit_quality": ours["quality"], "reference_quality": theirs["quality"]}


def whole_processes(tmp: Path, model: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    ours = [sys.executable, "-m", "morphkit", "morph", str(PHOTOS / "astronaut.jpg"), str(PHOTOS / "chelsea.jpg"),
            "--model", "tiny", "--prompt-a", PROMPTS[0], "--prompt-b", PROMPTS[1], "--frames", "16", "--steps", "50",
            "--lora-steps", "200", "--resolution", "64", "--formats", "gif", "--no-cache", "-o", str(tmp / "ours"),
            "--overwrite", "-q"]
    theirs = [sys.executable, str(HERE / "reference.py"), "--model", str(model), "--out", str(tmp / "reference.gif")]
    seconds = {}
    for name, command in (("morphkit", ours), ("reference", theirs)):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds[name] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"morphkit_s": round(seconds["morphkit"], 2), "reference_s": round(seconds["reference"], 2),
            "speedup": round(seconds["reference"] / seconds["morphkit"], 3)}


def main():
    import tempfile

    from bench_morph import build_sd15

    from morphkit.models import load_pipeline
    from morphkit.tiny import tiny_model_path

    torch.set_num_threads(1)
    report = {"command": "python benchmarks/bench_summary.py", **describe(threads=1)}
    tiny = load_pipeline("tiny", device="cpu")
    report["tiny_defaults"] = in_process(tiny, TINY, pair_images(64))
    with tempfile.TemporaryDirectory() as tmp:
        report["tiny_cli"] = whole_processes(Path(tmp), tiny_model_path())
    sd15 = build_sd15(torch.device("cpu"), torch.float32)
    report["sd15_128_defaults"] = in_process(sd15, SD15_CPU, pair_images(128))
    report["settings"] = {"tiny": TINY, "sd15_128": SD15_CPU}
    summary_path = HERE / "results" / "summary.json"
    earlier = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary = {
        "tiny_defaults_speedup": report["tiny_defaults"]["speedup"],
        "tiny_cli_speedup": report["tiny_cli"]["speedup"],
        "sd15_128_defaults_speedup": report["sd15_128_defaults"]["speedup"],
        **{k: v for k, v in earlier.items() if k.startswith("gpu_")},
        "details": report,
    }
    summary_path.parent.mkdir(exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Speed summary (CPU, one thread)", "", machine_line(report), "",
             "| ratio | morphkit s | reference s | speed-up | morphkit end PSNR / PPL / PDV | reference end PSNR / PPL / PDV |",
             "|---|---:|---:|---:|---|---|"]
    for key in ("tiny_defaults", "tiny_cli", "sd15_128_defaults"):
        r = report[key]
        q = [r.get("morphkit_quality"), r.get("reference_quality")]
        shown = ["" if x is None else f"{x['end_psnr_db']} dB / {x['ppl_l2']} / {x['pdv_l2']}" for x in q]
        lines.append(f"| {key}_speedup | {r['morphkit_s']} | {r['reference_s']} | {r['speedup']} | {shown[0]} | {shown[1]} |")
    (HERE / "results" / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
