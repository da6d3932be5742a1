"""The Stable Diffusion web UI API (AUTOMATIC1111's /sdapi/v1/*) on a tokenpaint model.

txt2img and img2img take and answer that API's JSON: `images` are raw base64 PNGs, `parameters` echoes the request,
`info` is a JSON string (prompt, all_prompts, seed, all_seeds, ...). The sampler follows the model kind, whatever
`sampler_name` says (it is reported back). img2img: with a mask it inpaints (white = regenerate, or black with
`inpainting_mask_invert`); without one, a masked model re-generates a `denoising_strength` share of the tokens and a
GPT keeps the top (1 - denoising_strength) of the rows and continues the rest. `<lora:NAME:SCALE>` in the prompt sets
the scale of the server's --lora adapter NAME for that request, as in the web UI. interrogate captions an image with
a run trained to caption (model.directions holding i2t) by its caption options (greedy by default); a model trained
for one direction answers the other's endpoints with a 422 naming what it was trained for. The GET endpoints answer
in the shapes clients read at start-up.
"""

from __future__ import annotations

import json
import re
import time

from fastapi import APIRouter
from PIL import ImageOps
from starlette.concurrency import run_in_threadpool

from ..pipeline import default_edit_mode
from .errors import RequestError
from .jobs import Edit, check_edit, make_job, resolve_options
from .schemas import Img2ImgRequest, InterrogateRequest, Txt2ImgRequest

SAMPLER_NAMES = {"mim": "MaskGIT", "gpt": "Top-k"}
SD_NAMES = {"guidance_scale": "cfg_scale", "strength": "denoising_strength"}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")  # the web UI's LoRA syntax: scales for the --lora adapters


def _check_size(state, req) -> None:
    side = state.pipe.resolution
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is not None and value != side:
            raise RequestError(422, f"{name} {value}: this model makes {side}x{side} images", name)


def lora_tags(prompt: str) -> tuple[str, dict]:
    """The web UI's `<lora:NAME:SCALE>` prompt tags (scale 1 when left out) -> (prompt without them, {NAME: SCALE})."""
    scales = {}
    for name, scale in LORA_TAG.findall(prompt):
        try:
            scales[name] = float(scale) if scale else 1.0
        except ValueError:
            raise RequestError(422, f"<lora:{name}:{scale}>: the scale must be a number", "prompt") from None
    return " ".join(LORA_TAG.sub(" ", prompt).split()), scales


def _job(state, req, edit=None):
    state.check_direction("t2i", "prompt")
    _check_size(state, req)
    prompt, lora = lora_tags(req.prompt)
    options = resolve_options(state.pipe, {"steps": req.steps, "guidance_scale": req.cfg_scale, "lora": lora},
                              {**SD_NAMES, "lora": "prompt"})
    return make_job(state.pipe, state.settings, [prompt], req.batch_size * req.n_iter, req.seed,
                    req.negative_prompt or "", options, edit, count_field="batch_size")


def _answer(state, req, job, images) -> dict:
    side = state.pipe.resolution
    sampler = req.sampler_name or req.sampler_index or SAMPLER_NAMES[state.pipe.kind]
    steps, cfg = job.options["steps"], job.options["guidance_scale"]
    infotexts = [f"{p}\nNegative prompt: {n}\nSteps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {s}, "
                 f"Size: {side}x{side}, Model: {state.model_name}" for p, n, s in zip(job.prompts, job.negatives,
                                                                                       job.seeds)]
    info = dict(prompt=req.prompt, all_prompts=job.prompts, negative_prompt=req.negative_prompt or "",
                all_negative_prompts=job.negatives, seed=job.seeds[0], all_seeds=job.seeds, subseed=-1,
                all_subseeds=[-1] * job.size, subseed_strength=0, width=side, height=side, sampler_name=sampler,
                cfg_scale=cfg, steps=steps, batch_size=req.batch_size, n_iter=req.n_iter, restore_faces=False,
                face_restoration_model=None, sd_model_name=state.model_name, sd_model_hash=state.model_hash()[:10],
                seed_resize_from_w=-1, seed_resize_from_h=-1,
                denoising_strength=getattr(req, "denoising_strength", None), extra_generation_params={},
                index_of_first_image=0, infotexts=infotexts, styles=req.styles or [],
                job_timestamp=time.strftime("%Y%m%d%H%M%S"), clip_skip=1, is_using_inpainting_conditioning=False,
                version=f"tokenpaint-{state.version}")
    parameters = dict(req.model_dump(), seed=job.seeds[0])
    if "init_images" in parameters:  # as the web UI answers: the input images are not sent back
        parameters.update(init_images=None, mask=None)
    return {"images": images, "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}


def build_router(state, dependencies) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies)

    @router.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        job = _job(state, req)
        images, _ = await state.generate(job)
        return _answer(state, req, job, images)

    @router.post("/img2img")
    async def img2img(req: Img2ImgRequest):
        if not req.init_images:
            raise RequestError(422, "init_images must hold one base64 image", "init_images")
        image = state.decode_image(req.init_images[0], "init_images.0").convert("RGB")
        mask = None
        if req.mask:
            mask = state.decode_image(req.mask, "mask").convert("L")
            if mask.size != image.size:  # the web UI resizes the mask to the image
                mask = mask.resize(image.size)
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        strength = req.denoising_strength
        if not 0 < strength <= 1:
            raise RequestError(422, f"denoising_strength must be in (0, 1], got {strength}", "denoising_strength")
        side, keep_rows = state.pipe.tokens_per_side, None
        mode = default_edit_mode(state.pipe.kind, has_mask=mask is not None)
        if mode == "continue":  # a GPT without a mask: denoising_strength is the share of rows regenerated
            keep_rows = min(side - 1, side - round(strength * side))
        edit = Edit(image, mask, mode, strength, keep_rows)
        check_edit(state.pipe, edit, dict(mode="mask", mask="mask", strength="denoising_strength",
                                          keep_rows="denoising_strength"))
        job = _job(state, req, edit)
        images, _ = await state.generate(job)
        return _answer(state, req, job, images)

    @router.post("/interrogate")
    async def interrogate(req: InterrogateRequest):
        state.check_direction("i2t", "image")
        image = state.decode_image(req.image, "image").convert("RGB")
        caption = await run_in_threadpool(lambda: state.pipe.caption([image])[0])  # off the event loop
        return {"caption": caption}

    @router.get("/sd-models")
    async def sd_models():
        sha = state.model_hash()
        return [{"title": f"{state.model_name} [{sha[:10]}]", "model_name": state.model_name, "hash": sha[:10],
                 "sha256": sha, "filename": str(state.model_dir), "config": None}]

    @router.get("/samplers")
    async def samplers():
        name = SAMPLER_NAMES[state.pipe.kind]
        return [{"name": name, "aliases": [name.lower()], "options": {}}]

    @router.get("/options")
    async def options():
        sha = state.model_hash()
        return {"sd_model_checkpoint": f"{state.model_name} [{sha[:10]}]", "sd_checkpoint_hash": sha,
                "samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                "tokenpaint_kind": state.pipe.kind, "tokenpaint_resolution": state.pipe.resolution}

    @router.post("/options")
    async def set_options(body: dict):
        return None  # one model per server: settings are accepted and left as they are

    @router.get("/progress")
    async def progress():
        """The running batch: the fraction of its decoding steps done and the seconds it still needs at its pace."""
        batcher = state.batcher
        fraction, eta, done, total = batcher.progress()
        running = batcher.active()
        started = time.time() - (time.monotonic() - batcher.batch_started)
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "current_image": None,
                "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "busy" if running else "",
                          "job_count": batcher.depth() + running,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)) if running else "0",
                          "job_no": 0, "sampling_step": done, "sampling_steps": total}}

    @router.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @router.post("/interrupt")
    async def interrupt():
        return None  # a running batch is not interrupted (it serves other requests too)

    return router
