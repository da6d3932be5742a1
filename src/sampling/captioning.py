"""Image -> text: caption decoding with a GPT trained in the caption direction (`model.config.directions` holds "i2t").

The cached path prefills the image ids once, then feeds one text token per step through the static KV cache (the
same machinery as image decoding); the uncached path re-runs the whole sequence each step. A caption ends at the
padding id (NULL_TEXT_ID, which the model learns as the end of a caption); the rest of its row is padding.
temperature 0 is greedy decoding (the default); otherwise each step draws from the tempered, top-k/top-p filtered
distribution with the row's generator, the same draws on both paths.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..transformer.presets import SAMPLE_DEFAULTS as D
from ..transformer.schedule import NULL_TEXT_ID
from .filters import Generators, check_generators, sample_from_logits
from .options import CAPTION_OPTIONS, check_option


@torch.inference_mode()
def sample_caption(
    model,
    image_ids: torch.Tensor,
    *,
    temperature: float = D["caption_temperature"],
    top_k: Optional[int] = D["caption_top_k"],
    top_p: Optional[float] = D["caption_top_p"],
    max_length: Optional[int] = D["caption_max_length"],
    generator: Generators = None,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Caption image ids long [B, N] (or [B, h, w]) -> text ids long [B, max_length] (default text_len), padded with
    NULL_TEXT_ID from each caption's end. generator: one torch.Generator, or one per row (unused when greedy).
    The defaults and rules are those of the sampler options caption_temperature, ... (SAMPLE_DEFAULTS)."""
    model.check_direction("i2t")  # a model trained text-to-image only cannot caption: a clear error
    for name, value in zip(CAPTION_OPTIONS, (temperature, top_k, top_p, max_length)):
        check_option("caption_" + name, value, name)
    c = model.config
    batch = image_ids.shape[0]
    image_ids = image_ids.reshape(batch, -1).to(device=model.device, dtype=torch.long)  # [B, N]
    max_length = c.text_len if max_length is None else max_length
    if max_length > c.text_len:
        raise ValueError(f"max_length must be an integer in [1, text_len={c.text_len}], got {max_length!r}")
    check_generators(generator, batch)

    out = torch.full((batch, max_length), NULL_TEXT_ID, dtype=torch.long, device=image_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=image_ids.device)
    if use_kv_cache:
        logits, cache = model.prefill_caption(image_ids, max_len=c.num_image_tokens + max_length - 1)
    for pos in range(max_length):
        if not use_kv_cache:
            # text position pos is predicted from text < pos; the placeholder at pos is never attended to
            logits = model(out[:, : pos + 1], image_ids, direction="i2t")[0][:, pos]
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            token, _ = sample_from_logits(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
        token = token.masked_fill(done, NULL_TEXT_ID)
        out[:, pos] = token
        done |= token == NULL_TEXT_ID
        if bool(done.all()):
            break
        if use_kv_cache and pos + 1 < max_length:
            logits, cache = model.decode_caption_step(token, pos, cache)
    return out


__all__ = ["sample_caption"]
