"""The `morphkit` command: a thin Typer layer over the Python API.

Each command parses its options, calls the function of the same name in `morphkit` once, and
prints a short summary. Errors that morphkit raises on purpose (`MorphkitError`) become one
paragraph on stderr and a non-zero exit code; no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import DTYPE_HELP, MODEL_HELP, VAE_HELP, call

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    name="morphkit",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

def version_callback(value: bool):
    if value:
        from morphkit import __version__

        typer.echo(f"morphkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."),
):
    """Edit and morph single images with Stable Diffusion (1.5 and SDXL) and LoRA.

    Try it offline on the built-in tiny model:
    morphkit morph dataset/photos/astronaut.jpg dataset/photos/chelsea.jpg --model tiny
    """


@app.command()
def invert(
    image: Path = typer.Argument(..., help="The image to invert."),
    prompt: str = typer.Option("", "--prompt", "-p", help="The prompt it is inverted under (use the LoRA's training prompt). [default: empty]"),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A LoRA (.safetensors, kohya or diffusers format) to invert under, e.g. one fitted to this image."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    inversion: str = typer.Option("fixed-point", "--inversion", help=(
        "fixed-point: each inversion step solved by fixed-point iteration, so that sampling maps the noise back "
        "onto the image (to float rounding). ddim: plain DDIM inversion, one UNet call per step, faster but "
        "inexact (24 to 50 % latent error on the tiny model at 50 steps, against at most 5e-5)."
    )),
    inversion_iterations: Optional[int] = typer.Option(None, "--inversion-iterations", help=(
        "Most fixed-point iterations per inversion step, Anderson-accelerated (one UNet call each, after the call at "
        "the plain DDIM guess). "
        "[default: 10]"
    )),
    inversion_tolerance: Optional[float] = typer.Option(None, "--inversion-tolerance", help=(
        "A step stops iterating once the relative change of its latent is below this; 0 runs every iteration. "
        "[default: 1e-05]"
    )),
    guidance: float = typer.Option(1.0, "--guidance", help=(
        "Classifier-free guidance of the eps that inversion and regeneration use: invert with the guidance you "
        "will sample with, and the round trip still closes."
    )),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt (only used when --guidance is not 1)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Shorter image side in pixels, a multiple of 8. [default: the model's]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where to write NAME.noise.safetensors, NAME.reconstruction.png and NAME.inversion.json. [default: outputs/invert/NAME]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP + " Inversion and regeneration run with the UNet in fp32 whatever it is."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled .ckpt/.pt/.bin model (loaded with weights_only=True). Only for files you trust."),
    vae: Optional[str] = typer.Option(None, "--vae", help=VAE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Invert an image back to the noise that DDIM sampling maps onto it (exact fixed-point inversion by default).

    Saves the noise (safetensors, key 'noise', with the image latent as 'latent'), the image regenerated
    from it, and NAME.inversion.json with the round-trip error and the settings; prints the error.
    """
    import morphkit
    from morphkit.inversion import Inversion

    given = {k: v for k, v in (("iterations", inversion_iterations), ("tolerance", inversion_tolerance)) if v is not None}
    settings = Inversion(inversion, **given)
    result = call(morphkit.invert, image, prompt, lora=lora, model=model, steps=steps, inversion=settings,
                  guidance=guidance, negative_prompt=negative_prompt, resolution=resolution, output_dir=output_dir,
                  overwrite=overwrite, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae,
                  progress=not quiet)
    guided = f", guidance {guidance:g}" if guidance != 1.0 else ""
    typer.echo(f"Inverted with {settings.describe()}: {steps} steps{guided}, {result.model_calls} UNet calls in "
               f"{result.seconds:.1f} s, UNet in {result.settings['precision']}.")
    typer.echo(f"Round trip: latent error {100 * result.latent_error:.2g}% (||regenerated - latent|| / ||latent|| = "
               f"{result.latent_error:.2e}), PSNR {result.psnr:.1f} dB against the VAE's own reconstruction.")
    for kind, path in result.paths.items():
        typer.echo(f"{kind}: {path}")


@app.command(name="eval")
def eval_(
    frames: Path = typer.Argument(..., help=(
        "The morph: a folder of frames (in natural order: frame_2 before frame_10) or a GIF (a --back-and-forth GIF is cut to its A-to-B "
        "half)."
    )),
    image_a: Optional[Path] = typer.Option(None, "--a", help=(
        "Image A, the morph's start (scaled to cover the frame size and center-cropped, as morph does)."
    )),
    image_b: Optional[Path] = typer.Option(None, "--b", help="Image B, the morph's end (scaled and cropped the same way)."),
    keyframes: Optional[list[Path]] = typer.Option(None, "--keyframe", "-k", help=(
        "A chain's images, in order: give it once per keyframe (instead of --a and --b). Each is found at its "
        "most similar frame, after the one before, and its PSNR and SSIM are measured there."
    )),
    distance: str = typer.Option("auto", "--distance", help=(
        "Distance between neighbouring frames: lpips (needs the lpips package and its AlexNet weights on this "
        "machine), l2 (RMS pixel difference, no weights), or auto (lpips when it can run, else l2)."
    )),
    protocol: str = typer.Option("morphkit", "--protocol", help=(
        "How PPL and PDV are measured. morphkit: --distance on the frames as they are. diffmorpher: the "
        "DiffMorpher authors' protocol (LPIPS with AlexNet from the lpips package, frames resized to 512x512, "
        "values in [-1, 1]), so that the numbers compare with their paper's; needs lpips and its weights."
    )),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=(
        "Also compare each end frame with its input's VAE round trip (encoded and decoded by this model's VAE: "
        "the best a latent-diffusion morph can reproduce). Use the morph's model. " + MODEL_HELP
    )),
    device: Optional[str] = typer.Option(None, "--device", help="Where the distance and the VAE run: auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    json_path: Optional[str] = typer.Option(None, "--json", help=(
        "Also write the numbers as JSON to this file (written atomically), or '-' to print only the JSON to "
        "stdout."
    )),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
):
    """Measure a morph: PPL and PDV of the distances between neighbouring frames, PSNR and SSIM of its ends.

    PPL (path length) is the sum of the neighbour distances; PDV their variance (0 is perfectly even
    pacing). Endpoint fidelity compares the first frame with A and the last with B, and with --model also
    with their VAE round trips. Frames from a PNG folder measure more faithfully than a GIF, whose colours
    are reduced to 256.
    """
    import json

    import morphkit
    from morphkit.io import check_can_write, write_json

    target = None
    if json_path not in (None, "-"):
        target = call(check_can_write, json_path, overwrite, "JSON file")
    result = call(morphkit.evaluate, frames, image_a, image_b, distance=distance, protocol=protocol, model=model,
                  device=device, keyframes=keyframes or None)
    data = result.to_dict()
    if json_path == "-":
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for line in eval_report(result, frames):
        typer.echo(line)
    if target is not None:
        call(write_json, target, data)
        typer.echo(f"JSON: {target}")


def eval_report(result, frames) -> list[str]:
    """The lines `morphkit eval` prints."""
    from morphkit.metrics import PROTOCOLS

    steps = result.distances
    lines = [f"Frames     {result.frames} of {result.size[0]}x{result.size[1]} ({frames})",
             f"Protocol   {result.protocol} ({PROTOCOLS[result.protocol].help})",
             f"Distance   {result.distance}" + (f" ({result.note})" if result.note else ""),
             f"PPL        {result.ppl:.4f}   (sum of neighbour distances)",
             f"PDV        {result.pdv:.3g}   (their variance; 0 is even pacing)",
             f"Steps      min {min(steps):.4f}  mean {sum(steps) / len(steps):.4f}  max {max(steps):.4f}",
             "Ends       against the input            against its VAE round trip"]
    for label, side in (("Start (A)", "a"), ("End (B)  ", "b")):
        own = f"PSNR {getattr(result, 'psnr_' + side):6.2f} dB  SSIM {getattr(result, 'ssim_' + side):.4f}"
        vae = (f"PSNR {result.vae['psnr_' + side]:6.2f} dB  SSIM {result.vae['ssim_' + side]:.4f}"
               if result.vae else "-")
        lines.append(f"{label}  {own}   {vae}")
    for k in result.keyframes or []:
        lines.append(f"Keyframe   frame {k['frame']:3d}  PSNR {k['psnr']:6.2f} dB  SSIM {k['ssim']:.4f}  ({k['image']})")
    if result.vae:
        lines.append(f"VAE round trip by {result.vae['model']}.")
    else:
        lines.append("VAE round trip: not measured (pass --model, the morph's model, to compare the ends with what "
                     "its VAE can reproduce).")
    return lines


# Command groups that live in their own modules.
from cli import lora as _lora_cli  # noqa: E402

from cli.batch import batch as _batch  # noqa: E402
from cli.morph import morph as _morph  # noqa: E402
from cli.stylize import stylize as _stylize  # noqa: E402
from cli.train import train as _train  # noqa: E402

app.add_typer(_lora_cli.app, name="lora")
app.command(name="train")(_train)
app.command(name="morph")(_morph)
app.command(name="stylize")(_stylize)
app.command(name="batch")(_batch)
from cli.ui import ui as _ui  # noqa: E402
app.command(name="ui")(_ui)


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
