"""Classifier-free guidance, all of it: the doubled batch, the formula, negative prompts and the scale schedules.

A guided sampler runs the model once on a doubled batch [cond ; uncond] (`prepare_text_pair` builds the text half,
`double_for_guidance` repeats the image ids for it), then combines the two halves of the logits with
`split_guidance`: uncond + scale * (cond - uncond). The unconditional branch is the empty prompt (all
NULL_TEXT_ID = 0, what `transformer.schedule.drop_condition` trains on) or a negative prompt in its place.
Scales 1 (the plain conditional model) and 0 need no unconditional branch: the batch is not doubled.
`guidance_at` gives the scale of each step of masked decoding (GUIDANCE_SCHEDULES).
"""

from __future__ import annotations

from typing import Optional

import torch

GUIDANCE_SCHEDULES = ("constant", "linear")


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). scale 1 returns cond."""
    return uncond + scale * (cond - uncond)


def guidance_enabled(scale: float) -> bool:
    """Scales 1 (the plain conditional model) and 0 (guidance off) need no unconditional branch."""
    if scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {scale}")
    return scale not in (0.0, 1.0)


def prepare_text_pair(
    text_ids: torch.Tensor, negative_text_ids: Optional[torch.Tensor], use_guidance: bool
) -> torch.Tensor:
    """The text batch the model sees: [cond ; uncond] when guiding (uncond = negative prompt or all zeros), else cond.

    negative_text_ids: one row [T] or [1, T] for the whole batch, or one row per prompt [B, T].
    """
    if text_ids.dim() != 2:
        raise ValueError(f"text_ids must be long [B, text_len], got shape {tuple(text_ids.shape)}")
    if negative_text_ids is not None:
        if negative_text_ids.dim() == 1:
            negative_text_ids = negative_text_ids.unsqueeze(0)
        if negative_text_ids.shape[0] == 1 and text_ids.shape[0] > 1:
            negative_text_ids = negative_text_ids.expand(text_ids.shape[0], -1)
        if negative_text_ids.shape != text_ids.shape:
            raise ValueError(
                f"negative_text_ids shape {tuple(negative_text_ids.shape)} does not match text_ids "
                f"shape {tuple(text_ids.shape)}"
            )
    if not use_guidance:
        return text_ids
    uncond = negative_text_ids if negative_text_ids is not None else torch.zeros_like(text_ids)
    return torch.cat([text_ids, uncond.to(text_ids)], dim=0)  # [2B, T]


def double_for_guidance(ids: Optional[torch.Tensor], use_guidance: bool) -> Optional[torch.Tensor]:
    """Repeat image ids [B, ...] -> [2B, ...] for the [cond ; uncond] halves: both branches see the same image."""
    if ids is None or not use_guidance:
        return ids
    return torch.cat([ids, ids], dim=0)


def split_guidance(logits: torch.Tensor, scale: float, use_guidance: bool) -> torch.Tensor:
    """Combine the [cond ; uncond] halves of a doubled batch of logits; a single batch is returned as is."""
    if not use_guidance:
        return logits
    cond, uncond = logits.float().chunk(2, dim=0)
    return apply_guidance(cond, uncond, scale)


def check_guidance_schedule(guidance_schedule: str) -> None:
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be 'constant' or 'linear', got {guidance_schedule!r}")


def guidance_at(step: int, steps: int, scale: float, guidance_schedule: str) -> float:
    """Guidance scale of step `step` of `steps`: constant, or "linear" = rising from ~1 to `scale` at the last step."""
    check_guidance_schedule(guidance_schedule)
    if guidance_schedule == "linear":
        return 1.0 + (scale - 1.0) * (step + 1) / steps
    return scale


__all__ = [
    "GUIDANCE_SCHEDULES",
    "apply_guidance",
    "guidance_enabled",
    "prepare_text_pair",
    "double_for_guidance",
    "split_guidance",
    "check_guidance_schedule",
    "guidance_at",
]
