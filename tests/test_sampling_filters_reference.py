"""filter_logits against HuggingFace transformers' top-k / top-p rule, recomputed in float64, on many random logits:
continuous, bf16-rounded (many ties), integer-valued (ties at the cut), exact dyadic boundaries, and top_p placed
within float32 round-off of the boundary."""
import pytest
import torch

from tokenpaint.sampling import filter_logits

NEG_INF = float("-inf")


def reference_filter(logits: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1), computed in float64, a mass
    within 1e-12 of the threshold counting as reaching it (36 of 72 equal logits hold exactly 0.5, which a float64
    sum may give as 0.5000000000000001)."""
    scores = logits.double()
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(scores, dim=-1, descending=False)  # ascending, as transformers
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p + 1e-12
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, NEG_INF)
    return scores


def assert_same_cut(ours: torch.Tensor, ref: torch.Tensor, logits: torch.Tensor):
    """Per row: the same number of kept ids and the same kept logit values (which of several ids tied at a top-p
    cut survives is a sort-order detail that transformers leaves to torch.sort; ours keeps the lowest ids)."""
    ours_kept, ref_kept = torch.isfinite(ours), torch.isfinite(ref)
    assert torch.equal(ours_kept.sum(-1), ref_kept.sum(-1)), (ours_kept.sum(-1) - ref_kept.sum(-1)).nonzero()
    for row in range(logits.shape[0]):
        a = logits[row][ours_kept[row]].sort().values
        b = logits[row][ref_kept[row]].sort().values
        assert torch.equal(a, b), row
    assert torch.equal(ours[ours_kept], logits[ours_kept])  # kept logits are untouched


def random_logit_rows(seed: int, rows: int, vocab: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.rand(rows, 1, generator=g).mul(4).add(0.5)
    if kind == "bf16":  # a model run in bfloat16: 8 bits of mantissa, many exact ties
        return x.bfloat16().float()
    if kind == "int":  # few distinct values: ties at nearly every cut
        return x.round()
    return x


@pytest.mark.parametrize("kind", ["float", "bf16", "int"])
@pytest.mark.parametrize("top_k", [1, 5, 100, None])
def test_top_k_matches_transformers_exactly(kind, top_k):
    logits = random_logit_rows(1, 64, 2048, kind)
    ours, ref = filter_logits(logits, top_k=top_k), reference_filter(logits, top_k=top_k)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))  # top-k keeps ties: the sets are identical


def test_bf16_logits_have_ties_at_the_100th_largest():
    """The data above is not tie-free: an 'exactly k' rule would keep a different set on most rows."""
    logits = random_logit_rows(1, 64, 16384, "bf16")
    kept = torch.isfinite(filter_logits(logits, top_k=100)).sum(-1)
    assert (kept > 100).float().mean() > 0.5


@pytest.mark.parametrize("kind", ["float", "bf16", "int"])
@pytest.mark.parametrize("top_k", [None, 50])
@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(kind, top_k, top_p):
    logits = random_logit_rows(2, 48, 4096, kind)
    assert_same_cut(filter_logits(logits, top_k=top_k, top_p=top_p), reference_filter(logits, top_k, top_p), logits)


def test_exact_dyadic_boundaries():
    """Uniform mass over 2^j ids: the partial sums are exact, so p lands exactly on a boundary."""
    for j, n in [(3, 3), (4, 8), (5, 1), (6, 63)]:
        logits = torch.full((2, 128), NEG_INF)
        logits[:, : 2**j] = 0.0
        logits[1] = logits[1].flip(0)  # the same mass at the other end of the ids
        top_p = n / 2**j
        ours, ref = filter_logits(logits, top_p=top_p), reference_filter(logits, top_p=top_p)
        assert torch.isfinite(ours).sum(-1).tolist() == [n, n]  # reaching p exactly stops the nucleus
        assert_same_cut(ours, ref, logits)
        assert torch.isfinite(filter_logits(logits, top_p=top_p + 1e-9)).sum(-1).tolist() == [n + 1, n + 1]
    # 36 of 72 equal logits hold exactly half the mass, though their float64 sum is 0.5000000000000001
    logits = torch.full((1, 100), NEG_INF)
    logits[0, :72] = 2.0
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum().item() == 36
    assert_same_cut(filter_logits(logits, top_p=0.5), reference_filter(logits, top_p=0.5), logits)


def near_boundary_cases(seed: int = 3, rows: int = 256, vocab: int = 16384):
    """Rows over a taming-size vocabulary with top_p set within 1e-9 of the mass of the first n ids (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    probs = logits.double().softmax(-1).sort(-1, descending=True).values
    mass = probs.cumsum(-1)
    n = torch.randint(1, 400, (rows,), generator=g)
    boundary = mass.gather(-1, (n - 1)[:, None]).squeeze(-1)  # mass of the n most likely ids
    side = torch.where(torch.arange(rows) % 2 == 0, 1e-9, -1e-9)
    return logits, (boundary + side).tolist()


def test_top_p_cut_does_not_move_with_float32_round_off():
    logits, top_ps = near_boundary_cases()
    ours = torch.stack([filter_logits(row, top_p=p) for row, p in zip(logits, top_ps)])
    ref = torch.stack([reference_filter(row[None], top_p=p)[0] for row, p in zip(logits, top_ps)])
    assert_same_cut(ours, ref, logits)
    # the same rule evaluated with float32 sums misplaces the cut on some of these rows: the test has teeth
    float32_kept = []
    for row, p in zip(logits, top_ps):
        probs = row.sort(descending=True).values.softmax(-1)
        float32_kept.append(int((probs.cumsum(-1) - probs < p).sum()))
    assert sum(a != b for a, b in zip(float32_kept, torch.isfinite(ref).sum(-1).tolist())) > 0
