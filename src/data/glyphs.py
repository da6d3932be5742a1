"""Second built-in demo dataset: one coloured letter or digit on a plain light background, captioned in English or
Chinese ("a large red letter K at the top left" / "左上角一个大的红色字母K").

Other statistics than the shapes (strokes instead of filled areas, 12 outlines instead of 3, three fonts, four times
the attribute combinations), so that the demo's recipe is checked beyond the data it was tuned on. `measure_glyph` reads colour, character, size and
position back from pixels (the character by the nearest rendered template), `parse_glyph_caption` from a prompt.

The fonts: Pillow's built-in one (Aileron, emboldened) and Noto Sans CJK SC (Bold and Black), which the `demo` extra
installs (the pip package manimgx-fonts-cjk, SIL Open Font License 1.1; the demo also labels Chinese prompts with it).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFont

from ..resources import cjk_font_path, load_cjk_font
from .demo import (BACKGROUND, COLOR_ZH, HORIZONTAL, PALETTE, SIZE_ZH, SIZES, VERTICAL, _EN_WORDS, _ZH_CHARS,
                   _as_pixels, check_fields, _foreground, _largest_component, _majority_color, _where,
                   resolve_field)

LETTERS = tuple("AEHKLRST")  # distinct outlines, each a single piece for the tokenizer
DIGITS = tuple("2347")
CHARACTERS = LETTERS + DIGITS
# Bold faces only: a regular weight's small glyphs have ~1-pixel strokes at 32x32, finer than the f4 VQGAN keeps the
# colour of. Aileron (Pillow's built-in face, regular only) is emboldened by a stroke at render size.
FONTS = ("aileron", "noto-bold", "noto-black")
_EMBOLDEN = {"aileron": 5}  # stroke width in pixels at the render size
_HEIGHT = {"small": 0.34, "large": 0.56}  # ink height as a fraction of the image
_MARGIN = 0.04
_RENDER = 96  # font size the glyph outlines are rendered at before scaling down
_SUPERSAMPLE = 4
KIND_ZH = {"letter": "字母", "digit": "数字"}
GLYPH_ZH_WORDS = (*COLOR_ZH.values(), *SIZE_ZH.values(), *KIND_ZH.values(), "中间", "左", "右", "上", "下", "边",
                  "角", "一个", "画面", "有", "在")
# The characters are pieces too: else "letter K" gives "▁K" and "字母K" gives "K", two ids for one character, and each
# language's id learns from half the images.
GLYPH_PIECES = (*GLYPH_ZH_WORDS, *CHARACTERS)

TEMPLATES = {
    "en": ("a {size} {color} {kind} {char} {where}", "{where} there is a {size} {color} {kind} {char}",
           "a picture of a {size} {color} {kind} {char} {where}"),
    "zh": ("{where}一个{size}{color}{kind}{char}", "一个{size}{color}{kind}{char}在{where}",
           "画面{where}有一个{size}{color}{kind}{char}"),
}

GLYPH_PROMPTS = [
    "a large red letter K at the top left",
    "a small blue digit 7 on the right",
    "a large green letter A in the center",
    "a small orange letter S at the bottom",
    "左上角一个大的红色字母K",
    "右边一个小的紫色数字3",
    "画面中间有一个大的黄色字母E",
    "一个小的蓝色数字4在左下角",
]


@dataclass(frozen=True)
class GlyphAttributes:
    color: Optional[str]
    char: Optional[str]  # one of CHARACTERS
    size: Optional[str]  # small | large
    horizontal: Optional[str]  # left | center | right
    vertical: Optional[str]  # top | middle | bottom

    def __post_init__(self):
        check_fields(self, color=tuple(PALETTE), char=CHARACTERS, size=SIZES, horizontal=HORIZONTAL, vertical=VERTICAL)


GLYPH_ATTRIBUTES = ("color", "char", "size", "horizontal", "vertical")


def random_glyph(rng: np.random.Generator) -> GlyphAttributes:
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return GlyphAttributes(pick(tuple(PALETTE)), pick(CHARACTERS), pick(SIZES), pick(HORIZONTAL), pick(VERTICAL))


def glyph_caption(attrs: GlyphAttributes, lang: str = "en", rng: Optional[np.random.Generator] = None) -> str:
    """A caption in `lang` ("en" or "zh"), with a phrasing template drawn from rng (the first one if rng is None)."""
    if lang not in TEMPLATES:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    templates = TEMPLATES[lang]
    template = templates[int(rng.integers(len(templates)))] if rng is not None else templates[0]
    kind = "digit" if attrs.char in DIGITS else "letter"
    if lang == "zh":
        words = dict(size=SIZE_ZH[attrs.size], color=COLOR_ZH[attrs.color], kind=KIND_ZH[kind])
    else:
        words = dict(size=attrs.size, color=attrs.color, kind=kind)
    return template.format(where=_where(attrs, lang), char=attrs.char, **words)


def parse_glyph_caption(text: str, strict: bool = True) -> GlyphAttributes:
    """The attributes a caption asks for (English or Chinese); absent position words mean center/middle. A missing or
    contradictory colour/character/size raises ValueError (strict) or leaves that field None."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    chars = set(re.findall(r"(?:letter|digit|number|字母|数字)\s*([A-Za-z0-9])(?![A-Za-z0-9])", text))
    found = {"char": {c.upper() for c in chars} & set(CHARACTERS)}
    for field in ("color", "size", "horizontal", "vertical"):
        found[field] = {value for value, synonyms in _EN_WORDS[field].items() if words & set(synonyms)}
        found[field] |= {value for value, zh in _ZH_CHARS[field].items() if zh in text}
    return GlyphAttributes(**{field: resolve_field(field, hits, f"parse_glyph_caption({text!r})", strict)
                              for field, hits in found.items()})


# ----------------------------------------------------------------------------------------------------------------------
# drawing


def _font(name: str):
    if name == "aileron":
        return ImageFont.load_default(size=_RENDER)
    path = cjk_font_path()
    if path is None:
        raise RuntimeError("the glyphs dataset draws with Noto Sans CJK: install tokenpaint's demo extra "
                           "(pip install 'tokenpaint[demo]', which `make venv` does)")
    return load_cjk_font(path, _RENDER, {"noto-bold": "Bold", "noto-black": "Black"}[name])


@functools.lru_cache(maxsize=None)
def _outline(char: str, font: str) -> np.ndarray:
    """The character's ink as a float coverage map in [0,1], cropped to its bounding box, at the render size."""
    image = Image.new("L", (2 * _RENDER, 2 * _RENDER), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(image).text((_RENDER // 2, _RENDER // 4), char, fill=255, font=_font(font),
                               stroke_width=_EMBOLDEN.get(font, 0), stroke_fill=255)
    ink = np.asarray(image, dtype=np.float32) / 255
    ys, xs = np.nonzero(ink > 0.02)
    return ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def draw_glyph(attrs: GlyphAttributes, resolution: int = 32, rng: Optional[np.random.Generator] = None,
               font: Optional[str] = None) -> Image.Image:
    """Draw the glyph as an RGB image; rng picks the font (unless given) and adds small jitter to position, size and
    shades (None: the first font, exact)."""
    jitter = (lambda lo, hi: float(rng.uniform(lo, hi))) if rng is not None else (lambda lo, hi: 0.0)
    if font is None:
        font = FONTS[int(rng.integers(len(FONTS)))] if rng is not None else FONTS[0]
    outline = _outline(attrs.char, font)
    canvas = resolution * _SUPERSAMPLE
    height = _HEIGHT[attrs.size] * (1 + jitter(-0.06, 0.06)) * canvas
    width = max(1.0, height * outline.shape[1] / outline.shape[0])
    half_w, half_h = width / 2 / canvas, height / 2 / canvas
    cx = {"left": max(0.25, _MARGIN + half_w), "center": 0.5, "right": min(0.75, 1 - _MARGIN - half_w)}[
        attrs.horizontal] + jitter(-0.02, 0.02)
    cy = {"top": max(0.25, _MARGIN + half_h), "middle": 0.5, "bottom": min(0.75, 1 - _MARGIN - half_h)}[
        attrs.vertical] + jitter(-0.02, 0.02)
    mask_small = Image.fromarray(outline, mode="F").resize((round(width), round(height)), Image.BILINEAR)
    mask = Image.new("F", (canvas, canvas), 0.0)
    mask.paste(mask_small, (round(cx * canvas - width / 2), round(cy * canvas - height / 2)))
    alpha = np.clip(np.asarray(mask, dtype=np.float32), 0, 1)[..., None]
    background = np.array([c + jitter(-6, 6) for c in BACKGROUND], dtype=np.float32)
    color = np.array([np.clip(c + jitter(-12, 12), 0, 255) for c in PALETTE[attrs.color]], dtype=np.float32)
    pixels = (1 - alpha) * background + alpha * color
    image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")
    return image.resize((resolution, resolution), Image.BOX)


# ----------------------------------------------------------------------------------------------------------------------
# measuring

_TEMPLATE_GRID = 12  # glyphs are compared as 12x12 coverage maps of their bounding box, plus their aspect ratio


def _features(coverage: np.ndarray) -> tuple[np.ndarray, float]:
    """A bounding-box crop of a coverage map -> (normalised 12x12 map, aspect ratio width/height)."""
    grid = np.asarray(Image.fromarray(coverage.astype(np.float32), mode="F").resize(
        (_TEMPLATE_GRID, _TEMPLATE_GRID), Image.BILINEAR), dtype=np.float64).ravel()
    grid = grid - grid.mean()
    return grid / max(np.linalg.norm(grid), 1e-9), coverage.shape[1] / coverage.shape[0]


@functools.lru_cache(maxsize=None)
def _templates(resolution: int) -> tuple:
    """(char, features, aspect) of every character in every font and size, drawn exactly and measured as a generated
    image is: the nearest one names the character."""
    out = []
    for char in CHARACTERS:
        for font in FONTS:
            for size in SIZES:
                image = draw_glyph(GlyphAttributes("blue", char, size, "center", "middle"), resolution, font=font)
                out.append((char, *_features(_coverage_box(_as_pixels(image))[0])))
    return tuple(out)


def _coverage_box(pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int], str]:
    """(coverage crop, (top, bottom, left, right) in pixels, colour) of the glyph: the strongly coloured pixels that
    belong to blobs of at least a fifth of the largest one (strokes may break apart in a generated image)."""
    background, distance, candidates = _foreground(pixels, "measure_glyph: no glyph")
    largest = _largest_component(candidates)
    core = candidates.copy()
    rest = candidates.copy()
    rest[tuple(largest.T)] = False
    while rest.any():  # drop specks: blobs under a fifth of the largest
        blob = _largest_component(rest)
        rest[tuple(blob.T)] = False
        if len(blob) < max(2, len(largest) / 5):
            core[tuple(blob.T)] = False
    color = _majority_color(pixels[core & (distance >= 0.6 * np.percentile(distance[core], 98))], background)
    direction = np.array(PALETTE[color], dtype=np.float64) - background
    coverage = np.clip((pixels - background) @ direction / max(direction @ direction, 1e-6), 0.0, 1.0)
    ys, xs = np.nonzero(core)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    return coverage[box[0]:box[1], box[2]:box[3]], box, color


def measure_glyph(image) -> GlyphAttributes:
    """Colour (majority vote over the palette), character (nearest template by 12x12 coverage map and aspect ratio),
    size (ink height) and position (centre of the ink's bounding box) of the glyph in an image. Raises ValueError if
    nothing stands out from the background."""
    pixels = _as_pixels(image)
    height, width, _ = pixels.shape
    crop, (top, bottom, left, right), color = _coverage_box(pixels)
    features, aspect = _features(crop)
    scores = [(float(features @ t) - 0.5 * abs(np.log(aspect / a)), char) for char, t, a in _templates(height)]
    char = max(scores)[1]
    size = "large" if (bottom - top) / height > np.sqrt(_HEIGHT["small"] * _HEIGHT["large"]) else "small"
    cx, cy = (left + right) / 2 / width, (top + bottom) / 2 / height
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else "center"
    vertical = "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"
    return GlyphAttributes(color, char, size, horizontal, vertical)


# ----------------------------------------------------------------------------------------------------------------------
# the dataset


def _write_split(path: str, num_rows: int, resolution: int, rng: np.random.Generator) -> None:
    from .tsv import encode_png_base64

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for i in range(num_rows):
            attrs = random_glyph(rng)
            text = glyph_caption(attrs, "en" if rng.random() < 0.5 else "zh", rng)
            f.write(f"{i}\t{text}\t{encode_png_base64(draw_glyph(attrs, resolution, rng))}\n")
    os.replace(tmp, path)


def make_glyph_dataset(out_dir, num_train: int = 16000, num_val: int = 256, resolution: int = 32,
                       seed: int = 0) -> tuple[str, str, str]:
    """Write `train.tsv`, `val.tsv` (idx, caption, base64 PNG) and `prompts.tsv` (idx, GLYPH_PROMPTS) into out_dir,
    deterministically from `seed`. Returns (train_tsv, val_tsv, prompts_tsv)."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train}, {num_val}")
    os.makedirs(out_dir, exist_ok=True)
    paths = tuple(os.path.join(out_dir, name) for name in ("train.tsv", "val.tsv", "prompts.tsv"))
    for split, (path, num_rows) in enumerate(zip(paths[:2], (num_train, num_val))):
        _write_split(path, num_rows, resolution, np.random.default_rng([seed, split, 1]))
    with open(paths[2], "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{i}\t{prompt}\n" for i, prompt in enumerate(GLYPH_PROMPTS))
    return paths
