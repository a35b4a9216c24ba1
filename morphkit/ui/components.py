"""What both tabs share: the queue group of model jobs, the path-passing image input, the session of a request."""

from __future__ import annotations

from . import require_gradio

MODEL_JOBS = "model"  # the queue group of every job that runs the model: one at a time


def image_input(**kwargs):
    """A `gr.Image` upload that hands its handler the uploaded file's path without decoding it first.

    Gradio's own preprocessing opens the upload with Pillow before any handler runs, so a corrupt file would
    fail inside Gradio with a generic error. Here morphkit's loader reads it, and its message reaches the page.
    (The method is replaced on the instance: a subclass of a Gradio component makes Gradio write a .pyi stub
    next to this file.)
    """
    gr = require_gradio()
    image = gr.Image(type="filepath", sources=["upload", "clipboard"], **kwargs)
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def session_of(request) -> str:
    """The browser session a request comes from (each tab of each visitor has its own)."""
    return getattr(request, "session_hash", None) or "local"
