"""Causal GPT over [text ; image ids] (EasyNLP pai-painter / taming / DALL-E style), with a static KV cache.

Sequence layout: text (T = text_len tokens) then image[:-1]. Logits position i predicts image token i from the text
and image tokens < i, so the last text position predicts image token 0. Block size = T + N - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import TokenTransformer
from .config import GeneratorConfig


@dataclass
class GPTConfig(GeneratorConfig):
    kind = "gpt"

    @property
    def block_size(self) -> int:
        return self.text_len + self.num_image_tokens - 1


class KVCache:
    """Preallocated keys/values of every layer, `k`/`v` [n_layer, B, H, max_len, D]; `index` = positions filled.

    Allocated once by `GPT.prefill`; each `GPT.decode_step` writes one position in place (no reallocation).
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.index = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [B,H,max_len,D] views of layer i."""
        return self.k[i], self.v[i]


class GPT(TokenTransformer):
    config_class = GPTConfig

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """text_ids [B,T], image_ids [B,n] (n <= N; usually N) -> (logits [B,n,codebook_size], loss or None).

        logits[:, i] predicts image_ids[:, i]; `loss` = mean CE against `targets` [B,n] (-100 = ignored),
        typically `targets = image_ids`.
        """
        c = self.config
        self._check_text(text_ids)
        self._check_image("image_ids", image_ids, text_ids.shape[0], c.num_image_tokens, c.codebook_size)
        if image_ids.shape[1] == 0:
            raise ValueError("image_ids must hold at least one image token (use prefill for text-only context)")
        T = c.text_len
        x = torch.cat([self.embed.text(text_ids), self.embed.image(image_ids[:, :-1])], dim=1)  # [B, T+n-1, C]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, causal=True)
        logits = self.head(self.ln_f(x[:, T - 1 :]))  # [B, n, V]: positions T-1 .. T+n-2 predict image 0 .. n-1
        loss = None
        if targets is not None:
            self._check_targets(targets, image_ids.shape)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------ cached decoding
    @torch.no_grad()
    def prefill(
        self, text_ids: torch.Tensor, image_prefix: Optional[torch.Tensor] = None, max_len: Optional[int] = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Run the text (and an optional image prefix [B,P], P <= N-1) and allocate the cache.

        Returns (float32 logits [B,codebook_size] for image token P, cache). `max_len` = cache capacity in sequence
        positions, default T + N - 1 (enough to decode the whole image). Without a KV cache, calling
        `prefill(text_ids, ids[:, :i])` for each i gives the same logits by recomputation.
        """
        c = self.config
        self._check_text(text_ids)
        B, T, N = text_ids.shape[0], c.text_len, c.num_image_tokens
        if image_prefix is None:
            image_prefix = text_ids.new_zeros(B, 0)
        if image_prefix.dim() == 2 and image_prefix.shape[1] > N - 1:
            raise ValueError(f"image_prefix holds {image_prefix.shape[1]} tokens; at most N-1 = {N - 1} leave one to predict")
        self._check_image("image_prefix", image_prefix, B, N - 1, c.codebook_size)
        P = image_prefix.shape[1]
        max_len = c.block_size if max_len is None else int(max_len)
        if not T + P <= max_len <= c.block_size:
            raise ValueError(f"max_len must be in [{T + P}, {c.block_size}] (text + prefix .. T + N - 1), got {max_len}")
        cache = KVCache(c.n_layer, B, c.n_head, max_len, c.head_dim, dtype=self.dtype, device=self.device)
        x = torch.cat([self.embed.text(text_ids), self.embed.image(image_prefix)], dim=1)  # [B, T+P, C]
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, kv_cache=cache.layer(i), start=0)
        cache.index = T + P
        return self.head(self.ln_f(x[:, -1])).float(), cache

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed image token `token` [B] that sits at index `pos` of the image sequence (0-based, row-major).

        Returns (float32 logits [B,codebook_size] for image token pos+1, the same cache advanced by one). Tokens
        must come in order: after `prefill` with a prefix of P tokens the first step is pos = P. The last step that
        predicts anything is pos = N-2.
        """
        c = self.config
        pos = int(pos)
        expected = cache.index - c.text_len
        if pos != expected:
            raise ValueError(f"decode_step: pos={pos}, but the cache holds image tokens 0..{expected - 1}; pass pos={expected}")
        if not 0 <= pos <= c.num_image_tokens - 2:
            raise ValueError(f"decode_step: pos must be in [0, N-2={c.num_image_tokens - 2}], got {pos}")
        if cache.index >= cache.max_len:
            raise ValueError(f"decode_step: the cache is full (max_len={cache.max_len}); prefill with a larger max_len")
        if token.shape != (cache.batch_size,):
            raise ValueError(f"decode_step: token must be [B={cache.batch_size}], got shape {tuple(token.shape)}")
        logits, cache = self._feed(token[:, None], pos, cache)
        return logits[:, 0], cache

    @torch.no_grad()
    def decode_window(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed n image tokens [B, n] at image positions pos..pos+n-1 in one cached pass (speculative decoding).

        The cache must hold the image tokens before pos; anything it holds from pos on (an earlier window's rejected
        drafts) is overwritten, so rewinding is just passing a smaller pos. Returns (float32 logits [B, n,
        codebook_size] for image tokens pos+1..pos+n, the cache holding positions < pos+n).
        """
        c = self.config
        pos, held = int(pos), cache.index - c.text_len
        if tokens.dim() != 2 or tokens.shape[0] != cache.batch_size or tokens.shape[1] < 1:
            raise ValueError(f"decode_window: tokens must be [B={cache.batch_size}, n>=1], got {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if not 0 <= pos <= held:
            raise ValueError(f"decode_window: pos={pos}, but the cache holds image tokens 0..{held - 1} (pos <= {held})")
        if pos + n - 1 > c.num_image_tokens - 2:
            raise ValueError(f"decode_window: positions {pos}..{pos + n - 1} go past N-2={c.num_image_tokens - 2}")
        return self._feed(tokens, pos, cache)

    def _feed(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        start = self.config.text_len + pos
        x = self.embed.image(tokens, start=pos)  # [B, n, C]
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, kv_cache=cache.layer(i), start=start)
        cache.index = start + tokens.shape[1]
        return self.head(self.ln_f(x)).float(), cache  # [B, n, V]
