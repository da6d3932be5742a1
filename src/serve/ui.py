"""The web page (gradio, the `ui` extra), mounted at / of the API server: a text-to-image tab and an edit tab.

Both tabs go through the same queue as the API (their requests batch with API requests) and report the seeds used.
Nothing is fetched from the internet: the theme uses the system's fonts and analytics are off.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
from PIL import Image

from ..pipeline import EDIT_MODES
from .errors import RequestError
from .jobs import Edit, check_edit, make_job, resolve_options


def _pil(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _seed(value) -> int:
    return -1 if value is None else int(value)


def editor_mask(value) -> tuple:
    """gradio ImageEditor value -> (background RGB, mask L where anything was drawn, or None)."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    drawn = None
    for layer in value.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        drawn = alpha if drawn is None else drawn | alpha
    if drawn is None or not drawn.any():
        return background, None
    return background, Image.fromarray(drawn.astype(np.uint8) * 255, "L").resize(background.size)


def build_blocks(state):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    pipe = state.pipe
    mim = pipe.kind == "mim"
    d = pipe.options.to_dict()

    async def run(job):
        try:
            images, _ = await state.generate(job)
        except RequestError as e:
            raise gr.Error(f"{e.field}: {e.detail}" if e.field else e.detail) from None
        return [_pil(b) for b in images], ", ".join(str(s) for s in job.seeds)

    def options(guidance, steps, top_k, temperature):
        given = dict(guidance_scale=guidance, temperature=temperature)
        given.update(steps=int(steps)) if mim else given.update(top_k=int(top_k))
        return resolve_options(pipe, given)

    async def txt2img(prompt, negative, num_images, seed, guidance, steps, top_k, temperature):
        try:
            job = make_job(pipe, state.settings, [prompt or ""], int(num_images), _seed(seed), negative or "",
                           options(guidance, steps, top_k, temperature))
        except RequestError as e:
            raise gr.Error(f"{e.field}: {e.detail}") from None
        return await run(job)

    async def edit(editor, mask_upload, mode, strength, prompt, negative, num_images, seed, guidance, steps, top_k,
                   temperature):
        image, mask = editor_mask(editor)
        if image is None:
            raise gr.Error("upload an image to edit")
        if mask_upload is not None:
            mask = mask_upload.convert("L").resize(image.size)
        try:
            e = Edit(image, mask if mode in ("inpaint", "continue") else None, mode, float(strength), None)
            check_edit(pipe, e, {k: k for k in ("mode", "mask", "strength", "keep_rows")})
            job = make_job(pipe, state.settings, [prompt or ""], int(num_images), _seed(seed), negative or "",
                           options(guidance, steps, top_k, temperature), e)
        except RequestError as err:
            raise gr.Error(f"{err.field}: {err.detail}") from None
        return await run(job)

    def sampler_controls():
        codes = int(pipe.model.config.codebook_size)  # slider ranges hold the model's defaults
        guidance = gr.Slider(0.0, max(10.0, d["guidance_scale"]), value=float(d["guidance_scale"]), step=0.1,
                             label="Guidance scale (1 = off)")
        steps = gr.Slider(1, max(64, d["steps"]), value=int(d["steps"]), step=1, label="Steps", visible=mim)
        top_k = gr.Slider(1, codes, value=min(codes, int(d.get("top_k") or codes)), step=1, label="Top-k",
                          visible=not mim)
        temperature = gr.Slider(0.05, max(2.0, d["temperature"]), value=float(d["temperature"]), step=0.05,
                                label="Temperature")
        return [guidance, steps, top_k, temperature]

    side = pipe.resolution
    with gr.Blocks(title="tokenpaint", analytics_enabled=False) as blocks:
        gr.Markdown(f"## tokenpaint: {state.model_name} ({pipe.kind}, {side}x{side})")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        count = gr.Slider(1, state.settings.max_images_per_request, value=4, step=1,
                                          label="Number of images")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                    controls = sampler_controls()
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", format="png")  # exact pixels
                    seeds = gr.Textbox(label="Seeds used", elem_id="seeds")
            button.click(txt2img, [prompt, negative, count, seed, *controls], [gallery, seeds])
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(label="Image (paint the region to regenerate)", type="pil")
                    mask_upload = gr.Image(label="Mask (optional upload, white = regenerate)", type="pil")
                    mode = gr.Radio(list(EDIT_MODES), value="inpaint", label="Mode")
                    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (img2img)")
                    e_prompt = gr.Textbox(label="Prompt", lines=2)
                    e_negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        e_count = gr.Slider(1, state.settings.max_images_per_request, value=2, step=1,
                                            label="Number of images")
                        e_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                    e_controls = sampler_controls()
                    e_button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    e_gallery = gr.Gallery(label="Images", columns=4, format="png")
                    e_seeds = gr.Textbox(label="Seeds used")
            e_button.click(edit, [editor, mask_upload, mode, strength, e_prompt, e_negative, e_count, e_seed,
                                  *e_controls], [e_gallery, e_seeds])
    return blocks


def mount_ui(app, state):
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, build_blocks(state), path="/", auth=state.settings.credentials, theme=theme,
                               ssr_mode=False, footer_links=[])
