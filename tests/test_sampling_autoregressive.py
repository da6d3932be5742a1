"""Autoregressive sampling against a stand-in GPT whose logits are known, and a tiny real GPT."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tokenpaint.sampling import continue_image, sample_autoregressive
from tokenpaint.sampling.guidance import apply_guidance


class StandInGPT(nn.Module):
    """logits(token i) = T[hash(text)] + P[token i-1] + Q[i]: fixed random tables, so every logit is known.

    forward / prefill / decode_step follow tokenpaint.transformer.GPT's contract; prefill records the text batch.
    """

    def __init__(self, side=3, vocab=6, text_len=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(kind="gpt", image_size=side, codebook_size=vocab, text_len=text_len)
        self.text_table = torch.randn(7, vocab, generator=g) * 2
        self.prev_table = torch.randn(vocab + 1, vocab, generator=g)  # row `vocab` = "no previous token"
        self.pos_table = torch.randn(side * side, vocab, generator=g)
        self.prefill_texts = []

    def logits_at(self, text_ids, prev, pos):
        text_key = (text_ids * torch.arange(1, text_ids.shape[1] + 1)).sum(1) % 7  # [B]
        return self.text_table[text_key] + self.prev_table[prev] + self.pos_table[pos]  # [B, V]

    def forward(self, text_ids, image_ids, targets=None):
        batch, n = image_ids.shape
        start = torch.full((batch, 1), self.config.codebook_size, dtype=torch.long)
        prev = torch.cat([start, image_ids[:, :-1]], dim=1)
        return torch.stack([self.logits_at(text_ids, prev[:, i], i) for i in range(n)], dim=1), None

    def prefill(self, text_ids, image_prefix=None, max_len=None):
        self.prefill_texts.append(text_ids.clone())
        n_prefix = 0 if image_prefix is None else image_prefix.shape[1]
        if n_prefix == 0:
            prev = torch.full((text_ids.shape[0],), self.config.codebook_size, dtype=torch.long)
        else:
            prev = image_prefix[:, -1]
        return self.logits_at(text_ids, prev, n_prefix), {"text": text_ids, "next": n_prefix}

    def decode_step(self, token, pos, cache):
        assert pos == cache["next"], "tokens must be fed in order"
        cache["next"] = pos + 1
        return self.logits_at(cache["text"], token, pos + 1), cache


TEXT = torch.tensor([[3, 1, 2, 0], [5, 0, 0, 0]])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def greedy_reference(model, text, scale, uncond_text=None):
    """Greedy decoding written out step by step with the guidance formula."""
    uncond_text = torch.zeros_like(text) if uncond_text is None else uncond_text
    prev = torch.full((text.shape[0],), model.config.codebook_size, dtype=torch.long)
    out = []
    for pos in range(model.config.image_size**2):
        logits = apply_guidance(model.logits_at(text, prev, pos), model.logits_at(uncond_text, prev, pos), scale)
        prev = logits.argmax(-1)
        out.append(prev)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cached_and_uncached_give_identical_ids(guidance_scale):
    model = StandInGPT()
    for seed in range(3):
        kwargs = dict(guidance_scale=guidance_scale, top_k=4, top_p=0.9, temperature=1.3, generator=gen(seed))
        cached = sample_autoregressive(model, TEXT, use_kv_cache=True, **kwargs)
        kwargs["generator"] = gen(seed)
        uncached = sample_autoregressive(model, TEXT, use_kv_cache=False, **kwargs)
        assert cached.shape == (2, 9) and cached.dtype == torch.long
        assert torch.equal(cached, uncached)


def test_deterministic_under_a_seed_and_seed_dependent():
    model = StandInGPT()
    a = sample_autoregressive(model, TEXT, generator=gen(0), top_k=None)
    b = sample_autoregressive(model, TEXT, generator=gen(0), top_k=None)
    c = sample_autoregressive(model, TEXT, generator=gen(1), top_k=None)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_combines_cond_and_uncond_logits():
    model = StandInGPT()
    for scale in (1.0, 2.5, 4.0):
        got = sample_autoregressive(model, TEXT, guidance_scale=scale, top_k=1, generator=gen(0))
        assert torch.equal(got, greedy_reference(model, TEXT, scale))
    # guidance must change something here, or this test could not catch a sampler that ignores it
    assert not torch.equal(greedy_reference(model, TEXT, 4.0), greedy_reference(model, TEXT, 1.0))


def test_no_uncond_branch_at_scale_one_or_zero():
    model = StandInGPT()
    for scale in (1.0, 0.0):
        sample_autoregressive(model, TEXT, guidance_scale=scale, generator=gen(0))
        assert model.prefill_texts[-1].shape[0] == 2
    sample_autoregressive(model, TEXT, guidance_scale=2.0, generator=gen(0))
    assert torch.equal(model.prefill_texts[-1], torch.cat([TEXT, torch.zeros_like(TEXT)]))


def test_negative_prompt_replaces_the_empty_prompt():
    model = StandInGPT()
    negative = torch.tensor([[4, 4, 1, 0]])
    got = sample_autoregressive(model, TEXT, negative_text_ids=negative, guidance_scale=3.0, top_k=1, generator=gen(0))
    assert torch.equal(model.prefill_texts[-1][2:], negative.expand(2, -1))
    expected = greedy_reference(model, TEXT, 3.0, uncond_text=negative.expand(2, -1))
    assert torch.equal(got, expected)
    assert not torch.equal(expected, greedy_reference(model, TEXT, 3.0))


def test_per_row_generators_match_rows_sampled_alone():
    model = StandInGPT()
    batch = sample_autoregressive(model, TEXT, guidance_scale=2.0, generator=[gen(10), gen(11)], top_k=None)
    alone = sample_autoregressive(model, TEXT[1:], guidance_scale=2.0, generator=[gen(11)], top_k=None)
    assert torch.equal(batch[1:], alone)


def test_prefix_is_kept_and_continued_identically_with_and_without_cache():
    model = StandInGPT()
    prefix = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 5]])
    cached = sample_autoregressive(model, TEXT, prefix_ids=prefix, generator=gen(0), top_k=None)
    uncached = sample_autoregressive(model, TEXT, prefix_ids=prefix, generator=gen(0), top_k=None, use_kv_cache=False)
    assert torch.equal(cached[:, :4], prefix) and torch.equal(cached, uncached)
    # continue_image keeps whole token rows (3 per row here)
    init = torch.arange(18).reshape(2, 3, 3) % 6
    out = continue_image(model, TEXT, init, keep_rows=1, generator=gen(0))
    assert torch.equal(out[:, :3], init.reshape(2, 9)[:, :3])


def test_forced_known_tokens_are_kept():
    model = StandInGPT()
    init = torch.randint(0, 6, (2, 9), generator=gen(5))
    known = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    for use_kv_cache in (True, False):
        out = sample_autoregressive(model, TEXT, init_ids=init, known_mask=known, generator=gen(0),
                                    use_kv_cache=use_kv_cache, top_k=None)
        assert torch.equal(out[:, known], init[:, known])


def test_argument_errors():
    model = StandInGPT()
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_autoregressive(model, TEXT, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="prefix_ids"):
        sample_autoregressive(model, TEXT, prefix_ids=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="generator"):
        sample_autoregressive(model, TEXT, generator=[gen(0)])


def tiny_gpt():
    from tokenpaint.transformer import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(text_vocab_size=16, text_len=4, codebook_size=32, image_size=4, n_layer=2, n_head=2, n_embd=32)
    return GPT(config).eval()


def test_real_gpt_cached_and_uncached_agree():
    model = tiny_gpt()
    text = torch.tensor([[3, 1, 2, 0], [5, 7, 0, 0], [9, 0, 0, 0]])
    for guidance_scale in (1.0, 3.0):
        for seed in range(2):
            kwargs = dict(guidance_scale=guidance_scale, top_k=20, temperature=1.0)
            cached = sample_autoregressive(model, text, generator=gen(seed), use_kv_cache=True, **kwargs)
            uncached = sample_autoregressive(model, text, generator=gen(seed), use_kv_cache=False, **kwargs)
            assert cached.shape == (3, 16)
            assert torch.equal(cached, uncached)
    # the logits behind them agree to float precision: no sample can flip on a meaningful difference
    ids = cached
    with torch.inference_mode():
        full, _ = model(text, ids)
        logits, cache = model.prefill(text)
        steps = [logits]
        for pos in range(15):
            logits, cache = model.decode_step(ids[:, pos], pos, cache)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full.float(), atol=1e-5)
