"""Estimate the peak memory of each morph stage for full-size SD 1.5 at 512 px in fp16, without a GPU.

    python benchmarks/memory_sd15.py

The full-size architecture is built from morphkit/configs/sd15 on the meta device, the two LoRAs are
added by morphkit, and then every weight is replaced by a *fake* tensor (torch's FakeTensorMode: shape,
dtype and device, no data). morphkit's stage code then runs on it, with the batch shapes a morph uses
at DiffMorpher's settings: one LoRA step as `fit_loras` takes it (both LoRAs in one batch, its loss,
autocast and optimizer, written out here because `fit_loras` adds its adapters itself, which fake
weights do not allow), `invert_under_loras` (both images in one batch), the whole of `render_frames`
(8 frames per batch, 50 steps, attention interpolation with λ = 0.6, so the attention store is
included), and VAE encode and `decode_latents`.
A dispatch mode counts the bytes of every tensor storage alive after each operation; its peak is the
stage's peak.

What this counts: weights, activations kept for backward, temporaries, gradients, AdamW state, the
attention store. What it cannot count: the CUDA caching allocator's rounding and fragmentation, cuDNN
workspaces, and the CUDA context (~0.5 GB, outside `max_memory_allocated` anyway). It runs the CPU
kernels' shapes (CPU flash attention, like CUDA's SDPA, keeps no attention matrix). Treat the figures
as a floor to compare with the 16 GB budget, and replace them with `bench_morph.py --size sd15` figures
measured on a GPU when one is at hand.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import types
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import describe, machine_line  # noqa: E402
import morphkit  # noqa: E402
from morphkit.inversion import Inversion, ddim_schedule  # noqa: E402
from morphkit.lora import LoraShape, add_lora, adapter_weights, one_hot_weights  # noqa: E402
from morphkit.models import SD15_CONFIG, decode_latents  # noqa: E402
from morphkit.morph import ADAPTERS, AttentionStore, attention_steps, invert_under_loras, render_frames  # noqa: E402
from morphkit.morph.settings import MORPH_INVERSION_ITERATIONS, MORPH_INVERSION_TOLERANCE  # noqa: E402
from morphkit.train import TrainSettings, diffusion_loss, draw_noise, make_optimizer, mixed_precision, rng  # noqa: E402

GIB = 2**30
DTYPE = torch.float16
SETTINGS = dict(resolution=512, frames=16, steps=50, render_batch=8, decode_batch=8, attn_lambda=0.6, lora_rank=16)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive; `peak` is the most at any moment since `reset()`."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        n = storage.nbytes()
        self.seen[storage] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int):
        self.current -= n

    def reset(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def fake_weights(module: torch.nn.Module, live: LiveBytes):
    """Replace every parameter and buffer of a meta-device `module` by a fake CPU tensor, counted by `live`."""
    with live:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def build():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG), subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG), subfolder="text_encoder"))
    for m in (unet, vae, text_encoder):
        m.to(DTYPE)
    for name in ADAPTERS:
        add_lora(unet, LoraShape(rank=SETTINGS["lora_rank"]), name)
    scheduler = DDIMScheduler.from_pretrained(str(SD15_CONFIG), subfolder="scheduler")
    return unet, vae, text_encoder, scheduler


def main():
    from diffusers import DDPMScheduler

    t0 = time.perf_counter()
    unet, vae, text_encoder, scheduler = build()
    live = LiveBytes()
    peaks: dict[str, float] = {}
    side = SETTINGS["resolution"] // 8
    # Only the weights are made fake; operations on them give fake results wherever they run, while the small
    # real tensors (α, indices) stay real, so the stage code's data-dependent indexing runs as it does on a GPU.
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (unet, vae, text_encoder):
            fake_weights(m, live)
    peaks["weights (UNet, VAE, text encoder, two LoRAs)"] = live.current
    lora_params = {name: [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
                   for name in ADAPTERS}
    pipe = types.SimpleNamespace(unet=unet, vae=vae, scheduler=scheduler)

    with live, torch.no_grad():  # VAE encode of one image
        live.reset()
        vae.encode(torch.randn(1, 3, SETTINGS["resolution"], SETTINGS["resolution"], dtype=DTYPE)).latent_dist.mean
        peaks["VAE encode (1 image)"] = live.peak

    latents = torch.randn(2, 4, side, side)
    embeds = torch.randn(2, 77, 768)
    with live:  # one step of fit_loras: both LoRAs, one batch of 2, per-sample adapters
        live.reset()
        settings = TrainSettings(data="-", steps=1, rank=SETTINGS["lora_rank"])
        optimizer = make_optimizer([p for g in lora_params.values() for p in g], settings, torch.device("meta"))
        train_scheduler = DDPMScheduler.from_config(scheduler.config)
        _, autocast = mixed_precision(unet)  # fit_loras' autocast: fp16, as on CUDA (frozen weights fp16, LoRAs fp32)
        with adapter_weights(unet, one_hot_weights(list(ADAPTERS))):
            for group in lora_params.values():  # as fit_loras: activating adapters may mark them frozen
                for p in group:
                    p.requires_grad_(True)
            noise, timesteps = draw_noise(latents, rng(0, "noise", 0), settings, 1000)
            loss = diffusion_loss(unet, train_scheduler, latents, embeds, noise, timesteps, settings,
                                  autocast, per_sample=True).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del loss, noise
        for group in lora_params.values():
            for p in group:
                p.requires_grad_(False)
        peaks["LoRA fitting (two LoRAs, batch 2, with AdamW state)"] = live.peak

    schedule = ddim_schedule(scheduler.config, SETTINGS["steps"])
    with live:  # both images inverted in one batch
        live.reset()
        # the morph's solve (at most 3 iterations a step), as morph runs it
        invert_under_loras(pipe, latents, embeds, list(ADAPTERS), schedule,
                           inversion=Inversion(iterations=MORPH_INVERSION_ITERATIONS, tolerance=MORPH_INVERSION_TOLERANCE))
        peaks["inversion (two images, batch 2)"] = live.peak

    with live:  # all frames, 8 per batch, with the attention store
        live.reset()
        store = AttentionStore(attention_steps(SETTINGS["attn_lambda"], SETTINGS["steps"]), keep=True)
        alphas = torch.linspace(0, 1, SETTINGS["frames"], dtype=torch.float64)
        starts = torch.randn(2, 1, 4, side, side)  # real (slerp branches on values); the inverted ones are fake
        frames = render_frames(pipe, starts[0], starts[1], embeds[:1], embeds[1:], alphas, schedule,
                               batch_size=SETTINGS["render_batch"], adain=True, attention=store)
        peaks["rendering (16 frames, batch 8, attention store kept)"] = live.peak
        store_bytes = store.peak_bytes
        store.clear()

    with live, torch.no_grad():
        live.reset()
        decode_latents(pipe, frames.to(DTYPE), batch_size=SETTINGS["decode_batch"])
        peaks["VAE decode (16 frames, 8 at a time)"] = live.peak

    report = {
        "command": "python benchmarks/memory_sd15.py",
        "what": "estimated peak memory per morph stage, full-size SD 1.5, fp16, no GPU (fake tensors)",
        **describe(),
        "settings": SETTINGS,
        "peak_gib": {k: round(v / GIB, 2) for k, v in peaks.items()},
        "attention_store_gib": round(store_bytes / GIB, 2),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "morphkit": morphkit.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "sd15-memory-estimate.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Peak memory per morph stage, full-size SD 1.5 at 512 px, fp16 (estimate, no GPU)", "",
             machine_line(report) + " (an estimate: the machine does not change it)  ",
             f"settings {json.dumps(SETTINGS)}  ",
             f"versions {json.dumps(report['versions'])}", "",
             "Counted by running morphkit's stage code on fake tensors (see the script's docstring for what is and",
             "is not counted). Each figure is the most memory alive at any moment of the stage, weights included.", "",
             "| stage | peak GiB |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["peak_gib"].items()]
    lines += ["", f"Attention store at its largest: {report['attention_store_gib']} GiB (inside the rendering figure)."]
    (out / "sd15-memory-estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
