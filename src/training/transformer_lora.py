"""LoRA runs of the transformer stage (`train.py transformer --init-from BASE --lora RANK`): the config's `lora:`
section with the command line's overrides, the frozen base with one trainable adapter, and its checks on resume.

The base's weights stay frozen; only the adapter (A/B of the target layers, the text-embedding rows of
`lora.words`, new rows for `lora.new_words`) is trained, checkpointed and saved (lora.safetensors + lora.json). New
words extend the run's tokenizer (its tokenizer.model holds them). A checkpoint records the base's directory and
hash: a resumed run reloads the base from there and refuses other weights.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..data.text import WORD_BOUNDARY, TextTokenizer
from ..transformer.lora import TARGET_GROUPS, LoRAAdapter, LoRASet, base_hash

NEW_WORDS = "lora.new_words / --lora-new-words"


def apply_lora_options(cfg: dict, opts, source: str) -> None:
    """--lora / --lora-alpha / --lora-targets / --lora-new-words over the config's `lora:` section, then check it
    (naming `source`)."""
    lora = cfg["lora"]
    for key, value in (("rank", opts.lora_rank), ("alpha", opts.lora_alpha), ("targets", opts.lora_targets),
                       ("new_words", opts.lora_new_words)):
        if value is not None:
            lora[key] = value
    rank, alpha, targets, words = lora["rank"], lora["alpha"], lora["targets"], lora["words"]
    if rank is None:
        if opts.lora_alpha is not None or opts.lora_targets is not None or opts.lora_new_words is not None:
            raise ValueError("--lora-alpha / --lora-targets / --lora-new-words need --lora RANK (or lora.rank in the "
                             "config)")
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
    new_words = lora["new_words"]
    if not isinstance(new_words, list):
        raise ValueError(f"{source}: {NEW_WORDS} must be a list of words, got {new_words!r}")
    both = sorted(set(new_words) & set(words))
    if both:
        raise ValueError(f"{source}: {both[0]!r} is in lora.words and in {NEW_WORDS}: lora.words trains the rows of "
                         f"pieces the tokenizer has, new words get new pieces")
    if new_words:  # checked against the base's tokenizer now, before any work
        init_tokenizer = os.path.join(opts.init_from, "tokenizer.model")
        if os.path.isfile(init_tokenizer):
            extend_tokenizer(TextTokenizer(init_tokenizer), new_words, source)


def extend_tokenizer(tokenizer: TextTokenizer, new_words: list[str], source: str) -> TextTokenizer:
    """The run's tokenizer with `new_words` as new pieces (TextTokenizer.with_words), errors naming the option."""
    try:
        return tokenizer.with_words(new_words)
    except ValueError as e:
        raise ValueError(f"{source}: {NEW_WORDS}: {e}") from None


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


def new_word_ids(tokenizer: TextTokenizer, new_words: list[str]) -> dict[str, int]:
    """{piece of each new word: its id} in the run's (extended) tokenizer."""
    out = {}
    for word in new_words:
        piece = tokenizer.sp.normalize(word).lstrip(WORD_BOUNDARY)
        found = tokenizer.sp.piece_to_id(piece)
        if tokenizer.sp.id_to_piece(found) != piece:
            raise ValueError(f"{NEW_WORDS}: the run's tokenizer.model has no piece for {word!r}")
        out[piece] = found
    return out


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
                                 text_ids=word_ids(tokenizer, lora["words"]), words=lora["words"],
                                 new_words=new_word_ids(tokenizer, lora["new_words"]))
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
        rows = [p for p in (self.adapter.text_delta, self.adapter.new_rows) if p is not None]
        if rows:
            groups.append({"params": rows, "weight_decay": 0.0})
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
