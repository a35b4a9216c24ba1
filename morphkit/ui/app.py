"""The page: a `gr.Blocks` with a Morph tab and a Stylize tab over one `Workspace`.

Jobs that use the model run one at a time in the queue group `model`; previews and checks of uploads run
beside them. Every handler returns its outcome to a status box (`#morph-status`, `#stylize-status`), errors
included: the page never shows a traceback and the server keeps running.
"""

from __future__ import annotations

from . import require_gradio
from .morph_tab import morph_tab
from .stylize_tab import stylize_tab
from .workspace import Workspace

CSS = "#morph-gif img { width: 100%; height: 100%; object-fit: contain; }"  # small frames shown large, not tiny


def build_app(workspace: Workspace):
    """The whole page for `workspace` (not launched)."""
    gr = require_gradio()

    with gr.Blocks(title="morphkit", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## morphkit\nModel: `{workspace.model}`. Morph two photos into each other, or redraw photos "
                    "in a LoRA's style. Jobs run one at a time; others wait in the queue.")
        with gr.Tabs():
            with gr.Tab("Morph", id="morph"):
                morph_tab(workspace)
            with gr.Tab("Stylize", id="stylize"):
                stylize_tab(workspace)
    return demo
