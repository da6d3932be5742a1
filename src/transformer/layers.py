"""Building blocks shared by the GPT and the masked transformer (nanoGPT style, pre-norm)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    With `kv_cache=(k, v)` (static tensors [B,H,L,D] of one layer) the new keys/values are written at positions
    [start, start+n) and the queries attend to everything in [0, start+n): the prefill / one-token-step path. Several
    new tokens after a filled cache (a speculative window) see the cache and the window causally
    (`window_attention_mask`, which a caller running every layer passes as `window_mask`, built once).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.c_proj.is_residual_projection = True  # scaled init, see `init_weights`
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool,
        kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start: int = 0,
        window_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = rearrange(self.c_attn(x), "b n (three h d) -> three b h n d", three=3, h=self.n_head)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache  # [B,H,L,D]
            cache_k[:, :, start : start + n] = k
            cache_v[:, :, start : start + n] = v
            k = cache_k[:, :, : start + n]  # [B,H,start+n,D] views, no copy
            v = cache_v[:, :, : start + n]
        attn_mask, is_causal = None, False
        if causal:
            if start == 0:
                is_causal = n > 1  # queries and keys are the same positions
            elif n > 1:  # a window after the cache: the caller may pass its mask, built once for every layer
                attn_mask = window_mask if window_mask is not None else window_attention_mask(n, start, x)
            # start > 0 and n == 1: the single new query sees every cached key, no mask needed
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = rearrange(y, "b h n d -> b n (h d)")
        return self.resid_dropout(self.c_proj(y))


def causal_mask_with_offset(n_new: int, start: int, device: torch.device) -> torch.Tensor:
    """bool [n_new, start+n_new]: query at absolute position start+i sees keys at positions <= start+i."""
    query_pos = torch.arange(start, start + n_new, device=device)
    key_pos = torch.arange(start + n_new, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def window_attention_mask(n_new: int, start: int, like: torch.Tensor) -> torch.Tensor:
    """The additive form of `causal_mask_with_offset` in like's dtype (0 = seen, -inf = hidden): what
    scaled_dot_product_attention would otherwise convert a bool mask to in every layer."""
    seen = causal_mask_with_offset(n_new, start, like.device)
    return torch.zeros(seen.shape, dtype=like.dtype, device=like.device).masked_fill_(~seen, float("-inf"))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = SelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x, causal: bool, kv_cache=None, start: int = 0, window_mask=None):
        x = x + self.attn(self.ln_1(x), causal=causal, kv_cache=kv_cache, start=start, window_mask=window_mask)
        return x + self.mlp(self.ln_2(x))


class TextImageEmbedding(nn.Module):
    """Separate token tables for text and image ids; learned text positions; 2D image positions (row + column)."""

    def __init__(self, text_vocab_size: int, text_len: int, image_vocab_size: int, image_size: int, n_embd: int):
        super().__init__()
        self.image_size = image_size
        self.text_tok = nn.Embedding(text_vocab_size, n_embd)
        self.text_pos = nn.Embedding(text_len, n_embd)
        self.image_tok = nn.Embedding(image_vocab_size, n_embd)
        self.image_row = nn.Embedding(image_size, n_embd)
        self.image_col = nn.Embedding(image_size, n_embd)

    def text(self, text_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B,n] ids at text positions start..start+n-1 -> [B,n,C]"""
        return self.text_tok(text_ids) + self.text_pos.weight[start : start + text_ids.shape[1]]

    def image_positions(self, start: int, n: int) -> torch.Tensor:
        """[n,C] embeddings of image positions start..start+n-1 (row-major)."""
        if n == 1:  # the one-token decode step: plain indexing, no arange
            row, col = divmod(start, self.image_size)
            return (self.image_row.weight[row] + self.image_col.weight[col])[None]
        pos = torch.arange(start, start + n, device=self.image_row.weight.device)
        return self.image_row(pos // self.image_size) + self.image_col(pos % self.image_size)

    def image(self, image_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B,n] ids at image positions start..start+n-1 -> [B,n,C]"""
        return self.image_tok(image_ids) + self.image_positions(start, image_ids.shape[1])


def init_weights(model: nn.Module, n_layer: int) -> None:
    """nanoGPT init: normal(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if getattr(module, "is_residual_projection", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
