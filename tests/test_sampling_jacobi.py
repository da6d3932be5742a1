"""Speculative Jacobi decoding: the same distribution as one-token sampling, greedy parity, the cache after rejections."""
import itertools
import math

import pytest
import torch

from tiny_generators import CODES, SIDE, TEXT_LEN, TEXT_VOCAB, random_batch, tiny_gpt
from tokenpaint.sampling import sample_autoregressive
from tokenpaint.sampling.filters import filtered_probs
from tokenpaint.sampling.guidance import prepare_text_pair, split_guidance
from tokenpaint.sampling.jacobi import JacobiDecoder


def sharpened_gpt(seed=0, **overrides):
    model = tiny_gpt(seed, **overrides)
    with torch.no_grad():  # at init the logits are near uniform: make them depend on the context
        model.head.weight.mul_(40)
        model.embed.image_tok.weight.mul_(20)
    return model


def generators(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.mark.parametrize("window", [2, 4, 16])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_top_k_1_equals_greedy(window, guidance):
    model = sharpened_gpt()
    text, _ = random_batch(batch=3)
    greedy = sample_autoregressive(model, text, top_k=1, guidance_scale=guidance, generator=generators(3))
    jacobi = sample_autoregressive(model, text, top_k=1, guidance_scale=guidance, generator=generators(3, 7),
                                   jacobi_window=window)
    assert torch.equal(jacobi, greedy)


def chi_square_limit(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def exact_sequence_probs(model, text, negative, scale, **sampling):
    """Probability of each of the V^N sequences under one-token sampling (guided, tempered, filtered)."""
    seqs = torch.tensor(list(itertools.product(range(model.config.codebook_size),
                                               repeat=model.config.num_image_tokens)))
    text_in = prepare_text_pair(text.expand(len(seqs), -1), negative.expand(len(seqs), -1), True)
    logits, _ = model(text_in, torch.cat([seqs, seqs]))
    probs = filtered_probs(split_guidance(logits, scale, True), **sampling)  # [S, N, V]
    return seqs, probs.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=-1)


@torch.inference_mode()
def test_sequence_distribution_matches_one_token_sampling():
    # 3 codes, 2x2 tokens: 81 possible images, enumerable; guidance with a negative prompt, temperature and top-p
    model = sharpened_gpt(seed=3, codebook_size=3, image_size=2)
    g = torch.Generator().manual_seed(5)
    text = torch.randint(1, TEXT_VOCAB, (1, TEXT_LEN), generator=g)
    negative = torch.randint(1, TEXT_VOCAB, (1, TEXT_LEN), generator=g)
    sampling = dict(temperature=0.9, top_k=None, top_p=0.95)
    seqs, exact = exact_sequence_probs(model, text, negative, 2.0, **sampling)
    index = {tuple(s.tolist()): i for i, s in enumerate(seqs)}
    rows = 2000
    counts = {}
    for name, window in (("one-token", 1), ("jacobi", 3)):
        c = torch.zeros(len(seqs))
        for seed in range(3):  # fixed seed set
            ids = sample_autoregressive(model, text.expand(rows, -1), negative_text_ids=negative, guidance_scale=2.0,
                                        generator=torch.Generator().manual_seed(100 + seed), jacobi_window=window,
                                        **sampling)
            for row in ids.tolist():
                c[index[tuple(row)]] += 1
        counts[name] = c
    total = 3 * rows
    expected = exact * total
    assert counts["jacobi"][exact == 0].sum() == 0  # nothing outside the top-p support
    big = expected >= 5  # pool the rare sequences into one cell
    for name, c in counts.items():
        observed = torch.cat([c[big], c[~big].sum(dim=0, keepdim=True)])
        wanted = torch.cat([expected[big], expected[~big].sum(dim=0, keepdim=True)])
        keep = wanted > 0
        stat = (((observed - wanted) ** 2 / wanted)[keep]).sum().item()
        assert stat < chi_square_limit(int(keep.sum()) - 1), (name, stat)


@torch.inference_mode()
def test_cache_after_rejections_equals_fresh_prefill():
    model = sharpened_gpt(seed=1, image_size=6)  # 36 tokens
    text, _ = random_batch(batch=3)
    use_guidance, scale = True, 2.0
    text_in = prepare_text_pair(text, None, use_guidance)
    decoder = JacobiDecoder(model, text_in, torch.zeros(3, 0, dtype=torch.long), window=5, use_guidance=True,
                            guidance_scale=scale, temperature=1.0, top_k=None, top_p=None, generator=generators(3))
    rejections = 0
    while decoder.start < 24:
        before = decoder.accepted.clone()
        decoder.step()
        rejections += int(((decoder.accepted - before) < decoder.window).sum())
    assert rejections > 0 and len(set(decoder.accepted.tolist())) > 1  # rows accepted different lengths
    held = model.config.text_len + decoder.start - 1
    accepted = decoder.ids[:, : decoder.start - 1]
    _, fresh = model.prefill(text_in, image_prefix=torch.cat([accepted, accepted]))
    torch.testing.assert_close(decoder.cache.k[:, :, :, :held], fresh.k[:, :, :, :held], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decoder.cache.v[:, :, :, :held], fresh.v[:, :, :, :held], atol=1e-5, rtol=1e-4)


def test_fewer_passes_and_each_image_independent_of_its_batch():
    model = sharpened_gpt(seed=2)
    text, _ = random_batch(batch=3)
    batch = sample_autoregressive(model, text, top_k=4, temperature=0.5, generator=generators(3), jacobi_window=6)
    alone = sample_autoregressive(model, text[1:2], top_k=4, temperature=0.5, generator=generators(1, 1),
                                  jacobi_window=6)
    assert torch.equal(batch[1:2], alone)
    with torch.no_grad():  # image tokens that barely depend on each other: the drafts are mostly accepted
        model.embed.image_tok.weight.mul_(0.01)
    decoder = JacobiDecoder(model, text, torch.zeros(3, 0, dtype=torch.long), window=6, use_guidance=False,
                            guidance_scale=1.0, temperature=0.5, top_k=4, top_p=None, generator=generators(3))
    decoder.run()
    assert decoder.forward_passes <= SIDE * SIDE // 2


def test_editing_keeps_known_tokens_and_prefix():
    model = sharpened_gpt()
    text, image = random_batch(batch=2)
    known = torch.rand(SIDE * SIDE, generator=torch.Generator().manual_seed(0)) < 0.5
    ids = sample_autoregressive(model, text, init_ids=image, known_mask=known, guidance_scale=2.0, top_p=0.9,
                                generator=generators(2), jacobi_window=4)
    assert torch.equal(ids[:, known], image[:, known])
    cont = sample_autoregressive(model, text, prefix_ids=image[:, :5], generator=generators(2), jacobi_window=4)
    assert torch.equal(cont[:, :5], image[:, :5]) and cont.shape == (2, SIDE * SIDE) and cont.max() < CODES


def test_bad_window_is_refused():
    model = tiny_gpt()
    text, _ = random_batch(batch=1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="jacobi_window"):
            sample_autoregressive(model, text, jacobi_window=bad)
    with pytest.raises(ValueError, match="KV cache"):
        sample_autoregressive(model, text, jacobi_window=4, use_kv_cache=False)


def test_pipeline_sample_config_and_cli_reach_the_decoder(tmp_path, monkeypatch, capsys):
    import sys
    from pathlib import Path

    from test_pipeline import CAPTIONS, build_run, tiny_vqgan
    from tokenpaint import Pipeline
    from tokenpaint.data import TextTokenizer
    from tokenpaint.sampling import autoregressive

    windows = []

    class Recording(JacobiDecoder):
        def __init__(self, *args, **kwargs):
            windows.append(kwargs["window"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(autoregressive, "JacobiDecoder", Recording)
    tokenizer = TextTokenizer.train(CAPTIONS, tmp_path / "spm" / "tok", vocab_size=400)
    run = build_run(tmp_path, "gpt", tokenizer, tiny_vqgan(), sample={"jacobi_window": 3, "top_k": 1})
    pipe = Pipeline.from_pretrained(run)
    assert pipe.options.jacobi_window == 3
    jacobi = pipe.generate_ids(["a red circle"], num_images=2, seed=0)
    assert windows == [3]
    assert torch.equal(jacobi, pipe.generate_ids(["a red circle"], num_images=2, seed=0, jacobi_window=1))  # greedy
    with pytest.raises(ValueError, match="jacobi_window"):
        pipe.generate_ids(["a red circle"], jacobi_window=0)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate

    assert generate.main(["--model", str(run), "--prompt", "a red circle", "--jacobi-window", "5",
                          "--out-dir", str(tmp_path / "out")]) == 0
    assert windows[-1] == 5
    with pytest.raises(SystemExit):
        generate.main(["--model", str(run), "--prompt", "x", "--jacobi-window", "4", "--no-kv-cache"])
    assert "--jacobi-window" in capsys.readouterr().err


def test_on_step_reports_the_tokens_every_row_has():
    model = sharpened_gpt()
    text, _ = random_batch(batch=3)
    reported = []
    sample_autoregressive(model, text, generator=generators(3), jacobi_window=4,
                          on_step=lambda done, total: reported.append((done, total)))
    n = SIDE * SIDE
    assert reported[-1] == (n, n) and all(total == n for _, total in reported)
    done = [d for d, _ in reported]
    assert done == sorted(done) and len(done) < n  # a pass gains at least one token, often more
