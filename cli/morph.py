"""`morphkit morph`: a thin layer over `morphkit.morph`.

Options are the fields of `MorphSettings` (with '-' for '_'). Each defaults to None here, meaning "not given",
so that a `--config` file's value stands unless the flag is given; the real defaults live in `MorphSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import DTYPE_HELP, MODEL_HELP, VAE_HELP, call, fail

PICKLE_HELP = ("Allow a pickled .ckpt/.pt/.bin --model (loaded with weights_only=True). Only for files you trust; "
               "LoRA files must be .safetensors.")


HELP = {  # the longer help texts, apart, so that the command's signature reads one option a line
    "inversion_iterations": (
        "Most fixed-point iterations per inversion step after its first UNet call (0: one call per step). The end "
        "frames come back exact at any value (each step's remaining residual is kept and added back); more brings "
        "the in-between frames closer to a fully converged solve's. [default: 3]"
    ),
    "inversion_tolerance": (
        "A step stops iterating once the relative change of its latent is below this; 0 runs every iteration. "
        "[default: 0.001]"
    ),
    "attn_lambda": (
        "Self-attention interpolation: for this fraction of the sampling steps (from the start) the "
        "in-between frames' self-attention in the UNet's up blocks takes its keys and values from the two end "
        "frames, interpolated by the frame's α (DiffMorpher's lambda). Smooths the structure of the "
        "in-between frames. 0 turns it off; 1 uses it at every step. [default: 0.6]"
    ),
    "adain": (
        "AdaIN: give each in-between frame's starting noise the per-channel mean and std interpolated from "
        "the two inverted noises, so that colour and brightness go smoothly from A to B instead of fading in "
        "the middle. [default: on]"
    ),
    "pacing": (
        "even (default): after a first pass, move each frame's α so that consecutive frames are equally far "
        "apart (no rush through the middle) and render again only the frames whose α moved: up to frames-2 "
        "extra frame renders. linear: α evenly spaced, one pass, faster, but the morph can jump where the "
        "images change fastest."
    ),
    "pacing_probe_steps": (
        "Even pacing from a quick probe: draw the frames first with this many coarse DDIM steps (the same path "
        "from the same noise), pace on their distances, then render every frame once. Faster (20 steps: about "
        "a quarter less rendering), but less even than pacing on a full pass (benchmarks/results/pacing-cpu.md). "
        "[default: 0, a full first pass]"
    ),
    "distance": (
        "How --pacing even measures the distance between frames: lpips (perceptual; needs the lpips package "
        "and its AlexNet weights already on this machine), l2 (RMS pixel difference, no weights), or auto "
        "(lpips when it can run, else l2). The summary names the one used. [default: auto]"
    ),
    "lora_blend": (
        "How a frame blends the two LoRAs at its α. adapters (default): the weighted sum of the two LoRA "
        "updates, (1-α)ΔW_A + αΔW_B. factors: DiffMorpher's way, the A and B factors interpolated separately, "
        "((1-α)B_A + αB_B)((1-α)A_A + αA_B); needs LoRAs of the same rank."
    ),
    "compile_unet": (
        "Render through torch.compile. The first run waits for the compiler (90 s for the tiny morph on a cold cache; "
        "torch keeps compiled graphs on disk for later runs), then rendering is faster (the tiny morph's render: "
        "4.4 s against 5.4 s eager on one CPU thread). Worth it for long renders and repeated runs; measured figures "
        "in benchmarks/README.md."
    ),
    "tuning_free": (
        "Fit no LoRA: invert and render with the base model alone (DiffMorpher users' no_lora). Much faster; "
        "exact inversion still brings the ends back, the in-between frames follow the base model more."
    ),
    "inversion": (
        "fixed-point (default): each DDIM inversion step solved exactly by fixed-point iteration, so the first "
        "and last frames come back as the inputs (to the VAE's own round trip). ddim: plain DDIM inversion, one "
        "UNet call per step, with a visible error at the ends."
    ),
}


def morph(
    images: list[Path] = typer.Argument(..., help=(
        "Two or more images (keyframes), morphed in order into one continuous morph. The first sets the frame "
        "size; the others are scaled to cover it (aspect kept) and center-cropped.")),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON or TOML file with any of these settings (keys as the option names, '_' or '-'); flags override it."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt for both images. [default: empty]"),
    prompt_a: Optional[str] = typer.Option(None, "--prompt-a", help="Prompt for image A (overrides --prompt)."),
    prompt_b: Optional[str] = typer.Option(None, "--prompt-b", help="Prompt for image B (overrides --prompt)."),
    prompt_for: Optional[list[str]] = typer.Option(None, "--prompt-for", help="The prompt of one image: give it once per image, in order (a config file's prompts = [...])."),
    loop: Optional[bool] = typer.Option(None, "--loop/--no-loop", help="Close the chain: morph from the last image back to the first, so that the GIF and MP4 loop seamlessly. [default: off]"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Frames in all, every image's included (at least 2, and one per image); a chain shares them out by each segment's perceptual length. [default: 16]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps for inversion and rendering. [default: 50]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance. 1 (DiffMorpher's default) keeps the ends faithful. [default: 1]"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (only used when --guidance is not 1)."),
    embedding: Optional[list[Path]] = typer.Option(None, "--embedding", help="A textual-inversion embedding (.safetensors; morphkit train --train-text-encoder-ti writes NAME_emb.safetensors, A1111 and civitai embeddings load too) whose tokens the prompts may use; a morphkit embedding also turns its token abstraction (TOK) in the prompts into its tokens. Repeat for several."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the LoRA fitting (the rest is deterministic). [default: 0]"),
    lora_a: Optional[Path] = typer.Option(None, "--lora-a", help="Use this LoRA for image A instead of fitting one."),
    lora_b: Optional[Path] = typer.Option(None, "--lora-b", help="Use this LoRA for image B instead of fitting one."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Rank of the fitted LoRAs. [default: 16]"),
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="Training steps of each fitted LoRA. [default: 200]"),
    lora_lr: Optional[float] = typer.Option(None, "--lora-lr", help="Learning rate of the fitted LoRAs. [default: 2e-4]"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Shorter side of the frames in pixels, a multiple of 8. [default: the model's]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Frames rendered per UNet call. [default: 16 on a CPU, 8 on a GPU]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Folder for morph.gif, morph.mp4 and frames/. [default: outputs/morph/A-B]"),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated: gif, mp4, png (frame folder). [default: gif,mp4,png]"),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frames per second of the GIF and MP4. [default: 10]"),
    frame_duration: Optional[int] = typer.Option(None, "--frame-duration", help="Milliseconds per frame (instead of --fps)."),
    gif_loops: Optional[int] = typer.Option(None, "--gif-loops", help="How often the GIF plays; 0 repeats forever. (Earlier versions called this --loop, which now closes a chain.) [default: 0]"),
    back_and_forth: Optional[bool] = typer.Option(None, "--back-and-forth/--one-way", help="Play A to B and back in the GIF and MP4. [default: one way]"),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="Reuse fitted LoRAs and inversions from earlier runs (keyed by image content and settings). [default: on]"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the cache lives. [default: $MORPHKIT_CACHE/morph or ~/.cache/morphkit/morph]"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a morph already in the output folder."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle", help=PICKLE_HELP),
    vae: Optional[str] = typer.Option(None, "--vae", help=VAE_HELP),
    attn_lambda: Optional[float] = typer.Option(None, "--attn-lambda", help=HELP["attn_lambda"]),
    adain: Optional[bool] = typer.Option(None, "--adain/--no-adain", help=HELP["adain"]),
    pacing: Optional[str] = typer.Option(None, "--pacing", help=HELP["pacing"]),
    pacing_probe_steps: Optional[int] = typer.Option(None, "--pacing-probe-steps", help=HELP["pacing_probe_steps"]),
    distance: Optional[str] = typer.Option(None, "--distance", help=HELP["distance"]),
    lora_blend: Optional[str] = typer.Option(None, "--lora-blend", help=HELP["lora_blend"]),
    compile_unet: Optional[bool] = typer.Option(None, "--compile", help=HELP["compile_unet"]),
    tuning_free: Optional[bool] = typer.Option(None, "--tuning-free", help=HELP["tuning_free"]),
    inversion: Optional[str] = typer.Option(None, "--inversion", help=HELP["inversion"]),
    inversion_iterations: Optional[int] = typer.Option(None, "--inversion-iterations", help=HELP["inversion_iterations"]),
    inversion_tolerance: Optional[float] = typer.Option(None, "--inversion-tolerance", help=HELP["inversion_tolerance"]),
    fp32_ends: Optional[bool] = typer.Option(None, "--fp32-ends/--no-fp32-ends", help="On a model in fp16/bf16, invert and render the end frames in fp32 (the other frames stay in the model's precision). [default: on]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Morph image A into image B (and on through C, D, ...): a LoRA per image, DDIM inversion, slerp and
    blended adapters.

    With DiffMorpher's refinements: self-attention interpolation, AdaIN and even pacing (see the options).
    A chain of three or more images is one continuous morph: each image is one frame, the frames go to the
    segments by their perceptual length, and --loop closes it back to the first image.
    Writes morph.gif, morph.mp4 and frames/frame_NNN.png into the output folder.
    """
    import morphkit

    check_images(images)
    if formats is not None and not [f for f in formats.split(",") if f.strip()]:
        fail("--formats is empty: name at least one of gif, mp4, png.", 2)
    options = dict(
        prompt=prompt, prompt_a=prompt_a, prompt_b=prompt_b, model=model, frames=frames, steps=steps,
        guidance=guidance, negative_prompt=negative_prompt, seed=seed, lora_a=lora_a, lora_b=lora_b,
        lora_rank=lora_rank, lora_steps=lora_steps, lora_lr=lora_lr, resolution=resolution, batch_size=batch_size,
        output_dir=output_dir, formats=formats, fps=fps, frame_duration_ms=frame_duration, gif_loops=gif_loops,
        prompt_for=prompt_for or None, loop=loop, embeddings=[str(e) for e in embedding] if embedding else None,
        back_and_forth=back_and_forth, cache=cache, cache_dir=cache_dir, overwrite=overwrite, device=device,
        dtype=dtype, allow_pickle=allow_pickle, attn_lambda=attn_lambda, adain=adain, pacing=pacing,
        pacing_probe_steps=pacing_probe_steps,
        distance=distance, lora_blend=lora_blend, compile_unet=compile_unet, tuning_free=tuning_free,
        inversion=inversion, inversion_iterations=inversion_iterations, inversion_tolerance=inversion_tolerance,
        fp32_ends=fp32_ends, vae=vae,
    )
    settings = call(morphkit.MorphSettings.resolve, config, **options)
    result = call(morphkit.morph_chain, images, settings, progress=not quiet)
    print_summary(result, settings.steps)


def check_images(images: list[Path]) -> None:
    """Two or more images; a number where an image should be is most likely the GIF loop count of before."""
    numbers = [str(i) for i in images if str(i).isdigit() and not i.exists()]
    if numbers:
        fail(f"{numbers[0]} is not an image. --loop is a switch now (it closes a chain back to its first image); "
             f"the GIF's loop count is --gif-loops {numbers[0]}.", 2)
    if len(images) < 2:
        fail(f"A morph needs two or more images; got {len(images)}.", 2)


def print_summary(result, steps: int) -> None:
    cached = [k for k, hit in result.cache_hits.items() if hit]
    typer.echo(f"Morphed {len(result.frames)} frames of {result.frames[0].width}x{result.frames[0].height}.")
    if len(result.keyframes) > 2 or len(result.segments) > 1:
        typer.echo(f"Chain: keyframes at frames {', '.join(map(str, result.keyframes))}; steps per segment "
                   f"{', '.join(map(str, result.segments))} (shared out by perceptual length).")
    for line in morph_report(result, steps):
        typer.echo(line)
    typer.echo("Time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
               + (f" (from cache: {', '.join(cached)})" if cached else ""))
    if result.peak_memory:  # CUDA only
        typer.echo("Peak GPU memory: " + ", ".join(f"{stage} {format_bytes(n)}" for stage, n in result.peak_memory.items()))
    for kind, path in result.paths.items():
        typer.echo(f"{kind}: {path}")


def morph_report(result, steps: int) -> list[str]:
    """The summary lines on DiffMorpher's refinements: attention memory, pacing distance, frames re-rendered."""
    lines = []
    if result.attention_steps:
        kept = (f"kept {format_bytes(result.attention_bytes)} of end-frame self-attention inputs (fp16)"
                if result.attention_bytes else "nothing kept (all frames in one batch)")
        lines.append(f"Attention interpolation: first {result.attention_steps} of {steps} steps; {kept}.")
    else:
        lines.append("Attention interpolation: off.")
    if result.distance is not None:
        from morphkit.metrics import pdv
        import torch

        before, after = pdv(torch.tensor(result.first_distances)), pdv(torch.tensor(result.distances))
        how = (f"measured on a {result.probe_steps}-step probe pass, every frame rendered once" if result.probe_steps
               else f"re-rendered {len(result.rerendered)} of {len(result.frames)} frames")
        lines.append(f"Pacing: even by {result.distance} distance; {how}; PDV {before:.3g} (linear) -> {after:.3g}.")
    else:
        lines.append(f"Pacing: {result.pacing}.")
    if result.inversion:
        lines.append(f"Inversion: {result.inversion}.")
    if result.precisions:
        lines.append("Precision: " + ", ".join(f"{stage} {name}" for stage, name in result.precisions.items()) + ".")
    return lines


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
