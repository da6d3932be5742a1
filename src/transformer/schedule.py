"""Mask schedules and the random training-time corruptions (masking, condition dropout).

`mask_ratio` is the ONE schedule used by both masked training and the MaskGIT sampler. Every random helper takes a
`torch.Generator` so training is reproducible under a seed.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

NULL_TEXT_ID = 0  # = tokenpaint.data.NULL_TEXT_ID: the empty prompt encodes to all zeros

MASK_SCHEDULES = ("cosine", "linear", "square", "sqrt")


def check_mask_schedule(name: str) -> None:
    """An unknown schedule name -> ValueError listing MASK_SCHEDULES (before any work starts)."""
    if name not in MASK_SCHEDULES:
        raise ValueError(f"unknown mask schedule {name!r}; expected one of {list(MASK_SCHEDULES)}")


def mask_ratio(r: Union[float, torch.Tensor], kind: str = "cosine") -> Union[float, torch.Tensor]:
    """gamma(r): the fraction of tokens still masked at progress r in [0, 1]; gamma(0) = 1, gamma(1) = 0.

    cosine: cos(pi/2 r) (MaskGIT), linear: 1 - r, square: 1 - r^2, sqrt: 1 - sqrt(r).
    Works on floats and tensors.
    """
    is_tensor = isinstance(r, torch.Tensor)
    if kind == "cosine":
        return torch.cos(r * (math.pi / 2)) if is_tensor else math.cos(r * math.pi / 2)
    if kind == "linear":
        return 1 - r
    if kind == "square":
        return 1 - r * r
    if kind == "sqrt":
        return 1 - (torch.sqrt(r) if is_tensor else math.sqrt(r))
    check_mask_schedule(kind)
    raise AssertionError(f"mask schedule {kind!r} is listed in MASK_SCHEDULES but has no formula")


def _uniform(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_mask(
    batch: int,
    n: int,
    generator: Optional[torch.Generator],
    schedule: str = "cosine",
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """bool [batch, n], True = masked. Per row: r ~ U(0,1), round(n * gamma(r)) positions (at least 1) at random."""
    check_mask_schedule(schedule)
    r = _uniform((batch,), generator, device)
    num_masked = (mask_ratio(r, schedule) * n).round().clamp(1, n).long()  # [B]
    # A random permutation per row: rank of each position in sorted uniform noise
    ranks = _uniform((batch, n), generator, device).argsort(dim=1).argsort(dim=1)  # [B,n] in 0..n-1
    return ranks < num_masked[:, None]


def masked_training_batch(
    image_ids: torch.Tensor,
    mask_token_id: int,
    generator: Optional[torch.Generator],
    schedule: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """image_ids [B,N] -> (inputs with [MASK] at sampled positions, targets = ids there and -100 elsewhere)."""
    if image_ids.dim() != 2:
        raise ValueError(f"image_ids must be [B,N], got shape {tuple(image_ids.shape)}")
    mask = sample_mask(image_ids.shape[0], image_ids.shape[1], generator, schedule, device=image_ids.device)
    inputs = image_ids.masked_fill(mask, mask_token_id)
    targets = image_ids.masked_fill(~mask, -100)
    return inputs, targets


def drop_condition(text_ids: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Replace whole rows of text_ids [B,T] by NULL_TEXT_ID with probability p (classifier-free guidance training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_condition: p must be in [0, 1], got {p}")
    drop = _uniform((text_ids.shape[0],), generator, text_ids.device) < p  # [B]
    return text_ids.masked_fill(drop[:, None], NULL_TEXT_ID)
