"""`morphkit stylize`: a thin layer over `morphkit.stylize`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cli.common import DTYPE_HELP, MODEL_HELP, VAE_HELP, call

LORA_HELP = ("A style LoRA (.safetensors, kohya or diffusers format), optionally with its weight as PATH:WEIGHT "
             "(default 1). Repeat for several.")
PROMPT_HELP = ("What the picture shows, with the style's trigger words, e.g. 'a painting in mkstyle style'. "
               "[default: empty]")
STRENGTH_HELP = "How far to redraw, above 0 up to 1: near 0 keeps the photo, 1 redraws from noise."
STEPS_HELP = "DDIM steps of a full redraw; img2img runs int(steps x strength) of them."
CANNY_LOW_HELP = ("Canny low threshold, 0-255. [default: 0.67 x each image's median brightness, or half "
                  "--canny-high when only that is given]")
CANNY_HIGH_HELP = ("Canny high threshold, 0-255, at least --canny-low. [default: 1.33 x each image's median "
                   "brightness, or twice --canny-low when only that is given; at most 255]")
RESOLUTION_HELP = ("Shorter side of the output in pixels, a multiple of 8; the aspect ratio is kept. "
                   "[default: the model's, 512 for SD 1.5, 1024 for SDXL]")
CONTROLNET_HELP = (
    "ControlNet-Canny: a hub id, a local diffusers folder, a single-file SD 1.5 or SDXL ControlNet .safetensors, "
    "or 'tiny' (the built-in test model's of the model's family). [default: lllyasviel/sd-controlnet-canny for "
    "SD 1.x, diffusers/controlnet-canny-sdxl-1.0 for SDXL; tiny with --model tiny or tiny-sdxl]"
)
PICKLE_HELP = ("Allow a pickled .ckpt/.pt/.bin model or ControlNet (loaded with weights_only=True). "
               "Only for files you trust.")


def stylize(
    images: list[Path] = typer.Argument(..., help="Images, or folders of images, to stylize."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", "-l", help=LORA_HELP),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Multiplies every LoRA's weight; 0: the base model."),
    prompt: str = typer.Option("", "--prompt", "-p", help=PROMPT_HELP),
    embedding: Optional[list[Path]] = typer.Option(None, "--embedding", help="A textual-inversion embedding (.safetensors; morphkit train --train-text-encoder-ti writes NAME_emb.safetensors, A1111 and civitai embeddings load too) whose tokens the prompts may use; a morphkit embedding also turns its token abstraction (TOK) in the prompts into its tokens. Repeat for several."),
    negative_prompt: str = typer.Option("", "--negative-prompt",
                                        help="What to steer away from (with --guidance above 1)."),
    strength: float = typer.Option(0.5, "--strength", help=STRENGTH_HELP),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; 1 turns it off. [default: the model's: 7.5 for SD 1.x, 5 for SDXL]"),
    controlnet_scale: float = typer.Option(0.5, "--controlnet-scale",
                                           help="How strongly the edges hold the layout; 0 ignores them."),
    steps: int = typer.Option(50, "--steps", help=STEPS_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise: the same seed and settings, the same image."),
    canny_low: Optional[int] = typer.Option(None, "--canny-low", help=CANNY_LOW_HELP),
    canny_high: Optional[int] = typer.Option(None, "--canny-high", help=CANNY_HIGH_HELP),
    resolution: Optional[int] = typer.Option(None, "--resolution", help=RESOLUTION_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help=CONTROLNET_HELP),
    output_dir: Path = typer.Option(Path("outputs/stylize"), "--output-dir", "-o",
                                    help="Where to write NAME.png and NAME.edges.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that already exist."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    vae: Optional[str] = typer.Option(None, "--vae", help=VAE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Redraw photos with style LoRAs through ControlNet-Canny img2img.

    Each image keeps its aspect ratio; its Canny edge map holds the layout while the LoRAs set the style.
    Writes NAME.png and NAME.edges.png per image. If some images fail, the others are still done, the
    failures are listed and the exit status is 1.
    """
    import morphkit
    from morphkit.models import DEFAULT_MODEL

    start = time.perf_counter()
    result = call(
        morphkit.stylize, images, lora or [], prompt=prompt, negative_prompt=negative_prompt, embedding=embedding or (),
        lora_scale=lora_scale,
        strength=strength, guidance=guidance, controlnet_scale=controlnet_scale, steps=steps, seed=seed,
        canny_low=canny_low, canny_high=canny_high, resolution=resolution, model=model or DEFAULT_MODEL,
        controlnet=controlnet, output_dir=output_dir, overwrite=overwrite, device=device,
        dtype=dtype, allow_pickle=allow_pickle, vae=vae, progress=not quiet,
    )
    total = len(result.stylized) + len(result.failed)
    loras = ", ".join(f"{path.name} x{weight:g}" for path, weight in result.loras) or "none"
    typer.echo(f"Stylized {len(result.stylized)} of {total} image{'s' if total != 1 else ''} in "
               f"{time.perf_counter() - start:.1f} s (LoRA: {loras}).")
    for item in result.stylized:
        low, high = item.thresholds
        typer.echo(f"{item.paths['image']}  {item.image.width}x{item.image.height}, edges {item.paths['edges']} "
                   f"(Canny {low}/{high})")
    for path, message in result.failed.items():
        typer.echo(f"Error: {message}" if str(path) in message else f"Error: {path}: {message}", err=True)
    if result.failed:
        raise typer.Exit(1)
