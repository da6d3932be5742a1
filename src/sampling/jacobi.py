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

A pass is one model call plus a few dozen whole-batch tensor operations: no loop over rows or window positions, one
host sync (the accepted lengths, kept as Python ints for the next pass's bounds), one call for the pass's 2W + 1
uniform numbers per row and one draw for the redrawn token and the next drafts together, and the [B, W, V]
distributions touched only where the rule needs them (the residual is formed at each row's stop alone). When every
row has accepted as many tokens (always at batch 1) the fed tokens and window distributions are plain slices.
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .filters import (Generators, StepCallback, categorical, filtered_probs, multinomial_last_dim,
                      uniform_noise)
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
        self.n_tokens = N = int(model.config.image_size) ** 2
        device = prefix_ids.device
        self.rel = torch.arange(self.window, device=device)  # [W] window offsets
        self.rows = torch.arange(batch, device=device)
        self.has_known = known is not None and bool(known.any())
        self.known = known if known is not None else torch.zeros(batch, N, dtype=torch.bool, device=device)
        self.forced = forced if forced is not None else torch.zeros(batch, N, dtype=torch.long, device=device)
        # W spare columns: a pass writes its whole window there, past N included; only accepted columns are kept
        self._ids = torch.zeros(batch, N + self.window, dtype=torch.long, device=device)
        self._ids[:, :start] = prefix_ids
        self.forward_passes = 1
        logits, self.cache = model.prefill(text_in, image_prefix=double_for_guidance(prefix_ids, use_guidance)
                                           if start > 0 else None)
        first_p = self._probs(logits)  # [B, V]: the exact distribution of token `start`
        first = self._force(multinomial_last_dim(first_p, generator), torch.full((batch,), start, device=device))
        self._ids[:, start] = first
        self.accepted = torch.full((batch,), start + 1, dtype=torch.long, device=device)  # tokens fixed per row
        self._accepted = [start + 1] * batch  # the same on the host: the bounds of the next pass
        self.drafts, self.proposals = self._draw_drafts(first_p[:, None].expand(-1, self.window, -1))

    @property
    def ids(self) -> torch.Tensor:
        """[B, N]: the accepted tokens (and, past `accepted`, not yet meaningful ones)."""
        return self._ids[:, : self.n_tokens]

    @property
    def done(self) -> bool:
        return min(self._accepted) >= self.n_tokens

    @property
    def start(self) -> int:
        """The first position some row has not accepted (the cache holds every position before start - 1)."""
        return min(self._accepted)

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
        return self.ids.contiguous()

    # ------------------------------------------------------------------ one pass
    def step(self) -> None:
        """One forward pass over every row's window, verification, and the next drafts."""
        W, N, rel = self.window, self.n_tokens, self.rel
        c, ahead = min(self._accepted), max(self._accepted)
        last = min(ahead + W - 1, N - 1)  # the last position some row's window predicts
        L = last - c + 1  # fed positions c-1 .. last-1 predict c .. last
        window_pos = self.accepted[:, None] + rel  # [B, W] absolute positions of each row's window
        aligned = c == ahead  # every row at the same position (always at batch 1)
        if aligned:
            fed = torch.cat([self._ids[:, c - 1 : c], self.drafts[:, : L - 1]], dim=1)
        else:
            offset = torch.arange(c - 1, last, device=rel.device)[None, :] - self.accepted[:, None]  # [B, L]
            # < 0: an accepted token; 0..W-1: a draft; past a slower row's window: never looked at
            fed = torch.where(offset < 0, self._ids[:, c - 1 : last], self.drafts.gather(1, offset.clamp(0, W - 1)))
        logits, self.cache = self.model.decode_window(double_for_guidance(fed, self.use_guidance), c - 1, self.cache)
        self.forward_passes += 1
        p = self._probs(logits)  # [B, L, V]: index i predicts position c + i
        if not (aligned and L == W):  # the window positions of each row, the last one repeated past the image
            index = (window_pos - c).clamp(max=L - 1)
            p = p[self.rows[:, None], index]  # [B, W, V]

        # window positions inside the image per row: W for every row until a window reaches the end
        n_valid = W if ahead + W <= N else (N - self.accepted).clamp(max=W)
        x = self.drafts
        px = p.gather(-1, x[..., None])[..., 0]
        qx = self.proposals.gather(-1, x[..., None])[..., 0]
        u = uniform_noise((x.shape[0], 2 * W + 1), self.generator, device=x.device)  # this pass's numbers, per row
        rejected = u[:, :W] * qx >= px  # accept x with probability min(1, p(x) / q(x))
        if self.has_known:
            rejected &= ~self.known.gather(1, window_pos.clamp(max=N - 1))
        stop = torch.where(rejected, rel, W).amin(dim=1).clamp(max=n_valid)  # [B] first rejection, else n_valid
        gained = (stop + 1).clamp(max=n_valid)  # accepted drafts + the redrawn token

        at_stop = stop.clamp(max=W - 1)
        p_stop, q_stop = p[self.rows, at_stop], self.proposals[self.rows, at_stop]  # [B, V]
        residual = (p_stop - q_stop).clamp(min=0)
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p <= q everywhere can only mean p == q: draw from p
        # next window of each row: this pass's p where it predicted past the stop, else the last predicted one
        source = (gained[:, None] + rel).clamp(max=n_valid - 1 if isinstance(n_valid, int) else n_valid[:, None] - 1)
        proposals = p[self.rows[:, None], source]  # [B, W, V]
        # one draw for the token at the stop (from the residual) and the next drafts (from their proposals)
        drawn = categorical(torch.cat([torch.where(empty, p_stop, residual)[:, None], proposals], dim=1), u[:, W:])
        redrawn, drafts = drawn[:, 0], drawn[:, 1:]
        # accepted drafts, the redrawn token at the stop; columns after it are rewritten when they are accepted
        self._ids.scatter_(1, window_pos, torch.where(rel == stop[:, None], redrawn[:, None], x))
        self.accepted = self.accepted + gained
        self._accepted = self.accepted.tolist()
        if self.has_known:
            drafts = self._force(drafts, self.accepted[:, None] + rel)
        self.drafts, self.proposals = drafts, proposals

    # ------------------------------------------------------------------ helpers
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The one-token sampling distribution from raw (doubled) logits [B or 2B, ..., V]."""
        return filtered_probs(split_guidance(logits, self.scale, self.use_guidance), **self.sampling)

    def _draw_drafts(self, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts [B, W] drawn from proposals [B, W, V] (W per row, always), known positions forced."""
        drafts = multinomial_last_dim(proposals, self.generator)
        if self.has_known:
            drafts = self._force(drafts, self.accepted[:, None] + self.rel)
        return drafts, proposals

    def _force(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Known tokens at `positions` (same shape as tokens, any position past the image ignored)."""
        positions = positions.clamp(max=self.n_tokens - 1)
        if tokens.dim() == 1:
            return torch.where(self.known.gather(1, positions[:, None])[:, 0],
                               self.forced.gather(1, positions[:, None])[:, 0], tokens)
        return torch.where(self.known.gather(1, positions), self.forced.gather(1, positions), tokens)


__all__ = ["JacobiDecoder"]
