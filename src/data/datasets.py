"""The demo's built-in datasets, one entry each, and the one judge of a generated image against its prompt.

    shapes  one coloured circle, square or triangle (tokenpaint.data.demo)
    glyphs  one coloured letter or digit in one of three fonts (tokenpaint.data.glyphs)

Each entry says how to write the dataset and how many training rows the demo writes, its sample prompts, the pieces
its caption tokenizer keeps whole (the Chinese words, and for glyphs the character names), how to caption random
attributes (held-out prompts) and how to read attributes back from a caption and from pixels. `judge` compares the two: colour, identity (shape or character), size and position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import demo as shapes
from . import glyphs

# Chinese has no spaces to stop BPE merges: at vocab 400 they fused whole phrases ("色圆形", "一个小的橙") while
# English colour words fell apart ("g re en"). Declaring the datasets' Chinese words as user-defined pieces makes every
# content word one piece in both languages (captions <= 11 ids), as the conditioning learns fastest with word-level ids.
SHAPES_ZH_WORDS = (*shapes.COLOR_ZH.values(), *shapes.SHAPE_ZH.values(), *shapes.SIZE_ZH.values(), "中间", "左", "右",
                   "上", "下", "边", "角", "一个", "画面", "有", "在")


@dataclass(frozen=True)
class DemoDataset:
    name: str
    make: Callable[..., tuple]  # (out_dir, num_train, num_val, resolution, seed) -> (train, val, prompts) paths
    prompts: tuple[str, ...]  # drawn in the demo's samples.png
    pieces: tuple[str, ...]  # user-defined pieces of the caption tokenizer
    num_train: int  # training rows the demo writes: ~12 per combination of attributes (shapes 324, glyphs 1296)
    identity: str  # the attribute that says what is drawn: "shape" or "char"
    attributes: tuple[str, ...]  # judged attributes (colour, identity, size, horizontal, vertical)
    random: Callable[[Any], Any]  # rng -> attributes
    caption: Callable[..., str]  # (attributes, lang, rng) -> caption
    parse: Callable[[str], Any]  # caption -> attributes (ValueError if it names none)
    measure: Callable[[Any], Any]  # image -> attributes (ValueError if nothing is drawn)


DATASETS = {
    "shapes": DemoDataset("shapes", shapes.make_demo_dataset, tuple(shapes.DEMO_PROMPTS), SHAPES_ZH_WORDS, 4000,
                          "shape",
                          ("color", "shape", "size", "horizontal", "vertical"), shapes.random_attributes,
                          shapes.caption, shapes.parse_caption, shapes.measure_scene),
    "glyphs": DemoDataset("glyphs", glyphs.make_glyph_dataset, tuple(glyphs.GLYPH_PROMPTS), glyphs.GLYPH_PIECES,
                          16000, "char", glyphs.GLYPH_ATTRIBUTES, glyphs.random_glyph, glyphs.glyph_caption,
                          glyphs.parse_glyph_caption, glyphs.measure_glyph),
}


def get_dataset(name: str) -> DemoDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def judge(image, prompt: str, dataset: str = "shapes") -> dict[str, bool]:
    """Which attributes of `prompt` the image shows, per attribute, plus "position" (both axes), "match" (colour,
    identity and position) and "all" (also size). Nothing drawn = a miss on every count."""
    ds = get_dataset(dataset)
    wanted = ds.parse(prompt)
    try:
        seen = ds.measure(image)
    except ValueError:  # nothing stands out from the background
        return {name: False for name in (*ds.attributes, "position", "match", "all")}
    verdict = {name: getattr(seen, name) == getattr(wanted, name) for name in ds.attributes}
    verdict["position"] = verdict["horizontal"] and verdict["vertical"]
    verdict["match"] = verdict["color"] and verdict[ds.identity] and verdict["position"]
    verdict["all"] = verdict["match"] and verdict["size"]
    return verdict


def english_label(prompt: str, dataset: str = "shapes") -> str:
    """A Chinese prompt's English rendering (its attributes captioned with the first English template)."""
    ds = get_dataset(dataset)
    return ds.caption(ds.parse(prompt), "en")
