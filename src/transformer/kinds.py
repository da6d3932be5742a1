"""The one registry of generator kinds: `kind` (as written in config.json and the YAML's `model.kind`) -> class.

To add a kind: subclass TokenTransformer with a GeneratorConfig subclass whose `kind` is new, and list the model
class in GENERATORS. Everything else (YAML configs, presets, training, loading, the sampler dispatch) reads this table.
Code that needs to know the kind of a model reads `model.config.kind`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .gpt import GPT
from .io import CONFIG_NAME, PathLike, read_generator_config
from .masked import MaskedTransformer

GENERATORS: dict[str, type] = {cls.config_class.kind: cls for cls in (GPT, MaskedTransformer)}
CONFIG_CLASSES: dict[str, type] = {kind: cls.config_class for kind, cls in GENERATORS.items()}


def generator_class(kind, source: str = "") -> type:
    """The model class of `kind`; an unknown kind -> ValueError naming `source` and the known kinds."""
    if kind not in GENERATORS:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}unknown generator kind {kind!r}; expected one of {sorted(GENERATORS)}")
    return GENERATORS[kind]


def load_generator(directory: PathLike, map_location: Union[str, torch.device] = "cpu"):
    """Load a GPT or a MaskedTransformer from a `save_pretrained` directory, choosing by `config.json["kind"]`."""
    config = read_generator_config(directory)
    cls = generator_class(config.get("kind"), source=str(Path(directory) / CONFIG_NAME))
    return cls.from_pretrained(directory, map_location=map_location)


__all__ = ["GENERATORS", "CONFIG_CLASSES", "generator_class", "load_generator"]
