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
    """tqdm whose iteration and `update` first check for cancellation."""

    def __iter__(self):
        for item in super().__iter__():
            check_cancelled()
            yield item

    def update(self, n=1):
        check_cancelled()
        return super().update(n)
