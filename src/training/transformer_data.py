"""Batches for the transformer stage: global batches of token-cache rows, the training corruptions, the loss.

A GPT trained in both directions (model.directions [t2i, i2t]) trains row r of a global batch in direction
directions[r % 2] (`split_directions`; the rows are shuffled), so each step costs what a one-direction step costs.

Every rank walks the SAME sequence of global batches (a per-epoch permutation seeded by (seed, epoch)) and draws the
SAME corruptions (condition dropout, masks) from one shared generator, then keeps its own rows. So training on R
ranks x B rows is the same computation as one process with R*B rows, and a resume only needs (epoch, batch index)
and the generator's state.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..transformer import caption_targets, drop_condition, masked_training_batch


class GlobalBatches:
    """Endless global batches of `global_batch` rows from a TokenCache, epoch after epoch, resumable exactly.

    Each batch is (text_ids long [G,T], image_ids long [G,N]); a rank's share is `rank_rows(...)`. Rows that do not
    fill a last global batch of an epoch are left for later epochs (a new permutation each epoch).
    """

    def __init__(self, cache, global_batch: int, seed: int, shuffle: bool = True, name: str = "data"):
        self.cache, self.global_batch, self.seed, self.shuffle, self.name = cache, global_batch, seed, shuffle, name
        self.batches_per_epoch = len(cache) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{name} has {len(cache)} rows, fewer than one global batch of {global_batch} "
                             f"(ranks x --batch-size x train.grad_accum): lower the batch size or add data")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        n = len(self.cache)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(n, generator=generator)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_batch": self.global_batch,
                "rows": len(self.cache)}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"cannot resume {self.name} with a global batch of {self.global_batch} rows: the "
                             f"checkpoint was written with {state['global_batch']} (ranks x --batch-size x "
                             f"grad_accum must stay the same)")
        if state["rows"] != len(self.cache):
            raise ValueError(f"cannot resume {self.name}: it now has {len(self.cache)} rows, the checkpoint was "
                             f"written with {state['rows']} (did the data file change?)")
        self.epoch, self.batch_in_epoch, self._order = state["epoch"], state["batch_in_epoch"], None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order()
        start = self.batch_in_epoch * self.global_batch
        rows = self._order[start:start + self.global_batch].sort().values.numpy()  # sorted: sequential memmap reads
        self.batch_in_epoch += 1
        text = torch.from_numpy(self.cache.text_ids[rows].astype("int64"))  # [G,T]
        image = torch.from_numpy(self.cache.image_ids[rows].astype("int64"))  # [G,N]
        return text, image


class TrainingBatch(NamedTuple):
    text_ids: torch.Tensor  # long [B,T], some rows dropped to the empty prompt (not for captioning)
    image_ids: torch.Tensor  # long [B,N] model input (mim: with [MASK])
    targets: torch.Tensor  # long [B,N] ([B,T] text targets for captioning), -100 where the loss does not count


def split_directions(text_ids: torch.Tensor, image_ids: torch.Tensor,
                     directions=("t2i",)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{direction: (text_ids, image_ids)}: row r of the global batch goes to directions[r % len(directions)]."""
    n = len(directions)
    if n == 1:
        return {directions[0]: (text_ids, image_ids)}
    return {d: (text_ids[i::n], image_ids[i::n]) for i, d in enumerate(directions)}


def corrupt(kind: str, text_ids: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator,
            cond_dropout: float, mask_schedule: str = "cosine", mask_token_id: int | None = None,
            direction: str = "t2i") -> TrainingBatch:
    """Condition dropout for both kinds; for "mim" also the [MASK] corruption, with targets only where masked. The
    caption direction ("i2t", GPT) is not corrupted: its targets are the caption and its end (`caption_targets`)."""
    if direction == "i2t":
        return TrainingBatch(text_ids, image_ids, caption_targets(text_ids))
    text_ids = drop_condition(text_ids, cond_dropout, generator)
    if kind == "gpt":
        return TrainingBatch(text_ids, image_ids, image_ids)  # logits[:, i] predicts image_ids[:, i]
    inputs, targets = masked_training_batch(image_ids, mask_token_id, generator, mask_schedule)
    return TrainingBatch(text_ids, inputs, targets)


def rank_rows(batch: TrainingBatch, rank: int, world_size: int) -> TrainingBatch:
    """This rank's contiguous share of a global batch."""
    per_rank = batch.text_ids.shape[0] // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return TrainingBatch(*(t[rows] for t in batch))


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum (not mean) of the CE over positions with targets != -100: the caller divides by the count over the whole
    global batch, so the gradient does not depend on how the batch is split into ranks and micro-batches."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction="sum")
