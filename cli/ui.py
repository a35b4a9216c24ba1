"""`morphkit ui`: serve the web UI (needs the `ui` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import DTYPE_HELP, MODEL_HELP, call

HOST_HELP = ("Address to listen on. The default, 127.0.0.1, is this machine only; 0.0.0.0 opens the page to your "
             "network (it has no login: do that only on a network you trust). Never a public share link.")
LORA_DIR_HELP = "Folder whose .safetensors files the Stylize tab offers to pick. [default: outputs/lora]"


def ui(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help=MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    lora_dir: Optional[Path] = typer.Option(None, "--lora-dir", help=LORA_DIR_HELP),
    controlnet: Optional[str] = typer.Option(None, "--controlnet",
                                             help="ControlNet-Canny for the Stylize tab, as `stylize` takes it."),
    max_upload_mb: int = typer.Option(50, "--max-upload-mb", help="Largest upload the page accepts, in MB."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
):
    """Serve morphkit's web UI: a Morph tab (Prepare, Render, Cancel; fast re-render) and a Stylize tab.

    The model is loaded once; jobs run one at a time and other visitors queue. Open the printed address
    in a browser; Ctrl-C stops the server.
    """
    from morphkit.models import DEFAULT_MODEL
    from morphkit.ui import launch, require_gradio

    call(require_gradio)
    call(_check_options, port, max_upload_mb)
    call(launch, model or DEFAULT_MODEL, host=host, port=port, lora_dir=lora_dir, controlnet=controlnet,
         max_upload_mb=max_upload_mb, device=device, dtype=dtype)


def _check_options(port: int, max_upload_mb: int) -> None:
    from morphkit.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535; got {port}.")
    if max_upload_mb < 1:
        raise ConfigError(f"--max-upload-mb must be at least 1; got {max_upload_mb}.")
