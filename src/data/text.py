"""Caption tokenizer: a SentencePiece model trained on the captions (Chinese and English), fixed-length ids.

Id 0 is padding, so the empty prompt "" encodes to all zeros: the unconditional text for classifier-free guidance.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

logger = logging.getLogger(__name__)

NULL_TEXT_ID = 0  # pad id == the "no text" condition
UNK_ID = 1
_MAX_RETRIES = 3


class TextTokenizer:
    """Wraps a SentencePiece model with pad_id=0, unk_id=1 and no BOS/EOS (what `train` produces)."""

    def __init__(self, model_file):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = model_file
        with open(model_file, "rb") as f:
            self._load_proto(f.read())

    def _load_proto(self, proto: bytes) -> None:
        self._proto = proto
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_file}: not a SentencePiece model ({e})") from None
        if self.sp.pad_id() != NULL_TEXT_ID:
            raise ValueError(
                f"{self.model_file}: pad_id is {self.sp.pad_id()}, expected {NULL_TEXT_ID} "
                "(train it with TextTokenizer.train or pad_id=0, unk_id=1, bos_id=-1, eos_id=-1)")

    def __getstate__(self):  # picklable for DataLoader workers: carry the model bytes, not the C++ object
        return {"model_file": self.model_file, "proto": self._proto}

    def __setstate__(self, state):
        self.model_file = state["model_file"]
        self._load_proto(state["proto"])

    def __repr__(self) -> str:
        return f"TextTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix, vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 1.0, max_sentence_length: int = 4096, input_sentence_size: int = 2_000_000,
              num_threads: int | None = None, **options) -> "TextTokenizer":
        """Train on captions (an in-memory iterable, one caption per item) and write `{model_prefix}.model`.

        If the corpus cannot support `vocab_size` pieces, retrain with the largest size SentencePiece allows (logged).
        BPE is the default: on small or templated caption sets, unigram seeding drops whole words and falls back to
        characters, while BPE makes frequent words single pieces. Keep the vocabulary small enough that merges stop at
        words rather than whole phrases (Chinese has no spaces to stop them). Extra keyword options are passed to
        `SentencePieceTrainer.train`.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        corpus = [t.strip() for t in texts if t and t.strip()]
        if not corpus:
            raise ValueError("TextTokenizer.train: no non-empty texts to train on")
        model_prefix = os.fspath(model_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        settings = dict(
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            pad_id=NULL_TEXT_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=num_threads or min(4, os.cpu_count() or 1),
            minloglevel=2,  # quiet: only errors
        )
        settings.update(options)
        size = vocab_size
        for _ in range(_MAX_RETRIES):
            try:
                spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=model_prefix,
                                               vocab_size=size, **settings)
                break
            except RuntimeError as e:
                limit = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
                if limit is None:
                    floor = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
                    if floor is not None:
                        raise ValueError(f"vocab_size={size} is too small: this corpus needs at least {floor.group(1)} "
                                         "pieces (256 byte-fallback pieces + its characters + pad/unk)") from None
                    raise ValueError(f"SentencePiece training failed for vocab_size={size}: {e}") from None
                logger.warning("TextTokenizer.train: the corpus (%d captions) supports at most %s pieces, "
                               "not %d; using %s", len(corpus), limit.group(1), size, limit.group(1))
                size = int(limit.group(1))
        else:
            raise ValueError(f"SentencePiece training did not converge on a vocab size (last tried {size})")
        return cls(model_prefix + ".model")

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token count of each text."""
        return [len(ids) for ids in self.sp.encode(list(texts), out_type=int)]

    def encode(self, texts: str | Sequence[str], length: int = 32, warn: bool = True) -> torch.Tensor:
        """texts -> long [B,length]: no BOS/EOS, truncated (with one warning per call unless warn=False) and padded
        with 0."""
        if isinstance(texts, str):
            texts = [texts]
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        ids = self.sp.encode(list(texts), out_type=int)
        out = torch.full((len(ids), length), NULL_TEXT_ID, dtype=torch.long)
        truncated = []
        for row, piece_ids in enumerate(ids):
            if len(piece_ids) > length:
                truncated.append((texts[row], len(piece_ids)))
            piece_ids = piece_ids[:length]
            out[row, : len(piece_ids)] = torch.tensor(piece_ids, dtype=torch.long)
        if truncated and warn:
            text, n = truncated[0]
            more = f" (and {len(truncated) - 1} more prompt(s))" if len(truncated) > 1 else ""
            warnings.warn(f"prompt {text!r} is {n} tokens, truncated to {length}{more}", stacklevel=2)
        return out

    def decode(self, ids) -> list[str]:
        """long [B,T] (or [T], or lists) -> list of B strings; padding (0) is ignored."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and not isinstance(ids[0], (list, tuple)):
            ids = [ids]
        out = []
        for row in ids:
            row = [int(i) for i in row if int(i) != NULL_TEXT_ID]
            bad = [i for i in row if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"decode: id {bad[0]} out of range for vocab_size {self.vocab_size}")
            out.append(self.sp.decode(row))
        return out

    def pieces(self, text: str) -> list[str]:
        """The pieces `text` splits into (for inspecting the vocabulary)."""
        return self.sp.encode(text, out_type=str)

    def save(self, directory) -> str:
        """Copy the model to `directory/tokenizer.model` and return that path."""
        os.makedirs(directory, exist_ok=True)
        dest = os.path.join(directory, "tokenizer.model")
        if os.path.abspath(dest) != os.path.abspath(self.model_file):
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(self._proto)
            os.replace(tmp, dest)
        return dest

    @classmethod
    def from_pretrained(cls, directory) -> "TextTokenizer":
        return cls(os.path.join(directory, "tokenizer.model"))
