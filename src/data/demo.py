"""Built-in demo dataset: one coloured shape on a plain light background, captioned in English or Chinese.

Small enough to train a VQGAN and a transformer on 2 CPU cores in minutes (32x32 images, a few thousand rows), and
judgeable: `measure_scene` reads the attributes back from pixels and `parse_caption` from a prompt, so a benchmark can
check that generated images show what their prompts asked for.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, deque
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .tsv import encode_png_base64

PALETTE = {  # well separated in RGB, and all far from the light background
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (235, 200, 30), "purple": (140, 60, 175), "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HORIZONTAL = ("left", "center", "right")
VERTICAL = ("top", "middle", "bottom")

BACKGROUND = (238, 238, 232)
_ANCHOR = {"left": 0.25, "center": 0.5, "right": 0.75, "top": 0.25, "middle": 0.5, "bottom": 0.75}
_SIDE = {"small": 0.18, "large": 0.35}  # bounding-box side as a fraction of the image
_AREA_PER_SIDE2 = {"square": 1.0, "circle": math.pi / 4, "triangle": math.sqrt(3) / 4}  # area / side^2
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges

COLOR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SIZE_ZH = {"small": "小的", "large": "大的"}
_H_ZH = {"left": "左", "right": "右"}
_V_ZH = {"top": "上", "bottom": "下"}

TEMPLATES = {
    "en": ("a {size} {color} {shape} {where}", "{where} there is a {size} {color} {shape}",
           "a picture of a {size} {color} {shape} {where}"),
    "zh": ("{where}一个{size}{color}{shape}", "一个{size}{color}{shape}在{where}", "画面{where}有一个{size}{color}{shape}"),
}


@dataclass(frozen=True)
class SceneAttributes:
    color: Optional[str]  # a PALETTE key
    shape: Optional[str]  # circle | square | triangle
    size: Optional[str]  # small | large
    horizontal: Optional[str]  # left | center | right
    vertical: Optional[str]  # top | middle | bottom

    def __post_init__(self):
        check_fields(self, color=tuple(PALETTE), shape=SHAPES, size=SIZES, horizontal=HORIZONTAL, vertical=VERTICAL)


def check_fields(attributes, **allowed: Sequence[str]) -> None:
    """Each named field of an attributes dataclass is None (unknown) or one of its allowed values."""
    for name, options in allowed.items():
        value = getattr(attributes, name)
        if value is not None and value not in options:
            raise ValueError(f"{type(attributes).__name__}.{name}={value!r}; expected one of {tuple(options)}")


def random_attributes(rng: np.random.Generator, colors: Optional[Sequence[str]] = None) -> SceneAttributes:
    """A random scene; `colors` (PALETTE keys) limits the colours drawn from (default: all of them)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    return SceneAttributes(pick(tuple(PALETTE) if colors is None else tuple(colors)), pick(SHAPES), pick(SIZES),
                           pick(HORIZONTAL), pick(VERTICAL))


# ----------------------------------------------------------------------------------------------------------------------
# captions


def _where(attrs: SceneAttributes, lang: str) -> str:
    h, v = attrs.horizontal, attrs.vertical
    if lang == "zh":
        if h == "center" and v == "middle":
            return "中间"
        if v == "middle":
            return _H_ZH[h] + "边"
        if h == "center":
            return _V_ZH[v] + "边"
        return _H_ZH[h] + _V_ZH[v] + "角"  # 左上角
    if v == "middle":
        return {"left": "on the left", "center": "in the center", "right": "on the right"}[h]
    return f"at the {v}" if h == "center" else f"at the {v} {h}"


def caption(attrs: SceneAttributes, lang: str = "en", rng: np.random.Generator | None = None) -> str:
    """A caption in `lang` ("en" or "zh"), with a phrasing template drawn from rng (the first one if rng is None)."""
    if lang not in TEMPLATES:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    templates = TEMPLATES[lang]
    template = templates[int(rng.integers(len(templates)))] if rng is not None else templates[0]
    if lang == "zh":
        words = dict(size=SIZE_ZH[attrs.size], color=COLOR_ZH[attrs.color], shape=SHAPE_ZH[attrs.shape])
    else:
        words = dict(size=attrs.size, color=attrs.color, shape=attrs.shape)
    return template.format(where=_where(attrs, lang), **words)


def describe_scene(attrs: SceneAttributes, lang: str = "en") -> str:
    """The canonical (first-template) caption."""
    return caption(attrs, lang)


_EN_WORDS = {
    "color": {c: (c,) for c in PALETTE} | {"purple": ("purple", "violet")},
    "shape": {"circle": ("circle", "disc", "disk", "round"), "square": ("square", "box"), "triangle": ("triangle",)},
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "horizontal": {"left": ("left",), "right": ("right",)},
    "vertical": {"top": ("top", "upper"), "bottom": ("bottom", "lower")},
}
_ZH_CHARS = {
    "color": {"red": "红", "green": "绿", "blue": "蓝", "yellow": "黄", "purple": "紫", "orange": "橙"},
    "shape": {"circle": "圆", "square": "方", "triangle": "三角"},
    "size": {"small": "小", "large": "大"},
    "horizontal": {"left": "左", "right": "右"},
    "vertical": {"top": "上", "bottom": "下"},
}
_DEFAULT = {"horizontal": "center", "vertical": "middle"}  # position words that are absent mean "centered"


def parse_caption(text: str, strict: bool = True) -> SceneAttributes:
    """Read the attributes a caption asks for (English or Chinese). Position words that are absent mean center/middle.
    A missing or contradictory colour/shape/size raises ValueError (strict) or leaves that field None."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    found = {}
    for field in (f.name for f in fields(SceneAttributes)):
        hits = {value for value, synonyms in _EN_WORDS[field].items() if words & set(synonyms)}
        hits |= {value for value, chars in _ZH_CHARS[field].items() if chars in text}
        found[field] = resolve_field(field, hits, f"parse_caption({text!r})", strict)
    return SceneAttributes(**found)


def resolve_field(field: str, hits: set, where: str, strict: bool) -> Optional[str]:
    """The one value a caption names for `field`; absent position words mean center/middle. None or several: a
    ValueError naming `where` and the field (strict), else None."""
    if len(hits) == 1:
        return next(iter(hits))
    if not hits and field in _DEFAULT:
        return _DEFAULT[field]
    if strict:
        problem = f"mentions several ({', '.join(sorted(hits))})" if hits else "names none"
        raise ValueError(f"{where}: {problem} for {field}")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# drawing and measuring


def draw_scene(attrs: SceneAttributes, resolution: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene as an RGB PIL image; rng adds small jitter to position, size and shades (None: exact)."""
    jitter = (lambda lo, hi: float(rng.uniform(lo, hi))) if rng is not None else (lambda lo, hi: 0.0)
    background = tuple(int(c + jitter(-6, 6)) for c in BACKGROUND)
    color = tuple(int(np.clip(c + jitter(-12, 12), 0, 255)) for c in PALETTE[attrs.color])
    canvas = resolution * _SUPERSAMPLE
    cx = (_ANCHOR[attrs.horizontal] + jitter(-0.025, 0.025)) * canvas
    cy = (_ANCHOR[attrs.vertical] + jitter(-0.025, 0.025)) * canvas
    side = _SIDE[attrs.size] * (1 + jitter(-0.08, 0.08)) * canvas
    img = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(img)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=color)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=color)
    else:  # equilateral, pointing up, centroid on the anchor so that position is measured without bias
        height = side * math.sqrt(3) / 2
        draw.polygon([(cx, cy - 2 * height / 3), (cx + side / 2, cy + height / 3), (cx - side / 2, cy + height / 3)],
                     fill=color)
    return img.resize((resolution, resolution), Image.BOX)


def _as_pixels(image) -> np.ndarray:
    """PIL / float tensor [3,H,W] in [-1,1] / uint8 array [H,W,3] -> float64 [H,W,3] in [0,255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"measure_scene: expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
        return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"measure_scene: expected an [H,W,3] array, got shape {array.shape}")
    return array


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Coordinates [n,2] (y, x) of the largest 4-connected True region."""
    unvisited = set(zip(*(axis.tolist() for axis in np.nonzero(mask))))  # python sets: fast membership tests
    best: list = []
    while unvisited:
        start = unvisited.pop()
        region, queue = [start], deque([start])
        while queue:
            y, x = queue.popleft()
            for neighbour in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if neighbour in unvisited:
                    unvisited.remove(neighbour)
                    region.append(neighbour)
                    queue.append(neighbour)
        if len(region) > len(best):
            best = region
    return np.array(best, dtype=np.int64).reshape(-1, 2)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.any([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def _majority_color(pixels: np.ndarray, background: np.ndarray) -> str:
    """Majority vote of [n,3] pixels over the palette, each by its distance to the segment background -> colour,
    so that pixels blended with the background (blur, antialiasing) still vote for their colour."""
    names = list(PALETTE)
    offsets = np.array([PALETTE[name] for name in names], dtype=np.float64) - background  # [K,3]
    delta = pixels - background  # [n,3]
    alpha = np.clip(delta @ offsets.T / (offsets**2).sum(axis=1), 0.0, 1.0)  # [n,K] blend weight per colour
    residual = np.linalg.norm(delta[:, None, :] - alpha[..., None] * offsets[None], axis=-1)  # [n,K]
    votes = Counter(residual.argmin(axis=1).tolist())
    return names[votes.most_common(1)[0][0]]


def _foreground(pixels: np.ndarray, nothing: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background colour: the border's median, each pixel's distance from it, pixels far enough to be drawn). Raises
    ValueError "<nothing> stands out from the background" if no pixel is."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    candidates = distance > 40
    if not candidates.any():
        raise ValueError(f"{nothing} stands out from the background")
    return background, distance, candidates


def measure_scene(image, upsample: int = 4) -> SceneAttributes:
    """Measure the drawn object from pixels (also on blurry, imperfect generated images).

    background = median border colour; object = the largest blob of pixels far from it; colour = majority vote of
    its strongly coloured pixels over the palette (blend-aware). The object's coverage map is upsampled and
    thresholded at 0.5 for sub-pixel geometry. Shape: triangle by its top/bottom area balance (an upward triangle has
    1/4 of its area in the top half of its box) or bounding-box fill ratio (0.5); square vs circle by diagonal vs axis
    extent (sqrt(2) vs 1, which survives blur rounding the corners, unlike the fill ratio 1 vs 0.785). Size by area
    (normalised by the shape's area/side^2), position by the centroid (triangles are drawn centroid-anchored).
    Raises ValueError if no object stands out from the background.
    """
    pixels = _as_pixels(image)
    height, width, _ = pixels.shape
    background, distance, candidates = _foreground(pixels, "measure_scene: no object")
    # the object = the largest blob of foreground pixels (specks and stray marks elsewhere are ignored)
    blob = np.zeros_like(candidates)
    blob[tuple(_largest_component(candidates).T)] = True
    core = blob & (distance >= 0.6 * np.percentile(distance[blob], 98))
    color = _majority_color(pixels[core], background)

    object_color = np.median(pixels[core], axis=0)
    direction = object_color - background
    coverage = np.clip((pixels - background) @ direction / max(direction @ direction, 1e-6), 0.0, 1.0)
    coverage = np.where(_dilate(blob), coverage, 0.0)  # keep the blob and a 1-pixel rim for the interpolation
    fine_size = (width * upsample, height * upsample)  # PIL bilinear upsampling = half-pixel-centred, like torch's
    fine = np.asarray(Image.fromarray(coverage.astype(np.float32), mode="F").resize(fine_size, Image.BILINEAR))
    region = np.argwhere(fine > 0.5)  # [n,2] (y, x)
    if len(region) == 0:
        raise ValueError("measure_scene: no object stands out from the background")
    ys, xs = region[:, 0], region[:, 1]
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(region) / box_area
    middle = (ys.max() + ys.min()) / 2
    top_over_bottom = (ys < middle).sum() / max((ys > middle).sum(), 1)  # ~1/3 for an upward triangle, ~1 otherwise
    diagonal_extent = np.ptp(xs + ys) + np.ptp(xs - ys)  # both diagonal widths, x sqrt(2)
    axis_extent = np.ptp(xs) + np.ptp(ys)
    corners = diagonal_extent / (math.sqrt(2) * axis_extent)  # square ~1.41 (also once blur rounds it), circle ~1
    shape = "triangle" if top_over_bottom < 0.85 or fill < 0.64 else "square" if corners > 1.09 else "circle"
    area = len(region) / (height * width * upsample**2)  # fraction of the image
    side = math.sqrt(area / _AREA_PER_SIDE2[shape])
    size = "large" if side > math.sqrt(_SIDE["small"] * _SIDE["large"]) else "small"
    cx, cy = (xs.mean() + 0.5) / (width * upsample), (ys.mean() + 0.5) / (height * upsample)
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return SceneAttributes(color, shape, size, horizontal, vertical)


# ----------------------------------------------------------------------------------------------------------------------
# the dataset

# A BPE vocabulary of this size makes the demo's content words single pieces (or one piece per attribute in
# Chinese) without merging whole phrases: 256 byte pieces + ~100 characters + ~40 words.
DEMO_VOCAB_SIZE = 400

DEMO_PROMPTS = [
    "a large red circle in the center",
    "a small blue square on the left",
    "a large green triangle at the top right",
    "a small yellow circle at the bottom",
    "左边一个大的紫色三角形",
    "一个小的橙色正方形在右下角",
    "画面中间有一个大的蓝色圆形",
    "右边一个小的红色三角形",
]


def _write_split(path: str, num_rows: int, resolution: int, rng: np.random.Generator,
                 colors: Optional[Sequence[str]] = None) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for i in range(num_rows):
            attrs = random_attributes(rng, colors)
            text = caption(attrs, "en" if rng.random() < 0.5 else "zh", rng)
            f.write(f"{i}\t{text}\t{encode_png_base64(draw_scene(attrs, resolution, rng))}\n")
    os.replace(tmp, path)


def make_demo_dataset(out_dir, num_train: int = 4000, num_val: int = 256, resolution: int = 32,
                      seed: int = 0, colors: Optional[Sequence[str]] = None) -> tuple[str, str, str]:
    """Write `train.tsv`, `val.tsv` (idx, caption, base64 PNG) and `prompts.tsv` (idx, DEMO_PROMPTS) into out_dir,
    deterministically from `seed`; `colors` limits the scenes to those PALETTE colours (default: all).
    Returns (train_tsv, val_tsv, prompts_tsv)."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train}, {num_val}")
    unknown = sorted(set(colors or ()) - set(PALETTE))
    if unknown or (colors is not None and not colors):
        raise ValueError(f"colors must be a non-empty list of {sorted(PALETTE)}, got {colors!r}")
    os.makedirs(out_dir, exist_ok=True)
    paths = tuple(os.path.join(out_dir, name) for name in ("train.tsv", "val.tsv", "prompts.tsv"))
    for split, (path, num_rows) in enumerate(zip(paths[:2], (num_train, num_val))):
        _write_split(path, num_rows, resolution, np.random.default_rng([seed, split]), colors)
    with open(paths[2], "w", encoding="utf-8", newline="\n") as f:
        f.writelines(f"{i}\t{prompt}\n" for i, prompt in enumerate(DEMO_PROMPTS))
    return paths
