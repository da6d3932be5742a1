"""Logit filtering, guidance arithmetic, seeded noise and MaskGIT's re-masking rule."""

import math

import pytest
import torch

from tokenpaint.sampling import apply_guidance, filter_logits, gumbel_noise, mask_by_random_topk
from tokenpaint.sampling.filters import categorical, multinomial_last_dim, sample_from_logits
from tokenpaint.sampling.guidance import prepare_text_pair


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


# probabilities 0.5, 0.25, 0.15, 0.1 placed at shuffled ids so the filters must map sorted order back correctly
PROBS = torch.tensor([0.15, 0.5, 0.1, 0.25])
LOGITS = PROBS.log()


def test_top_k_keeps_the_k_largest_and_every_tie_of_the_kth():
    assert kept(filter_logits(LOGITS, top_k=1)) == {1}
    assert kept(filter_logits(LOGITS, top_k=2)) == {1, 3}
    assert kept(filter_logits(LOGITS, top_k=3)) == {1, 3, 0}
    assert kept(filter_logits(LOGITS, top_k=10)) == {0, 1, 2, 3}
    ties = torch.tensor([0.0, 2.0, 1.0, 1.0, 1.0, -1.0])
    assert kept(filter_logits(ties, top_k=2)) == {1, 2, 3, 4}  # the 2nd largest is tied three ways: all stay
    assert kept(filter_logits(ties, top_k=4)) == {1, 2, 3, 4}
    assert kept(filter_logits(torch.zeros(6), top_k=1)) == set(range(6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(filter_logits(LOGITS, top_p=0.4)) == {1}  # 0.5 alone reaches 0.4
    assert kept(filter_logits(LOGITS, top_p=0.7)) == {1, 3}  # 0.75
    assert kept(filter_logits(LOGITS, top_p=0.8)) == {1, 3, 0}  # 0.9
    assert kept(filter_logits(LOGITS, top_p=0.95)) == {0, 1, 2, 3}
    assert kept(filter_logits(LOGITS, top_p=1e-9)) == {1}  # always keeps the most likely id
    assert kept(filter_logits(LOGITS, top_p=0.0)) == {1}  # 0 keeps only the most likely id, as transformers does
    assert kept(filter_logits(torch.zeros(4), top_p=0.0)) == {0}  # one id even among ties: the lowest
    assert kept(filter_logits(LOGITS, top_p=1.0)) == {0, 1, 2, 3}
    out = filter_logits(LOGITS, top_p=0.7)
    assert torch.equal(out[[1, 3]], LOGITS[[1, 3]])  # kept logits are unchanged


def test_top_k_then_top_p_renormalises_after_top_k():
    # after top-3 the probabilities are 0.5/0.9, 0.25/0.9, 0.15/0.9: the first two hold 0.833 >= 0.8
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.8)) == {1, 3}
    # without top-k, 0.8 needs three ids
    assert kept(filter_logits(LOGITS, top_p=0.8)) == {0, 1, 3}


def test_filters_work_row_wise_on_batches():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # [2, 4]
    out = filter_logits(logits, top_k=2)
    assert kept(out[0]) == {1, 3} and kept(out[1]) == {2, 0}


def test_filter_argument_errors():
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(LOGITS, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(LOGITS, top_p=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(LOGITS, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_from_logits(LOGITS[None], None, temperature=0.0)


def test_apply_guidance_arithmetic():
    cond = torch.tensor([1.0, 4.0, -2.0])
    uncond = torch.tensor([2.0, 1.0, 0.0])
    assert torch.allclose(apply_guidance(cond, uncond, 3.0), torch.tensor([-1.0, 10.0, -6.0]))
    assert torch.equal(apply_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(apply_guidance(cond, uncond, 0.0), uncond)


def test_prepare_text_pair_uses_negative_prompt_or_zeros():
    text = torch.tensor([[5, 6, 0], [7, 0, 0]])
    assert torch.equal(prepare_text_pair(text, None, False), text)
    doubled = prepare_text_pair(text, None, True)
    assert torch.equal(doubled, torch.cat([text, torch.zeros_like(text)]))
    negative = torch.tensor([9, 9, 0])  # one row is broadcast to the batch
    doubled = prepare_text_pair(text, negative, True)
    assert torch.equal(doubled[2:], negative.expand(2, -1))
    with pytest.raises(ValueError, match="negative_text_ids"):
        prepare_text_pair(text, torch.zeros(3, 3, dtype=torch.long), True)


def test_gumbel_noise_is_seeded_and_gumbel_distributed():
    a = gumbel_noise((200_000,), torch.Generator().manual_seed(0))
    b = gumbel_noise((200_000,), torch.Generator().manual_seed(0))
    c = gumbel_noise((200_000,), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    assert abs(a.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(a.var().item() - math.pi**2 / 6) < 0.05


def test_per_row_generators_make_rows_independent_of_the_batch():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    batch = gumbel_noise((3, 7), gens)
    alone = gumbel_noise((1, 7), [torch.Generator().manual_seed(4)])
    assert torch.equal(batch[1:2], alone)
    probs = torch.rand(3, 5, 10, generator=torch.Generator().manual_seed(0))
    draws = multinomial_last_dim(probs, [torch.Generator().manual_seed(s) for s in (3, 4, 5)])
    alone = multinomial_last_dim(probs[1:2], [torch.Generator().manual_seed(4)])
    assert draws.shape == (3, 5) and torch.equal(draws[1:2], alone)
    with pytest.raises(ValueError, match="generator"):
        gumbel_noise((2, 7), gens)


def test_categorical_draws_each_id_with_its_probability_and_never_a_zero_one():
    probs = torch.tensor([[0.1, 0.0, 0.3, 0.6, 0.0], [0.0, 2.0, 0.0, 0.0, 2.0]])  # the second unnormalised
    u = torch.rand(2, 200_000, generator=torch.Generator().manual_seed(0))
    ids = categorical(probs[:, None].expand(-1, u.shape[1], -1), u)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in ids]).float() / u.shape[1]
    assert torch.allclose(freq, probs / probs.sum(-1, keepdim=True), atol=0.005)
    assert freq[0, 1] == 0 and freq[0, 4] == 0 and freq[1, [0, 2, 3]].sum() == 0
    edges = torch.tensor([[0.0, 1 - 2**-24], [0.0, 1 - 2**-24]])  # the smallest and largest torch.rand values
    assert categorical(probs[:, None].expand(-1, 2, -1), edges).tolist() == [[0, 3], [1, 4]]
    with pytest.raises(ValueError, match="shape of probs"):
        categorical(probs, torch.rand(3))
    with pytest.raises(ValueError, match="positive total"):
        categorical(torch.zeros(1, 5), torch.rand(1))


def test_mask_by_random_topk_exact_counts_and_never_masks_infinite_confidence():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 20, generator=g)
    conf[:, :5] = math.inf  # known tokens
    mask_len = torch.tensor([0, 1, 7, 15])
    masked = mask_by_random_topk(mask_len, conf, 4.5, g)
    assert masked.sum(1).tolist() == [0, 1, 7, 15]
    assert not masked[:, :5].any()


def test_mask_by_random_topk_without_noise_masks_the_least_confident():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])
    masked = mask_by_random_topk(torch.tensor([2]), conf, 0.0, torch.Generator().manual_seed(0))
    assert torch.nonzero(masked[0]).flatten().tolist() == [1, 3]
