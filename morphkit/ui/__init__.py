"""morphkit's web UI: a Gradio page over the same API as the CLI (`morphkit ui`, or `launch()` from Python).

It needs the `ui` extra (`pip install -e ".[ui]"`); Gradio is imported only when the page is built, so
the rest of morphkit works without it.
"""

from __future__ import annotations

import os

from ..errors import MorphkitError

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
    from .app import build_app
    from .workspace import Workspace

    from ..models import DEFAULT_MODEL

    workspace = Workspace(model or DEFAULT_MODEL, device=device, dtype=dtype, lora_dir=lora_dir, controlnet=controlnet,
                          allow_pickle=allow_pickle)
    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=host, server_port=port, share=False, max_file_size=f"{int(max_upload_mb)}mb",
                show_error=False, footer_links=[], prevent_thread_lock=not block, quiet=False)
    return demo


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MAX_UPLOAD_MB", "launch", "require_gradio"]
