"""Caption tokenizer: a SentencePiece model trained on the captions (Chinese and English), fixed-length ids.

Id 0 is padding, so the empty prompt "" encodes to all zeros: the unconditional text for classifier-free guidance.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import warnings
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

logger = logging.getLogger(__name__)

NULL_TEXT_ID = 0  # pad id == the "no text" condition
UNK_ID = 1
_MAX_RETRIES = 3
_USER_DEFINED = 4  # ModelProto.SentencePiece.Type.USER_DEFINED
WORD_BOUNDARY = "\u2581"  # how SentencePiece writes a space


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _user_defined_piece(piece: str) -> bytes:
    """One `pieces` entry of a SentencePiece ModelProto in protobuf wire format: {piece, score 0, USER_DEFINED}.
    Repeated protobuf fields may come in any order, so appending it to a serialized model appends a piece (the id
    after the last one) without the protobuf package."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(_USER_DEFINED)
    return b"\x0a" + _varint(len(body)) + body


class TextTokenizer:
    """Wraps a SentencePiece model with pad_id=0, unk_id=1 and no BOS/EOS (what `train` produces)."""

    def __init__(self, model_file):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = model_file
        self.added_words: tuple[str, ...] = ()  # pieces appended by `with_words`, in id order
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
        return {"model_file": self.model_file, "proto": self._proto, "added_words": self.added_words}

    def __setstate__(self, state):
        self.model_file = state["model_file"]
        self.added_words = tuple(state.get("added_words", ()))
        self._load_proto(state["proto"])

    def __repr__(self) -> str:
        added = f", added_words={list(self.added_words)}" if self.added_words else ""
        return f"TextTokenizer({self.model_file!r}, vocab_size={self.vocab_size}{added})"

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def proto(self) -> bytes:
        """The serialized SentencePiece model (what `save` writes)."""
        return self._proto

    def new_word_piece(self, word) -> str:
        """The piece `with_words` would add for `word` (its NFKC-normalized form, as SentencePiece normalizes the
        text it encodes). ValueError, naming the word, for an empty word, one with a space, or one the vocabulary
        already holds as a piece (with or without a word boundary before it)."""
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"an empty word ({word!r})")
        if any(ch.isspace() for ch in word) or WORD_BOUNDARY in word:
            raise ValueError(f"{word!r} holds a space: a new word is one word")
        piece = self.sp.normalize(word).lstrip(WORD_BOUNDARY)
        if not piece or WORD_BOUNDARY in piece:
            raise ValueError(f"{word!r} normalizes to {piece!r}, not one word")
        for form in (piece, WORD_BOUNDARY + piece):
            found = self.sp.piece_to_id(form)
            if self.sp.id_to_piece(found) == form:
                raise ValueError(f"{word!r} is already a piece of the tokenizer ({form!r}, id {found})")
        return piece

    def with_words(self, words: Sequence[str]) -> "TextTokenizer":
        """A copy with each of `words` added as one new piece, ids vocab_size, vocab_size + 1, ... in order.

        The pieces are SentencePiece user-defined pieces: a word is cut out of a text wherever its letters occur
        (inside another word too) before the model's own segmentation, and a space before it stays the
        word-boundary piece; a text holding none of the words encodes to exactly the ids it had before.
        Errors (ValueError naming the word): `new_word_piece`'s, and a word given twice."""
        pieces = [self.new_word_piece(word) for word in words]
        for i, piece in enumerate(pieces):
            if piece in pieces[:i]:
                raise ValueError(f"{words[i]!r} is given twice")
        extended = object.__new__(type(self))
        extended.model_file = self.model_file
        extended.added_words = self.added_words + tuple(pieces)
        extended._load_proto(self._proto + b"".join(_user_defined_piece(p) for p in pieces))
        return extended

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
        """Write the model (with its added words) to `directory/tokenizer.model` and return that path."""
        os.makedirs(directory, exist_ok=True)
        dest = os.path.join(directory, "tokenizer.model")
        if self.added_words or os.path.abspath(dest) != os.path.abspath(self.model_file):
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(self._proto)
            os.replace(tmp, dest)
        return dest

    @classmethod
    def from_pretrained(cls, directory) -> "TextTokenizer":
        return cls(os.path.join(directory, "tokenizer.model"))
