"""LoRA runs of the transformer stage (`train.py transformer --init-from BASE --lora RANK`): the config's `lora:`
section with the command line's overrides, the frozen base with one trainable adapter, and its checks on resume.

The base's weights stay frozen; only the adapter (A/B of the target layers, and the text-embedding rows of
`lora.words`) is trained, checkpointed and saved (lora.safetensors + lora.json). A checkpoint records the base's
directory and hash: a resumed run reloads the base from there and refuses other weights.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..transformer.lora import TARGET_GROUPS, LoRAAdapter, LoRASet, base_hash


def apply_lora_options(cfg: dict, opts, source: str) -> None:
    """--lora / --lora-alpha / --lora-targets over the config's `lora:` section, then check it (naming `source`)."""
    lora = cfg["lora"]
    for key, value in (("rank", opts.lora_rank), ("alpha", opts.lora_alpha), ("targets", opts.lora_targets)):
        if value is not None:
            lora[key] = value
    rank, alpha, targets, words = lora["rank"], lora["alpha"], lora["targets"], lora["words"]
    if rank is None:
        if opts.lora_alpha is not None or opts.lora_targets is not None:
            raise ValueError("--lora-alpha / --lora-targets need --lora RANK (or lora.rank in the config)")
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{source}: lora.rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0):
        raise ValueError(f"{source}: lora.alpha must be a number > 0, got {alpha!r}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{source}: lora.targets must be a non-empty list of names, got {targets!r}")
    unknown = [t for t in targets if t not in TARGET_GROUPS and "." not in t]  # dotted layer names: checked on the model
    if unknown:
        raise ValueError(f"{source}: unknown LoRA target {unknown[0]!r} (lora.targets / --lora-targets): expected "
                         f"{', '.join(sorted(TARGET_GROUPS))} or the name of a Linear layer")
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{source}: lora.words must be a list of words, got {words!r}")
    if opts.init_from is None:
        raise ValueError("--lora needs --init-from RUN_DIR: the trained generator the adapter is trained on")


def lora_enabled(cfg: dict) -> bool:
    return cfg.get("lora", {}).get("rank") is not None


def word_ids(tokenizer, words: list[str]) -> list[int]:
    """The text ids of the pieces of `words` (a bare word-boundary piece excluded: every caption has it)."""
    ids = []
    for word in words:
        pieces = tokenizer.sp.encode(word.strip(), out_type=int)
        if any(i == tokenizer.sp.unk_id() for i in pieces):
            raise ValueError(f"lora.words: {word!r} has characters the run's tokenizer does not know; new pieces "
                             f"(extending the tokenizer) are not supported")
        ids += [i for i in pieces if tokenizer.sp.id_to_piece(i).strip("\u2581")]
    return sorted(set(ids))


def attach_adapter(model: nn.Module, cfg: dict, tokenizer, base: dict, resume_state: Optional[dict] = None):
    """Freeze `model` (the base's weights already in it), check them against `base` ({"path", "sha256"}), and
    attach a trainable adapter (fresh, or the checkpoint's). Returns (adapter, module to train: model + adapter)."""
    found = base_hash(model)
    if base.get("sha256") not in (None, found):
        raise ValueError(f"the base of this LoRA run ({base['path']}) has changed: the checkpoint was trained on "
                         f"weights {base['sha256']}, the directory now holds {found}")
    base["sha256"] = found
    model.requires_grad_(False)
    lora = cfg["lora"]
    adapter = LoRAAdapter.create(model, lora["rank"], lora["alpha"], lora["targets"],
                                 text_ids=word_ids(tokenizer, lora["words"]), words=lora["words"])
    if resume_state is not None:
        adapter.load_state_dict(resume_state["lora"])
    LoRASet(model, found).add(adapter, 1.0, "training")
    return adapter, WithAdapter(model, adapter)


def base_path(opts, resume_state: Optional[dict]) -> str:
    return resume_state["lora_base"]["path"] if resume_state is not None else os.path.abspath(opts.init_from)


class WithAdapter(nn.Module):
    """The frozen model and its adapter as one module, so that DDP, gradient clipping and torch.compile see the
    adapter's tensors as the trainable parameters. Calls go to the model (whose hooks apply the adapter)."""

    def __init__(self, model: nn.Module, adapter: LoRAAdapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def configure_optimizers(self, weight_decay: float, lr: float, betas, device_type: str = "cpu"):
        """AdamW on the adapter: weight decay on A and B, none on the text-embedding rows."""
        decay = [*self.adapter.lora_A.values(), *self.adapter.lora_B.values()]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if self.adapter.text_delta is not None:
            groups.append({"params": [self.adapter.text_delta], "weight_decay": 0.0})
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
