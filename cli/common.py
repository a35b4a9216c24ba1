"""What every `morphkit` command shares: option help texts and the error-to-exit-code wrapper."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import typer

MODEL_HELP = (
    "Base model, SD 1.x or SDXL (told from the checkpoint): a hub id (used from the local Hugging Face cache when "
    "there), a local diffusers folder, a single-file SD 1.5 or SDXL .safetensors checkpoint, or 'tiny' / "
    "'tiny-sdxl' (built-in test models)."
)
VAE_HELP = (
    "Another VAE for the model: a diffusers VAE folder, a hub id, or a .safetensors file. For SDXL in fp16, "
    "madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in fp16, so it is decoded in fp32). [default: the model's]"
)


DTYPE_HELP = "auto, fp32, fp16 or bf16. [default: bf16 on CUDA GPUs that support it, else fp16; fp32 on CPU and MPS]"


def fail(message: str, code: int = 1):
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_warnings():
    """Show morphkit's warnings (LoRA compatibility, settings renamed, ...) as one `Warning:` line each, when they
    happen, without Python's file and source line: every warning that points at morphkit's or the CLI's code
    (a library's deprecation of a call morphkit makes among them); others as Python shows them."""
    import morphkit
    from morphkit.lora_files import LoraCompatibilityWarning, printable

    ours = tuple(str(folder) + os.sep for folder in (Path(morphkit.__file__).parent, Path(__file__).parent))
    with warnings.catch_warnings():
        shown_before = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LoraCompatibilityWarning) or str(filename).startswith(ours):
                typer.echo(f"Warning: {printable(message)}", err=True)
            else:
                shown_before(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", LoraCompatibilityWarning)
        warnings.showwarning = show
        yield


def call(fn, *args, **kwargs):
    """Run an API function; turn morphkit's errors and Ctrl-C into a message and an exit code, and its warnings
    into `Warning:` lines."""
    from morphkit.errors import MorphkitError
    from morphkit.io import NO_ROOM, disk_full

    try:
        with user_warnings():
            return fn(*args, **kwargs)
    except MorphkitError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail(interrupted_message(), 130)
    except OSError as e:
        if e.errno in NO_ROOM:  # a write that no morphkit writer wrapped: still the user's words
            fail(str(disk_full(Path(e.filename) if e.filename else None)), 1)
        unexpected(e)
    except MemoryError:
        fail("Out of memory. Try a smaller --resolution or --batch-size, or --gradient-checkpointing.", 1)
    except Exception as e:  # a bug in morphkit or below it: still one paragraph, with a way to the details
        unexpected(e)


def unexpected(e: Exception):
    from morphkit.errors import brief

    if "out of memory" in str(e).lower():
        fail("The GPU ran out of memory. Try a smaller --resolution or --batch-size, --gradient-checkpointing, "
             "or --mixed-precision fp16/bf16.", 1)
    if os.environ.get("MORPHKIT_DEBUG"):
        raise e
    first = brief(e, 300)
    fail(f"Unexpected {type(e).__name__}: {first}. This is probably a bug in morphkit; run again with "
         "MORPHKIT_DEBUG=1 for the full traceback and report it.", 1)


def interrupted_message() -> str:
    """What Ctrl-C leaves, for the command that was running: only `train` has --resume."""
    import click

    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx is not None else None
    if command == "train":
        return "Interrupted. Files already written are complete; continue from the last checkpoint with --resume."
    return ("Interrupted. Files already written are complete, and what finished is kept: fitted LoRAs and "
            "inversions are in the cache, so running the same command again starts after them.")


def without_processes(arguments: list[str]) -> list[str]:
    """The command line, less --processes N (each launched process runs its share, not another launch)."""
    out, skip = [], False
    for arg in arguments:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out
