"""Estimate the peak memory of each morph stage for full-size SDXL at 1024 px in fp16, without a GPU.

    python benchmarks/memory_sdxl.py [--quick]

As `memory_sd15.py` does for SD 1.5: SDXL base is built from morphkit/configs/sdxl on the meta device (UNet
2.57 B parameters, both text encoders, the VAE; the fp16-fix VAE has the same architecture), morphkit adds
the two LoRAs (rank 16, DiffMorpher's), every weight becomes a fake tensor (shape, dtype, no data), and
morphkit's own stage code runs on it with the batch shapes of a morph at DiffMorpher's settings: prompt
encoding through the SDXL family (both encoders), VAE encode, one LoRA step (written out here, with SDXL's
added conditioning, since the trainer's SDXL support is not in yet: both LoRAs in a batch of 2 as `fit_loras`
does, and one alone as with `fit_together=False`), `invert_under_loras` (both images, one batch), the whole
of `render_frames` (16 frames, 8 per batch, 50 steps, attention interpolation at λ = 0.6 with the store kept)
and `decode_latents` (its default chunks, then with the VAE's tiling). A dispatch mode counts the bytes of
every tensor storage alive after each operation; the peak is the stage's.

The inversion's peak is that of one UNet call on the batch, so it runs 2 steps (`--quick` also renders 5
steps and scales the attention store to 50 analytically). What is counted and what is not: see
memory_sd15.py (no allocator rounding, no cuDNN workspaces, no CUDA context). The figures are a floor.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import types
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine import describe, machine_line  # noqa: E402
import morphkit  # noqa: E402
from memory_sd15 import LiveBytes, fake_weights  # noqa: E402
from morphkit.families import SDXL, PromptEmbeds, time_ids  # noqa: E402
from morphkit.inversion import ddim_schedule  # noqa: E402
from morphkit.lora import LoraShape, add_lora, adapter_weights, one_hot_weights  # noqa: E402
from morphkit.models import decode_latents  # noqa: E402
from morphkit.morph import ADAPTERS, AttentionStore, attention_steps, invert_under_loras, render_frames  # noqa: E402

GIB = 2**30
DTYPE = torch.float16
SETTINGS = dict(resolution=1024, frames=16, steps=50, render_batch=8, attn_lambda=0.6, lora_rank=16, guidance=1.0)


def build():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = str(SDXL.config_folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    for m in (unet, vae, te1, te2):
        m.to(DTYPE)
    vae.register_to_config(force_upcast=False)  # the fp16-fix VAE (--vae madebyollin/sdxl-vae-fp16-fix)
    for name in ADAPTERS:
        add_lora(unet, LoraShape(rank=SETTINGS["lora_rank"]), name)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    return unet, vae, te1, te2, scheduler, tokenizers


def lora_step(unet, lora_params, latents, cond: PromptEmbeds, adapters):
    """One LoRA training step as morphkit's trainer takes it (fp16 autocast, fp32 LoRA weights, AdamW), with SDXL's
    added conditioning: per-sample adapters, noise at random timesteps, eps loss, backward, optimizer step."""
    params = [p for name in adapters for p in lora_params[name]]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    noise, t = torch.randn_like(latents), torch.randint(0, 1000, (len(latents),))
    with adapter_weights(unet, one_hot_weights(list(adapters))), torch.autocast("cpu", dtype=DTYPE):
        for p in params:  # as fit_loras: activating adapters may mark them frozen
            p.requires_grad_(True)
        pred = unet(latents + noise, t, cond.embeds, added_cond_kwargs=SDXL.added_cond_kwargs(cond, DTYPE)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)


def measure(quick: bool) -> tuple[dict, int]:
    unet, vae, te1, te2, scheduler, tokenizers = build()
    live, peaks = LiveBytes(), {}
    side, res = SETTINGS["resolution"] // 8, SETTINGS["resolution"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (unet, vae, te1, te2):
            fake_weights(m, live)
    peaks["weights (UNet, VAE, both text encoders, two LoRAs)"] = live.current
    lora_params = {n: [p for k, p in unet.named_parameters() if f".{n}." in k and "lora_" in k] for n in ADAPTERS}
    pipe = types.SimpleNamespace(unet=unet, vae=vae, scheduler=scheduler)

    with live, torch.no_grad():
        live.reset()
        ids = [tok("a photo", padding="max_length", max_length=77, return_tensors="pt").input_ids for tok in tokenizers]
        SDXL.encode_tokens([te1, te2], ids)
        peaks["prompt encoding (both text encoders)"] = live.peak
        live.reset()
        vae.encode(torch.randn(1, 3, res, res, dtype=DTYPE)).latent_dist.mean
        peaks["VAE encode (1 image)"] = live.peak

    latents = torch.randn(2, 4, side, side)
    ids6 = time_ids((res, res), (0, 0), (res, res))
    cond = PromptEmbeds(torch.randn(2, 77, 2048), torch.randn(2, 1280), ids6.expand(2, -1))
    with live:
        live.reset()
        lora_step(unet, lora_params, latents, cond, ADAPTERS)
        peaks["LoRA fitting (two LoRAs, batch 2, with AdamW state)"] = live.peak
        live.reset()
        lora_step(unet, lora_params, latents[:1], cond.rows(0), ADAPTERS[:1])
        peaks["LoRA fitting (one LoRA at a time: fit_together = false in a --config file)"] = live.peak

    with live:
        live.reset()
        invert_under_loras(pipe, latents, cond, list(ADAPTERS), ddim_schedule(scheduler.config, 2))
        peaks["inversion (two images, batch 2)"] = live.peak

    steps = 5 if quick else SETTINGS["steps"]
    with live:
        live.reset()
        store = AttentionStore(attention_steps(SETTINGS["attn_lambda"], steps), keep=True)
        alphas = torch.linspace(0, 1, SETTINGS["frames"], dtype=torch.float64)
        starts = torch.randn(2, 1, 4, side, side)
        frames = render_frames(pipe, starts[0], starts[1], cond.rows(0), cond.rows(1), alphas,
                               ddim_schedule(scheduler.config, steps), batch_size=SETTINGS["render_batch"],
                               adain=True, attention=store)
        store_bytes = store.peak_bytes * attention_steps(SETTINGS["attn_lambda"], SETTINGS["steps"]) // store.steps
        peaks["rendering (16 frames, batch 8, attention store kept)"] = live.peak + (store_bytes - store.peak_bytes)
        store.clear()

    with live, torch.no_grad():
        live.reset()
        decode_latents(pipe, frames.to(DTYPE))
        peaks["VAE decode (16 frames, 2 at a time: decode_latents' default at 1024 px)"] = live.peak
        vae.enable_tiling()
        live.reset()
        decode_latents(pipe, frames.to(DTYPE), batch_size=1)
        peaks["VAE decode (1 at a time, tiled: vae.enable_tiling())"] = live.peak
    return peaks, store_bytes


def write(peaks: dict, store_bytes: int, seconds: float, quick: bool):
    per_end_step = store_bytes / (2 * attention_steps(SETTINGS["attn_lambda"], SETTINGS["steps"]))
    report = {
        "command": "python benchmarks/memory_sdxl.py" + (" --quick" if quick else ""),
        "what": "estimated peak memory per morph stage, full-size SDXL base, 1024 px, fp16, no GPU (fake tensors)",
        **describe(),
        "settings": SETTINGS,
        "peak_gib": {k: round(v / GIB, 2) for k, v in peaks.items()},
        "attention_store_gib": round(store_bytes / GIB, 2),
        "attention_store_gib_per_end_and_step": round(per_end_step / GIB, 3),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "morphkit": morphkit.__version__, "python": platform.python_version()},
        "seconds": round(seconds, 1),
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "sdxl-memory-estimate.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Peak memory per morph stage, full-size SDXL at 1024 px, fp16 (estimate, no GPU)", "",
             machine_line(report) + " (an estimate: the machine does not change it)  ",
             f"settings {json.dumps(SETTINGS)}  ",
             f"versions {json.dumps(report['versions'])}", "",
             "Counted by running morphkit's stage code on fake tensors (see memory_sdxl.py's docstring for what is and",
             "is not counted). Each figure is the most memory alive at any moment of the stage, weights included.", "",
             "| stage | peak GiB |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["peak_gib"].items()]
    lines += ["", f"Attention store at its largest: {report['attention_store_gib']} GiB (inside the rendering figure): "
              f"{report['attention_store_gib_per_end_and_step']} GiB per end frame and interpolated step, twice that "
              "with --guidance above 1 (the batch holds the negative half too)."]
    (out / "sdxl-memory-estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    quick = "--quick" in sys.argv
    t0 = time.perf_counter()
    peaks, store_bytes = measure(quick)
    write(peaks, store_bytes, time.perf_counter() - t0, quick)


if __name__ == "__main__":
    main()
