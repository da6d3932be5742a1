"""Iterative masked decoding (MaskGIT) for the bidirectional masked transformer.

Per step t of T (r = (t+1)/T): predict every masked position (the model's head runs there alone, on the guided
features: `MaskedTransformer.features`), sample a token there, confidence = p(sampled token)
(known and already fixed tokens: +inf), keep `floor(U * gamma(r))` of them masked (U = unknown tokens at the start,
which is N for an all-masked start), clamped to [1, unknown now - 1], 0 at the final step, choosing the least
confident by log p + tau * Gumbel with tau = choice_temperature * (1 - r).

Randomness: each row draws all its noise in one go, up front: U(0,1) [steps, 2, N] from its generator (step t's
token draws by inverse CDF, then the uniforms of its choice noise). A row's draws are thus fixed by its own seed,
whatever shares its batch, and a batch of B rows costs B generator calls per image, not one per row, step and id.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from ..transformer.presets import SAMPLE_DEFAULTS as D
from ..transformer.schedule import check_mask_schedule, mask_ratio  # one schedule for training and sampling
from .autoregressive import num_image_tokens
from .filters import (Generators, StepCallback, check_generators, gumbel_from_uniform, known_tokens,
                      mask_by_random_topk, sample_from_logits, uniform_noise)
from .guidance import check_guidance_schedule, double_for_guidance, guidance_at, guidance_enabled, prepare_text_pair
from .guidance import split_guidance

Schedule = Union[str, Callable[[float], float]]


def schedule_fn(schedule: Schedule) -> Callable[[float], float]:
    """The mask-ratio schedule gamma(r): a name from tokenpaint.transformer.schedule, or a callable r -> ratio."""
    if callable(schedule):
        return schedule
    check_mask_schedule(schedule)
    return lambda r: float(mask_ratio(r, schedule))


def keep_masked_count(step: int, steps: int, n_unknown_start: torch.Tensor, n_masked_now: torch.Tensor, gamma) -> torch.Tensor:
    """How many positions stay masked after step `step` (long [B]); 0 after the last step."""
    if step == steps - 1:
        return torch.zeros_like(n_masked_now)
    ratio = gamma((step + 1) / steps)
    target = torch.floor(n_unknown_start.double() * ratio).long()
    keep = torch.maximum(torch.ones_like(target), torch.minimum(n_masked_now - 1, target))
    return torch.minimum(keep, n_masked_now)  # a row with nothing left to decode keeps nothing masked


@torch.inference_mode()
def sample_masked(
    model,
    text_ids: torch.Tensor,
    *,
    negative_text_ids: Optional[torch.Tensor] = None,
    steps: int = D["steps"],
    guidance_scale: float = D["guidance_scale"],
    guidance_schedule: str = D["guidance_schedule"],
    schedule: Schedule = D["schedule"],
    choice_temperature: float = D["choice_temperature"],
    temperature: float = D["temperature"],
    top_k: Optional[int] = D["top_k"],
    generator: Generators = None,
    init_ids: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    progress: bool = False,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Sample image ids [B, N] from a MaskedTransformer conditioned on text_ids [B, T].

    init_ids [B, N] (or [B, h, w]) with known_mask bool ([N], [B, N] or [B, h, w]): the known tokens are kept
    as they are; the others start masked and are decoded. Without them decoding starts all-masked.
    generator: one torch.Generator for the batch, or a list with one per row.
    on_step(done, steps): called after each decoding step (a batch with nothing left to decode reports steps, steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if choice_temperature < 0:
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
    batch, device = text_ids.shape[0], text_ids.device
    n_tokens = num_image_tokens(model)
    mask_id = int(model.mask_token_id)
    check_generators(generator, batch)
    check_guidance_schedule(guidance_schedule)
    gamma = schedule_fn(schedule)
    use_guidance = guidance_enabled(guidance_scale)
    text_in = prepare_text_pair(text_ids, negative_text_ids, use_guidance)

    ids = initial_ids(init_ids, known_mask, batch, n_tokens, mask_id, device)
    n_unknown_start = (ids == mask_id).sum(dim=1)  # [B]
    noise = uniform_noise((batch, steps, 2, n_tokens), generator, device=device)  # every draw of the call, per row
    loop = tqdm(range(steps), desc="steps", leave=False) if progress else range(steps)
    for step in loop:
        masked = ids == mask_id  # [B, N]
        if not masked.any():
            if on_step is not None:
                on_step(steps, steps)
            break
        features = model.features(text_in, double_for_guidance(ids, use_guidance))  # [B or 2B, N, C]
        scale = guidance_at(step, steps, guidance_scale, guidance_schedule)
        # the head is linear: guiding its input is guiding the logits; it runs at the masked positions only [M, V]
        logits = model.head(split_guidance(features, scale, use_guidance)[masked].to(features.dtype))
        drawn, probs = sample_from_logits(logits, None, temperature=temperature, top_k=top_k,
                                          uniform=noise[:, step, 0][masked])
        sampled = ids.masked_scatter(masked, drawn)
        confidence = torch.full(ids.shape, math.inf, device=device)  # p(sampled token) [B, N]; fixed tokens: inf
        confidence[masked] = probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        keep = keep_masked_count(step, steps, n_unknown_start, masked.sum(dim=1), gamma)
        tau = choice_temperature * (1.0 - (step + 1) / steps)
        remask = mask_by_random_topk(keep, confidence, tau, noise=gumbel_from_uniform(noise[:, step, 1]))
        ids = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        if on_step is not None:
            on_step(step + 1, steps)
    return ids


def initial_ids(init_ids, known_mask, batch: int, n_tokens: int, mask_id: int, device) -> torch.Tensor:
    """All-masked ids, or init_ids with every unknown position set to mask_id (long [B, N])."""
    known, init_ids = known_tokens(init_ids, known_mask, batch, n_tokens, mask_id, device)  # mask_id = codebook_size
    if known is None:
        return torch.full((batch, n_tokens), mask_id, dtype=torch.long, device=device)
    return torch.where(known, init_ids, torch.full_like(init_ids, mask_id))


__all__ = ["sample_masked", "schedule_fn", "keep_masked_count", "initial_ids"]
