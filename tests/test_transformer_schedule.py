"""Mask schedules, the masking helper and condition dropout."""
import math

import pytest
import torch

from tokenpaint.transformer import NULL_TEXT_ID, drop_condition, mask_ratio, masked_training_batch, sample_mask

# E[gamma(r)] for r ~ U(0,1): the mean masked fraction the training batches must show
MEAN_RATIO = {"cosine": 2 / math.pi, "linear": 1 / 2, "square": 2 / 3, "sqrt": 1 / 3}


@pytest.mark.parametrize("kind", sorted(MEAN_RATIO))
def test_mask_ratio_endpoints_monotone_and_tensor_float_agree(kind):
    assert mask_ratio(0.0, kind) == pytest.approx(1.0)
    assert mask_ratio(1.0, kind) == pytest.approx(0.0, abs=1e-12)
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    values = mask_ratio(r, kind)
    assert (values[1:] <= values[:-1]).all()
    for x in (0.1, 0.37, 0.8):
        assert float(mask_ratio(torch.tensor(x, dtype=torch.float64), kind)) == pytest.approx(mask_ratio(x, kind))


def test_mask_ratio_formulas():
    r = 0.3
    assert mask_ratio(r) == pytest.approx(math.cos(math.pi / 2 * r))  # cosine is the default
    assert mask_ratio(r, "linear") == pytest.approx(0.7)
    assert mask_ratio(r, "square") == pytest.approx(1 - 0.09)
    assert mask_ratio(r, "sqrt") == pytest.approx(1 - math.sqrt(0.3))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown mask schedule 'cubic'"):
        mask_ratio(0.5, "cubic")
    with pytest.raises(ValueError, match="cubic"):
        sample_mask(2, 8, torch.Generator().manual_seed(0), schedule="cubic")


@pytest.mark.parametrize("kind", sorted(MEAN_RATIO))
def test_masked_fraction_follows_the_schedule(kind):
    n = 64
    mask = sample_mask(4000, n, torch.Generator().manual_seed(0), schedule=kind)
    fraction = mask.float().mean(dim=1)  # [B]
    assert fraction.mean().item() == pytest.approx(MEAN_RATIO[kind], abs=0.02)
    # distribution, not just mean: P(fraction >= gamma(q)) = 1 - q for r ~ U(0,1) (gamma is decreasing)
    for q in (0.25, 0.5, 0.75):
        share = (fraction >= mask_ratio(q, kind) - 0.5 / n).float().mean().item()
        assert share == pytest.approx(q, abs=0.04)
    assert (mask.sum(dim=1) >= 1).all()


def test_at_least_one_masked_even_for_short_rows_and_positions_are_spread():
    mask = sample_mask(2000, 3, torch.Generator().manual_seed(1), schedule="sqrt")
    assert (mask.sum(dim=1) >= 1).all()
    per_position = mask.float().mean(dim=0)
    assert (per_position - per_position.mean()).abs().max() < 0.05  # random positions, no favourite


def test_masking_is_deterministic_under_a_generator():
    ids = torch.arange(2 * 16).reshape(2, 16) % 10
    a = masked_training_batch(ids, 10, torch.Generator().manual_seed(5))
    b = masked_training_batch(ids, 10, torch.Generator().manual_seed(5))
    c = masked_training_batch(ids, 10, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    inputs, targets = a
    masked = inputs == 10
    assert torch.equal(targets[masked], ids[masked]) and (targets[~masked] == -100).all()
    assert torch.equal(inputs[~masked], ids[~masked])


def test_drop_condition_replaces_whole_rows_by_the_null_prompt():
    text = torch.randint(1, 50, (2000, 8), generator=torch.Generator().manual_seed(0))
    out = drop_condition(text, 0.1, torch.Generator().manual_seed(1))
    dropped = (out == NULL_TEXT_ID).all(dim=1)
    kept = (out == text).all(dim=1)
    assert (dropped ^ kept).all()  # every row is either all NULL or untouched
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert torch.equal(out, drop_condition(text, 0.1, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_condition(text, 0.0, None), text)
    assert (drop_condition(text, 1.0, None) == NULL_TEXT_ID).all()
    with pytest.raises(ValueError, match="p must be in"):
        drop_condition(text, 1.5, None)
