"""Image editing at the token level: inpainting, outpainting, img2img (masked model) and continuation (GPT).

All functions work on image ids (long [B, N] or [B, h, w], row-major) and token masks; encoding pixels to ids and
back is the caller's business (see tokenpaint.pipeline.Pipeline.edit). A token mask is True where tokens are
regenerated.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from einops import rearrange, reduce

from .autoregressive import num_image_tokens
from .dispatch import sample
from .filters import Generators, StepCallback, uniform_noise
from .options import SampleOptions


def pixel_mask_to_token_mask(mask, downsample_factor: int) -> torch.Tensor:
    """Pixel mask [H, W] (bool/float tensor or array, or a PIL image: white = regenerate) -> bool [h*w] token mask.

    A token is regenerated if any pixel of its f x f patch is masked. H and W must be multiples of f.
    """
    pixels = pixel_mask_to_bool(mask)
    height, width = pixels.shape
    f = int(downsample_factor)
    if height % f or width % f:
        raise ValueError(f"mask size {width}x{height} is not a multiple of the downsample factor {f}")
    patches = reduce(pixels.to(torch.uint8), "(h f1) (w f2) -> h w", "max", f1=f, f2=f)  # any pixel in the patch
    return rearrange(patches, "h w -> (h w)").bool()


def pixel_mask_to_bool(mask) -> torch.Tensor:
    """Any supported mask -> bool tensor [H, W]; PIL and uint8 masks are thresholded at half intensity."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL image
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            mask = mask.astype(np.float32) / 255.0
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a PIL image, numpy array or tensor, got {type(mask).__name__}")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8:
        return mask > 127
    return mask.float() > 0.5


def _flat(ids: torch.Tensor) -> torch.Tensor:
    return ids.reshape(ids.shape[0], -1)  # [B, h, w] -> [B, N]


def _options(options: Optional[SampleOptions], overrides: dict) -> SampleOptions:
    """`options` (default SAMPLE_DEFAULTS) with keyword overrides such as steps=8 or temperature=0.9."""
    return (SampleOptions() if options is None else options).replace(**overrides)


def inpaint(model, text_ids, init_ids, token_mask, options: Optional[SampleOptions] = None, *,
            negative_text_ids=None, generator: Generators = None, on_step: Optional[StepCallback] = None,
            **overrides) -> torch.Tensor:
    """Regenerate the tokens where token_mask is True ([N], [B, N] or [B, h, w]); the others are kept exactly.

    Masked model: MaskGIT decoding started from init_ids with the region masked. GPT: raster-order sampling with the
    known tokens forced (each new token sees the known tokens above and to its left). Sampler settings: `options`
    and/or SampleOptions fields as keywords (steps=8, ...). on_step: as `sample`'s, here and in the helpers below.
    """
    token_mask = torch.as_tensor(token_mask, dtype=torch.bool, device=init_ids.device)
    return sample(model, text_ids, _options(options, overrides), negative_text_ids=negative_text_ids,
                  generator=generator, init_ids=_flat(init_ids), known_mask=~token_mask, on_step=on_step)


def outpaint(model, text_ids, known_ids, options: Optional[SampleOptions] = None, *, top: Optional[int] = None,
             left: Optional[int] = None, negative_text_ids=None, generator: Generators = None,
             on_step: Optional[StepCallback] = None, **overrides) -> torch.Tensor:
    """Extend a smaller token grid known_ids [B, hk, wk] to the model's full canvas.

    The known tokens are placed with their top-left corner at token (top, left) (default: centred) and kept; the rest
    of the canvas is generated. Returns ids [B, N].
    """
    side = int(math.isqrt(num_image_tokens(model)))
    if known_ids.dim() != 3:
        raise ValueError(f"known_ids must be [B, h, w], got shape {tuple(known_ids.shape)}")
    batch, hk, wk = known_ids.shape
    if hk > side or wk > side:
        raise ValueError(f"known_ids grid {hk}x{wk} is larger than the model's canvas {side}x{side}")
    top = (side - hk) // 2 if top is None else top
    left = (side - wk) // 2 if left is None else left
    if not (0 <= top <= side - hk and 0 <= left <= side - wk):
        raise ValueError(f"offset (top={top}, left={left}) puts a {hk}x{wk} grid outside the {side}x{side} canvas")
    canvas = torch.zeros(batch, side, side, dtype=torch.long, device=known_ids.device)
    canvas[:, top : top + hk, left : left + wk] = known_ids
    regenerate = torch.ones(side, side, dtype=torch.bool, device=known_ids.device)
    regenerate[top : top + hk, left : left + wk] = False
    return inpaint(model, text_ids, canvas, regenerate.flatten(), _options(options, overrides),
                   negative_text_ids=negative_text_ids, generator=generator, on_step=on_step)


def random_token_mask(batch: int, n_tokens: int, strength: float, generator: Generators, device=None) -> torch.Tensor:
    """bool [B, N] with round(strength * N) (at least 1) True entries per row, chosen at random with the generator."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n_masked = max(1, round(strength * n_tokens))
    scores = uniform_noise((batch, n_tokens), generator, device=device)
    chosen = scores.argsort(dim=-1)[:, :n_masked]
    return torch.zeros(batch, n_tokens, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def img2img(model, text_ids, init_ids, strength: float = 0.6, options: Optional[SampleOptions] = None, *,
            negative_text_ids=None, generator: Generators = None, on_step: Optional[StepCallback] = None,
            **overrides) -> torch.Tensor:
    """Masked model only: re-mask a `strength` fraction of the tokens at random and decode them in
    ceil(strength * steps) steps. strength 1 is plain generation; small strengths stay close to the input."""
    if model.config.kind != "mim":
        raise ValueError("img2img needs a masked (mim) model; use inpaint or continue_image with a GPT")
    options = _options(options, overrides)
    init_ids = _flat(init_ids)
    regenerate = random_token_mask(init_ids.shape[0], init_ids.shape[1], strength, generator, device=init_ids.device)
    run_steps = max(1, math.ceil(strength * options.steps))
    return sample(model, text_ids, options.replace(steps=run_steps), negative_text_ids=negative_text_ids,
                  generator=generator, init_ids=init_ids, known_mask=~regenerate, on_step=on_step)


def continue_image(model, text_ids, init_ids, keep_rows: int, options: Optional[SampleOptions] = None, *,
                   negative_text_ids=None, generator: Generators = None, on_step: Optional[StepCallback] = None,
                   **overrides) -> torch.Tensor:
    """Keep the top `keep_rows` token rows of init_ids and generate the rest (GPT: as a prefix; masked model: as
    known tokens)."""
    side = int(math.isqrt(num_image_tokens(model)))
    if not 0 <= keep_rows <= side:
        raise ValueError(f"keep_rows must be in [0, {side}], got {keep_rows}")
    options = _options(options, overrides)
    init_ids = _flat(init_ids)
    n_keep = keep_rows * side
    if model.config.kind == "mim":
        regenerate = torch.arange(side * side, device=init_ids.device) >= n_keep
        return inpaint(model, text_ids, init_ids, regenerate, options, negative_text_ids=negative_text_ids,
                       generator=generator, on_step=on_step)
    return sample(model, text_ids, options, negative_text_ids=negative_text_ids, generator=generator,
                  prefix_ids=init_ids[:, :n_keep], on_step=on_step)


__all__ = [
    "pixel_mask_to_token_mask",
    "pixel_mask_to_bool",
    "inpaint",
    "outpaint",
    "img2img",
    "continue_image",
    "random_token_mask",
]
