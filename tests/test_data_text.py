"""Caption tokenizer: CJK/mixed round trips, byte fallback, the empty prompt, truncation, training edge cases."""

import pickle
import warnings

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tokenpaint.data import NULL_TEXT_ID, TextTokenizer, caption, random_attributes

MIXED = ["a red 圆形 on the left", "左边 a large blue square", "一个小的 green triangle 在右边"]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    texts = [caption(random_attributes(rng), lang, rng) for _ in range(400) for lang in ("en", "zh")]
    return texts + MIXED * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    return TextTokenizer.train(corpus, tmp_path_factory.mktemp("tok") / "spm", vocab_size=400)


def test_round_trip_english_chinese_and_mixed(tokenizer, corpus):
    texts = corpus[:20] + MIXED
    ids = tokenizer.encode(texts, length=32)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 32)
    assert not (ids == 1).any(), "in-vocabulary text must not produce <unk>"
    assert tokenizer.decode(ids) == texts


def test_byte_fallback_covers_unseen_characters(tokenizer):
    texts = ["a 😀 circle", "龘龘 红色", "Ω ≈ ∞"]
    ids = tokenizer.encode(texts, length=32)
    assert not (ids == 1).any()
    assert tokenizer.decode(ids) == texts
    assert any(piece.startswith("<0x") for piece in tokenizer.pieces("😀"))


def test_content_words_are_single_pieces(tokenizer):
    for word in ("circle", "square", "triangle", "large", "small"):
        assert f"▁{word}" in tokenizer.pieces(f"a {word}")
    text = "左边一个大的红色圆形"
    assert len([piece for piece in tokenizer.pieces(text) if piece != "▁"]) <= len(text) // 2  # not per character


def test_empty_prompt_is_all_null_ids(tokenizer):
    assert NULL_TEXT_ID == 0
    ids = tokenizer.encode(["", "a red circle", "   "], length=8)
    assert torch.equal(ids[0], torch.zeros(8, dtype=torch.long)) and torch.equal(ids[2], ids[0])
    assert (ids[1] != 0).sum() >= 3 and (ids[1, 3:] == 0).all()
    assert tokenizer.decode(ids) == ["", "a red circle", ""]
    assert torch.equal(tokenizer.encode("a red circle", length=8), ids[1:2])


def test_truncation_warns_and_names_the_prompt(tokenizer):
    long_prompt = " ".join(["a large red circle on the left"] * 4)
    with pytest.warns(UserWarning, match=r"prompt 'a large red circle .*' is \d+ tokens, truncated to 6"):
        ids = tokenizer.encode([long_prompt, "a circle"], length=6)
    assert ids.shape == (2, 6) and (ids[0] != 0).all()
    assert torch.equal(ids[0], tokenizer.encode(long_prompt, length=64)[0, :6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode(["a circle"], length=6)  # fits: no warning


def test_decode_accepts_lists_and_rejects_out_of_range(tokenizer):
    ids = tokenizer.encode("a red circle", length=8)
    assert tokenizer.decode(ids[0].tolist()) == ["a red circle"]
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([[5, tokenizer.vocab_size + 3]])


def test_save_load_and_pickle_keep_the_model(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "run")
    assert path == str(tmp_path / "run" / "tokenizer.model")
    copies = (TextTokenizer(path), TextTokenizer.from_pretrained(tmp_path / "run"), pickle.loads(pickle.dumps(tokenizer)))
    for other in copies:
        assert other.vocab_size == tokenizer.vocab_size
        assert torch.equal(other.encode(MIXED), tokenizer.encode(MIXED))


def test_too_large_vocab_shrinks_and_too_small_vocab_explains(tmp_path, caplog):
    texts = ["a red circle", "红色圆形", "a blue square"]
    with caplog.at_level("WARNING"):
        tok = TextTokenizer.train(texts, tmp_path / "tiny", vocab_size=5000)
    assert 256 < tok.vocab_size < 5000
    assert "supports at most" in caplog.text
    assert tok.decode(tok.encode(texts)) == texts
    with pytest.raises(ValueError, match="vocab_size=100 is too small: this corpus needs at least"):
        TextTokenizer.train(texts, tmp_path / "tiny2", vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty texts"):
        TextTokenizer.train(["", "  "], tmp_path / "tiny3", vocab_size=300)


def test_rejects_models_whose_pad_is_not_zero(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle", "a blue square"] * 10),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=15, minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model: pad_id is -1, expected 0"):
        TextTokenizer(tmp_path / "plain.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        TextTokenizer(tmp_path / "missing.model")
