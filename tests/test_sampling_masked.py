"""MaskGIT decoding against a stand-in masked transformer whose logits are known, and a tiny real one."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tokenpaint.sampling import sample_masked
from tokenpaint.sampling.guidance import apply_guidance


def cosine(r):
    return math.cos(math.pi / 2 * r)


class StandInMIM(nn.Module):
    """logits[b, i] = T[hash(text_b)] + Q[i] + 0.1 * (number of masked inputs): known, and records every input
    (its features are the logits, its head the identity)."""

    def __init__(self, side=4, vocab=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(kind="mim", image_size=side, codebook_size=vocab)
        self.mask_token_id = vocab
        self.text_table = torch.randn(7, vocab, generator=g) * 2
        self.pos_table = torch.randn(side * side, vocab, generator=g)
        self.inputs = []

    def logits_for(self, text_ids, image_ids):
        text_key = (text_ids * torch.arange(1, text_ids.shape[1] + 1)).sum(1) % 7  # [B]
        n_masked = (image_ids == self.mask_token_id).sum(1, keepdim=True).float()  # [B, 1]
        return self.text_table[text_key][:, None] + self.pos_table[None] + 0.1 * n_masked[..., None]  # [B, N, V]

    def features(self, text_ids, image_ids):  # the sampler's entry: features, then the (linear) head
        assert image_ids.shape[1] == self.config.image_size**2
        self.inputs.append((text_ids.clone(), image_ids.clone()))
        return self.logits_for(text_ids, image_ids)

    head = nn.Identity()

    def forward(self, text_ids, image_ids, targets=None):
        return self.head(self.features(text_ids, image_ids)), None


TEXT = torch.tensor([[3, 1, 2, 0], [5, 0, 0, 0]])


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tokens_fixed_per_step_follow_the_schedule(steps):
    model = StandInMIM()
    n = 16
    out = sample_masked(model, TEXT, steps=steps, schedule=cosine, guidance_scale=1.0, generator=gen(0))
    masked_per_call = [(ids == model.mask_token_id).sum(1).tolist() for _, ids in model.inputs]
    expected, left = [], n
    for t in range(steps):
        expected.append([left, left])
        if t < steps - 1:
            left = max(1, min(left - 1, math.floor(n * cosine((t + 1) / steps))))
    assert masked_per_call == expected
    assert not (out == model.mask_token_id).any() and out.shape == (2, 16)


def test_schedule_by_name_is_the_shared_one():
    from tokenpaint.transformer.schedule import mask_ratio

    model = StandInMIM()
    sample_masked(model, TEXT, steps=4, schedule="linear", guidance_scale=1.0, generator=gen(0))
    counts = [(ids == model.mask_token_id).sum(1)[0].item() for _, ids in model.inputs]
    assert counts == [16] + [max(1, math.floor(16 * mask_ratio((t + 1) / 4, "linear"))) for t in range(3)]
    assert counts == [16, 12, 8, 4]


def test_decoded_tokens_are_never_changed_and_known_tokens_never_masked():
    model = StandInMIM()
    init = torch.randint(0, 8, (2, 16), generator=gen(3))
    known = torch.rand(2, 16, generator=gen(4)) < 0.4
    out = sample_masked(model, TEXT, steps=6, schedule=cosine, init_ids=init, known_mask=known, generator=gen(0))
    assert torch.equal(out[known], init[known])
    inputs = [ids[:2] for _, ids in model.inputs]  # the cond half of [cond ; uncond]
    for before, after in zip(inputs, inputs[1:] + [out]):
        fixed = before != model.mask_token_id
        assert torch.equal(after[fixed], before[fixed])  # once unmasked, a token stays as it is
    assert torch.equal(inputs[0] != model.mask_token_id, known)  # the unknown region starts masked
    # the schedule counts the unknown tokens, not N
    n_unknown = (~known).sum(1)
    second = (inputs[1] == model.mask_token_id).sum(1)
    expected = torch.clamp(torch.floor(n_unknown * cosine(1 / 6)).long(), min=1)
    expected = torch.minimum(expected, n_unknown - 1).clamp(min=1)
    assert torch.equal(second, expected)


def test_fully_known_rows_stay_as_they_are():
    model = StandInMIM()
    init = torch.randint(0, 8, (2, 16), generator=gen(3))
    known = torch.ones(2, 16, dtype=torch.bool)
    known[1, :5] = False
    out = sample_masked(model, TEXT, steps=3, schedule=cosine, init_ids=init, known_mask=known, generator=gen(0))
    assert torch.equal(out[0], init[0]) and torch.equal(out[1, 5:], init[1, 5:])


def test_guidance_combines_cond_and_uncond_logits():
    model = StandInMIM()
    negative = torch.tensor([[6, 6, 0, 0]])
    for scale, neg in ((1.0, None), (3.0, None), (3.0, negative)):
        # greedy (top_k=1) in one step: every position takes the argmax of the guided logits
        out = sample_masked(model, TEXT, steps=1, guidance_scale=scale, negative_text_ids=neg, top_k=1,
                            schedule=cosine, generator=gen(0))
        text_seen, ids_seen = model.inputs[-1]
        uncond = torch.zeros_like(TEXT) if neg is None else neg.expand(2, -1)
        if scale == 1.0:
            assert text_seen.shape[0] == 2
            expected_logits = model.logits_for(TEXT, ids_seen)
        else:
            assert torch.equal(text_seen, torch.cat([TEXT, uncond]))  # [cond ; uncond], negative prompt included
            expected_logits = apply_guidance(model.logits_for(TEXT, ids_seen[:2]), model.logits_for(uncond, ids_seen[2:]), scale)
        assert torch.equal(out, expected_logits.argmax(-1))
    plain = model.logits_for(TEXT, ids_seen[:2]).argmax(-1)
    assert not torch.equal(out, plain)  # guidance changed the result, so the check above can fail


def test_linear_guidance_schedule_rises_to_the_scale():
    from tokenpaint.sampling.guidance import guidance_at

    assert [guidance_at(t, 4, 3.0, "linear") for t in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert guidance_at(0, 4, 3.0, "constant") == 3.0
    with pytest.raises(ValueError, match="guidance_schedule"):
        sample_masked(StandInMIM(), TEXT, guidance_schedule="cubic", schedule=cosine)


def test_deterministic_under_a_seed_and_rows_independent_of_the_batch():
    model = StandInMIM()
    kwargs = dict(steps=5, schedule=cosine, guidance_scale=2.0, temperature=2.0)
    a = sample_masked(model, TEXT, generator=gen(0), **kwargs)
    b = sample_masked(model, TEXT, generator=gen(0), **kwargs)
    c = sample_masked(model, TEXT, generator=gen(1), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    batch = sample_masked(model, TEXT, generator=[gen(7), gen(8)], **kwargs)
    alone = sample_masked(model, TEXT[1:], generator=[gen(8)], **kwargs)
    assert torch.equal(batch[1:], alone)


def test_argument_errors():
    model = StandInMIM()
    with pytest.raises(ValueError, match="steps"):
        sample_masked(model, TEXT, steps=0, schedule=cosine)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_masked(model, TEXT, guidance_scale=-2.0, schedule=cosine)
    with pytest.raises(ValueError, match="mask schedule 'cubic'"):
        sample_masked(model, TEXT, steps=1, schedule="cubic")
    assert model.inputs == []  # every error above came before any model call
    with pytest.raises(ValueError, match="init_ids"):
        sample_masked(model, TEXT, init_ids=torch.zeros(2, 16, dtype=torch.long), schedule=cosine)
    with pytest.raises(ValueError, match="known_mask"):
        sample_masked(model, TEXT, init_ids=torch.zeros(2, 16, dtype=torch.long),
                      known_mask=torch.ones(2, 15, dtype=torch.bool), schedule=cosine)
    with pytest.raises(ValueError, match="image ids"):
        sample_masked(model, TEXT, init_ids=torch.full((2, 16), 8), known_mask=torch.ones(16, dtype=torch.bool),
                      schedule=cosine)


def test_real_masked_transformer_samples_valid_ids():
    from tokenpaint.transformer import MaskedTransformer, MaskedTransformerConfig

    torch.manual_seed(0)
    config = MaskedTransformerConfig(text_vocab_size=16, text_len=4, codebook_size=32, image_size=4, n_layer=1,
                                     n_head=2, n_embd=32)
    model = MaskedTransformer(config).eval()
    a = sample_masked(model, TEXT, steps=4, generator=gen(0))
    b = sample_masked(model, TEXT, steps=4, generator=gen(0))
    assert a.shape == (2, 16) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 32
