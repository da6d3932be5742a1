"""Sampler options: `SampleOptions` (defaults from the one table, SAMPLE_DEFAULTS) and every option's check.

`check_option` holds the rule for every option the API, the command line and the server accept, sampler options
(the SampleOptions fields) and request options (num_images, batch_size, strength, ...) alike, so that each rule and
its error message exist once. A failed check raises OptionError, whose `.name` is the option (generate.py turns it
into the flag `--` + name with dashes, the server into the JSON field).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from ..transformer.presets import SAMPLE_CHECKS, SAMPLE_DEFAULTS
from .guidance import GUIDANCE_SCHEDULES

Schedule = Union[str, Callable[[float], float]]


class OptionError(ValueError):
    """A bad option value; `name` is the option (e.g. "top_p")."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The arguments of a caption call (sample_caption, Pipeline.caption, generate.py --caption): each one's default and
# rule are those of the sampler option "caption_" + name.
CAPTION_OPTIONS = ("temperature", "top_k", "top_p", "max_length")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64); image i of a request uses seed + i
MAX_IMAGES_PER_PROMPT = 10_000


# name -> (accepts the value, what is wanted). The sampler settings' rules are those of the YAML `sample:` section
# (SAMPLE_CHECKS); a schedule may also be a function here.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (check.ok, check.wanted) for name, check in SAMPLE_CHECKS.items()},
    "schedule": (lambda v: callable(v) or SAMPLE_CHECKS["schedule"].ok(v),
                 f"{SAMPLE_CHECKS['schedule'].wanted} or a function r -> ratio"),
    "guidance_schedule": (lambda v: v in GUIDANCE_SCHEDULES, f"one of {list(GUIDANCE_SCHEDULES)}"),
    # request options (not sampler settings)
    "num_images": (lambda v: _int(v) and 1 <= v <= MAX_IMAGES_PER_PROMPT,
                   f"an integer in [1, {MAX_IMAGES_PER_PROMPT}]"),
    "batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**64)"),
    "strength": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
}


def check_option(name: str, value, shown: Optional[str] = None) -> None:
    """Raise OptionError naming `shown` (default `name`) if `value` breaks the rule of `name` (RULES); e.g.
    check_option("caption_temperature", t, "temperature") for the `temperature` argument of a caption call."""
    ok, wanted = RULES[name]
    if not ok(value):
        shown = shown or name
        raise OptionError(shown, f"{shown} must be {wanted}, got {value!r}")


def check_seeds(seed, count: int) -> None:
    """`seed` is a seed and leaves room for `count` consecutive seeds (image i of a request uses seed + i)."""
    check_option("seed", seed)
    if seed + count > SEED_LIMIT:
        raise OptionError("seed", f"seed must leave room for the {count} images of the request (image i uses seed + i, "
                                  f"below 2**64): at most {SEED_LIMIT - count}, got {seed}")


@dataclass(frozen=True)
class SampleOptions:
    """How to sample, for either generator kind; each sampler reads the fields that are its keyword arguments.

    Defaults come from SAMPLE_DEFAULTS (also the `sample:` section of a transformer YAML, so a run directory's
    train_config.yaml gives its own defaults: `Pipeline.from_pretrained` reads them). Frozen: derive variants with
    `options.replace(steps=8)`. Every value is checked on construction.

    To add an option: (1) add its default to SAMPLE_DEFAULTS (tokenpaint/transformer/presets.py), (2) add a field
    here of the same name with `= SAMPLE_DEFAULTS["name"]`, (3) add its rule to SAMPLE_CHECKS (presets.py; the YAML
    is checked by it too) or, for a value a YAML cannot hold, to RULES above, (4) add a keyword
    argument of the same name to the sampler(s) that use it (`sampling.sample` passes each sampler exactly the
    fields its signature names). The Pipeline, generate.py's defaults, training samples and the server then carry it.
    """

    steps: int = SAMPLE_DEFAULTS["steps"]  # masked decoding steps (mim)
    guidance_scale: float = SAMPLE_DEFAULTS["guidance_scale"]  # classifier-free guidance; 1 (or 0) = none
    top_k: Optional[int] = SAMPLE_DEFAULTS["top_k"]
    top_p: Optional[float] = SAMPLE_DEFAULTS["top_p"]  # nucleus sampling (gpt)
    temperature: float = SAMPLE_DEFAULTS["temperature"]
    choice_temperature: float = SAMPLE_DEFAULTS["choice_temperature"]  # MaskGIT's re-masking noise (mim)
    schedule: Schedule = SAMPLE_DEFAULTS["schedule"]  # mask schedule of masked decoding (mim)
    guidance_schedule: str = SAMPLE_DEFAULTS["guidance_schedule"]  # constant or linear over the steps (mim)
    use_kv_cache: bool = SAMPLE_DEFAULTS["use_kv_cache"]  # gpt: False re-runs the whole sequence each token
    jacobi_window: int = SAMPLE_DEFAULTS["jacobi_window"]  # gpt: W > 1 = speculative Jacobi decoding, W drafts a pass
    # image -> text (sample_caption's temperature, top_k, top_p, max_length; Pipeline.caption's defaults)
    caption_temperature: float = SAMPLE_DEFAULTS["caption_temperature"]  # 0 = greedy
    caption_top_k: Optional[int] = SAMPLE_DEFAULTS["caption_top_k"]
    caption_top_p: Optional[float] = SAMPLE_DEFAULTS["caption_top_p"]
    caption_max_length: Optional[int] = SAMPLE_DEFAULTS["caption_max_length"]  # None = the model's text_len

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "") -> "SampleOptions":
        """From a mapping of option names (e.g. a YAML `sample:` section); an unknown name -> OptionError."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            where = f"{source}: " if source else ""
            raise OptionError(unknown[0], f"{where}unknown sample options {unknown}; known: {list(cls.names())}")
        return cls(**values)

    def replace(self, **changes) -> "SampleOptions":
        """A checked copy with the given options changed (top_k=None means no top-k, as everywhere)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise OptionError(unknown[0], f"unknown sample options {unknown}; known: {list(self.names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def kwargs_for(self, sampler: Callable) -> dict[str, Any]:
        """The options that `sampler` takes as keyword arguments."""
        accepted = inspect.signature(sampler).parameters  # follows functools.wraps to the wrapped sampler
        return {name: getattr(self, name) for name in self.names() if name in accepted}


__all__ = ["SampleOptions", "OptionError", "check_option", "CAPTION_OPTIONS", "check_seeds", "RULES", "SAMPLE_DEFAULTS", "SEED_LIMIT",
           "MAX_IMAGES_PER_PROMPT"]
