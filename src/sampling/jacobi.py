"""Speculative Jacobi decoding (SJD; Teng et al. 2024, arXiv 2410.01699) for the GPT: fewer forward passes, the
same sampling distribution as one-token decoding.

Each row keeps a window of W draft tokens after its last accepted token, each drawn from a known proposal q. One
cached forward pass over the windows gives the model's distribution p (guided, tempered, top-k/top-p filtered:
exactly what one-token sampling draws from) at every window position. The drafts are verified in order: draft x is
accepted with probability min(1, p(x) / q(x)); at the first rejection a token is drawn from norm(max(0, p - q)) and
the row stops there. This is speculative sampling's rule, so every accepted or redrawn token is distributed exactly as
p given the tokens before it, whatever the proposals were. The first window position is always predicted from
accepted tokens only, so each pass gains at least one token per row. The drafts after the stop are redrawn from this
pass's p at their positions (the Jacobi update: a prediction from a nearly right context, usually accepted next
time); positions new to the window are drawn from the row's last predicted distribution (neighbouring image tokens
are alike). The paper initialises new positions at random; the neighbour's distribution is a proposal too.

Rows accept different lengths. The KV cache has one fill level, so each pass starts at the least advanced row: a
row further ahead re-feeds its accepted tokens there (rewritten identically in the cache). Positions a rejected draft
had written are always re-fed, so the cache below the next start holds accepted tokens only. Every row draws a fixed
number of random numbers per pass from its own generator, so with one generator per row an image does not depend on
the other rows of its batch. Known tokens (editing) are forced and never verified.
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .filters import Generators, StepCallback, filtered_probs, multinomial_last_dim, uniform_noise
from .guidance import double_for_guidance, split_guidance


class JacobiDecoder:
    """The state of one batch under speculative Jacobi decoding; `run()` returns the ids [B, N].

    text_in [B or 2B, T] is the (guidance-doubled) text; prefix_ids [B, P] are kept; known/forced [B, N] (or None)
    are the editing inputs. `forward_passes` counts model calls (the prefill included).
    """

    def __init__(self, model, text_in: torch.Tensor, prefix_ids: torch.Tensor, *, window: int, use_guidance: bool,
                 guidance_scale: float, temperature: float, top_k: Optional[int], top_p: Optional[float],
                 generator: Generators, known: Optional[torch.Tensor] = None, forced: Optional[torch.Tensor] = None):
        if window < 1:
            raise ValueError(f"jacobi_window must be >= 1, got {window}")
        self.model, self.window, self.generator = model, int(window), generator
        self.use_guidance, self.scale = use_guidance, guidance_scale
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        batch, start = prefix_ids.shape
        self.prefix_len = start
        self.n_tokens = int(model.config.image_size) ** 2
        device = prefix_ids.device
        self.known = known if known is not None else torch.zeros(batch, self.n_tokens, dtype=torch.bool, device=device)
        self.forced = forced if forced is not None else torch.zeros(batch, self.n_tokens, dtype=torch.long,
                                                                    device=device)
        self.ids = torch.zeros(batch, self.n_tokens, dtype=torch.long, device=device)
        self.ids[:, :start] = prefix_ids
        self.forward_passes = 1
        logits, self.cache = model.prefill(text_in, image_prefix=double_for_guidance(prefix_ids, use_guidance)
                                           if start > 0 else None)
        first_p = self._probs(logits)  # [B, V]: the exact distribution of token `start`
        first = self._force(multinomial_last_dim(first_p, generator), torch.full((batch,), start, device=device))
        self.ids[:, start] = first
        self.accepted = torch.full((batch,), start + 1, dtype=torch.long, device=device)  # tokens fixed per row
        self.drafts, self.proposals = self._draw_drafts(first_p[:, None].expand(-1, self.window, -1))

    @property
    def done(self) -> bool:
        return bool((self.accepted >= self.n_tokens).all())

    @property
    def start(self) -> int:
        """The first position some row has not accepted (the cache holds every position before start - 1)."""
        return int(self.accepted.min())

    def run(self, progress: bool = False, on_step: Optional[StepCallback] = None) -> torch.Tensor:
        """Decode to the end; on_step(tokens past the prefix every row has, tokens past the prefix) after each pass
        (the first token, drawn from the prefill, counts from the first pass on)."""
        bar = tqdm(total=self.n_tokens, initial=self.start, desc="tokens", leave=False, disable=not progress)
        while not self.done:
            before = self.start
            self.step()
            bar.update(min(self.start, self.n_tokens) - before)
            if on_step is not None:
                on_step(min(self.start, self.n_tokens) - self.prefix_len, self.n_tokens - self.prefix_len)
        bar.close()
        return self.ids

    # ------------------------------------------------------------------ one pass
    def step(self) -> None:
        """One forward pass over every row's window, verification, and the next drafts."""
        W, N = self.window, self.n_tokens
        batch, device = self.ids.shape[0], self.ids.device
        c = self.start
        rel = torch.arange(W, device=device)
        window_pos = self.accepted[:, None] + rel  # [B, W] absolute positions of each row's window
        valid = window_pos < N
        last = int(torch.where(valid, window_pos, torch.zeros_like(window_pos)).max())  # last position to predict
        fed_pos = torch.arange(c - 1, last, device=device)  # [L]: feeding these predicts c .. last
        offset = fed_pos[None, :] - self.accepted[:, None]  # [B, L]: < 0 accepted, 0..W-1 a draft
        fed = torch.where(offset < 0, self.ids[:, fed_pos],
                          self.drafts.gather(1, offset.clamp(0, W - 1)))
        fed = torch.where(offset >= W, torch.zeros_like(fed), fed)  # past a slower row's window: never looked at
        logits, self.cache = self.model.decode_window(double_for_guidance(fed, self.use_guidance), c - 1, self.cache)
        self.forward_passes += 1
        p_all = self._probs(logits)  # [B, L, V]: index i predicts position c + i
        index = (window_pos - c).clamp(max=p_all.shape[1] - 1)
        p = p_all.gather(1, index[..., None].expand(-1, -1, p_all.shape[-1]))  # [B, W, V] at the window positions

        x = self.drafts
        px = p.gather(-1, x[..., None]).squeeze(-1)
        qx = self.proposals.gather(-1, x[..., None]).squeeze(-1)
        u = uniform_noise((batch, W), self.generator, device=device)
        known = self.known.gather(1, window_pos.clamp(max=N - 1))
        rejected = valid & ~known & (u * qx >= px)  # accept x with probability min(1, p(x) / q(x))
        n_valid = valid.sum(dim=1)
        stop = torch.where(rejected.any(dim=1), rejected.float().argmax(dim=1), n_valid)  # [B] first rejection

        residual = (p - self.proposals).clamp(min=0).gather(1, stop.clamp(max=W - 1)[:, None, None]
                                                              .expand(-1, 1, p.shape[-1])).squeeze(1)
        p_stop = p.gather(1, stop.clamp(max=W - 1)[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p <= q everywhere can only mean p == q: draw from p
        redrawn = multinomial_last_dim(torch.where(empty, p_stop, residual), self.generator)  # [B]

        new_tokens = torch.where(rel[None, :] == stop[:, None], redrawn[:, None], x)  # [B, W]
        gained = torch.where(stop < n_valid, stop + 1, n_valid)  # accepted drafts + the redrawn token
        keep = (rel[None, :] < gained[:, None]) & valid
        rows, cols = keep.nonzero(as_tuple=True)
        self.ids[rows, window_pos[rows, cols]] = new_tokens[rows, cols]

        # next window of each row: this pass's p where it predicted past the stop, else the last predicted one
        shifted = gained[:, None] + rel[None, :]  # [B, W] old window index of each new window slot
        last_p = p.gather(1, (n_valid - 1).clamp(min=0)[:, None, None].expand(-1, 1, p.shape[-1]))  # [B, 1, V]
        fresh = shifted < n_valid[:, None]
        source = p.gather(1, shifted.clamp(max=W - 1)[..., None].expand(-1, -1, p.shape[-1]))
        self.accepted = self.accepted + gained
        self.drafts, self.proposals = self._draw_drafts(torch.where(fresh[..., None], source, last_p))

    # ------------------------------------------------------------------ helpers
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The one-token sampling distribution from raw (doubled) logits [B or 2B, ..., V]."""
        return filtered_probs(split_guidance(logits, self.scale, self.use_guidance), **self.sampling)

    def _draw_drafts(self, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts [B, W] drawn from proposals [B, W, V] (W per row, always), known positions forced."""
        proposals = proposals.contiguous()
        drafts = multinomial_last_dim(proposals, self.generator)
        if self.known.any():
            drafts = self._force(drafts, self.accepted[:, None] + torch.arange(self.window, device=drafts.device))
        return drafts, proposals

    def _force(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Known tokens at `positions` (same shape as tokens, any position past the image ignored)."""
        positions = positions.clamp(max=self.n_tokens - 1)
        if tokens.dim() == 1:
            return torch.where(self.known.gather(1, positions[:, None])[:, 0],
                               self.forced.gather(1, positions[:, None])[:, 0], tokens)
        return torch.where(self.known.gather(1, positions), self.forced.gather(1, positions), tokens)


__all__ = ["JacobiDecoder"]
