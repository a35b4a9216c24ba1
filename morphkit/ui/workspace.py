"""What the web page does, as plain functions and one `Workspace` object, without Gradio.

The workspace holds what lives as long as the server: the model (loaded once), the ControlNet pipeline for
stylizing (built on first use), a cancel event per browser session and a temporary folder for the files
the page offers. Each job is a short function over morphkit's API; the page (`app.py`) only wires them to
components. Errors come back as the one-paragraph messages of `morphkit.errors`, never as tracebacks.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import Cancelled, ConfigError, InputError, MorphkitError
from ..images import open_image

log = logging.getLogger("morphkit.ui")

MAX_PIXELS = 4096 * 4096  # the page's limit per uploaded image; the CLI takes up to 64 megapixels
PREVIEW_IMAGES = 4  # edge maps previewed live on the Stylize tab
LORA_SUFFIXES = (".safetensors",)
CANCEL_MESSAGES = {"none": "Nothing to cancel: no job of this page is running.",
                   "stopping": "Cancelling: the job stops at its next step."}


# ---------------------------------------------------------------------------------------------
# messages


def page_message(error: BaseException, uploads=()) -> str:
    """The message the page shows for `error`: morphkit's own text, with uploads named by their file names.

    Anything that is not a `MorphkitError` is a bug; it is logged with its traceback on the server and the
    page gets one line saying so.
    """
    if isinstance(error, MorphkitError):
        text = str(error)
    elif isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        text = "Out of memory. Try a smaller resolution, fewer frames or fewer steps."
    else:
        log.error("Unexpected error in a web UI job", exc_info=error)
        first = (str(error).strip().splitlines() or [""])[0][:200]
        text = (f"Unexpected {type(error).__name__}: {first}. This is probably a bug in morphkit; the server's "
                "log has the details.")
    return name_uploads(text, uploads)


def name_uploads(text: str, uploads=()) -> str:
    """`text` with each uploaded file's temporary path replaced by its file name (what the visitor knows).

    The folder is dropped even where the message shortened the file name.
    """
    for path in uploads:
        if path:
            text = text.replace(str(path), Path(path).name).replace(str(Path(path).parent) + os.sep, "")
    return text


def check_upload(path, what: str = "image") -> Image.Image:
    """An uploaded image as RGB, or `InputError` naming the file: unreadable, corrupt, or too large for the page."""
    if not path:
        raise InputError(f"No {what} was given. Upload one first.")
    image = open_image(path)
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"The {what} {Path(path).name} is {image.width}x{image.height} pixels, more than this page "
                         f"accepts ({MAX_PIXELS // 1_000_000} megapixels, e.g. 4096x4096). Downscale it first; "
                         "Stable Diffusion 1.5 works at 512 px.")
    return image


# ---------------------------------------------------------------------------------------------
# LoRA lists of the Stylize tab: uploaded files and files picked from the LoRA folder, each with a weight


def lora_folder_choices(folder) -> list[str]:
    """The LoRA files under `folder` (recursively), as paths relative to it; [] when there is no such folder."""
    if folder is None or not Path(folder).is_dir():
        return []
    root = Path(folder)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES)
    return found[:500]


def lora_names(uploaded, picked) -> dict[str, Path | str]:
    """{name shown in the page: where it is}: uploads by file name, folder picks by their relative path."""
    names: dict[str, Path | str] = {Path(p).name: Path(p) for p in (uploaded or [])}
    names.update({name: name for name in (picked or [])})
    return names


def lora_lines(uploaded, picked, text: str) -> str:
    """The 'name: weight' lines for the chosen LoRAs, keeping the weights already typed for those still chosen."""
    weights = {}
    for line in (text or "").splitlines():
        name, sep, weight = line.rpartition(":")
        if sep and name.strip():
            weights[name.strip()] = weight.strip()
    return "\n".join(f"{name}: {weights.get(name, '1.0')}" for name in lora_names(uploaded, picked))


def resolve_loras(text: str, uploaded, folder) -> list[tuple[Path, float]]:
    """'name: weight' lines -> (path, weight) pairs; only uploaded files and files in the LoRA folder are allowed."""
    names = lora_names(uploaded, lora_folder_choices(folder))
    specs = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, sep, weight = line.rpartition(":")
        name = name.strip() if sep else line.strip()
        if name not in names:
            raise ConfigError(f"The LoRA '{name}' is neither uploaded nor in the LoRA folder ({folder}). Upload it, "
                              "or pick it from the list.")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"The weight of the LoRA '{name}' must be a number, as in '{name}: 0.8'; "
                              f"got '{weight.strip()}'.") from None
        where = names[name]
        specs.append((where if isinstance(where, Path) else Path(folder) / where, value))
    return specs


# ---------------------------------------------------------------------------------------------
# results the page shows


@dataclass
class Prepared:
    """A prepared pair and what it was prepared from: the uploads (by path) and how long it took."""

    uploads: tuple[str, str]
    pair: object  # morphkit.morph.PreparedPair
    seconds: float


@dataclass
class Render:
    rendered: object  # morphkit.morph.Rendered
    files: dict[str, Path]  # gif, mp4, zip
    metrics: object  # morphkit.EvalResult
    seconds: float
    prepared_again: bool


def zip_frames(folder: Path, target: Path) -> Path:
    """The PNG frames of `folder` in one zip file (stored, PNGs do not compress further)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for frame in sorted(folder.glob("*.png")):
            archive.write(frame, arcname=frame.name)
    return target


class Workspace:
    """The server's model, its temporary files and the cancel events of the sessions."""

    def __init__(self, model: str, *, device=None, dtype=None, lora_dir=None, controlnet=None,
                 allow_pickle: bool = False, pipe=None):
        from ..models import load_pipeline

        self.model = str(model)
        self.lora_dir = Path(lora_dir) if lora_dir else Path("outputs") / "lora"
        self.controlnet = controlnet
        self.allow_pickle = allow_pickle
        self.pipe = pipe if pipe is not None else load_pipeline(self.model, device=device, dtype=dtype,
                                                                allow_pickle=allow_pickle)
        self.resolution = 8 * int(self.pipe.unet.config.sample_size)
        self._cn_pipe = None
        self.current_pair = None  # the pair whose adapters are on the model now (one at a time, see PreparedPair)
        self._cancel: dict[str, threading.Event] = {}
        self._outdirs: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="morphkit-ui-"))
        atexit.register(shutil.rmtree, self.tmp, True)

    # cancelling -----------------------------------------------------------------------------

    def job_event(self, session: str) -> threading.Event:
        """A fresh cancel event for the job this session starts now."""
        with self._lock:
            event = self._cancel[session] = threading.Event()
        return event

    def cancel(self, session: str, wait: float = 10.0) -> str:
        """Ask the session's running job to stop at its next step, and wait up to `wait` seconds for it to end.

        Returns "none" (nothing was running), "stopped" (it ended; its own message says so) or "stopping".
        """
        with self._lock:
            event = self._cancel.get(session)
        if event is None:
            return "none"
        event.set()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if self._cancel.get(session) is not event:
                    return "stopped"
            time.sleep(0.05)
        return "stopping"

    def run(self, session: str, job, /, *args, **kwargs):
        """`job(*args, **kwargs)` under this session's cancel event (morphkit's loops raise `Cancelled`)."""
        from ..progress import cancellable

        event = self.job_event(session)
        try:
            with cancellable(event):
                return job(*args, **kwargs)
        finally:
            with self._lock:
                if self._cancel.get(session) is event:
                    del self._cancel[session]

    def outdir(self, prefix: str, session: str) -> Path:
        """A new folder for a job's files; the session's previous one (already served to the page) is removed."""
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))
        with self._lock:
            previous, self._outdirs[session] = self._outdirs.get(session), folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return folder

    # morph ----------------------------------------------------------------------------------

    def morph_settings(self, values: dict):
        """`MorphSettings` from the page's values (named as its fields), for this server's model; validated."""
        from ..morph import MorphSettings

        known = {f.name for f in dataclasses.fields(MorphSettings)}
        settings = MorphSettings(model=self.model, **{k: v for k, v in values.items() if k in known})
        settings.validate()
        return settings

    def prepare(self, image_a: str, image_b: str, settings) -> Prepared:
        """Fit (or load from the cache) the two LoRAs and invert both images: the slow stage."""
        from ..morph import prepare_pair

        for path, what in ((image_a, "image A"), (image_b, "image B")):
            check_upload(path, what)
        start = time.perf_counter()
        self.current_pair = None  # preparing replaces the adapters on the model, even when it fails half-way
        pair = prepare_pair(image_a, image_b, settings, pipe=self.pipe, progress=True)
        self.current_pair = pair
        return Prepared((image_a, image_b), pair, time.perf_counter() - start)

    def render(self, prepared: Prepared, settings, prepared_again: bool = False, session: str = "local") -> Render:
        """Render the prepared pair with `settings`, write GIF, MP4 and a zip of the frames, and measure it."""
        from ..metrics import evaluate
        from ..morph import export_morph, render_morph

        start = time.perf_counter()
        rendered = render_morph(prepared.pair, settings, progress=True)
        seconds = time.perf_counter() - start
        out = self.outdir("morph-", session)
        paths = export_morph(rendered.frames, settings, out, overwrite=True)
        files = {k: Path(paths[k]) for k in ("gif", "mp4") if k in paths}
        if "png" in paths:
            files["zip"] = zip_frames(Path(paths["png"]), out / "frames.zip")
        metrics = evaluate(rendered.frames, *prepared.pair.images)
        return Render(rendered, files, metrics, seconds, prepared_again)

    # stylize --------------------------------------------------------------------------------

    def controlnet_pipe(self):
        """The ControlNet img2img pipeline around the server's model, built on first use and kept."""
        if self._cn_pipe is None:
            from ..models import controlnet_for
            from ..stylize import controlnet_pipeline

            net = controlnet_for(self.pipe, self.model, self.controlnet, self.allow_pickle)
            self._cn_pipe = controlnet_pipeline(self.pipe, net)
        return self._cn_pipe

    def edge_previews(self, paths, resolution, low, high) -> list[tuple[Image.Image, str]]:
        """(edge map, caption) for the first few images, as `stylize` will compute them."""
        from ..images import resize_to_policy
        from ..stylize import canny_edges, canny_thresholds, to_gray

        previews = []
        for path in list(paths or [])[:PREVIEW_IMAGES]:
            image = resize_to_policy(check_upload(path), int(resolution or self.resolution))
            gray = to_gray(image)
            lo, hi = canny_thresholds(gray, low, high)
            previews.append((Image.fromarray(canny_edges(gray, lo, hi)), f"{Path(path).name}: Canny {lo}/{hi}"))
        return previews

    def stylize(self, paths, loras, **settings):
        """`morphkit.stylize` on the uploads with the server's model; the results are not written to disk."""
        from ..stylize import stylize

        if not paths:
            raise InputError("No image was given to stylize. Upload one or more first.")
        return stylize([Path(p) for p in paths], loras, model=self.model, pipe=self.controlnet_pipe(), save=False,
                       allow_pickle=self.allow_pickle, progress=True, **settings)


__all__ = ["Cancelled", "MAX_PIXELS", "CANCEL_MESSAGES", "Prepared", "Render", "Workspace", "check_upload",
           "lora_folder_choices", "lora_lines", "name_uploads", "page_message", "resolve_loras", "zip_frames"]
