"""Saving and loading generators: `config.json` (with "kind") + `model.safetensors`, strict, no pickles.

`load_generator`, which picks the class by kind, lives beside the registry of kinds (kinds.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file

from ..utils import atomic_write, state_dict_mismatch

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


def load_state_dict_strict(model: torch.nn.Module, weights_path: PathLike) -> None:
    """Load safetensors weights into `model`; any missing / unexpected key or shape mismatch -> ValueError."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no weights file at {weights_path}")
    state = load_file(str(weights_path))
    check_state_dict(model, state, source=str(weights_path))
    model.load_state_dict(state, strict=True)


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: {problems}")
