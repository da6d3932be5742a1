"""Request bodies. Unknown fields are ignored (as the Stable Diffusion web UI does); a field of the wrong type is a
422 naming it. Ranges are checked by tokenpaint.sampling.check_option (jobs.resolve_options)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict


class ImagesRequest(BaseModel):
    """POST /v1/images: tokenpaint's own option names (those of Pipeline and generate.py)."""

    model_config = ConfigDict(extra="ignore")
    prompts: Union[str, list[str]]
    num_images: int = 1
    seed: Optional[int] = None  # None or -1: a random seed (reported in the answer)
    steps: Optional[int] = None  # None: the model's default (train_config.yaml `sample:`)
    guidance_scale: Optional[float] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    negative_prompt: Optional[str] = None
    lora: Optional[dict[str, float]] = None  # {adapter name: scale} of the server's --lora adapters (0 = off)
    # editing: an input image (base64 or a data: URL) turns the request into an edit of it (one prompt)
    image: Optional[str] = None
    mask: Optional[str] = None  # white = regenerate; same size as the image
    mode: Optional[str] = None  # inpaint | outpaint | img2img | continue (default: inpaint with a mask, else
    strength: float = 0.6  # img2img on a masked model, continue on a GPT)
    keep_rows: Optional[int] = None


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img: the Stable Diffusion web UI's fields that mean something here."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: Optional[str] = ""
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None
    styles: Optional[list[str]] = None


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: adds the input image(s), the mask and the strength."""

    init_images: Optional[list[str]] = None
    mask: Optional[str] = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0  # 1: regenerate where the mask is black


class InterrogateRequest(BaseModel):
    """POST /sdapi/v1/interrogate (the web UI's image -> prompt): `model` (the web UI's clip / deepdanbooru) is
    accepted and ignored: the run's own captioning GPT answers."""

    model_config = ConfigDict(extra="ignore")
    image: str
    model: Optional[str] = None
