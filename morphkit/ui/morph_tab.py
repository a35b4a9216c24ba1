"""The Morph tab: two images and the morph's settings; Prepare, Render and Cancel; the morph and its measures.

The setting components are named as the fields of `MorphSettings`, so the page maps one-to-one onto the
settings object. Render reuses the session's prepared pair when only render settings changed (its
`matches`), and prepares again otherwise; the status box says which.
"""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` by the evaluated annotation.

from . import require_gradio
from .components import MODEL_JOBS, image_input, session_of
from .plot import pacing_plot
from .workspace import CANCEL_MESSAGES, Prepared, Render, Workspace, check_upload, page_message

RENDER_ONLY = "λ, AdaIN, LoRA blend, frames or pacing"


def settings_inputs(workspace: Workspace) -> dict:
    """{MorphSettings field: component}, laid out as fitting/inversion and rendering settings."""
    gr = require_gradio()
    c = {}
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            c["frames"] = gr.Slider(2, 64, value=16, step=1, label="Frames", elem_id="frames")
            c["attn_lambda"] = gr.Slider(0, 1, value=0.6, step=0.05, label="λ (self-attention interpolation)",
                                         elem_id="attn_lambda")
            c["pacing"] = gr.Radio(["even", "linear"], value="even", label="Pacing", elem_id="pacing")
            c["lora_blend"] = gr.Radio(["adapters", "factors"], value="adapters", label="LoRA blend",
                                       elem_id="lora_blend")
            c["adain"] = gr.Checkbox(value=True, label="AdaIN", elem_id="adain")
        with gr.Row():
            c["steps"] = gr.Number(50, precision=0, minimum=1, label="DDIM steps", elem_id="steps")
            c["guidance"] = gr.Number(1.0, minimum=0, label="Guidance", elem_id="guidance")
            c["lora_steps"] = gr.Number(200, precision=0, minimum=0, label="LoRA steps", elem_id="lora_steps")
            c["lora_rank"] = gr.Number(16, precision=0, minimum=1, label="LoRA rank", elem_id="lora_rank")
            c["lora_lr"] = gr.Number(2e-4, minimum=0, label="LoRA learning rate", elem_id="lora_lr")
            c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
            c["resolution"] = gr.Number(workspace.resolution, precision=0, minimum=8, step=8, label="Resolution",
                                        elem_id="resolution")
    return c


def prepared_message(prepared: Prepared) -> str:
    hits = prepared.pair.hits
    parts = [f"{label}: {', '.join(k for k, v in hits.items() if v == hit)}"
             for label, hit in (("from the cache", True), ("computed", False)) if hit in hits.values()]
    return (f"Prepared in {prepared.seconds:.2f} s ({'; '.join(parts) or 'done'}). Render now; after changing "
            f"{RENDER_ONLY}, Render reuses this pair without fitting or inverting again.")


def render_message(result: Render, prepared: Prepared, reason: str | None, settings) -> str:
    frames = len(result.rendered.frames)
    again = len(result.rendered.rerendered)
    how = (f"λ {settings.attn_lambda:g}, AdaIN {'on' if settings.adain else 'off'}, {settings.lora_blend} blend, "
           f"{settings.pacing} pacing" + (f", {again} re-rendered by pacing" if again else ""))
    if reason is None:
        return (f"Rendered {frames} frames ({how}) in {result.seconds:.2f} s; reused the prepared pair (no LoRA "
                "fitted, nothing inverted again).")
    return (f"Prepared the pair ({reason}) in {prepared.seconds:.2f} s, then rendered {frames} frames ({how}) in "
            f"{result.seconds:.2f} s.")


def metrics_markdown(result: Render) -> str:
    m = result.metrics
    rows = [("PPL (path length)", f"{m.ppl:.4f}"), ("PDV (0: even pacing)", f"{m.pdv:.3g}"),
            ("PSNR, SSIM at A", f"{m.psnr_a:.2f} dB, {m.ssim_a:.4f}"),
            ("PSNR, SSIM at B", f"{m.psnr_b:.2f} dB, {m.ssim_b:.4f}"), ("distance", str(getattr(m, "distance", "")))]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def result_outputs() -> dict:
    """The components that show a render: GIF and MP4 players, the frames, the measures, the pacing, downloads."""
    gr = require_gradio()
    c = {}
    with gr.Row():
        c["gif"] = gr.Image(label="GIF", type="filepath", format="gif", interactive=False, height=300,
                            elem_id="morph-gif")
        c["mp4"] = gr.Video(label="MP4", interactive=False, height=300, elem_id="morph-mp4", loop=True, autoplay=True)
    c["frames"] = gr.Gallery(label="Frames", columns=8, height=180, format="png", elem_id="morph-frames")
    with gr.Row():
        c["metrics"] = gr.Markdown(elem_id="morph-metrics")
        c["plot"] = gr.Image(label="Pacing", type="pil", interactive=False, elem_id="morph-plot")
    c["files"] = gr.File(label="Downloads: GIF, MP4, frames (zip)", file_count="multiple", interactive=False,
                         elem_id="morph-files")
    return c


def result_values(result: Render) -> dict:
    """What each of `result_outputs` shows for `result`."""
    r, files = result.rendered, result.files
    return {"gif": str(files["gif"]) if "gif" in files else None,
            "mp4": str(files["mp4"]) if "mp4" in files else None,
            "frames": [(frame, f"{i}: α {a:.3f}") for i, (frame, a) in enumerate(zip(r.frames, r.alphas))],
            "metrics": metrics_markdown(result),
            "plot": pacing_plot(r.first_alphas or r.alphas, r.alphas, r.first_distances, r.distances),
            "files": [str(path) for path in files.values()]}


def why_prepare(workspace: Workspace, prepared: Prepared | None, uploads: tuple, settings) -> str | None:
    """Why the session's prepared pair cannot be rendered with `settings`, or None when it can."""
    if prepared is None:
        return "nothing was prepared yet"
    if prepared.uploads != uploads:
        return "the images changed"
    if not prepared.pair.matches(settings):
        return "a setting of the LoRAs or the inversion changed"
    if prepared.pair is not workspace.current_pair:
        return "another pair was prepared on the model since, in another tab or by another visitor"
    return None


def morph_tab(workspace: Workspace) -> None:
    gr = require_gradio()
    with gr.Row():
        with gr.Column():
            image_a = image_input(label="Image A", elem_id="image_a", height=260)
            prompt_a = gr.Textbox(label="Prompt A", placeholder="a photo of ...", elem_id="prompt_a")
        with gr.Column():
            image_b = image_input(label="Image B", elem_id="image_b", height=260)
            prompt_b = gr.Textbox(label="Prompt B", placeholder="a photo of ...", elem_id="prompt_b")
    fields = settings_inputs(workspace)
    fields.update(prompt_a=prompt_a, prompt_b=prompt_b)
    with gr.Row():
        prepare_btn = gr.Button("Prepare", elem_id="prepare")
        render_btn = gr.Button("Render", variant="primary", elem_id="render")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="morph-cancel")
    status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="morph-status")
    shown = result_outputs()
    state = gr.State(None, time_to_live=3600)

    def settings_of(values):
        return workspace.morph_settings({name: values[c] for name, c in fields.items()})

    def prepare(values, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        uploads = (values[image_a], values[image_b])
        try:
            prepared = workspace.run(session_of(request), workspace.prepare, *uploads, settings_of(values))
        except Exception as e:  # noqa: BLE001 (every error becomes the page's message)
            return {status: page_message(e, uploads)}
        return {status: prepared_message(prepared), state: prepared}

    def render(values, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        uploads, prepared = (values[image_a], values[image_b]), values[state]
        try:
            settings = settings_of(values)
            reason = why_prepare(workspace, prepared, uploads, settings)
            if reason is not None:
                prepared = workspace.run(session_of(request), workspace.prepare, *uploads, settings)
            result = workspace.run(session_of(request), workspace.render, prepared, settings, reason is not None,
                                   session=session_of(request))
        except Exception as e:  # noqa: BLE001
            return {status: page_message(e, uploads)}
        values = {shown[name]: value for name, value in result_values(result).items()}
        return {status: render_message(result, prepared, reason, settings), state: prepared, **values}

    def cancel(request: gr.Request):  # a job that stopped says so itself (in its own output)
        return CANCEL_MESSAGES.get(workspace.cancel(session_of(request)), gr.skip())

    def check(path):
        try:
            image = check_upload(path)
        except Exception as e:  # noqa: BLE001
            return page_message(e, (path,))
        return f"{path.rsplit('/', 1)[-1]}: {image.width}x{image.height}, ready."

    inputs = {image_a, image_b, state, *fields.values()}
    outputs = [status, state, *shown.values()]
    prepare_btn.click(prepare, inputs, [status, state], concurrency_id=MODEL_JOBS)
    render_btn.click(render, inputs, outputs, concurrency_id=MODEL_JOBS)
    cancel_btn.click(cancel, None, status, queue=False)
    for image in (image_a, image_b):
        image.upload(check, image, status, concurrency_limit=None, show_progress="hidden")
