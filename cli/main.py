"""The `morphkit` command: a thin Typer layer over the Python API.

Each command parses its options, calls the function of the same name in `morphkit` once, and
prints a short summary. Errors that morphkit raises on purpose (`MorphkitError`) become one
paragraph on stderr and a non-zero exit code; no traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    name="morphkit",
    help="Edit and morph single images with Stable Diffusion 1.5 and LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

MODEL_HELP = (
    "Base model: a hub id (used from the local Hugging Face cache when there), a local diffusers folder, "
    "a single-file SD 1.5 .safetensors checkpoint, or 'tiny' (built-in test model)."
)


def fail(message: str, code: int = 1):
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def call(fn, *args, **kwargs):
    """Run an API function; turn morphkit's errors and Ctrl-C into a message and an exit code."""
    from morphkit.errors import MorphkitError

    try:
        return fn(*args, **kwargs)
    except MorphkitError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("Interrupted. Files already written are complete; a training run continues from its last "
             "checkpoint with --resume.", 130)
    except MemoryError:
        fail("Out of memory. Try a smaller --resolution or --batch-size, or --gradient-checkpointing.", 1)
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            fail("The GPU ran out of memory. Try a smaller --resolution or --batch-size, --gradient-checkpointing, "
                 "or --mixed-precision fp16/bf16.", 1)
        raise


def version_callback(value: bool):
    if value:
        from morphkit import __version__

        typer.echo(f"morphkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."),
):
    """Edit and morph single images with Stable Diffusion 1.5 and LoRA.

    Try it offline on the built-in tiny model:  morphkit train dataset/photos/astronaut.jpg --prompt "a photo" --model tiny
    """


@app.command()
def train(
    data: Optional[Path] = typer.Argument(None, help="An image (with --prompt) or a folder with metadata.jsonl. May come from --config instead."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Caption for a single training image, e.g. 'a photo of sks'."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON or TOML file with any of these settings (keys as the option names, '_' or '-'); flags override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Folder for the LoRA, its log and checkpoints. [default: outputs/lora/NAME]"),
    name: Optional[str] = typer.Option(None, "--name", help="File name of the LoRA (without .safetensors). [default: the image or folder name]"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="LoRA rank. [default: 16]"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha; the update is scaled by alpha/rank. [default: rank]"),
    targets: Optional[str] = typer.Option(None, "--targets", help="Comma-separated UNet module names to adapt. [default: to_q,to_k,to_v,to_out.0]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps. [default: 200, unless --epochs]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the data, instead of --steps."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Learning rate. [default: 2e-4]"),
    lr_scheduler: Optional[str] = typer.Option(None, "--lr-scheduler", help="constant, cosine or linear. [default: constant]"),
    lr_warmup_steps: Optional[int] = typer.Option(None, "--lr-warmup-steps", help="Steps of linear warm-up. [default: 0]"),
    adam_beta1: Optional[float] = typer.Option(None, "--adam-beta1", help="AdamW beta1. [default: 0.9]"),
    adam_beta2: Optional[float] = typer.Option(None, "--adam-beta2", help="AdamW beta2. [default: 0.999]"),
    adam_weight_decay: Optional[float] = typer.Option(None, "--adam-weight-decay", help="AdamW weight decay. [default: 0.01]"),
    adam_epsilon: Optional[float] = typer.Option(None, "--adam-epsilon", help="AdamW epsilon. [default: 1e-8]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per micro-batch. [default: 1]"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps", help="Micro-batches per optimizer step. [default: 1]"),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm. [default: 1.0]"),
    noise_offset: Optional[float] = typer.Option(None, "--noise-offset", help="Noise offset (0.1 helps very dark/bright styles). [default: 0]"),
    snr_gamma: Optional[float] = typer.Option(None, "--snr-gamma", help="Min-SNR loss weighting gamma (5.0 is usual). [default: off]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for LoRA init, data order, noise and timesteps. [default: 0]"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Shorter image side in pixels, a multiple of 8. [default: the model's, 512 for SD 1.5, 64 for tiny]"),
    crop: Optional[str] = typer.Option(None, "--crop", help="center or random (square crops), or none (whole image, aspect kept). [default: none for one image, center for a folder]"),
    random_flip: Optional[bool] = typer.Option(None, "--random-flip/--no-random-flip", help="Flip images left-right at random. [default: off]"),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto, no, fp16 or bf16. Base weights in that precision, LoRA weights fp32. [default: auto: bf16 on CUDA if supported, else fp16; no on CPU/MPS]"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory. [default: off]"),
    checkpointing_steps: Optional[int] = typer.Option(None, "--checkpointing-steps", help="Save a resumable checkpoint every N steps (0: none). [default: 100]"),
    checkpoints_total_limit: Optional[int] = typer.Option(None, "--checkpoints-total-limit", help="Keep at most K checkpoints. [default: 2]"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing LoRA and start afresh (with --resume: continue, then replace)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled .ckpt/.pt/.bin model (loaded with weights_only=True). Only for files you trust."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Fit a LoRA to one image (overfitting is the point) or to a captioned folder (a style).

    Writes NAME.safetensors (diffusers format, loads with pipe.load_lora_weights), train_log.jsonl,
    train_settings.json and checkpoints/ into the output folder.
    """
    import morphkit

    settings = dict(
        rank=rank, alpha=alpha, targets=targets, steps=steps, epochs=epochs, learning_rate=learning_rate,
        lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        adam_weight_decay=adam_weight_decay, adam_epsilon=adam_epsilon, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
        noise_offset=noise_offset, snr_gamma=snr_gamma, seed=seed, resolution=resolution, crop=crop,
        random_flip=random_flip, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        checkpointing_steps=checkpointing_steps, checkpoints_total_limit=checkpoints_total_limit,
    )
    start = time.perf_counter()
    result = call(
        morphkit.train_lora, data, prompt, config=config, model=model, output_dir=output_dir, name=name,
        device=device, resume=resume, overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet, **settings,
    )
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
    typer.echo(f"Trained {result.steps} steps{resumed}{last} in {time.perf_counter() - start:.1f} s.")
    typer.echo(f"LoRA: {result.lora_path}")
    typer.echo(f"Log:  {result.output_dir / 'train_log.jsonl'}")


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
