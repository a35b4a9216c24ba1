"""The Stylize tab: images, LoRAs (uploaded or picked from the LoRA folder) with weights, Canny thresholds
with a live edge-map preview, the img2img settings, and each result beside its input."""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` by the evaluated annotation.

from pathlib import Path

from ..errors import ConfigError
from . import require_gradio
from .components import MODEL_JOBS, session_of
from .workspace import (CANCEL_MESSAGES, Workspace, check_upload, lora_folder_choices, lora_lines, name_uploads,
                        page_message, resolve_loras)


def _paths(files) -> list[str]:
    return [str(getattr(f, "name", f)) for f in (files or [])]


def lora_inputs(workspace: Workspace):
    gr = require_gradio()
    with gr.Row():
        upload = gr.File(label="Upload LoRAs (.safetensors)", file_count="multiple", file_types=[".safetensors"],
                         elem_id="stylize-lora-upload")
        with gr.Column():
            pick = gr.Dropdown(lora_folder_choices(workspace.lora_dir), multiselect=True, elem_id="stylize-lora-pick",
                               label=f"LoRAs in {workspace.lora_dir}")
            refresh = gr.Button("Refresh the list", size="sm")
        weights = gr.Textbox(label="LoRAs and weights (name: weight, one a line)", lines=3,
                             elem_id="stylize-loras")
    upload.change(lambda u, p, t: lora_lines(_paths(u), p, t), [upload, pick, weights], weights, queue=False)
    pick.change(lambda u, p, t: lora_lines(_paths(u), p, t), [upload, pick, weights], weights, queue=False)
    refresh.click(lambda: gr.update(choices=lora_folder_choices(workspace.lora_dir)), None, pick, queue=False)
    return upload, weights


SETTING_TYPES = {"strength": float, "guidance": float, "controlnet_scale": float, "steps": int, "seed": int,
                 "resolution": int}


def setting(name: str, value):
    """A page value as `morphkit.stylize` takes it; an emptied number box is a `ConfigError`, not a crash."""
    if value is None:
        raise ConfigError(f"{name.replace('_', ' ').capitalize()} is empty: enter a value.")
    return SETTING_TYPES.get(name, str)(value)


def stylize_settings(workspace: Workspace) -> dict:
    """{`morphkit.stylize` keyword: component} for the prompt and the img2img settings."""
    gr = require_gradio()
    c = {}
    with gr.Row():
        c["prompt"] = gr.Textbox(label="Prompt", placeholder="a painting in mkstyle style", elem_id="stylize-prompt")
        c["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="stylize-negative")
    with gr.Row():
        c["strength"] = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Strength", elem_id="strength")
        c["guidance"] = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance", elem_id="stylize-guidance")
        c["controlnet_scale"] = gr.Slider(0, 2, value=0.5, step=0.05, label="ControlNet scale",
                                          elem_id="controlnet-scale")
        c["steps"] = gr.Number(50, precision=0, minimum=1, label="Steps", elem_id="stylize-steps")
        c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="stylize-seed")
        c["resolution"] = gr.Number(workspace.resolution, precision=0, minimum=8, step=8, label="Resolution",
                                    elem_id="stylize-resolution")
    return c


def stylize_tab(workspace: Workspace) -> None:
    gr = require_gradio()
    with gr.Row():
        with gr.Column():
            images = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="stylize-images")
            inputs_view = gr.Gallery(label="Input", columns=4, height=200, elem_id="stylize-inputs")
        with gr.Column():
            auto = gr.Checkbox(value=True, label="Canny thresholds from each image's brightness", elem_id="canny-auto")
            low = gr.Slider(0, 255, value=100, step=1, label="Canny low", elem_id="canny-low")
            high = gr.Slider(0, 255, value=200, step=1, label="Canny high", elem_id="canny-high")
            edges = gr.Gallery(label="Edge maps (live)", columns=4, height=200, elem_id="stylize-edges")
    upload, weights = lora_inputs(workspace)
    fields = stylize_settings(workspace)
    with gr.Row():
        run_btn = gr.Button("Stylize", variant="primary", elem_id="stylize")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="stylize-cancel")
    status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="stylize-status")
    results = gr.Gallery(label="Input and result", columns=2, height=360, format="png", elem_id="stylize-results")

    def thresholds(auto_on, lo, hi):
        return (None, None) if auto_on else (int(lo), int(hi))

    def preview(files, auto_on, lo, hi, res):
        paths = _paths(files)
        try:
            shown = workspace.edge_previews(paths, res, *thresholds(auto_on, lo, hi))
            views = [(check_upload(p), Path(p).name) for p in paths[:len(shown)]]
        except Exception as e:  # noqa: BLE001
            return gr.skip(), gr.skip(), page_message(e, paths)
        return views, shown, (f"{len(paths)} image{'s' if len(paths) != 1 else ''} ready." if paths else "")

    def run(values, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        paths, lora_files = _paths(values[images]), _paths(values[upload])
        try:
            loras = resolve_loras(values[weights], lora_files, workspace.lora_dir)
            canny_low, canny_high = thresholds(values[auto], values[low], values[high])
            settings = {name: setting(name, values[c]) for name, c in fields.items()}
            result = workspace.run(session_of(request), workspace.stylize, paths, loras, canny_low=canny_low,
                                   canny_high=canny_high, **settings)
        except Exception as e:  # noqa: BLE001
            return {status: page_message(e, paths + lora_files)}
        pairs = [item for s in result.stylized for item in ((check_upload(s.source), s.source.name),
                                                              (s.image, f"{s.source.name}, stylized"))]
        failed = " ".join(name_uploads(m, paths) for m in result.failed.values())
        message = f"Stylized {len(result.stylized)} of {len(paths)} in {sum(result.timings.values()):.1f} s."
        return {results: pairs, status: f"{message} Failed: {failed}" if failed else message}

    preview_inputs = [images, auto, low, high, fields["resolution"]]
    images.change(preview, preview_inputs, [inputs_view, edges, status], concurrency_limit=None,
                  show_progress="hidden")
    for control in (low, high):
        control.release(preview, preview_inputs, [inputs_view, edges, status], concurrency_limit=None,
                        show_progress="hidden", trigger_mode="always_last")
    for control in (auto, fields["resolution"]):
        control.change(preview, preview_inputs, [inputs_view, edges, status], concurrency_limit=None,
                       show_progress="hidden", trigger_mode="always_last")
    run_btn.click(run, {images, upload, weights, auto, low, high, *fields.values()}, [results, status],
                  concurrency_id=MODEL_JOBS)

    def cancel(request: gr.Request):  # a job that stopped says so itself (in its own output)
        return CANCEL_MESSAGES.get(workspace.cancel(session_of(request)), gr.skip())

    cancel_btn.click(cancel, None, status, queue=False)
