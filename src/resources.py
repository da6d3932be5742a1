"""Files the package reads at run time: the YAML configs of `configs/`, shipped inside the package, and the CJK font.

setup.cfg maps the package `tokenpaint.configs` onto the repository's `configs/` folder (and ships its YAML files as
package data), so the same files are found from a source checkout, an editable install and a plain `pip install .`.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional


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


# Noto Sans CJK (SIL Open Font License 1.1), shipped by the pip package manimgx-fonts-cjk (the `demo` extra): a
# variable-font collection whose face 2 is Simplified Chinese.
CJK_FONT_PACKAGE, CJK_FONT_FILE, CJK_FONT_SC_INDEX = "manimgx_fonts_cjk", "NotoSansCJK-VF.otf.ttc", 2


def cjk_font_path() -> Optional[str]:
    """The CJK font the `demo` extra installs (labels of Chinese prompts, the glyphs dataset), or None without it."""
    try:
        package = importlib.import_module(CJK_FONT_PACKAGE)
    except ImportError:
        return None
    path = Path(package.__file__).resolve().parent / CJK_FONT_FILE
    return str(path) if path.is_file() else None


def load_cjk_font(path: str, size: int, weight: str = "Regular"):
    """A Pillow font from a CJK font file: the shipped Noto Sans CJK collection as Simplified Chinese at `weight`
    (its default instance is Thin), any other file as it is."""
    from PIL import ImageFont

    if os.path.basename(path) != CJK_FONT_FILE:
        return ImageFont.truetype(path, size)
    font = ImageFont.truetype(path, size, index=CJK_FONT_SC_INDEX)
    font.set_variation_by_name(weight)
    return font


__all__ = ["configs_dir", "config_path", "cjk_font_path", "load_cjk_font"]
