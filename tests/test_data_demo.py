"""Demo dataset: determinism, caption <-> attributes, pixels -> attributes (also on degraded images)."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tokenpaint.data import (DEMO_PROMPTS, SceneAttributes, TSVImageText, caption, draw_scene, make_demo_dataset,
                             measure_scene, parse_caption, pil_to_tensor, random_attributes)
from tokenpaint.data.demo import HORIZONTAL, PALETTE, SHAPES, SIZES, TEMPLATES, VERTICAL

ALL_ATTRIBUTES = [SceneAttributes(*combo) for combo in itertools.product(PALETTE, SHAPES, SIZES, HORIZONTAL, VERTICAL)]


def test_dataset_is_deterministic_from_the_seed_and_readable(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_train=60, num_val=10, seed=3)
    b = make_demo_dataset(tmp_path / "b", num_train=60, num_val=10, seed=3)
    c = make_demo_dataset(tmp_path / "c", num_train=60, num_val=10, seed=4)
    for path_a, path_b, path_c in zip(a, b, c):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
    assert open(a[0], "rb").read() != open(c[0], "rb").read()
    assert open(a[0], "rb").read() != open(a[1], "rb").read()  # train and val differ
    rows = list(TSVImageText(a[0], resolution=32))
    assert len(rows) == 60 and rows[0]["image"].shape == (3, 32, 32)
    chinese = sum(any("\u4e00" <= ch <= "\u9fff" for ch in row["text"]) for row in rows)
    assert 15 <= chinese <= 45
    for row in rows:  # every image shows what its caption says
        assert measure_scene(row["image"]) == parse_caption(row["text"])
    assert [line.split("\t")[1].strip() for line in open(a[2], encoding="utf-8")] == DEMO_PROMPTS


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_parse_caption_inverts_every_template_for_every_scene(lang):
    for attrs in ALL_ATTRIBUTES:
        for template in range(len(TEMPLATES[lang])):
            rng = _FixedChoice(template)
            assert parse_caption(caption(attrs, lang, rng)) == attrs


class _FixedChoice:
    """An rng stand-in whose integers() always picks `index` (to enumerate templates)."""

    def __init__(self, index):
        self.index = index

    def integers(self, n):
        return self.index


def test_captions_follow_the_examples():
    attrs = SceneAttributes("red", "circle", "large", "left", "middle")
    assert caption(attrs, "en") == "a large red circle on the left"
    assert caption(attrs, "zh") == "左边一个大的红色圆形"
    assert caption(SceneAttributes("blue", "triangle", "small", "right", "top"), "zh") == "右上角一个小的蓝色三角形"


def test_parse_caption_accepts_demo_prompts_and_explains_failures():
    parsed = [parse_caption(p) for p in DEMO_PROMPTS]
    assert parsed[0] == SceneAttributes("red", "circle", "large", "center", "middle")
    assert parsed[4] == SceneAttributes("purple", "triangle", "large", "left", "middle")
    assert parsed[5] == SceneAttributes("orange", "square", "small", "right", "bottom")
    with pytest.raises(ValueError, match="names none for color"):
        parse_caption("a large circle")
    with pytest.raises(ValueError, match=r"several \(blue, red\) for color"):
        parse_caption("a large red blue circle")
    assert parse_caption("a big circle", strict=False) == SceneAttributes(None, "circle", "large", "center", "middle")


def test_measure_scene_recovers_random_drawn_scenes():
    rng = np.random.default_rng(0)
    for _ in range(150):
        attrs = random_attributes(rng)
        image = draw_scene(attrs, 32, rng)
        assert image.size == (32, 32)
        assert measure_scene(image) == attrs
    exact = draw_scene(attrs, 32)  # no rng: no jitter
    assert measure_scene(exact) == attrs and measure_scene(pil_to_tensor(exact)) == attrs
    assert measure_scene(np.asarray(exact)) == attrs


def test_measure_scene_is_robust_to_blur_noise_specks_and_resolution():
    rng = np.random.default_rng(1)
    for i in range(90):
        attrs = random_attributes(rng)
        resolution = 64 if i % 3 == 0 else 32
        image = draw_scene(attrs, resolution, rng).filter(ImageFilter.GaussianBlur(0.9 * resolution / 32))
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, (resolution, resolution, 3))
        corner = (2, 2) if attrs.horizontal != "left" or attrs.vertical != "top" else (resolution - 4, resolution - 4)
        pixels[corner[0]:corner[0] + 2, corner[1]:corner[1] + 2] = (20, 20, 20)  # a stray dark speck
        degraded = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        assert measure_scene(degraded) == attrs, (i, attrs)


def test_measure_scene_rejects_empty_images():
    with pytest.raises(ValueError, match="no object"):
        measure_scene(Image.new("RGB", (32, 32), (238, 238, 232)))


def test_attributes_are_validated():
    with pytest.raises(ValueError, match="shape='hexagon'"):
        SceneAttributes("red", "hexagon", "large", "left", "top")
