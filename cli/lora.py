"""`morphkit lora ...`: inspect, convert, mix and fuse LoRA files (a thin layer over `morphkit.lora_files` and
`morphkit.lora`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import MODEL_HELP, call, fail

app = typer.Typer(name="lora", no_args_is_help=True, rich_markup_mode=None,
                  help="Inspect, convert, mix and fuse LoRA files (kohya and diffusers formats).")

PICKLE_HELP = "Allow a pickled .ckpt/.pt/.bin file (read with torch.load(weights_only=True)). Only for files you trust."


@app.command()
def info(
    file: Path = typer.Argument(..., help="A LoRA file (.safetensors, kohya or diffusers format)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON instead of a summary."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """Format, base architecture, ranks, alphas, target modules and header metadata of a LoRA file."""
    from morphkit.lora_files import lora_info

    report = call(lora_info, file, allow_pickle=allow_pickle)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    counts = lambda d: ", ".join(f"{k} (x{v})" for k, v in d.items())  # noqa: E731
    typer.echo(f"{report['path']}")
    typer.echo(f"  format:        {report['format']}")
    typer.echo(f"  made for:      {report['base']}")
    typer.echo(f"  modules:       {report['modules']} ({report['unet_modules']} UNet, "
               f"{report['text_encoder_modules']} text encoder)")
    typer.echo(f"  ranks:         {counts(report['ranks'])}")
    typer.echo(f"  alphas:        {counts(report['alphas'])}")
    typer.echo(f"  parameters:    {report['parameters']:,} ({report['dtype']})")
    typer.echo("  targets:       " + counts(report["targets"]))
    if report["metadata"]:
        typer.echo("  header:")
        for key, value in report["metadata"].items():
            value = value if len(value) <= 100 else value[:97] + "..."
            typer.echo(f"    {key}: {value}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The LoRA to convert."),
    dst: Path = typer.Argument(..., help="Where to write the converted LoRA (.safetensors)."),
    to: str = typer.Option(..., "--to", help="Target format: kohya (A1111, ComfyUI, civitai) or diffusers (PEFT keys)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """Rewrite a LoRA in the other format. The factors are copied bit for bit; alpha goes along."""
    from morphkit.lora_files import convert_lora

    path = call(convert_lora, src, dst, to=to, overwrite=overwrite, allow_pickle=allow_pickle)
    typer.echo(f"Wrote {path} ({to} format).")


@app.command()
def mix(
    loras: List[str] = typer.Argument(..., help="LoRAs with weights, FILE:WEIGHT (weight 1 if left out)."),
    out: Path = typer.Option(..., "--out", "-o", help="The mixed LoRA to write (.safetensors)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Reduce to this rank by SVD (reports the energy lost). [default: exact, ranks concatenated]"),
    to: str = typer.Option("kohya", "--to", help="Format of the result: kohya or diffusers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """One LoRA whose effect is the weighted sum of the inputs' effects."""
    from morphkit.lora_files import mix_loras

    result = call(mix_loras, loras, out, rank=rank, format=to, overwrite=overwrite, allow_pickle=allow_pickle)
    ranks = sorted({m.rank for m in result.lora.modules.values()})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"
    typer.echo(f"Mixed {len(loras)} LoRAs into {len(result.lora.modules)} modules of rank {shown}: {out}")
    if rank is not None:
        worst = f"; worst module {result.worst_module[0]} lost {result.worst_module[1]:.2%}" if result.worst_module else ""
        typer.echo(f"SVD to rank {rank} kept {1 - result.lost_energy:.2%} of the update's energy{worst}.")


@app.command()
def fuse(
    loras: List[str] = typer.Option(..., "--lora", "-l", help="A LoRA to bake in, FILE or FILE:WEIGHT; repeat for several."),
    out: Path = typer.Option(..., "--out", "-o", help="The fused single-file checkpoint to write (.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    dtype: str = typer.Option("fp16", "--dtype", help="Precision of the written checkpoint: fp16, bf16 or fp32 (the sum is done in fp32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """Bake LoRAs into a model and write a single-file SD 1.x checkpoint (A1111/ComfyUI layout)."""
    import morphkit
    from morphkit.lora import fuse_lora

    if not loras:
        fail("Give at least one --lora FILE[:WEIGHT].", 2)
    result = call(fuse_lora, model or morphkit.models.DEFAULT_MODEL, loras, out, dtype=dtype, overwrite=overwrite,
                  allow_pickle=allow_pickle)
    typer.echo(f"Fused {len(loras)} LoRA(s) into {result.layers['unet']} UNet and {result.layers['text_encoder']} "
               f"text-encoder layers: {result.path}")
