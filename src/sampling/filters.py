"""Small pure helpers shared by the samplers: logit filtering, seeded noise and draws (guidance: guidance.py).

Every random helper takes either one `torch.Generator` (or None) for the whole batch, or a list with one generator
per batch row. Per-row generators make image i of a request depend only on its own seed, not on which other images
happen to share its batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]
# on_step(done, total): called by a sampler after each decoding step (masked steps, tokens, Jacobi passes)
StepCallback = Callable[[int, int], None]


def check_generators(generator: Generators, batch: int) -> None:
    """A list of generators must hold exactly one generator per batch row."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch} rows")


# float64 sums of ~1e4 probabilities err by ~1e-14; real masses 1e-12 apart from top_p are still told apart
TOP_P_TOLERANCE = 1e-12


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering over the last dim; filtered entries become -inf, kept ones are unchanged.

    The conventions of HuggingFace transformers, taming, minGPT and LlamaGen:
    - top-k keeps every logit >= the k-th largest, so ids tied with the k-th are all kept (more than k then);
    - top-p keeps the most likely ids, in order, until their probability mass reaches top_p: an id is dropped when
      the ids strictly before it in that order already hold >= top_p. Equal logits are ordered by id. The masses are
      summed in float64, so float32 round-off (probabilities summing to 1 +- 1e-5 over a large vocabulary) cannot
      move the cut; a mass within TOP_P_TOLERANCE of top_p counts as reaching it, so an exact boundary (36 of 72
      equal logits at top_p = 0.5) is not decided by the last bit of a float64 sum either.
      top_p = 0 keeps the single most likely id (as transformers does); top_p = 1 keeps every id.
    The most likely id always survives.
    """
    vocab = logits.shape[-1]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < vocab:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 keeps only the most likely id), got {top_p}")
        if top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)
            if sorted_logits.device.type == "mps":  # no float64 there: the [B, V] sums are small, do them on the CPU
                sorted_logits = sorted_logits.cpu()
            sorted_probs = sorted_logits.double().softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1).roll(1, dims=-1)  # mass of the ids before each one
            mass_before[..., 0] = 0.0
            remove_sorted = (mass_before >= top_p - TOP_P_TOLERANCE).to(logits.device)
            remove_sorted[..., 0] = False  # the most likely id always stays (top_p = 0 keeps only it)
            remove = torch.zeros_like(remove_sorted).scatter_(-1, sorted_idx, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
    return logits


def known_tokens(init_ids, known_mask, batch: int, n_tokens: int, codebook_size: int, device):
    """The editing inputs of both samplers, checked: (known bool [B, N], init ids long [B, N]) or (None, None).

    init_ids [B, N] or [B, h, w]; known_mask [N], [1, N], [B, N] or [B, h, w] (True = keep). The known tokens must be
    image ids in [0, codebook_size).
    """
    if init_ids is None and known_mask is None:
        return None, None
    if init_ids is None or known_mask is None:
        raise ValueError("init_ids and known_mask must be given together")
    init_ids = init_ids.to(device=device, dtype=torch.long).reshape(init_ids.shape[0], -1)
    known_mask = known_mask.to(device=device, dtype=torch.bool)
    known_mask = known_mask.reshape(1, -1) if known_mask.dim() == 1 else known_mask.reshape(known_mask.shape[0], -1)
    known_mask = known_mask.expand(batch, -1) if known_mask.shape[0] == 1 else known_mask
    if init_ids.shape != (batch, n_tokens) or known_mask.shape != (batch, n_tokens):
        raise ValueError(
            f"init_ids {tuple(init_ids.shape)} and known_mask {tuple(known_mask.shape)} must both be "
            f"[B={batch}, N={n_tokens}]"
        )
    known_vals = init_ids[known_mask]
    if known_vals.numel() and (known_vals.min() < 0 or known_vals.max() >= codebook_size):
        raise ValueError(
            f"init_ids: known tokens must be image ids in [0, {codebook_size}), got values in "
            f"[{known_vals.min().item()}, {known_vals.max().item()}]"
        )
    return known_mask, init_ids


def uniform_noise(shape: Sequence[int], generator: Generators, device=None) -> torch.Tensor:
    """U(0,1) noise of `shape`; with a list of generators, row b of dim 0 comes from generator[b]."""
    def draw(size, g):  # on the generator's device (a CPU generator cannot fill a CUDA tensor), then moved
        return torch.rand(size, generator=g, device=g.device if g is not None else device).to(device)

    if isinstance(generator, (list, tuple)):
        check_generators(generator, shape[0])
        rows = [draw(tuple(shape[1:]), g) for g in generator]
        return torch.stack(rows) if rows else torch.empty(tuple(shape), device=device)
    return draw(tuple(shape), generator)


def gumbel_noise(shape: Sequence[int], generator: Generators, device=None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U(0,1) drawn from `generator` (clamped away from 0 and 1)."""
    return gumbel_from_uniform(uniform_noise(shape, generator, device=device))


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) from U(0,1) noise u (clamped away from 0 and 1), float32."""
    u = u.float()
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per distribution over the last dim by inverting its cumulative sum with one uniform each:
    probs [..., V] (non-negative, any positive total) and u [...] in [0, 1) -> ids [...] (long).

    The id drawn is the first whose cumulative mass exceeds u * total: each id is drawn with probability p / total
    (up to float32 round-off, ~1e-6, as torch.multinomial), an id of probability 0 never. One random number per draw,
    not one per id as torch.multinomial's exponential race takes, so a batch of [B, N, V] distributions costs B * N
    random numbers and one cumulative sum.
    """
    if u.shape != probs.shape[:-1]:
        raise ValueError(f"categorical: u {tuple(u.shape)} must have the shape of probs without its last dim "
                         f"{tuple(probs.shape[:-1])}")
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[..., -1:]
    if not (torch.isfinite(total) & (total > 0)).all():
        raise ValueError("categorical: every distribution needs a finite, positive total probability")
    # u * total < total, so a draw never runs past the last id of positive probability
    target = torch.minimum(u.to(cdf).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def multinomial_last_dim(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per distribution over the last dim: probs [B, ..., V] -> ids [B, ...] (long), by `categorical` with
    one uniform per draw. With a list of generators, row b's uniforms come from generator[b] alone.
    """
    return categorical(probs, uniform_noise(probs.shape[:-1], generator, device=probs.device))


def sample_from_logits(
    logits: torch.Tensor,
    generator: Generators,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    uniform: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k/top-p, then one draw per distribution: logits [B, ..., V] -> (ids [B, ...], probs).

    probs are the filtered, tempered probabilities the ids were drawn from (float32). uniform [B, ...]: U(0,1) noise
    the caller drew already (then `generator` is not used), else one uniform per draw from `generator`.
    """
    probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if uniform is not None:
        return categorical(probs, uniform), probs
    return multinomial_last_dim(probs, generator), probs


def filtered_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """The distribution one-token sampling draws from: softmax of the tempered, top-k/top-p filtered logits (float32)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)


def mask_by_random_topk(
    mask_len: torch.Tensor, confidence: torch.Tensor, temperature: float, generator: Generators = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MaskGIT's re-masking rule: mask the `mask_len[b]` positions of row b with the lowest log(confidence) + tau*Gumbel.

    confidence [B, N] are probabilities (+inf = never masked), mask_len long [B]. noise [B, N]: standard Gumbel noise
    the caller drew already (then `generator` is not used), else drawn from `generator`. Returns bool [B, N] with
    exactly mask_len[b] True entries in row b (ties broken by position, so the count is exact).
    """
    if noise is None:
        noise = gumbel_noise(confidence.shape, generator, device=confidence.device)
    score = torch.log(confidence.float()) + temperature * noise
    order = torch.argsort(score, dim=-1, stable=True)  # ascending: least confident first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < mask_len.unsqueeze(-1)


__all__ = [
    "StepCallback",
    "filter_logits",
    "gumbel_noise",
    "gumbel_from_uniform",
    "uniform_noise",
    "categorical",
    "multinomial_last_dim",
    "sample_from_logits",
    "filtered_probs",
    "mask_by_random_topk",
    "check_generators",
    "known_tokens",
]
