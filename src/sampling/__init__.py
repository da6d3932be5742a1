"""Samplers: autoregressive (GPT, KV cache) and iterative masked (MaskGIT) decoding, guidance and editing helpers,
and caption decoding (image -> text) with a GPT trained in the caption direction.

Free functions over a model; every random choice comes from the `torch.Generator` (or one generator per batch row)
the caller passes, so results are reproducible. `sample(model, text_ids, SampleOptions(...))` picks the sampler of
the model's kind; guidance is all in guidance.py.
"""

from .autoregressive import num_image_tokens, sample_autoregressive
from .dispatch import SAMPLERS, sample, sampler_for
from .captioning import sample_caption
from .editing import continue_image, img2img, inpaint, outpaint, pixel_mask_to_token_mask, random_token_mask
from .filters import filter_logits, gumbel_noise, mask_by_random_topk, sample_from_logits
from .guidance import apply_guidance, guidance_at
from .masked import sample_masked
from .options import CAPTION_OPTIONS, RULES, SAMPLE_DEFAULTS, OptionError, SampleOptions, check_option, check_seeds

__all__ = [
    "sample",
    "sampler_for",
    "SAMPLERS",
    "SampleOptions",
    "SAMPLE_DEFAULTS",
    "CAPTION_OPTIONS",
    "RULES",
    "OptionError",
    "check_option",
    "check_seeds",
    "sample_autoregressive",
    "sample_masked",
    "sample_caption",
    "filter_logits",
    "apply_guidance",
    "guidance_at",
    "gumbel_noise",
    "mask_by_random_topk",
    "sample_from_logits",
    "num_image_tokens",
    "pixel_mask_to_token_mask",
    "inpaint",
    "outpaint",
    "img2img",
    "continue_image",
    "random_token_mask",
]
