"""The demo's sample grid: one row of generated images per generator, the prompt under each column, Chinese prompts
in Chinese (with the CJK font the `demo` extra installs, else a system one, else their English rendering)."""
from __future__ import annotations

import glob
import os
import subprocess
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .data.datasets import english_label
from .resources import cjk_font_path, load_cjk_font

CELL = 128  # pixels per sample in the grid (32x32 images scaled up, nearest)




def find_cjk_font() -> Optional[str]:
    """A font file that covers Chinese: the one the `demo` extra installs (Noto Sans CJK, from the pip package
    manimgx-fonts-cjk), else one of the system's, else None."""
    shipped = cjk_font_path()
    if shipped is not None:
        return shipped
    try:
        listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
        files = [line.split(":")[0].strip() for line in listed.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        files = []
    patterns = ("*CJK*", "*Han*Sans*", "*wqy*", "*WenQuanYi*", "*DroidSansFallback*", "*SimHei*", "*simhei*",
                "*msyh*", "*PingFang*", "*SourceHan*", "*NotoSansSC*", "*ukai*", "*uming*")
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"), "/System/Library/Fonts",
                 "C:/Windows/Fonts"):
        for pattern in patterns:
            files += glob.glob(os.path.join(root, "**", pattern), recursive=True)
    return next((f for f in files if f.lower().endswith((".ttf", ".ttc", ".otf")) and os.path.isfile(f)), None)


def is_ascii(text: str) -> bool:
    return all(ord(c) < 128 for c in text)


def label_for(prompt: str, cjk_font: Optional[str], dataset: str = "shapes") -> str:
    """What to print under an image: the prompt, or, for a Chinese prompt without a CJK font, its English rendering
    (the attributes the dataset reads from it, captioned in English) marked "zh:"."""
    if is_ascii(prompt) or cjk_font is not None:
        return prompt
    return "zh: " + english_label(prompt, dataset)


def _font(cjk_font: Optional[str], size: int = 13):
    if cjk_font is not None:
        try:
            return load_cjk_font(cjk_font, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType (DejaVu-like, no CJK glyphs)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy line breaking by measured width; CJK text (no spaces) breaks between characters."""
    units = text.split(" ") if " " in text else list(text)
    joiner = " " if " " in text else ""
    lines, line = [], ""
    for unit in units:
        candidate = f"{line}{joiner}{unit}" if line else unit
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = unit
        else:
            line = candidate
    return lines + [line] if line else lines


def sample_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], prompts: Sequence[str],
                cjk_font: Optional[str] = None, cell: int = CELL, notes: Sequence[str] = (),
                dataset: str = "shapes") -> Image.Image:
    """One row of images per (row label, images) pair, one column per prompt, the prompt printed under each column's
    images and the row label at the left of each row; `notes` (e.g. a stage cut short by a cap) below the rows."""
    font = _font(cjk_font)
    labels = [_wrap(label_for(p, cjk_font, dataset), font, cell - 8) for p in prompts]
    line_height = int(font.getbbox("Ag")[3]) + 3
    text_height = max(len(lines) for lines in labels) * line_height + 6
    margin = 56
    width = margin + len(prompts) * cell
    note_lines = [line for note in notes for line in _wrap(note, font, width - 8)]
    height = len(rows) * (cell + text_height) + (len(note_lines) * line_height + 8 if note_lines else 0)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(note_lines):
        draw.text((4, len(rows) * (cell + text_height) + 4 + i * line_height), line, fill=(170, 0, 0), font=font)
    for r, (row_label, images) in enumerate(rows):
        if len(images) != len(prompts):
            raise ValueError(f"sample_grid: row {row_label!r} has {len(images)} images for {len(prompts)} prompts")
        top = r * (cell + text_height)
        draw.text((4, top + cell // 2 - line_height // 2), row_label, fill="black", font=font)
        for c, (image, lines) in enumerate(zip(images, labels)):
            left = margin + c * cell
            grid.paste(image.convert("RGB").resize((cell - 8, cell - 8), Image.NEAREST), (left + 4, top + 4))
            for i, line in enumerate(lines):
                draw.text((left + 4, top + cell + i * line_height), line, fill="black", font=font)
    return grid
