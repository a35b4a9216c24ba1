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
from morphkit.models import (SD15_CONFIG, decode_latents, encode_conditioning, encode_image, encode_prompt,  # noqa: E402
                             load_pipeline, resolve_device)
from morphkit.images import cover_resize  # noqa: E402
from morphkit.morph import invert_under_loras  # noqa: E402
from morphkit.train import EncodedExample, TrainSettings, fit_lora, fit_loras  # noqa: E402
from machine import cpu_name, describe, machine_line  # noqa: E402
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
    parser.add_argument("--frames", type=int, default=None, help="Override the preset's frame count.")
    parser.add_argument("--steps", type=int, default=None, help="Override the preset's sampling steps.")
    parser.add_argument("--lora-steps", type=int, default=None, help="Override the preset's LoRA steps.")
    parser.add_argument("--no-stages", action="store_true", help="Skip the rows that time each stage alone.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS where set, else every core).")
    parser.add_argument("--reference", choices=["fp32", "both", "none"], default="both",
                        help="The reference in fp32 (the headline ratio), also in morphkit's dtype (both, the "
                             "default), or not at all.")
    parser.add_argument("--defaults-only", action="store_true",
                        help="Time only morphkit's default morph, not the plain one (the reference's algorithm): "
                             "the ratio against the reference is then the defaults' alone.")
    args = parser.parse_args()
    if args.no_reference:
        args.reference = "none"

    device = resolve_device(args.device)
    if args.size == "sdxl" and device.type != "cuda":
        sys.exit("--size sdxl is for a CUDA GPU: full-size SDXL in fp32 on a CPU needs tens of GB and hours.")
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    settings = dict(PRESETS["sd15-cpu" if args.size == "sd15" and device.type == "cpu" else "full"])
    settings.update({k: v for k, v in (("frames", args.frames), ("steps", args.steps),
                                       ("lora_steps", args.lora_steps)) if v is not None})
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    report = Report(args, device, dtype, settings)

    with Timer(device) as t:
        pipe = BUILDERS[args.size](device, dtype)
    report.record("model load" if args.size == "tiny" else "model build (random weights)", t)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    resolution = settings["resolution"] = settings["resolution"] or 8 * pipe.unet.config.sample_size
    img_a = load_image(PHOTOS / "astronaut.jpg", resolution)
    settings["frame size"] = list(img_a.size)
    prompts = ("a photo of an astronaut", "a photo of a cat")

    if args.size != "sdxl" and not args.no_stages:
        stage_rows(pipe, device, settings, img_a, prompts, report.record)
    else:
        warm_up(pipe, img_a)

    # --- the whole morph: morphkit, then the reference, on the same pipeline ---
    common = dict(prompt_a=prompts[0], prompt_b=prompts[1], frames=settings["frames"], steps=settings["steps"],
                  lora_steps=settings["lora_steps"], resolution=resolution, formats=(), cache=False, progress=False)
    whole_morphs(pipe, device, settings, common, args, report)
    print("\n".join(report.save()))


class Report:
    """The rows so far, written out after every one: a run stopped at a time limit keeps what it measured."""

    def __init__(self, args, device, dtype, settings: dict):
        self.args, self.device, self.dtype, self.settings = args, device, dtype, settings
        self.timings, self.memory, self.note = {}, {}, ""

    def record(self, name, timer, per=1, result=None):
        self.timings[name] = timer.seconds / per
        if result is not None and result.peak_memory:  # morph resets the peak at each stage: take its stages' peak
            self.memory[name] = round(max(result.peak_memory.values()) / 2**30, 2)
        elif timer.peak_gib is not None:
            self.memory[name] = round(timer.peak_gib, 2)
        self.save()

    def add(self, name, seconds, memory_gib=None):
        self.timings[name] = seconds
        if memory_gib is not None:
            self.memory[name] = memory_gib
        self.save()

    def stem(self) -> str:
        a = self.args
        return (f"{a.size}-{self.device.type}" + (f"-{a.dtype}" if a.dtype else "")
                + ("-channels-last" if a.channels_last else "") + ("-compile" if a.compile else ""))

    def save(self) -> list[str]:
        """Write <stem>.json and .md into --out; returns the Markdown lines."""
        args, device = self.args, self.device
        report = {
            "size": args.size,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({cpu_name()})",
            "command": "python benchmarks/bench_morph.py " + " ".join(sys.argv[1:]),
            **describe(),
            "dtype": str(self.dtype).replace("torch.", "") + (", channels-last" if args.channels_last else ""),
            "settings": self.settings,
            "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                         "peft": __import__("peft").__version__, "morphkit": morphkit.__version__,
                         "python": platform.python_version()},
            "seconds": {k: round(v, 4) for k, v in self.timings.items()},
            "peak_gpu_memory_gib": self.memory or "n/a (CPU)",
            "peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "morphkit_defaults": self.note,
            # what "fp32" means on a GPU: morphkit's exact stages turn TF32 off (models.stage_precision)
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out / f"{self.stem()}.json", json.dumps(report, indent=2) + "\n")
        lines = [f"# morph benchmark: {args.size} on {report['device']}", "", machine_line(report) + "  ",
                 f"dtype {report['dtype']}; settings {json.dumps(report['settings'])}  ",
                 f"versions {json.dumps(report['versions'])}", "", "| stage | seconds | peak GPU GiB |", "|---|---|---|"]
        for k, v in self.timings.items():
            lines.append(f"| {k} | {v:.4f} | {self.memory.get(k, '')} |")
        lines += ["", f"Peak host memory (max RSS): {report['peak_host_memory_gib']} GiB  ",
                  f"morphkit defaults: {self.note}"]
        write_atomically(args.out / f"{self.stem()}.md", "\n".join(lines) + "\n")
        return lines


def write_atomically(path: Path, text: str) -> None:
    """A stopped run leaves the last whole file, never a cut-off one (the GPU check reads them as they come)."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def warm_up(pipe, img):
    """One VAE round trip and two UNet calls, untimed: the first morph timed must not pay the device's first-use
    costs (CUDA context, cuBLAS / cuDNN algorithm choice) when no stage rows ran before it."""
    with torch.no_grad():
        latent = encode_image(pipe, img)
        decode_latents(pipe, latent)
        model = eps_model(pipe.unet, encode_conditioning(pipe, "a photo", img.size[::-1]).to(latent.device))
        for _ in range(2):
            model(latent, torch.tensor(999))
    sync(latent.device)


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


def whole_morphs(pipe, device, settings, common, args, report: Report):
    """The whole morph: morphkit's plain one (the reference's algorithm), its defaults, then the reference."""
    # Against the reference, the same algorithm: plain slerp + adapter blend, linear α, no attention
    # interpolation or AdaIN. What morphkit's defaults add is timed after it, on its own line.
    plain = dict(attn_lambda=0.0, adain=False, pacing="linear")
    if not args.defaults_only:
        result = timed_morph(pipe, device, common, plain, "morphkit: whole morph", report)
        for stage, seconds in result.timings.items():
            peak = result.peak_memory.get(stage)
            report.add(f"morphkit: {stage}", seconds, None if peak is None else round(peak / 2**30, 2))
        report.add("morphkit: rendering per frame", result.timings["render"] / settings["frames"])
    result = timed_morph(pipe, device, common, {},
                         "morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph", report)
    report.note = (f"attention store {result.attention_bytes / 2**20:.1f} MiB, {len(result.rerendered)} frames "
                   f"re-rendered, pacing probe {result.probe_steps} steps")
    report.add("morphkit defaults: render", result.timings["render"])
    report.save()
    if args.compile:
        for label, options in (("morphkit", plain), ("morphkit defaults", {})):
            for run in ("first run, compiling", "second run"):
                result = timed_morph(pipe, device, common, {**options, "compile_unet": True},
                                     f"{label} + torch.compile ({run}): whole morph", report)
                report.add(f"{label} + torch.compile ({run}): render", result.timings["render"])
    if args.reference != "none":
        reference_morphs(pipe, device, settings, common, args, report)


def timed_morph(pipe, device, common: dict, options: dict, label: str, report: Report):
    """One whole morph in-process on `pipe` (its adapters from an earlier morph removed first), timed as `label`."""
    for name in ("img0", "img1"):
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    with Timer(device) as t:
        result = morphkit.morph(PHOTOS / "astronaut.jpg", PHOTOS / "chelsea.jpg", pipe=pipe, **common, **options)
    report.record(label, t, result=result)
    return result


def reference_morphs(pipe, device, settings, common, args, report: Report):
    """The reference as the issue defines it runs in fp32. Where morphkit runs in another dtype (fp16 on CUDA) and
    `--reference both`, it also runs in morphkit's dtype, so the ratio can be read both ways."""
    dtype = pipe.unet.dtype
    for name in ("img0", "img1"):
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    img_a = load_image(PHOTOS / "astronaut.jpg", common["resolution"])
    img_b = cover_resize(load_image(PHOTOS / "chelsea.jpg"), img_a.size)
    runs = [(torch.float32, "reference: whole morph")]
    if dtype != torch.float32 and args.reference == "both":
        runs.append((dtype, f"reference in {str(dtype).replace('torch.', '')}: whole morph"))
    for ref_dtype, label in runs:
        ref_pipe = pipe if ref_dtype == dtype else BUILDERS[args.size](device, ref_dtype)
        if args.channels_last and ref_pipe is not pipe:
            ref_pipe.unet.to(memory_format=torch.channels_last)
            ref_pipe.vae.to(memory_format=torch.channels_last)
        tensors = [to_tensor(img).to(device, ref_dtype) for img in (img_a, img_b)]
        with Timer(device) as t:
            reference_morph(ref_pipe, *tensors, common["prompt_a"], common["prompt_b"], settings["frames"],
                            settings["steps"], settings["lora_steps"])
        report.record(label, t)
        if ref_pipe is not pipe:
            del ref_pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ours = report.timings.get("morphkit: whole morph")
    if ours:
        report.add("speed-up (reference / morphkit)", report.timings["reference: whole morph"] / ours)
        if len(runs) > 1:
            report.add("speed-up (reference in morphkit's dtype / morphkit)", report.timings[runs[1][1]] / ours)
    defaults = report.timings.get("morphkit defaults (attention interpolation, AdaIN, even pacing): whole morph")
    if defaults:  # what bench_summary.py's ratios compare: morphkit's defaults against the reference
        report.add("speed-up (reference / morphkit defaults)", report.timings["reference: whole morph"] / defaults)
    report.save()


if __name__ == "__main__":
    main()
