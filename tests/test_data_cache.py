"""Token cache: contents match a direct encode, reuse, rebuild on data / VQGAN / tokenizer change, atomic builds."""

import json
import os

import pytest
import torch
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader

from tokenpaint.data import (TextTokenizer, TokenCache, TSVImageText, build_token_cache, iter_rows,
                             make_demo_dataset)


class StandInVQ(nn.Module):
    """Tiny stand-in for the VQGAN: 4x4 patches -> nearest of 300 random codes, offset to ids near the top of the
    uint16 range so that storage truncation would show."""

    def __init__(self, codebook_size=300, patch=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch = patch
        self.codebook = nn.Parameter(torch.randn(codebook_size, 3 * patch * patch, generator=g))
        self.register_buffer("id_offset", torch.tensor(65200))
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        p = self.patch
        patches = rearrange(x, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=p, p2=p)
        distances = torch.cdist(patches.flatten(1, 2), self.codebook[None])  # [B, h*w, K]
        ids = distances.argmin(-1) + self.id_offset  # long [B, h*w]
        return ids.view(x.shape[0], x.shape[2] // p, x.shape[3] // p)  # long [B,h,w]


@pytest.fixture()
def setup(tmp_path):
    train, _, _ = make_demo_dataset(tmp_path / "demo", num_train=20, num_val=1, resolution=16, seed=0)
    texts = [line.split("\t")[1] for line in open(train, encoding="utf-8")]
    tokenizer = TextTokenizer.train(texts * 5, tmp_path / "spm", vocab_size=400)
    return train, StandInVQ(), tokenizer, str(tmp_path / "cache")


def build(setup, **kwargs):
    train, vq, tokenizer, cache_dir = setup
    return build_token_cache(train, vq, tokenizer, cache_dir, resolution=16, text_len=32, batch_size=8,
                             progress=False, **kwargs)


def test_cache_holds_exactly_what_a_direct_encode_gives(setup):
    train, vq, tokenizer, cache_dir = setup
    cache = build(setup)
    assert not cache.reused and len(cache) == 20 and cache.image_grid == (4, 4)
    assert cache.image_ids.dtype == "uint16" and cache.image_ids.shape == (20, 16)
    assert cache.text_ids.dtype == "int32" and cache.text_ids.shape == (20, 32)
    rows = list(TSVImageText(train, resolution=16))
    expected_ids = vq.encode(torch.stack([r["image"] for r in rows])).flatten(1)
    expected_text = tokenizer.encode([r["text"] for r in rows], length=32)
    assert int(expected_ids.max()) > 65200 and len(expected_ids.unique()) > 1
    for i in range(20):
        text_ids, image_ids = cache[i]
        assert text_ids.dtype == image_ids.dtype == torch.long
        assert torch.equal(image_ids, expected_ids[i]) and torch.equal(text_ids, expected_text[i])
    assert [c["text"] for c in cache.captions()] == [r["text"] for r in rows]


def test_reused_when_unchanged_and_rebuilt_when_the_data_changes(setup):
    train, vq, _, _ = setup
    build(setup)
    calls = vq.calls
    again = build(setup)
    assert again.reused and vq.calls == calls and len(again) == 20
    with open(train, "a", encoding="utf-8") as f:
        f.write(open(train, encoding="utf-8").readline())
    rebuilt = build(setup)
    assert not rebuilt.reused and len(rebuilt) == 21 and vq.calls > calls


def test_rebuilt_when_the_vqgan_weights_or_tokenizer_or_settings_change(setup, tmp_path):
    train, vq, tokenizer, cache_dir = setup
    first = build(setup)
    old_ids = torch.from_numpy(first.image_ids[:].astype("int64"))
    with torch.no_grad():
        vq.codebook.mul_(-1.0)
    after_weights = build(setup)
    assert not after_weights.reused
    assert not torch.equal(torch.from_numpy(after_weights.image_ids[:].astype("int64")), old_ids)
    assert build(setup).reused
    other_tokenizer = TextTokenizer.train([row.text for row in iter_rows(train)] * 5, tmp_path / "spm2", 360)
    assert not build_token_cache(train, vq, other_tokenizer, cache_dir, 16, text_len=32, progress=False).reused
    with pytest.warns(UserWarning, match=r"\d+ of 20 captions were longer than text_len=8"):
        shorter = build_token_cache(train, vq, other_tokenizer, cache_dir, 16, text_len=8, progress=False)
    assert not shorter.reused and shorter.text_ids.shape == (20, 8)


def test_a_failed_build_leaves_no_cache_and_no_temp_files(setup):
    train, vq, tokenizer, cache_dir = setup
    build(setup)

    class Crashes(StandInVQ):
        def encode(self, x):
            if self.calls == 1:
                raise RuntimeError("killed mid-build")
            return super().encode(x)

    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_token_cache(train, Crashes(seed=1), tokenizer, cache_dir, 16, text_len=32, batch_size=8, progress=False)
    assert not os.path.exists(os.path.join(cache_dir, "meta.json"))  # the old cache no longer counts
    assert not [name for name in os.listdir(cache_dir) if ".tmp" in name]
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        TokenCache(cache_dir)
    assert not build(setup).reused


def test_a_damaged_cache_is_rebuilt(setup):
    build(setup)
    with open(os.path.join(setup[3], "image_ids.u16"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="image_ids.u16 is missing or not 640 bytes"):
        TokenCache(setup[3])
    repaired = build(setup)
    assert not repaired.reused and len(repaired) == 20


def test_cache_loads_memory_mapped_in_dataloader_workers(setup):
    cache = build(setup)
    reopened = TokenCache(setup[3])
    assert json.load(open(os.path.join(setup[3], "meta.json")))["num_rows"] == 20
    batches = list(DataLoader(reopened, batch_size=5, num_workers=2))
    text_ids = torch.cat([b[0] for b in batches])
    image_ids = torch.cat([b[1] for b in batches])
    assert torch.equal(image_ids, torch.from_numpy(cache.image_ids[:].astype("int64")))
    assert torch.equal(text_ids, torch.from_numpy(cache.text_ids[:].astype("int64")))


def test_ids_that_do_not_fit_uint16_are_rejected(setup):
    train, vq, tokenizer, cache_dir = setup
    vq.id_offset.fill_(65500)  # no codebook_size: the cache cannot know it needs wider ids
    with pytest.raises(ValueError, match="outside \\[0, 65535\\]"):
        build(setup)


def test_a_codebook_of_more_than_65536_codes_is_stored_as_uint32(setup):
    train, vq, tokenizer, cache_dir = setup
    vq.codebook_size = 2**18
    vq.id_offset.fill_(2**18 - 300)  # ids up to 262143: uint16 would wrap them
    cache = build(setup)
    assert cache.meta["image_ids_dtype"] == "uint32" and cache.image_ids.dtype == "uint32"
    assert sorted(os.listdir(cache_dir)) == ["captions.jsonl", "image_ids.u32", "meta.json", "text_ids.i32"]
    rows = list(TSVImageText(train, resolution=16))
    expected = vq.encode(torch.stack([r["image"] for r in rows])).flatten(1)
    assert int(expected.max()) > 2**17
    assert torch.equal(torch.stack([cache[i][1] for i in range(len(cache))]), expected)
    assert build(setup).reused  # and it reopens as uint32
    vq.codebook_size = 65536  # the boundary: 65536 codes (ids <= 65535) still fit uint16
    vq.id_offset.fill_(65000)
    assert build(setup).image_ids.dtype == "uint16"
    assert "image_ids.u32" not in os.listdir(cache_dir)  # the wider ids of the previous build are gone


def test_skipped_bad_rows_are_recorded(setup):
    train, vq, tokenizer, cache_dir = setup
    with open(train, "a", encoding="utf-8") as f:
        f.write("bad\t\tAAAA\n")
    with pytest.raises(ValueError, match=r"train\.tsv:21: empty text"):
        build(setup)
    cache = build(setup, bad_rows="skip")
    assert len(cache) == 20 and cache.meta["bad_rows_skipped"] == 1
