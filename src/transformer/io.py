"""Saving and loading generators: `config.json` (with "kind") + `model.safetensors`, strict, no pickles.

`load_generator`, which picks the class by kind, lives beside the registry of kinds (kinds.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from ..utils import atomic_write, state_dict_mismatch
from ..vqgan.io import read_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = Union[str, os.PathLike]


def save_generator(model, directory: PathLike) -> Path:
    """Write `config.json` ({"kind": ..., **config}) and `model.safetensors` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"kind": model.config.kind, **model.config.to_dict()}
    # safetensors wants contiguous tensors that do not share memory
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, write_config)
    return directory


def read_generator_config(directory: PathLike) -> dict:
    """The parsed `config.json` of a saved generator, with a clear error if it is missing or malformed."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no generator config at {path} (expected a directory written by save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_state_dict_strict(model: torch.nn.Module, weights_path: PathLike, assign: bool = False) -> None:
    """Load safetensors weights into `model`; a corrupt file (CheckpointError) and any missing / unexpected key or
    shape mismatch (ValueError) name the file. `assign=True` adopts the file's tensors (for a model built on the
    meta device, whose parameters hold no memory until then)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no weights file at {weights_path}")
    state = read_safetensors(weights_path)
    check_state_dict(model, state, source=str(weights_path))
    model.load_state_dict(state, strict=True, assign=assign)


def build_from_weights(model_class, config, weights_path: PathLike):
    """`model_class(config)` built on the meta device (no memory, no random init) and materialised from the weights
    file: a config.json naming a huge model fails on the file's shapes, not in the allocator."""
    with torch.device("meta"):
        model = model_class(config)
    load_state_dict_strict(model, weights_path, assign=True)
    dtypes = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
    if len(dtypes) > 1:  # a mixed file: settle on the head's dtype so every op sees one dtype
        model.to(model.head.weight.dtype)
    return model


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: {problems}")
