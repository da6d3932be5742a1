"""Files the package reads at run time: the YAML configs of `configs/`, shipped inside the package.

setup.cfg maps the package `tokenpaint.configs` onto the repository's `configs/` folder (and ships its YAML files as
package data), so the same files are found from a source checkout, an editable install and a plain `pip install .`.
"""
from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """The folder holding the shipped configs (`vqgan_f16_16384.yaml`, `gpt_base.yaml`, ..., `demo/`)."""
    from . import configs

    return Path(configs.__file__).resolve().parent


def config_path(*parts: str) -> Path:
    """A shipped config by its path under `configs/`, e.g. `config_path("demo", "mim.yaml")`; a clear error if absent."""
    path = configs_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {'/'.join(parts)} in {configs_dir()}")
    return path


__all__ = ["configs_dir", "config_path"]
