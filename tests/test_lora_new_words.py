"""LoRA adapters that add words to the tokenizer: one new piece each, new text-embedding rows, exact unload."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from test_pipeline import CAPTIONS, build_run, tiny_vqgan
from tiny_generators import TEXT_VOCAB, random_batch, tiny_gpt, tiny_mim
from tokenpaint import Pipeline
from tokenpaint.data import TextTokenizer, caption, random_attributes
from tokenpaint.transformer import load_generator
from tokenpaint.transformer.lora import LORA_CONFIG, LORA_WEIGHTS, LoRAAdapter, LoRASet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402  (the script at the repo root)

NEW = ["zorbly", "佐布色"]  # a made-up colour word in English and in Chinese
SHORT = ["a red circle", "blue square", "一个大的红色圆形", "蓝色的天空", ""]  # within the tiny run's 8 text ids


def logits(model, text, image):
    with torch.no_grad():
        return model(text, image)[0]


def with_rows(adapter, seed, layers=True):
    """Random new rows (and B, unless layers=False), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.new_rows.copy_(torch.randn(adapter.new_rows.shape, generator=g))
        for p in adapter.lora_B.values() if layers else ():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


# ----------------------------------------------------------------------------- the tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [caption(random_attributes(rng), lang, rng) for _ in range(300) for lang in ("en", "zh")]
    return TextTokenizer.train(texts + CAPTIONS, tmp_path_factory.mktemp("spm") / "tok", vocab_size=400)


def test_a_new_word_becomes_one_piece_and_other_texts_keep_their_ids(tokenizer):
    assert len(tokenizer.pieces("a zorbly circle")) > 4  # the base has no piece for it: bytes and letters
    extended = tokenizer.with_words(NEW)
    v = tokenizer.vocab_size
    assert extended.vocab_size == v + 2 and extended.added_words == tuple(NEW)
    assert extended.pieces("a zorbly circle") == ["▁a", "▁", "zorbly", "▁circle"]  # the word is one id
    ids = extended.encode(["a zorbly circle", "一个大的佐布色圆形"], length=8)
    assert (ids[0] == v).sum() == 1 and (ids[1] == v + 1).sum() == 1
    assert extended.decode(ids) == ["a zorbly circle", "一个大的佐布色圆形"]
    rng = np.random.default_rng(1)  # texts without the words: exactly the base's ids
    texts = CAPTIONS + [caption(random_attributes(rng), lang, rng) for _ in range(200) for lang in ("en", "zh")]
    texts += ["zorb ly", "Zorbly", "佐布", "色", "ZORBLY circle", "x" * 50, "😀 emoji"]
    assert torch.equal(extended.encode(texts, length=64, warn=False), tokenizer.encode(texts, length=64, warn=False))
    saved = TextTokenizer(extended.save(tokenizer.model_file.rsplit("/", 1)[0] + "/ext"))
    assert saved.vocab_size == v + 2 and torch.equal(saved.encode(texts[:5] + ["a zorbly circle"]),
                                                     extended.encode(texts[:5] + ["a zorbly circle"]))


def test_bad_new_words_are_refused_naming_the_word(tokenizer):
    for words, message in ((["circle"], "'circle' is already a piece of the tokenizer \\('▁circle'"),
                           ([""], "an empty word"), (["  "], "an empty word"), (["zor bly"], "holds a space"),
                           (["<unk>"], "already a piece"), (["zorbly", "zorbly"], "given twice")):
        with pytest.raises(ValueError, match=message):
            tokenizer.with_words(words)
    with pytest.raises(ValueError, match="'zorbly' is already a piece"):
        tokenizer.with_words(["zorbly"]).with_words(["zorbly"])


# ----------------------------------------------------------------------------- the model: rows, fuse, unload


@pytest.mark.parametrize("make", [tiny_gpt, tiny_mim])
def test_new_rows_fuse_and_unload_restore_table_and_weights_exactly(make):
    model, (text, image) = make(), random_batch()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_config = model.config
    before = logits(model, text, image)
    lora = LoRASet(model)
    adapter = with_rows(LoRAAdapter.create(model, rank=2, targets=["attn"], new_words={"zorbly": TEXT_VOCAB}), 0,
                        layers=False)
    lora.add(adapter, 0.8, "a")
    assert model.embed.text_tok.weight.shape[0] == model.config.text_vocab_size == TEXT_VOCAB + 1
    assert torch.equal(logits(model, text, image), before)  # B = 0 and no new id in the text: the base exactly
    new_text = text.clone()
    new_text[:, 2] = TEXT_VOCAB
    at_08 = logits(model, new_text, image)
    lora.set_scale("a", 0.0)  # B = 0 here: only the new row acts, and it does not scale
    assert torch.equal(logits(model, new_text, image), at_08)
    lora.set_scale("a", 0.8)
    with_rows(adapter, 1)
    hooked = logits(model, new_text, image)
    old_word = new_text.clone()
    old_word[:, 2] = 5
    assert not torch.allclose(hooked[:, -1], logits(model, old_word, image)[:, -1], atol=1e-3)
    lora.fuse()
    assert torch.allclose(logits(model, new_text, image), hooked, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.embed.text_tok.weight[TEXT_VOCAB], adapter.new_rows[0])  # unscaled: its own row
    lora.unload()
    assert model.config is base_config and model.embed.text_tok.num_embeddings == TEXT_VOCAB
    assert model.state_dict().keys() == base_state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key  # bit for bit, the table's shape included
    with pytest.raises(ValueError, match=f"in \\[0, {TEXT_VOCAB}\\)"):
        model(new_text, image)


def test_two_adapters_with_new_words_share_the_table_and_one_word_cannot_come_twice(tmp_path):
    model, (text, image) = tiny_mim(), random_batch()
    a = with_rows(LoRAAdapter.create(model, rank=2, targets=["attn"], new_words={"zorbly": TEXT_VOCAB}), 0)
    b = with_rows(LoRAAdapter.create(model, rank=2, targets=["mlp"], new_words={"blorp": TEXT_VOCAB}), 1)
    a.save(tmp_path / "a")
    lora = LoRASet(model)
    lora.add(a, 1.0, "a")
    with pytest.raises(ValueError, match="taken"):  # b's file says the same id: the loader must move it
        lora.add(b, 1.0, "b")
    b.assign_new_ids([TEXT_VOCAB + 1])
    lora.add(b, 1.0, "b")
    assert model.embed.text_tok.num_embeddings == TEXT_VOCAB + 2
    text[:, 1], text[:, 2] = TEXT_VOCAB, TEXT_VOCAB + 1
    hooked = logits(model, text, image)
    lora.fuse()
    assert torch.equal(model.embed.text_tok.weight[TEXT_VOCAB + 1], b.new_rows[0])
    assert torch.allclose(logits(model, text, image), hooked, atol=1e-5, rtol=1e-5)
    again = LoRAAdapter.load(tmp_path / "a")
    again.assign_new_ids([TEXT_VOCAB + 2])
    with pytest.raises(ValueError, match=f"LoRA 'a2' \\({tmp_path / 'a'}\\) and LoRA 'a' .* both add the word 'zorbly'"):
        lora.add(again, 1.0, "a2")
    with pytest.raises(ValueError, match="text head has no rows for new words"):
        LoRASet(tiny_gpt(directions=["t2i", "i2t"])).add(
            LoRAAdapter.create(tiny_gpt(directions=["t2i", "i2t"]), 2, new_words={"zorbly": TEXT_VOCAB}), 1.0, "c")


def test_adapter_file_holds_adapter_tensors_and_the_new_rows(tmp_path):
    model = tiny_mim()
    adapter = with_rows(LoRAAdapter.create(model, rank=2, targets=["qkv"], text_ids=[3], words=["red"],
                                           new_words={"zorbly": TEXT_VOCAB, "佐布色": TEXT_VOCAB + 1}), 2)
    adapter.save(tmp_path / "run")
    tensors = load_file(str(tmp_path / "run" / LORA_WEIGHTS))
    assert set(tensors) == {*(f"{layer}.lora_{ab}" for layer in adapter.config.layers for ab in "AB"),
                            "text_embedding.ids", "text_embedding.delta", "text_embedding.new_rows"}
    assert tensors["text_embedding.new_rows"].shape == (2, model.config.n_embd)
    meta = json.loads((tmp_path / "run" / LORA_CONFIG).read_text(encoding="utf-8"))
    assert meta["new_words"] == {"zorbly": TEXT_VOCAB, "佐布色": TEXT_VOCAB + 1} and meta["words"] == ["red"]
    loaded = LoRAAdapter.load(tmp_path / "run")
    assert loaded.new_words == ["zorbly", "佐布色"] and loaded.new_ids.tolist() == [TEXT_VOCAB, TEXT_VOCAB + 1]
    assert torch.equal(loaded.new_rows, adapter.new_rows)
    del tensors["text_embedding.new_rows"]
    save_file(tensors, str(tmp_path / "run" / LORA_WEIGHTS))
    with pytest.raises(ValueError, match="text_embedding.new_rows"):
        LoRAAdapter.load(tmp_path / "run")


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora_words")
    run = build_run(root, "mim", tokenizer, tiny_vqgan(), sample={"steps": 3, "guidance_scale": 2.0})
    model = load_generator(run)
    v = tokenizer.vocab_size
    adapters = {}
    for name, words, seed in (("zorbly", {"zorbly": v, "佐布色": v + 1}, 0), ("blorp", {"blorp": v}, 1),
                              ("same", {"zorbly": v}, 2), ("known", {"circle": v}, 3)):
        adapter = with_rows(LoRAAdapter.create(model, rank=2, targets=["attn"], new_words=words), seed)
        adapters[name] = adapter.save(root / name)
    return {"run": run, **adapters}


def test_pipeline_load_extends_the_tokenizer_and_unload_restores_it(runs, tokenizer):
    pipe = Pipeline.from_pretrained(runs["run"])
    base_tokenizer, base_state = pipe.tokenizer, {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base_ids = pipe.generate_ids(SHORT[:2], seed=1)
    v = tokenizer.vocab_size
    pipe.load_lora(runs["zorbly"], scale=0.8)
    assert pipe.tokenizer.added_words == ("zorbly", "佐布色")
    assert pipe.encode_text(["a zorbly circle"])[0, :4].tolist()[2] == v
    assert torch.equal(pipe.encode_text(SHORT), base_tokenizer.encode(SHORT, length=8))
    assert pipe.generate_ids(["a large zorbly circle"], seed=1).shape == (1, 4, 4)
    pipe.load_lora(runs["blorp"], scale=0.5)  # its file says id v too: it gets the next free one
    assert pipe.encode_text(["blorp zorbly"])[0, :4].tolist() == [tokenizer.sp.piece_to_id("▁"), v + 2,
                                                                  tokenizer.sp.piece_to_id("▁"), v]
    with pytest.raises(ValueError, match="LoRA 'same' .* and LoRA 'zorbly' .* both add the word 'zorbly'"):
        pipe.load_lora(runs["same"])
    assert pipe.tokenizer.vocab_size == v + 3 and pipe.loras == {"zorbly": 0.8, "blorp": 0.5}
    with torch.no_grad():
        text, image = pipe.encode_text(["a blorp zorbly square"]), torch.zeros(1, 16, dtype=torch.long)
        hooked = pipe.model(text, image)[0]
        pipe.fuse_lora()  # keeps the words
        assert pipe.tokenizer.vocab_size == v + 3
        assert torch.allclose(pipe.model(text, image)[0], hooked, atol=1e-5, rtol=1e-5)
    pipe.unload_lora()
    assert pipe.tokenizer is base_tokenizer and pipe.tokenizer.vocab_size == v
    assert pipe.model.state_dict().keys() == base_state.keys()
    for key, value in pipe.model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    assert torch.equal(pipe.generate_ids(SHORT[:2], seed=1), base_ids)
    pipe.load_lora(runs["same"])  # after unload the word is free again
    assert pipe.encode_text(["zorbly"])[0, 1].item() == v
    with pytest.raises(ValueError, match="lora.json new_words: 'circle' is already a piece"):
        pipe.load_lora(runs["known"])  # made for another tokenizer
    assert pipe.loras == {"same": 0.8} and pipe.tokenizer.vocab_size == v + 1


def test_generate_cli_with_a_new_word_adapter(runs, tmp_path):
    for dtype in ("float32", "int8"):  # int8: fused (the grown table included), then quantized
        rc = generate.main(["--model", str(runs["run"]), "--prompt", "a zorbly blorp circle", "--out-dir",
                            str(tmp_path / dtype), "--lora", f"{runs['zorbly']}:0.9", "--lora", str(runs["blorp"]),
                            "--dtype", dtype])
        assert rc == 0 and (tmp_path / dtype / "0_0.png").is_file()
