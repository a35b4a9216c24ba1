"""Progress bars that a caller can cancel.

Every long loop in morphkit iterates through `tqdm` from here: tqdm's own bar (so `gr.Progress(track_tqdm=True)`
and the terminal see it as usual), which also stops the loop cleanly when the current job is cancelled. A caller
that wants to cancel (the web UI's Cancel button) runs the job inside `cancellable(event)` and sets the event
from another thread; the loop then raises `Cancelled` at its next step. Finished stages are kept (fitted LoRAs
and inversions are in the cache), so running the job again continues where it stopped.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading

from tqdm.auto import tqdm as _tqdm

from .errors import Cancelled

_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("morphkit_cancel", default=None)


@contextlib.contextmanager
def cancellable(event: threading.Event):
    """Within this block, morphkit's loops stop with `Cancelled` once `event` is set."""
    token = _cancel.set(event)
    try:
        yield event
    finally:
        _cancel.reset(token)


def check_cancelled() -> None:
    """Raise `Cancelled` if the job running in this context has been cancelled."""
    event = _cancel.get()
    if event is not None and event.is_set():
        raise Cancelled("Cancelled. What finished is kept: fitted LoRAs and inversions are in the cache, so the "
                        "same job run again starts after them.")


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm)
    """tqdm whose iteration and `update` first check for cancellation.

    When its output is not a terminal (redirected to a file or a pipe), every bar without an explicit position
    draws at position 0: nested bars then never move the cursor, so the file holds no `ESC[A` escape lines.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("position") is None:
            kwargs.update(bar_options(kwargs.get("file")))
        super().__init__(*args, **kwargs)

    def __iter__(self):
        for item in super().__iter__():
            check_cancelled()
            yield item

    def update(self, n=1):
        check_cancelled()
        return super().update(n)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar_options(stream=None) -> dict:
    """tqdm options for a bar that may be nested: position 0 when the output is not a terminal (no `ESC[A`)."""
    return {} if _is_terminal(stream or sys.stderr) else {"position": 0}
