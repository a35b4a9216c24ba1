"""The joint LoRA fit eager and through torch.compile, cold and warm: does a compiled training step pay on a CPU?

    python benchmarks/bench_fit_compile.py    # tiny model, one thread, about 4 minutes

Fits the two photos' LoRAs together as morph does (`train.fit_loras`, 200 steps, rank 16, lr 2e-4) three times,
each in a fresh process: eager; compiled with an empty inductor cache (cold: the first run on a machine); compiled
again with that cache (warm). Reports seconds and the last 20 steps' mean loss of the first LoRA (the same
training, so the same loss). Writes benchmarks/results/fit-compile-tiny-cpu.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def fit(compile_unet: bool) -> dict:
    """One joint fit in this process; returns its seconds and final loss."""
    import torch

    from morphkit import train
    from morphkit.images import load_image
    from morphkit.models import compiled, encode_conditioning, encode_image, load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    examples = {}
    for name, (photo, prompt) in {"img0": ("astronaut.jpg", "a photo of an astronaut"),
                                  "img1": ("chelsea.jpg", "a photo of a cat")}.items():
        img = load_image(REPO / "dataset" / "photos" / photo, 64).resize((64, 64))
        examples[name] = [train.EncodedExample([encode_image(pipe, img)[0]],
                                               [encode_conditioning(pipe, prompt, (64, 64)).embeds[0]])]
    settings = train.TrainSettings(data="<morph>", model="tiny", rank=16, steps=200, learning_rate=2e-4, seed=0,
                                   resolution=64, crop="none", checkpointing_steps=0)
    start = time.perf_counter()
    with compiled(pipe.unet, enabled=compile_unet):
        results = train.fit_loras(pipe, examples, settings, progress=False)
    losses = results["img0"].losses
    return {"seconds": round(time.perf_counter() - start, 2), "final_loss": sum(losses[-20:]) / 20}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(fit(sys.argv[2] == "compiled")))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=cache)
        for label, mode in (("eager", "eager"), ("compiled, cold cache", "compiled"), ("compiled, warm cache", "compiled")):
            done = subprocess.run([sys.executable, __file__, "--one", mode], env=env, capture_output=True, text=True,
                                  cwd=REPO)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
            print(label, rows[label], flush=True)
    from machine import describe, machine_line

    report = {"command": "python benchmarks/bench_fit_compile.py", **describe(threads=1), "rows": rows}
    (HERE / "results" / "fit-compile-tiny-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The joint LoRA fit, eager and compiled (tiny, CPU, one thread)", "",
             machine_line(report) + "; 200 steps, two LoRAs in one batch", "",
             "| fit | seconds | final loss |", "|---|---:|---:|"]
    lines += [f"| {label} | {r['seconds']} | {r['final_loss']:.6f} |" for label, r in rows.items()]
    (HERE / "results" / "fit-compile-tiny-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
