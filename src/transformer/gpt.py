"""Causal GPT over [text ; image ids] (EasyNLP pai-painter / taming / DALL-E style) and over [image ids ; text ids]
(captioning), with a static KV cache. One GPT may learn both directions (ERNIE-ViLG style).

Directions (`GPTConfig.directions`):
- "t2i": text (T = text_len tokens) then image[:-1]. Logits position i predicts image token i from the text and the
  image tokens < i, so the last text position predicts image token 0. `head` is over the codebook.
- "i2t": image (N tokens) then text[:-1]; the last image position predicts text token 0. `text_head` is over the
  text vocabulary; a caption ends with the padding id 0 (`caption_targets`).
Both sequences are T + N - 1 long (block_size). A model with both directions adds a learned direction embedding to
every position; all other weights are shared. A model without "t2i" has no image head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import TokenTransformer, check_ids
from .config import GeneratorConfig
from .layers import init_weights, window_attention_mask
from .schedule import NULL_TEXT_ID

DIRECTIONS = ("t2i", "i2t")  # the index is the row of the direction embedding
DIRECTION_NAMES = {"t2i": "text-to-image", "i2t": "image-to-text (captioning)"}


@dataclass
class GPTConfig(GeneratorConfig):
    directions: list = field(default_factory=lambda: ["t2i"])  # any of DIRECTIONS; both = one shared GPT

    kind = "gpt"

    def validate(self, source: Optional[str] = None) -> None:
        super().validate(source)
        where = f" in {source}" if source else ""
        d = self.directions
        if (not isinstance(d, (list, tuple)) or not d or len(set(d)) != len(d)
                or any(not isinstance(x, str) or x not in DIRECTIONS for x in d)):
            raise ValueError(f"GPTConfig.directions{where} must be a non-empty list of distinct directions from "
                             f"{list(DIRECTIONS)}, got {d!r}")
        self.directions = [x for x in DIRECTIONS if x in d]  # canonical order

    @property
    def block_size(self) -> int:
        return self.text_len + self.num_image_tokens - 1


def caption_targets(text_ids: torch.Tensor) -> torch.Tensor:
    """Targets of the caption direction from padded text ids [B,T]: the caption's ids and the first padding id (the
    end of the caption, which decoding stops at); -100 (ignored) after it."""
    is_pad = text_ids == NULL_TEXT_ID
    after_end = (is_pad.long().cumsum(dim=1) - is_pad.long()) > 0  # strictly after the first pad
    return text_ids.masked_fill(after_end, -100)


class KVCache:
    """Preallocated keys/values of every layer, `k`/`v` [n_layer, B, H, max_len, D]; `index` = positions filled.

    Allocated once by `GPT.prefill` (or `prefill_caption`, direction "i2t"); each decode step writes one position in
    place (no reallocation).
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype=torch.float32, device="cpu",
                 direction: str = "t2i"):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.index = 0
        self.direction = direction

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

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        c = config
        if "t2i" not in c.directions:
            self.head = None  # a captioner predicts no image ids
        self.text_head = nn.Linear(c.n_embd, c.text_vocab_size, bias=False) if "i2t" in c.directions else None
        self.direction_embedding = nn.Embedding(len(DIRECTIONS), c.n_embd) if len(c.directions) > 1 else None
        for module in (self.text_head, self.direction_embedding):
            if module is not None:
                init_weights(module, c.n_layer)

    def check_direction(self, direction: str) -> None:
        """ValueError unless this model was trained for `direction` ("t2i" or "i2t")."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")
        if direction not in self.config.directions:
            trained = " and ".join(DIRECTION_NAMES[d] for d in self.config.directions)
            raise ValueError(f"this GPT was trained for {trained} only (model.directions: {self.config.directions}); "
                             f"it cannot do {DIRECTION_NAMES[direction]}")

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                direction: str = "t2i"):
        """t2i: text_ids [B,T], image_ids [B,n] (n <= N; usually N) -> (logits [B,n,codebook_size], loss or None);
        logits[:, i] predicts image_ids[:, i] (typically `targets = image_ids`).

        i2t: image_ids [B,N], text_ids [B,n] (n <= T) -> (logits [B,n,text_vocab_size], loss or None); logits[:, j]
        predicts text_ids[:, j] (typically `targets = caption_targets(text_ids)`).
        `loss` = mean CE against `targets` (-100 = ignored).
        """
        self.check_direction(direction)
        c = self.config
        if direction == "t2i":
            self._check_text(text_ids)
            self._check_image("image_ids", image_ids, text_ids.shape[0], c.num_image_tokens, c.codebook_size)
            condition, tokens, vocab = text_ids, image_ids, c.codebook_size
        else:
            self._check_full_image(image_ids)
            self._check_tokens("text_ids", text_ids, image_ids.shape[0], c.text_len, c.text_vocab_size)
            condition, tokens, vocab = image_ids, text_ids, c.text_vocab_size
        if tokens.shape[1] == 0:
            what = "image_ids" if direction == "t2i" else "text_ids"
            raise ValueError(f"{what} must hold at least one token to predict (use prefill for context only)")
        L = condition.shape[1]
        x = self.drop(self._embed(direction, condition, tokens[:, :-1], 0))  # [B, L+n-1, C]
        for block in self.blocks:
            x = block(x, causal=True)
        logits = self._head(direction)(self.ln_f(x[:, L - 1 :]))  # [B, n, V]: positions L-1 .. L+n-2
        loss = None
        if targets is not None:
            self._check_targets(targets, tokens.shape, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def _check_full_image(self, image_ids: torch.Tensor) -> None:
        N = self.config.num_image_tokens
        if image_ids.dim() != 2 or image_ids.shape[1] != N:
            raise ValueError(f"image_ids must be [B, N={N}] (row-major image ids), got shape {tuple(image_ids.shape)}")
        self._check_image("image_ids", image_ids, image_ids.shape[0], N, self.config.codebook_size)

    def _check_tokens(self, name: str, ids: torch.Tensor, batch: int, max_len: int, vocab: int) -> None:
        if name.startswith("image"):
            return self._check_image(name, ids, batch, max_len, vocab)
        if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] > max_len:
            raise ValueError(f"{name} must be [B={batch}, n<={max_len}] (text ids), got shape {tuple(ids.shape)}")
        check_ids(name, ids, vocab)

    def _embed(self, direction: str, condition: Optional[torch.Tensor], tokens: torch.Tensor, start: int):
        """[B, L+n, C]: the condition (text for t2i, image for i2t; None in a decode step), then `tokens` of the other
        modality at its positions start..start+n-1; plus the direction embedding of a two-direction model."""
        first, second = (self.embed.text, self.embed.image) if direction == "t2i" else (self.embed.image,
                                                                                        self.embed.text)
        x = second(tokens, start=start)
        if condition is not None:
            x = torch.cat([first(condition), x], dim=1)
        if self.direction_embedding is not None:
            x = x + self.direction_embedding.weight[DIRECTIONS.index(direction)]
        return x

    def _head(self, direction: str) -> nn.Linear:
        return self.head if direction == "t2i" else self.text_head

    def _sizes(self, direction: str) -> tuple[int, int, int]:
        """(condition length, predicted length, predicted vocabulary) of a direction."""
        c = self.config
        if direction == "t2i":
            return c.text_len, c.num_image_tokens, c.codebook_size
        return c.num_image_tokens, c.text_len, c.text_vocab_size

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
        self.check_direction("t2i")
        self._check_text(text_ids)
        return self._prefill("t2i", text_ids, image_prefix, "image_prefix", max_len)

    @torch.no_grad()
    def prefill_caption(
        self, image_ids: torch.Tensor, text_prefix: Optional[torch.Tensor] = None, max_len: Optional[int] = None
    ) -> tuple[torch.Tensor, KVCache]:
        """The caption direction's prefill: image ids [B,N] (and an optional text prefix [B,P], P <= T-1) ->
        (float32 logits [B,text_vocab_size] for text token P, cache of capacity `max_len`, default N + T - 1)."""
        self.check_direction("i2t")
        self._check_full_image(image_ids)
        return self._prefill("i2t", image_ids, text_prefix, "text_prefix", max_len)

    def _prefill(self, direction, condition, prefix, prefix_name, max_len):
        c = self.config
        L, M, vocab = self._sizes(direction)
        B = condition.shape[0]
        if prefix is None:
            prefix = condition.new_zeros(B, 0)
        if prefix.dim() == 2 and prefix.shape[1] > M - 1:
            raise ValueError(f"{prefix_name} holds {prefix.shape[1]} tokens; at most {M - 1} leave one to predict")
        self._check_tokens(prefix_name, prefix, B, M - 1, vocab)
        P = prefix.shape[1]
        max_len = c.block_size if max_len is None else int(max_len)
        if not L + P <= max_len <= c.block_size:
            raise ValueError(f"max_len must be in [{L + P}, {c.block_size}] (context + prefix .. T + N - 1), "
                             f"got {max_len}")
        cache = KVCache(c.n_layer, B, c.n_head, max_len, c.head_dim, dtype=self.dtype, device=self.device,
                        direction=direction)
        x = self._embed(direction, condition, prefix, 0)  # [B, L+P, C]
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, kv_cache=cache.layer(i), start=0)
        cache.index = L + P
        return self._head(direction)(self.ln_f(x[:, -1])).float(), cache

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed image token `token` [B] that sits at index `pos` of the image sequence (0-based, row-major).

        Returns (float32 logits [B,codebook_size] for image token pos+1, the same cache advanced by one). Tokens
        must come in order: after `prefill` with a prefix of P tokens the first step is pos = P. The last step that
        predicts anything is pos = N-2.
        """
        return self._step("t2i", token, pos, cache, "decode_step")

    @torch.no_grad()
    def decode_caption_step(self, token: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """The caption direction's step: feed text token `token` [B] at text position `pos` -> (float32 logits
        [B,text_vocab_size] for text token pos+1, the cache advanced by one). The last step is pos = T-2."""
        return self._step("i2t", token, pos, cache, "decode_caption_step")

    def _step(self, direction, token, pos, cache, name):
        L, M, _ = self._sizes(direction)
        if cache.direction != direction:
            raise ValueError(f"{name}: the cache was filled for direction {cache.direction!r}, not {direction!r}")
        pos = int(pos)
        expected = cache.index - L
        if pos != expected:
            raise ValueError(f"{name}: pos={pos}, but the cache holds tokens 0..{expected - 1}; pass pos={expected}")
        if not 0 <= pos <= M - 2:
            raise ValueError(f"{name}: pos must be in [0, {M - 2}], got {pos}")
        if cache.index >= cache.max_len:
            raise ValueError(f"{name}: the cache is full (max_len={cache.max_len}); prefill with a larger max_len")
        if token.shape != (cache.batch_size,):
            raise ValueError(f"{name}: token must be [B={cache.batch_size}], got shape {tuple(token.shape)}")
        logits, cache = self._feed(direction, token[:, None], pos, cache)
        return logits[:, 0], cache

    @torch.no_grad()
    def decode_window(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed n image tokens [B, n] at image positions pos..pos+n-1 in one cached pass (speculative decoding).

        The cache must hold the image tokens before pos; anything it holds from pos on (an earlier window's rejected
        drafts) is overwritten, so rewinding is just passing a smaller pos. Returns (float32 logits [B, n,
        codebook_size] for image tokens pos+1..pos+n, the cache holding positions < pos+n).
        """
        c = self.config
        self.check_direction("t2i")
        if cache.direction != "t2i":
            raise ValueError(f"decode_window: the cache was filled for direction {cache.direction!r}, not 't2i'")
        pos, held = int(pos), cache.index - c.text_len
        if tokens.dim() != 2 or tokens.shape[0] != cache.batch_size or tokens.shape[1] < 1:
            raise ValueError(f"decode_window: tokens must be [B={cache.batch_size}, n>=1], got {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if not 0 <= pos <= held:
            raise ValueError(f"decode_window: pos={pos}, but the cache holds image tokens 0..{held - 1} (pos <= {held})")
        if pos + n - 1 > c.num_image_tokens - 2:
            raise ValueError(f"decode_window: positions {pos}..{pos + n - 1} go past N-2={c.num_image_tokens - 2}")
        return self._feed("t2i", tokens, pos, cache)

    def _feed(self, direction: str, tokens: torch.Tensor, pos: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Tokens [B, n] of the predicted modality at its positions pos..pos+n-1 through the cache -> (float32
        logits [B, n, V] for positions pos+1..pos+n, the cache holding positions < pos+n)."""
        start = self._sizes(direction)[0] + pos
        x = self._embed(direction, None, tokens, pos)  # [B, n, C]
        n = tokens.shape[1]
        mask = window_attention_mask(n, start, x) if n > 1 else None  # one mask for every layer
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, kv_cache=cache.layer(i), start=start, window_mask=mask)
        cache.index = start + tokens.shape[1]
        return self._head(direction)(self.ln_f(x)).float(), cache  # [B, n, V]
