"""Bidirectional masked transformer over [text ; image ids] (MaskGIT / Muse / Meissonic style).

Image inputs use ids 0..codebook_size-1 plus `mask_token_id = codebook_size`; the head predicts codebook_size classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import TokenTransformer
from .config import GeneratorConfig
from .schedule import masked_training_batch


@dataclass
class MaskedTransformerConfig(GeneratorConfig):
    label_smoothing: float = 0.1

    kind = "mim"

    def validate(self, source: Optional[str] = None) -> None:
        super().validate(source)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"MaskedTransformerConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def image_vocab_size(self) -> int:
        return self.codebook_size + 1  # + [MASK]


class MaskedTransformer(TokenTransformer):
    config_class = MaskedTransformerConfig

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """text_ids [B,T], image_ids [B,N] (may hold mask_token_id) -> (logits [B,N,codebook_size], loss or None).

        `loss` = label-smoothed CE averaged over the positions where `targets` != -100 (the masked positions, as
        `masked_training_batch` builds them).
        """
        c = self.config
        logits = self.head(self.features(text_ids, image_ids))  # [B, N, V]
        loss = None
        if targets is not None:
            self._check_targets(targets, image_ids.shape)
            if not (targets != -100).any():
                raise ValueError("targets are all -100: no position to compute the loss on")
            loss = F.cross_entropy(
                logits.float().flatten(0, 1),
                targets.flatten(),
                ignore_index=-100,
                label_smoothing=c.label_smoothing,
            )
        return logits, loss

    def features(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """The head's input at the image positions: text_ids [B,T], image_ids [B,N] -> [B,N,C] (final-normed).

        The head is linear, so a sampler may combine guidance halves here and run the head only where it draws
        (`sampling.masked`): logits = head(features).
        """
        c = self.config
        self._check_text(text_ids)
        N = c.num_image_tokens
        if image_ids.dim() != 2 or image_ids.shape[1] != N:
            raise ValueError(f"image_ids must be [B, N={N}], got shape {tuple(image_ids.shape)}")
        self._check_image("image_ids", image_ids, text_ids.shape[0], N, c.image_vocab_size)
        x = torch.cat([self.embed.text(text_ids), self.embed.image(image_ids)], dim=1)  # [B, T+N, C]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, causal=False)
        return self.ln_f(x[:, c.text_len :])  # [B, N, C]

    def masked_training_batch(
        self, image_ids: torch.Tensor, generator: Optional[torch.Generator], schedule: str = "cosine"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs with [MASK], targets with -100 at unmasked positions); see `schedule.masked_training_batch`."""
        return masked_training_batch(image_ids, self.mask_token_id, generator, schedule)
