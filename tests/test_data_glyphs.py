"""Glyphs dataset: determinism, caption <-> attributes, pixels -> attributes (every character in every font), the
dataset registry's judge, the caption tokenizer's pieces and the shipped CJK font."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tokenpaint import demo
from tokenpaint.data import TSVImageText
from tokenpaint.data.datasets import DATASETS, english_label, judge
from tokenpaint.data.glyphs import (CHARACTERS, FONTS, GLYPH_PROMPTS, TEMPLATES, GlyphAttributes, draw_glyph,
                                    glyph_caption, make_glyph_dataset, measure_glyph, parse_glyph_caption, random_glyph)
from tokenpaint.resources import cjk_font_path, load_cjk_font


class _FixedChoice:
    """An rng stand-in whose integers() always picks `index` (to enumerate templates)."""

    def __init__(self, index):
        self.index = index

    def integers(self, n):
        return self.index


def test_captions_follow_the_examples_and_parse_back():
    attrs = GlyphAttributes("red", "K", "large", "left", "top")
    assert glyph_caption(attrs, "en") == "a large red letter K at the top left"
    assert glyph_caption(attrs, "zh") == "左上角一个大的红色字母K"
    assert glyph_caption(GlyphAttributes("blue", "7", "small", "right", "middle"), "zh") == "右边一个小的蓝色数字7"
    for lang in ("en", "zh"):
        for attrs in (GlyphAttributes(*c) for c in itertools.product(["red", "purple"], CHARACTERS, ["small", "large"],
                                                                     ["left", "center"], ["top", "middle"])):
            for template in range(len(TEMPLATES[lang])):
                assert parse_glyph_caption(glyph_caption(attrs, lang, _FixedChoice(template))) == attrs
    assert [parse_glyph_caption(p).char for p in GLYPH_PROMPTS] == ["K", "7", "A", "S", "K", "3", "E", "4"]
    with pytest.raises(ValueError, match=r"names none for char"):
        parse_glyph_caption("a large red thing at the top")
    with pytest.raises(ValueError, match=r"mentions several \(blue, red\) for color"):
        parse_glyph_caption("a large red blue letter K")
    with pytest.raises(ValueError, match="expected one of"):
        GlyphAttributes("red", "Q", "large", "left", "top")  # not one of the dataset's characters


def test_measure_glyph_reads_every_character_in_every_font_and_size():
    for char, font, size in itertools.product(CHARACTERS, FONTS, ("small", "large")):
        attrs = GlyphAttributes("green", char, size, "right", "bottom")
        assert measure_glyph(draw_glyph(attrs, 32, font=font)) == attrs, (char, font, size)


def test_measure_glyph_recovers_random_jittered_glyphs_and_survives_blur():
    rng = np.random.default_rng(0)
    scenes = [random_glyph(rng) for _ in range(60)]
    images = [draw_glyph(attrs, 32, rng) for attrs in scenes]
    assert [measure_glyph(image) for image in images] == scenes
    blurred = [measure_glyph(image.filter(ImageFilter.GaussianBlur(0.6))) for image in images]
    assert np.mean([b == a for a, b in zip(scenes, blurred)]) >= 0.9
    with pytest.raises(ValueError, match="no glyph"):
        measure_glyph(Image.new("RGB", (32, 32), (238, 238, 232)))


def test_dataset_is_deterministic_and_every_image_shows_its_caption(tmp_path):
    a = make_glyph_dataset(tmp_path / "a", num_train=40, num_val=4, seed=3)
    b = make_glyph_dataset(tmp_path / "b", num_train=40, num_val=4, seed=3)
    for path_a, path_b in zip(a, b):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
    rows = list(TSVImageText(a[0], resolution=32))
    assert len(rows) == 40 and rows[0]["image"].shape == (3, 32, 32)
    assert 8 <= sum("字母" in row["text"] or "数字" in row["text"] for row in rows) <= 32
    for row in rows:
        assert measure_glyph(row["image"]) == parse_glyph_caption(row["text"])


def test_the_registry_judge_names_what_differs_for_either_dataset():
    image = draw_glyph(GlyphAttributes("red", "K", "large", "left", "top"), 32)
    assert all(judge(image, "左上角一个大的红色字母K", "glyphs").values())
    wrong = judge(image, "a large red letter T at the top left", "glyphs")
    assert not wrong["char"] and not wrong["match"] and wrong["color"] and wrong["position"]
    assert not any(judge(Image.new("RGB", (32, 32), (238, 238, 232)), GLYPH_PROMPTS[0], "glyphs").values())
    assert english_label("右边一个小的紫色数字3", "glyphs") == "a small purple digit 3 on the right"
    with pytest.raises(ValueError, match="unknown demo dataset 'dots'; choose one of shapes, glyphs"):
        judge(image, GLYPH_PROMPTS[0], "dots")
    assert set(DATASETS) == {"shapes", "glyphs"}


def test_glyph_captions_tokenize_into_word_pieces(tmp_path):
    train_tsv = demo.prepare_data(str(tmp_path), num_train=300, num_val=2, seed=0, dataset="glyphs")[0]
    tokenizer = demo.TextTokenizer(demo.prepare_tokenizer(train_tsv, str(tmp_path / "tokenizer.model"), "glyphs"))
    pieces = tokenizer.pieces("左上角一个大的红色字母K")
    assert pieces[-4:] == ["大的", "红色", "字母", "K"], pieces
    assert tokenizer.pieces("a small blue digit 7 on the right")[:6] == ["▁a", "▁small", "▁blue", "▁digit", "▁", "7"]
    for char in CHARACTERS:  # one piece per character, whichever language names it
        for lang in ("zh", "en"):
            caption = glyph_caption(GlyphAttributes("red", char, "small", "left", "top"), lang)
            assert char in tokenizer.pieces(caption), (caption, tokenizer.pieces(caption))


def test_the_shipped_cjk_font_draws_chinese():
    path = cjk_font_path()
    assert path is not None and demo.find_cjk_font() == path  # the demo extra's font comes first
    font = load_cjk_font(path, 16)
    left, right, tofu = (np.asarray(font.getmask(ch)) for ch in ("左", "右", "\U000e0100"))
    assert left.any() and right.any() and left.tobytes() != right.tobytes()  # real glyphs, not one missing-glyph box
