"""Autoregressive (GPT) decoding over image tokens, with a KV cache and classifier-free guidance in one batch.

The cached path prefills [text ; prefix] once and then feeds one token per step; the uncached path re-runs the whole
sequence each step (as taming / EasyNLP / minGPT do). Both draw their random numbers identically (one multinomial
per row per step on the same probabilities), so they return identical ids for the same generator.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from ..transformer.presets import SAMPLE_DEFAULTS as D
from .filters import Generators, StepCallback, check_generators, known_tokens, sample_from_logits
from .guidance import double_for_guidance, guidance_enabled, prepare_text_pair, split_guidance
from .jacobi import JacobiDecoder


def num_image_tokens(model) -> int:
    """Tokens per image (image_size tokens per side, row-major)."""
    return int(model.config.image_size) ** 2


@torch.inference_mode()
def sample_autoregressive(
    model,
    text_ids: torch.Tensor,
    *,
    negative_text_ids: Optional[torch.Tensor] = None,
    guidance_scale: float = D["guidance_scale"],
    temperature: float = D["temperature"],
    top_k: Optional[int] = D["top_k"],
    top_p: Optional[float] = D["top_p"],
    generator: Generators = None,
    use_kv_cache: bool = D["use_kv_cache"],
    prefix_ids: Optional[torch.Tensor] = None,
    init_ids: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    jacobi_window: int = D["jacobi_window"],
    progress: bool = False,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Sample image ids [B, N] from a GPT conditioned on text_ids [B, T].

    guidance_scale: 1 (or 0) runs the conditional model only; otherwise the batch is doubled to [cond ; uncond],
    uncond being `negative_text_ids` (one row or B rows) or the empty prompt (all zeros).
    prefix_ids [B, P]: keep these first P tokens (continue an image from its top rows).
    init_ids [B, N] + known_mask bool [B, N] or [N]: force the known tokens wherever they occur (editing with a
    causal model: each generated token sees the known tokens above/left of it, later known tokens are kept).
    generator: one torch.Generator for the batch, or a list with one per row.
    jacobi_window W > 1: speculative Jacobi decoding (sampling/jacobi.py): W draft tokens per row verified in one
    cached pass, fewer passes, the same distribution as one-token sampling (not the same ids for a seed).
    on_step(done, total): called after each token (each Jacobi pass) with the tokens decoded and to decode.
    """
    batch, device = text_ids.shape[0], text_ids.device
    n_tokens = num_image_tokens(model)
    check_generators(generator, batch)
    use_guidance = guidance_enabled(guidance_scale)
    text_in = prepare_text_pair(text_ids, negative_text_ids, use_guidance)  # [B or 2B, T]

    if prefix_ids is None:
        prefix_ids = torch.zeros(batch, 0, dtype=torch.long, device=device)
    prefix_ids = prefix_ids.to(device=device, dtype=torch.long)
    if prefix_ids.shape[0] != batch or prefix_ids.shape[1] > n_tokens:
        raise ValueError(
            f"prefix_ids must be [B={batch}, P<={n_tokens}], got shape {tuple(prefix_ids.shape)}"
        )
    known, forced = known_tokens(init_ids, known_mask, batch, n_tokens, int(model.config.codebook_size), device)

    if not isinstance(jacobi_window, int) or isinstance(jacobi_window, bool) or jacobi_window < 1:
        raise ValueError(f"jacobi_window must be an integer >= 1 (1 = one token per step), got {jacobi_window!r}")
    if jacobi_window > 1 and not use_kv_cache:
        raise ValueError("jacobi_window > 1 needs the KV cache (use_kv_cache=True)")

    ids = prefix_ids
    start = prefix_ids.shape[1]
    if start == n_tokens:
        return ids.clone()
    if jacobi_window > 1:
        decoder = JacobiDecoder(model, text_in, prefix_ids, window=jacobi_window, use_guidance=use_guidance,
                                guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator, known=known, forced=forced)
        return decoder.run(progress, on_step)
    steps = range(start, n_tokens)
    if progress:
        steps = tqdm(steps, desc="tokens", leave=False)

    cache = None
    if use_kv_cache:
        image_prefix = double_for_guidance(prefix_ids, use_guidance) if start > 0 else None
        logits, cache = model.prefill(text_in, image_prefix=image_prefix)
    for pos in steps:
        if not use_kv_cache:
            # position pos of the output predicts token pos from tokens < pos; the appended 0 is never attended to
            placeholder = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=device)
            full_logits, _ = model(text_in, double_for_guidance(torch.cat([ids, placeholder], dim=1), use_guidance))
            logits = full_logits[:, pos]
        guided = split_guidance(logits, guidance_scale, use_guidance)  # [B, V]
        token, _ = sample_from_logits(guided, generator, temperature=temperature, top_k=top_k, top_p=top_p)
        if known is not None:
            token = torch.where(known[:, pos], forced[:, pos], token)
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)  # [B, pos+1]
        if on_step is not None:
            on_step(pos + 1 - start, n_tokens - start)
        if use_kv_cache and pos + 1 < n_tokens:
            logits, cache = model.decode_step(double_for_guidance(token, use_guidance), pos, cache)
    return ids


__all__ = ["sample_autoregressive", "num_image_tokens"]
