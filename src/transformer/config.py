"""The fields both generators share, with validation and dict round trips.

`GPTConfig` (gpt.py) and `MaskedTransformerConfig` (masked.py) subclass `GeneratorConfig`; `kind` ("gpt" | "mim")
is what `config.json` records so that `load_generator` can pick the class.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional


@dataclass
class GeneratorConfig:
    text_vocab_size: int = 8000  # from the SentencePiece model (pad = 0 = the empty prompt)
    text_len: int = 32  # text ids per caption, padded with 0
    codebook_size: int = 16384  # from the VQGAN; the head predicts these classes only
    image_size: int = 16  # image tokens per side: N = image_size**2 tokens, row-major
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    cond_dropout: float = 0.1  # applied by the training loop via `drop_condition`, recorded here for reference
    bias: bool = True  # biases in Linear layers and LayerNorms

    kind: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: Optional[str] = None) -> None:
        where = f" in {source}" if source else ""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _field_type(f)
            if expected is bool:
                ok = isinstance(value, bool)
            elif expected is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    setattr(self, f.name, float(value))
            else:
                ok = True
            if not ok:
                raise ValueError(
                    f"{type(self).__name__}.{f.name}{where} must be {expected.__name__}, got {value!r}"
                )
        for name in ("text_vocab_size", "text_len", "codebook_size", "image_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name}{where} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"{type(self).__name__}{where}: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("dropout", "cond_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{type(self).__name__}.{name}{where} must be in [0, 1), got {p}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_image_tokens(self) -> int:
        return self.image_size * self.image_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def image_vocab_size(self) -> int:
        """Input vocabulary of the image embedding (the masked model adds [MASK])."""
        return self.codebook_size

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Optional[str] = None):
        """Build from a plain dict. A `kind` key is accepted if it names this class; unknown keys -> ValueError."""
        where = f" in {source}" if source else ""
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"{cls.__name__}{where}: kind is {kind!r}, expected {cls.kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}{where}: unknown keys {unknown}; known keys are {sorted(names)}")
        try:
            return cls(**d)
        except ValueError as e:
            if source and source not in str(e):
                raise ValueError(f"{e} (in {source})") from None
            raise


def _field_type(f: dataclasses.Field) -> type:
    # With `from __future__ import annotations` the types are strings.
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return {"int": int, "float": float, "bool": bool}.get(t, object)
