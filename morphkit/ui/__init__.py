"""morphkit's web UI: a Gradio page over the same API as the CLI (`morphkit ui`, or `launch()` from Python).

It needs the `ui` extra (`pip install -e ".[ui]"`); Gradio is imported only when the page is built, so
the rest of morphkit works without it.
"""

from __future__ import annotations

import os
import socket
import sys

from ..errors import ConfigError, MorphkitError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD_MB = 50


def require_gradio():
    """Import Gradio, or raise `MorphkitError` saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    try:
        import gradio
    except ImportError:
        raise MorphkitError('The web UI needs Gradio, which the ui extra installs: pip install -e ".[ui]" '
                            '(from a checkout) or pip install "morphkit[ui]".') from None
    return gradio


def launch(model: str | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, lora_dir=None,
           controlnet: str | None = None, max_upload_mb: int = MAX_UPLOAD_MB, device: str | None = None,
           dtype: str | None = None, allow_pickle: bool = False, block: bool = True):
    """Load `model` once and serve the page on http://host:port until interrupted (never a public share link).

    `model`: as `load_pipeline` takes it; Stable Diffusion 1.5 by default, "tiny" runs offline.

    Jobs that use the model (Prepare, Render, Stylize) run one at a time; other visitors queue. Uploads
    above `max_upload_mb` are refused by the page.
    """
    require_gradio()
    check_port(host, port)  # before the model loads, which can take a while
    from .app import CSS, build_app
    from .workspace import Workspace

    from ..models import DEFAULT_MODEL

    workspace = Workspace(model or DEFAULT_MODEL, device=device, dtype=dtype, lora_dir=lora_dir, controlnet=controlnet,
                          allow_pickle=allow_pickle)
    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=1, max_size=32)
    # Gradio's own lines would suggest share=True, which this page never uses: morphkit says where it is instead
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=f"{int(max_upload_mb)}mb",
                show_error=False, footer_links=[], prevent_thread_lock=True, quiet=True, css=CSS)
    print(f"morphkit's page is on {demo.local_url} (no public link); press Ctrl+C to stop.", flush=True)
    if block and not (hasattr(sys, "ps1") or sys.flags.interactive):  # as Gradio does: a Python prompt stays usable
        demo.block_thread()
    return demo


def check_port(host: str, port: int) -> None:
    """Raise `ConfigError` when `host:port` cannot be listened on (in use, or not an address of this machine)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise ConfigError(f"Cannot listen on {host}:{port} ({e.strerror or e}). Another program (another morphkit "
                          "ui, perhaps) may be using that port: choose another --port, or check --host.") from None


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MAX_UPLOAD_MB", "check_port", "launch", "require_gradio"]
