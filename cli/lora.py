"""`morphkit lora ...`: inspect, convert, mix and fuse LoRA files (a thin layer over `morphkit.lora_files` and
`morphkit.lora`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import MODEL_HELP, call, fail, user_warnings

app = typer.Typer(name="lora", no_args_is_help=True, rich_markup_mode=None,
                  help="Inspect, convert, mix and fuse LoRA files (kohya, diffusers, LyCORIS, DoRA, ComfyUI).")

PICKLE_HELP = "Allow a pickled .ckpt/.pt/.bin file (read with torch.load(weights_only=True)). Only for files you trust."


@app.command()
def info(
    file: Path = typer.Argument(..., help="A LoRA file (.safetensors, kohya or diffusers format)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON instead of a summary."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """Format, kinds, base architecture, ranks, alphas, targets, which tools load it, and header metadata."""
    from morphkit.lora_files import info_lines, lora_info

    report = call(lora_info, file, allow_pickle=allow_pickle)
    if as_json:  # JSON escapes every control character itself
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    for line in info_lines(report):
        typer.echo(line)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The LoRA to convert (any kind morphkit reads)."),
    dst: Path = typer.Argument(..., help="Where to write the converted LoRA (.safetensors)."),
    to: str = typer.Option(..., "--to", help="Target format: kohya (A1111, ComfyUI, civitai) or diffusers (PEFT keys)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Rank of the LoRA that LoHa, LoKr, DoRA and diff modules become (SVD; the energy lost is reported). [default: each module's own dimension]"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The base model; needed only for DoRA files, whose update depends on its weights. " + MODEL_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
):
    """Rewrite a LoRA in kohya or diffusers format. Plain LoRA factors are copied bit for bit, alpha going along;
    LyCORIS, DoRA and ComfyUI difference modules become their nearest LoRA by SVD, and the energy lost is printed."""
    from morphkit.lora_files import convert_lora_report, printable

    def run():
        pipe = None
        if model:
            from morphkit.models import load_pipeline

            pipe = load_pipeline(model, device="cpu", dtype="fp32", allow_pickle=allow_pickle)
        return convert_lora_report(src, dst, to, overwrite=overwrite, allow_pickle=allow_pickle, rank=rank, model=pipe)

    with user_warnings():
        result = call(run)
    typer.echo(f"Wrote {printable(result.path)} ({to} format).")
    if not result.exact:
        worst = f"; worst module {printable(result.worst_module[0])} lost {result.worst_module[1]:.2%}" \
            if result.worst_module else ""
        typer.echo(f"Converted {', '.join(f'{k} (x{v})' for k, v in result.kinds.items())} by SVD: kept "
                   f"{1 - result.lost_energy:.2%} of the update's energy{worst}.")


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

    with user_warnings():
        result = call(mix_loras, loras, out, rank=rank, format=to, overwrite=overwrite, allow_pickle=allow_pickle)
    from morphkit.lora_files import printable

    ranks = sorted({m.rank for m in result.lora.modules.values()})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"
    typer.echo(f"Mixed {len(loras)} LoRA{'s' if len(loras) != 1 else ''} into {len(result.lora.modules)} modules of rank {span}: {printable(out)}")
    if rank is not None:
        worst = f"; worst module {printable(result.worst_module[0])} lost {result.worst_module[1]:.2%}" if result.worst_module else ""
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
    """Bake LoRAs (any kind morphkit reads, DoRA by its exact rescale) into a model and write a single-file SD 1.x or
    SDXL checkpoint (A1111/ComfyUI layout)."""
    import morphkit
    from morphkit.lora import fuse_lora
    from morphkit.lora_files import printable

    if not loras:
        fail("Give at least one --lora FILE[:WEIGHT].", 2)
    result = call(fuse_lora, model or morphkit.models.DEFAULT_MODEL, loras, out, dtype=dtype, overwrite=overwrite,
                  allow_pickle=allow_pickle)
    text = sum(n for part, n in result.layers.items() if part != "unet")  # SDXL: both text encoders
    typer.echo(f"Fused {len(loras)} LoRA(s) into {result.layers['unet']} UNet and {text} "
               f"text-encoder layers: {printable(result.path)}")
