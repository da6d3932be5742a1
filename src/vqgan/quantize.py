"""Vector quantizer: nearest-code search (argmin, never a one-hot), losses in three forms, straight-through z_q."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import QUANTIZERS


@dataclass
class QuantizeOutput:
    z_q: torch.Tensor  # [B, D, h, w]; straight-through (carries the encoder's gradient) when autograd is recording
    ids: torch.Tensor  # long [B, h, w]
    codebook_loss: torch.Tensor  # mean ||sg(z) - e||^2, unweighted (moves the codes)
    commitment_loss: torch.Tensor  # mean ||z - sg(e)||^2, unweighted (moves the encoder)
    loss: torch.Tensor  # the weighted sum the quantizer form prescribes
    perplexity: torch.Tensor  # exp(entropy of code usage in this batch)


def nearest_code_ids(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_j ||z_i - e_j||^2 for each row of z_flat [N, D] against codebook [K, D] -> long [N].

    Same expansion as taming (z^2 + e^2 - 2 z.e) so ties resolve alike; only an [N, K] distance matrix is built.
    """
    z_sq = z_flat.pow(2).sum(dim=1, keepdim=True)  # [N, 1]
    e_sq = codebook.pow(2).sum(dim=1)  # [K]
    dist = (z_sq + e_sq) - 2 * (z_flat @ codebook.t())  # [N, K]
    return dist.argmin(dim=1)


def code_perplexity(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    counts = torch.bincount(ids.flatten(), minlength=num_codes).float()
    probs = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


class VectorQuantizer(nn.Module):
    """Codebook `embedding.weight` [n_embed, dim] (taming's key `quantize.embedding.weight`).

    kind="legacy": loss = commitment + beta * codebook (taming's published form, beta on the wrong term);
    kind="standard": loss = codebook + beta * commitment (VQ-VAE paper);
    kind="l2": z and codes are l2-normalised before the search (LlamaGen), loss as "standard".
    """

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25, kind: str = "legacy"):
        super().__init__()
        if kind not in QUANTIZERS:
            raise ValueError(f"VectorQuantizer kind must be one of {QUANTIZERS}, got {kind!r}")
        self.n_embed, self.dim, self.beta, self.kind = n_embed, dim, beta, kind
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.kind == "l2" else w

    def search_space(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Rows [N, D] as the nearest-code search sees them (l2: normalised), to compare with codebook()."""
        return F.normalize(z_flat, dim=1) if self.kind == "l2" else z_flat

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B, h, w] -> z_q [B, D, h, w] (channels_last memory, no copy)."""
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"image ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 3:
            raise ValueError(f"image ids must have shape [B, h, w], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_embed):
            raise ValueError(
                f"image ids must lie in [0, {self.n_embed - 1}], got range [{int(ids.min())}, {int(ids.max())}]"
            )
        z_q = F.embedding(ids.long(), self.codebook())  # [B, h, w, D]
        return rearrange(z_q, "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"quantizer expects {self.dim} channels, got z of shape {tuple(z.shape)}")
        z_flat = self.search_space(rearrange(z, "b d h w -> (b h w) d"))  # a view when z is channels_last
        codebook = self.codebook()
        with torch.no_grad():
            ids = nearest_code_ids(z_flat.detach(), codebook.detach())  # [N]
        z_q_flat = F.embedding(ids, codebook)  # [N, D]

        codebook_loss = F.mse_loss(z_q_flat, z_flat.detach())
        commitment_loss = F.mse_loss(z_flat, z_q_flat.detach())
        if self.kind == "legacy":
            loss = commitment_loss + self.beta * codebook_loss
        else:
            loss = codebook_loss + self.beta * commitment_loss

        if torch.is_grad_enabled() and z_flat.requires_grad:
            z_q_flat = z_flat + (z_q_flat - z_flat).detach()  # straight-through estimator
        z_q = rearrange(z_q_flat, "(b h w) d -> b d h w", b=b, h=h, w=w)
        return QuantizeOutput(
            z_q=z_q,
            ids=ids.view(b, h, w),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            loss=loss,
            perplexity=code_perplexity(ids, self.n_embed),
        )
