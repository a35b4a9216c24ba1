"""Time each stage of a morph, and the whole morph against the straightforward reference, in one run.

    python benchmarks/bench_morph.py --size tiny          # the tiny model, DiffMorpher's settings
    python benchmarks/bench_morph.py --size sd15          # full-size SD 1.5 architecture, random weights

`sd15` builds the full-size architecture from the configs shipped in morphkit/configs/sd15 with random
weights (speed does not depend on weight values). On a GPU it runs DiffMorpher's settings at 512 px; on
a CPU, where one full-size UNet call at 512 px takes seconds, it runs a reduced resolution and step count
(printed in the report). Results go to benchmarks/results/<size>-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import morphkit  # noqa: E402
from morphkit.images import load_image, to_tensor  # noqa: E402
from morphkit.inversion import Inversion, ddim_schedule, eps_model, invert_ddim  # noqa: E402
from morphkit.lora import adapter_weights  # noqa: E402
from morphkit.models import SD15_CONFIG, decode_latents, encode_image, encode_prompt, load_pipeline, resolve_device  # noqa: E402
from morphkit.images import cover_resize  # noqa: E402
from morphkit.morph import invert_under_loras  # noqa: E402
from morphkit.train import EncodedExample, TrainSettings, fit_lora, fit_loras  # noqa: E402
from reference import reference_morph  # noqa: E402

PRESETS = {
    # DiffMorpher's settings: 2 x 200 LoRA steps, 2 x 50 inversion steps, 16 frames x 50 steps.
    "full": dict(resolution=None, frames=16, steps=50, lora_steps=200),
    "sd15-cpu": dict(resolution=128, frames=4, steps=4, lora_steps=4),
}
PHOTOS = HERE.parent / "dataset" / "photos"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall time and (on CUDA) peak memory of a block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None


def load_tiny(device, dtype):
    """The tiny model through morphkit's loader, then cast (so a half dtype can be timed on a CPU too)."""
    pipe = load_pipeline("tiny", device=device, dtype=torch.float32)
    return pipe.to(device, dtype)


def build_sd15(device, dtype):
    """The full-size SD 1.5 pipeline with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG), subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG), subfolder="text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, safety_checker=None, feature_extractor=None,
        tokenizer=CLIPTokenizer.from_pretrained(str(SD15_CONFIG), subfolder="tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(str(SD15_CONFIG), subfolder="scheduler"), requires_safety_checker=False,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl(device, dtype):
    """The full-size SDXL base pipeline with random weights, from the configs shipped in morphkit/configs/sdxl."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = SD15_CONFIG.parent / "sdxl"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config), subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder_2"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(str(config), subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(config), subfolder="tokenizer_2"),
        scheduler=DDIMScheduler.from_pretrained(str(config), subfolder="scheduler"), add_watermarker=False,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"tiny": load_tiny, "sd15": build_sd15, "sdxl": build_sdxl}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15", "sdxl"], default="tiny",
                        help="sdxl: full-size SDXL base at 1024 px; for a CUDA GPU (its stage rows are left out).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-reference", action="store_true", help="Skip the straightforward reference.")
    parser.add_argument("--channels-last", action="store_true",
                        help="UNet and VAE in channels-last memory format (for both morphkit and the reference); "
                             "results get a -channels-last suffix. On 2 CPU cores it did not pay.")
    parser.add_argument("--compile", action="store_true",
                        help="Also time morphkit's plain morph rendered through torch.compile, twice (the first run "
                             "compiles); results get a -compile suffix.")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="morphkit's dtype: fp16 on CUDA and fp32 on CPU unless given.")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.size == "sdxl" and device.type != "cuda":
        sys.exit("--size sdxl is for a CUDA GPU: full-size SDXL in fp32 on a CPU needs tens of GB and hours.")
    torch.set_num_threads(os.cpu_count() or 1)
    settings = PRESETS["sd15-cpu" if args.size == "sd15" and device.type == "cpu" else "full"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    timings, memory = {}, {}

    def record(name, timer, per=1, result=None):
        timings[name] = timer.seconds / per
        if result is not None and result.peak_memory:  # morph resets the peak at each stage: take its stages' peak
            memory[name] = round(max(result.peak_memory.values()) / 2**30, 2)
        elif timer.peak_gib is not None:
            memory[name] = round(timer.peak_gib, 2)

    with Timer(device) as t:
        pipe = BUILDERS[args.size](device, dtype)
    record("model load" if args.size == "tiny" else "model build (random weights)", t)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    resolution = settings["resolution"] or 8 * pipe.unet.config.sample_size
    img_a = load_image(PHOTOS / "astronaut.jpg", resolution)
    prompts = ("a photo of an astronaut", "a photo of a cat")

    if args.size != "sdxl":
        stage_rows(pipe, device, settings, img_a, prompts, record)

    # --- the whole morph: morphkit, then the reference, on the same pipeline ---
    common = dict(prompt_a=prompts[0], prompt_b=prompts[1], frames=settings["frames"], steps=settings["steps"],
                  lora_steps=settings["lora_steps"], resolution=resolution, formats=(), cache=False, progress=False)
    whole_morphs(pipe, device, settings, common, args, timings, memory, record)
    report_and_write(args, device, dtype, settings, resolution, img_a, timings, memory)


def stage_rows(pipe, device, settings, img_a, prompts, record):
    """Each stage of morphkit timed alone (SD 1.x: the stage functions take SD 1.x's prompt tensors)."""
    resolution = img_a.size[1]
    encode_image(pipe, img_a)  # warm-up
    with Timer(device) as t:
        latent = encode_image(pipe, img_a)
    record("VAE encode (1 image)", t)
    with Timer(device) as t:
        decode_latents(pipe, latent)
    record("VAE decode (1 image)", t)
    embeds = encode_prompt(pipe, prompts[0])
    lora_steps = settings["lora_steps"]
    train_settings = TrainSettings(data="-", steps=lora_steps, resolution=resolution, crop="none", checkpointing_steps=0)
    example = [EncodedExample([latent[0]], [embeds[0]])]
    with Timer(device) as t:
        fit_lora(pipe, example, train_settings, adapter_name="bench", progress=False)
    record("LoRA training step (one LoRA)", t, lora_steps)
    with Timer(device) as t:
        fit_loras(pipe, {"pair0": example, "pair1": example}, train_settings, progress=False)
    record("LoRA training step (two LoRAs in one batch, as morph fits them)", t, lora_steps)
    pipe.unet.delete_adapters(["pair0", "pair1"])
    schedule = ddim_schedule(pipe.scheduler.config, settings["steps"])
    with Timer(device) as t, adapter_weights(pipe.unet, {"bench": 1.0}):
        invert_ddim(eps_model(pipe.unet, embeds), latent, schedule)
    record("inversion step (one image)", t, settings["steps"])
    with Timer(device) as t:
        invert_under_loras(pipe, latent.repeat(2, 1, 1, 1), embeds.repeat(2, 1, 1), ["bench", "bench"], schedule,
                           inversion=Inversion("ddim"))
    record("inversion step (two images in one batch, as morph inverts them)", t, settings["steps"])
    pipe.unet.delete_adapters("bench")


def whole_morphs(pipe, device, settings, common, args, timings, memory, record):
    """The whole morph: morphkit's plain one (the reference's algorithm), its defaults, then the reference."""
    lora_steps, dtype = settings["lora_steps"], pipe.unet.dtype
    resolution = common["resolution"]
    img_a = load_image(PHOTOS / "astronaut.jpg", resolution)
    img_b = cover_resize(load_image(PHOTOS / "chelsea.jpg"), img_a.size)
    prompts = (common["prompt_a"], common["prompt_b"])
    # Against the reference, the same algorithm: plain slerp + adapter blend, linear α, no attention
    # interpolation or AdaIN. What morphkit's defaults add is timed after it, on its own line.
    plain = dict(attn_lambda=0.0, adain=False, pacing="linear")
    with Timer(device) as t:
        result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, **common, **plain)
    record("morphkit: whole morph", t, result=result)
    for stage, seconds in result.timings.items():
        timings[f"morphkit: {stage}"] = seconds
        if stage in result.peak_memory:
            memory[f"morphkit: {stage}"] = round(result.peak_memory[stage] / 2**30, 2)
    timings["morphkit: rendering per frame"] = result.timings["render"] / settings["frames"]
    for name in ("img0", "img1"):
        pipe.unet.delete_adapters(name)
    with Timer(device) as t:
        result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, **common)
    record("morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph", t, result=result)
    timings["_note"] = (f"attention store {result.attention_bytes / 2**20:.1f} MiB, {len(result.rerendered)} frames "
                        f"re-rendered, pacing probe {result.probe_steps} steps")
    timings["morphkit defaults: render"] = result.timings["render"]
    if args.compile:
        for label, options in (("morphkit", plain), ("morphkit defaults", {})):
            for run in ("first run, compiling", "second run"):
                for name in ("img0", "img1"):
                    pipe.unet.delete_adapters(name)
                with Timer(device) as t:
                    result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, **common,
                                            **options, compile_unet=True)
                record(f"{label} + torch.compile ({run}): whole morph", t, result=result)
                timings[f"{label} + torch.compile ({run}): render"] = result.timings["render"]
    if not args.no_reference:
        for name in ("img0", "img1"):
            pipe.unet.delete_adapters(name)
        # The reference as the issue defines it runs in fp32. Where morphkit runs in another dtype (fp16 on
        # CUDA), the reference also runs in morphkit's dtype, so the ratio can be read both ways.
        runs = [(torch.float32, "reference: whole morph")]
        if dtype != torch.float32:
            runs.append((dtype, f"reference in {str(dtype).replace('torch.', '')}: whole morph"))
        for ref_dtype, label in runs:
            if ref_dtype == dtype:
                ref_pipe = pipe
            else:
                ref_pipe = BUILDERS[args.size](device, ref_dtype)
                if args.channels_last:
                    ref_pipe.unet.to(memory_format=torch.channels_last)
                    ref_pipe.vae.to(memory_format=torch.channels_last)
            tensors = [to_tensor(img).to(device, ref_dtype) for img in (img_a, img_b)]
            with Timer(device) as t:
                reference_morph(ref_pipe, *tensors, *prompts, settings["frames"], settings["steps"], lora_steps)
            record(label, t)
            if ref_pipe is not pipe:
                del ref_pipe
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        timings["speed-up (reference / morphkit)"] = timings["reference: whole morph"] / timings["morphkit: whole morph"]
        if len(runs) > 1:
            timings["speed-up (reference in morphkit's dtype / morphkit)"] = (
                timings[runs[1][1]] / timings["morphkit: whole morph"])



def report_and_write(args, device, dtype, settings, resolution, img_a, timings, memory):
    memory_note = timings.pop("_note")
    report = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", "") + (", channels-last" if args.channels_last else ""),
        "settings": {**settings, "resolution": resolution, "frame size": list(img_a.size)},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "peft": __import__("peft").__version__, "morphkit": morphkit.__version__, "python": platform.python_version()},
        "command": "python benchmarks/bench_morph.py " + " ".join(sys.argv[1:]),
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "peak_gpu_memory_gib": memory or "n/a (CPU)",
        "peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "morphkit_defaults": memory_note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (f"{args.size}-{device.type}" + (f"-{args.dtype}" if args.dtype else "") + ("-channels-last" if args.channels_last else "")
            + ("-compile" if args.compile else ""))
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# morph benchmark: {args.size} on {report['device']}", "",
             f"Command: `{report['command']}`  ", f"dtype {report['dtype']}; settings {json.dumps(report['settings'])}  ",
             f"versions {json.dumps(report['versions'])}", "", "| stage | seconds | peak GPU GiB |", "|---|---|---|"]
    for k, v in timings.items():
        lines.append(f"| {k} | {v:.4f} | {memory.get(k, '') if memory else ''} |")
    lines += ["", f"Peak host memory (max RSS): {report['peak_host_memory_gib']} GiB  ",
              f"morphkit defaults: {memory_note}"]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))




if __name__ == "__main__":
    main()
