"""The caption direction of the GPT (image -> text) and the GPT that learns both directions: masks, losses, the
direction embedding, cached == uncached caption decoding, learning to name a colour, refused directions."""
import pytest
import torch
from PIL import Image

from tokenpaint import Pipeline
from tokenpaint.data import TextTokenizer, pil_to_tensor
from tokenpaint.sampling import SampleOptions, sample_autoregressive, sample_caption
from tokenpaint.transformer import GPT, GPTConfig, caption_targets, load_generator, model_config_from_yaml, preset_config
from tokenpaint.vqgan import VQGAN, VQGANConfig

from tiny_generators import CODES, SIDE, TEXT_LEN, TEXT_VOCAB, random_batch, tiny_gpt

N = SIDE * SIDE


def padded_text(batch=3, seed=1):
    """Captions of 2..4 ids then padding (0), like the tokenizer writes them."""
    text, _ = random_batch(batch, seed)
    for row, length in enumerate((2, 4, 3)[:batch]):
        text[row, length:] = 0
    return text


def test_caption_targets_keep_the_caption_and_its_end_only():
    text = torch.tensor([[5, 6, 0, 0, 0, 0], [5, 6, 7, 8, 9, 4], [3, 0, 0, 0, 0, 0]])
    assert caption_targets(text).tolist() == [[5, 6, 0, -100, -100, -100], [5, 6, 7, 8, 9, 4],
                                              [3, 0, -100, -100, -100, -100]]


def test_i2t_logits_predict_text_from_the_image_and_earlier_text_only():
    model = tiny_gpt(directions=["i2t"])
    text, image = padded_text(), random_batch()[1]
    logits, _ = model(text, image, direction="i2t")
    assert logits.shape == (3, TEXT_LEN, TEXT_VOCAB)
    for j in (0, 2, TEXT_LEN - 1):  # a later text id never changes earlier logits, and moves the next one
        changed = text.clone()
        changed[:, j] = (changed[:, j] + 1) % TEXT_VOCAB
        logits2, _ = model(changed, image, direction="i2t")
        torch.testing.assert_close(logits2[:, : j + 1], logits[:, : j + 1], atol=0, rtol=0)
        if j + 1 < TEXT_LEN:
            assert not torch.allclose(logits2[:, j + 1], logits[:, j + 1])
    changed_image = image.clone()
    changed_image[:, -1] = (changed_image[:, -1] + 1) % CODES  # the last image id conditions every text position
    other, _ = model(text, changed_image, direction="i2t")
    assert (other - logits).abs().amax(dim=-1).min() > 0


def test_i2t_loss_is_cross_entropy_over_the_caption_positions_only():
    model = tiny_gpt(directions=["i2t"])
    text, image = padded_text(), random_batch()[1]
    targets = caption_targets(text)
    logits, loss = model(text, image, targets=targets, direction="i2t")
    counted = targets != -100
    assert counted.sum() == 2 + 1 + 4 + 1 + 3 + 1  # caption ids plus one end (padding) id per row
    manual = torch.nn.functional.cross_entropy(logits[counted], text[counted])
    torch.testing.assert_close(loss, manual)
    # padding after the end carries no loss: changing those logits' targets is ignored
    text_more_pad = text.masked_fill(~counted, 0)
    assert torch.equal(caption_targets(text_more_pad), targets)


def test_one_direction_models_keep_their_weights_and_both_share_all_but_the_direction_embedding():
    t2i, i2t, both = (set(tiny_gpt(directions=d).state_dict()) for d in (["t2i"], ["i2t"], ["t2i", "i2t"]))
    assert not any(k.startswith(("text_head", "direction_embedding")) for k in t2i)  # old runs load unchanged
    assert "head.weight" not in i2t and "text_head.weight" in i2t
    assert both == t2i | i2t | {"direction_embedding.weight"}
    both_model = tiny_gpt(directions=["i2t", "t2i"])  # any order: canonical
    assert both_model.config.directions == ["t2i", "i2t"]


def test_the_direction_embedding_tells_the_shared_trunk_which_task_it_runs():
    model = tiny_gpt(directions=["t2i", "i2t"])
    text, image = random_batch()
    a, _ = model(text, image, direction="t2i")
    with torch.no_grad():
        model.direction_embedding.weight[0] += 1.0  # the t2i row
    b, _ = model(text, image, direction="t2i")
    c, _ = model(text, image, direction="i2t")
    with torch.no_grad():
        model.direction_embedding.weight[0] -= 1.0
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(text, image, direction="i2t")[0], c)  # the i2t row untouched


@pytest.mark.parametrize("directions", [["i2t"], ["t2i", "i2t"]])
def test_cached_caption_steps_equal_the_full_forward_pass(directions):
    model = tiny_gpt(directions=directions)
    text, image = padded_text(), random_batch()[1]
    full, _ = model(text, image, direction="i2t")
    logits, cache = model.prefill_caption(image)
    steps = [logits]
    for pos in range(TEXT_LEN - 1):
        logits, cache = model.decode_caption_step(text[:, pos], pos, cache)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"pos must be in \[0, 4\]"):  # the last text id predicts nothing
        model.decode_caption_step(text[:, 0], TEXT_LEN - 1, cache)
    _, t2i_cache = model.prefill_caption(image, max_len=N + 1)
    model.decode_caption_step(text[:, 0], 0, t2i_cache)
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_caption_step(text[:, 1], 1, t2i_cache)


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_cached_caption_decoding_equals_uncached(temperature, top_k):
    model = tiny_gpt(directions=["t2i", "i2t"])
    _, image = random_batch(batch=4)
    runs = []
    for cached in (True, False):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
        runs.append(sample_caption(model, image, temperature=temperature, top_k=top_k, generator=gens,
                                   use_kv_cache=cached))
    assert runs[0].shape == (4, TEXT_LEN)
    assert torch.equal(runs[0], runs[1])
    for row in runs[0].tolist():  # padding only after the end
        if 0 in row:
            assert all(t == 0 for t in row[row.index(0):])


def test_greedy_caption_is_the_argmax_chain_and_max_length_caps_it():
    model = tiny_gpt(directions=["i2t"])
    _, image = random_batch(batch=2)
    ids = sample_caption(model, image, max_length=3)
    assert ids.shape == (2, 3)
    logits, _ = model.prefill_caption(image)
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    with pytest.raises(ValueError, match="max_length"):
        sample_caption(model, image, max_length=TEXT_LEN + 1)
    with pytest.raises(ValueError, match="temperature"):
        sample_caption(model, image, temperature=-1.0)


def test_refused_directions_say_what_the_model_was_trained_for():
    t2i, captioner = tiny_gpt(), tiny_gpt(directions=["i2t"])
    text, image = random_batch()
    with pytest.raises(ValueError, match=r"trained for text-to-image only .* cannot do image-to-text"):
        sample_caption(t2i, image)
    with pytest.raises(ValueError, match="cannot do image-to-text"):
        t2i(text, image, direction="i2t")
    with pytest.raises(ValueError, match=r"trained for image-to-text \(captioning\) only .* cannot do text-to-image"):
        sample_autoregressive(captioner, text)
    with pytest.raises(ValueError, match="cannot do text-to-image"):
        captioner(text, image)
    with pytest.raises(ValueError, match="unknown direction 'x2y'"):
        captioner(text, image, direction="x2y")


def test_directions_in_yaml_presets_and_config_errors():
    cfg = {"model": {"preset": "demo_gpt_both"}, "tokenizer": {"vocab_size": 400}, "source": "x.yaml"}
    config = model_config_from_yaml(cfg, codebook_size=64, image_size=8)
    assert config.directions == ["t2i", "i2t"] and config.n_embd == 96
    assert preset_config("captioner_base", codebook_size=64).directions == ["i2t"]
    for bad in ([], ["t2i", "t2i"], ["image"], "i2t"):
        with pytest.raises(ValueError, match="directions"):
            GPTConfig(directions=bad)
    with pytest.raises(ValueError, match="unknown keys"):
        model_config_from_yaml({"model": {"kind": "mim", "directions": ["i2t"]}, "source": "m.yaml"},
                               text_vocab_size=40, codebook_size=24, image_size=4)


def test_save_and_load_keep_the_directions(tmp_path):
    model = tiny_gpt(directions=["t2i", "i2t"])
    model.save_pretrained(tmp_path)
    loaded = load_generator(tmp_path)
    assert loaded.config.directions == ["t2i", "i2t"]
    text, image = random_batch()
    torch.testing.assert_close(loaded(text, image, direction="i2t")[0], model(text, image, direction="i2t")[0])


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 210, 20)}


@pytest.fixture(scope="module")
def colour_pipeline(tmp_path_factory):
    """A tiny captioner trained (in-process, 150 steps) to name the colour of one-colour images, as a Pipeline."""
    root = tmp_path_factory.mktemp("colours")
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(embed_dim=8, n_embed=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, resolution=16)).eval()  # random f4: 4x4 ids
    captions = [f"a {name} picture" for name in COLOURS] * 8
    tokenizer = TextTokenizer.train(captions, root / "spm" / "tok", vocab_size=300)
    images = {name: Image.new("RGB", (16, 16), rgb) for name, rgb in COLOURS.items()}
    with torch.no_grad():
        ids = torch.cat([vqgan.encode(pil_to_tensor(im)[None]).flatten(1) for im in images.values()])  # [4, 16]
    text = tokenizer.encode([f"a {name} picture" for name in COLOURS], length=TEXT_LEN)
    model = GPTConfig(text_vocab_size=tokenizer.vocab_size, text_len=TEXT_LEN, codebook_size=32, image_size=4,
                      n_layer=2, n_head=2, n_embd=32, directions=["i2t"])
    torch.manual_seed(0)
    gpt = GPT(model).train()
    opt = gpt.configure_optimizers(weight_decay=0.0, lr=3e-3)
    for _ in range(150):
        _, loss = gpt(text, ids, targets=caption_targets(text), direction="i2t")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Pipeline(gpt.eval(), tokenizer, vqgan.eval()), images, float(loss.detach())


def test_a_tiny_captioner_learns_to_name_the_colour_of_a_one_colour_image(colour_pipeline):
    pipe, images, loss = colour_pipeline
    assert loss < 0.05
    captions = pipe.caption(list(images.values()))  # greedy
    assert captions == [f"a {name} picture" for name in images]
    # sampled captions: one per seed, reproducible, image-major
    sampled = pipe.caption([images["red"], images["blue"]], num_captions=2, seed=3, temperature=1.0)
    assert len(sampled) == 4 and sampled == pipe.caption([images["red"], images["blue"]], num_captions=2, seed=3,
                                                         temperature=1.0)
    assert pipe.caption(images["green"], max_length=2) == ["a green"]
    # a caption call's defaults are the pipeline's caption_* sampler options (a run's `sample:` section)
    short = Pipeline(pipe.model, pipe.tokenizer, pipe.vqgan, SampleOptions(caption_max_length=2))
    assert short.caption(images["green"]) == ["a green"] and short.caption(images["green"], max_length=3) == \
        ["a green picture"]
    hot = Pipeline(pipe.model, pipe.tokenizer, pipe.vqgan, SampleOptions(caption_temperature=1.0))
    assert hot.caption(images["red"], num_captions=2, seed=3) == pipe.caption(images["red"], num_captions=2, seed=3,
                                                                               temperature=1.0)


def test_pipeline_refuses_the_direction_it_was_not_trained_for(colour_pipeline):
    pipe, images, _ = colour_pipeline
    with pytest.raises(ValueError, match="cannot do text-to-image"):
        pipe(["a red picture"])
    model = GPTConfig(text_vocab_size=pipe.tokenizer.vocab_size, text_len=TEXT_LEN, codebook_size=32, image_size=4,
                      n_layer=1, n_head=2, n_embd=32)
    t2i = Pipeline(GPT(model).eval(), pipe.tokenizer, pipe.vqgan)
    with pytest.raises(ValueError, match="cannot do image-to-text"):
        t2i.caption(images["red"])
    with pytest.raises(ValueError, match="temperature"):
        pipe.caption(images["red"], temperature=-0.5)
    with pytest.raises(ValueError, match="images must hold"):
        pipe.caption([])


def test_a_yaml_with_bad_directions_names_the_file_and_key(tmp_path):
    from tokenpaint.transformer import load_transformer_yaml

    good = tmp_path / "good.yaml"
    good.write_text("model:\n  kind: gpt\n  directions: [i2t, t2i]\n", encoding="utf-8")
    assert load_transformer_yaml(good)["model"]["directions"] == ["i2t", "t2i"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: gpt\n  directions: [i2t, image]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.yaml.*line 3.*directions"):
        load_transformer_yaml(bad)
