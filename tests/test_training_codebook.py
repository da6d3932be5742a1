"""Dead-code restarts: uniform or error-weighted draws from recent encoder outputs, seeded, optimizer moments reset."""
import pytest
import torch

from tokenpaint.training.codebook import CodebookMonitor
from tokenpaint.vqgan.quantize import VectorQuantizer


def quantizer_with_one_live_code(kind="standard"):
    q = VectorQuantizer(4, 2, kind=kind)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, -1.0], [0.0, -1.0]]))
    return q


def test_restarts_go_to_the_outputs_the_codebook_covers_worst():
    q = quantizer_with_one_live_code()
    # 200 outputs sitting on code 0 (the "background") and 2 far away: uniform draws would pick the far ones 1% of
    # the time; drawing by squared distance to the nearest code never picks an output that is already covered
    latents = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(200, 1), torch.tensor([[5.0, 5.0], [6.0, 5.0]])])
    monitor = CodebookMonitor(4, window=10, restart_after=2, seed=0, draw="error")
    monitor.observe(torch.tensor([0]), step=1)
    assert monitor.restart(q, latents, step=2) == 3  # codes 1-3 unused for 2 steps
    restarted = q.embedding.weight[1:]
    assert all(row.tolist() in ([5.0, 5.0], [6.0, 5.0]) for row in restarted)
    assert q.embedding.weight[0].tolist() == [1.0, 0.0]  # the live code is untouched
    monitor.observe(torch.tensor([0]), step=3)
    assert monitor.restart(q, latents, step=3) == 0  # restarted codes get a grace period


def test_uniform_draws_follow_the_bulk_of_the_outputs_and_bad_draw_is_named():
    q = quantizer_with_one_live_code()
    latents = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(200, 1), torch.tensor([[5.0, 5.0], [6.0, 5.0]])])
    monitor = CodebookMonitor(4, window=10, restart_after=2, seed=0)  # default: uniform
    monitor.observe(torch.tensor([0]), step=1)
    monitor.restart(q, latents, step=2)
    assert sum(row.tolist() == [1.0, 0.0] for row in q.embedding.weight[1:]) >= 2  # 99% of outputs sit there
    with pytest.raises(ValueError, match="train.restart_draw must be one of"):
        CodebookMonitor(4, window=10, restart_after=2, seed=0, draw="kmeans")


def test_restart_resets_the_restarted_rows_adam_moments():
    q = quantizer_with_one_live_code(kind="l2")
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    q.embedding.weight.sum().backward()
    opt.step()
    monitor = CodebookMonitor(4, window=10, restart_after=2, seed=5)
    monitor.observe(torch.tensor([0]), step=1)
    monitor.restart(q, torch.randn(64, 2) * 3, step=2, optimizer=opt)
    state = opt.state[q.embedding.weight]
    assert state["exp_avg"][1:].abs().sum() == 0 and state["exp_avg_sq"][1:].abs().sum() == 0
    assert state["exp_avg"][0].abs().sum() > 0
    # l2: restarted codes sit on the unit sphere the nearest-code search uses
    assert torch.allclose(q.embedding.weight[1:].detach().norm(dim=1), torch.ones(3))


def test_restart_draws_come_from_the_monitor_seed_not_the_global_rng():
    latents = torch.randn(64, 2) * 3
    restarted = []
    for global_seed in (0, 1):
        q = quantizer_with_one_live_code()
        monitor = CodebookMonitor(4, window=10, restart_after=2, seed=5)
        monitor.observe(torch.tensor([0]), step=1)
        torch.manual_seed(global_seed)
        monitor.restart(q, latents, step=2)
        restarted.append(q.embedding.weight.detach().clone())
    assert torch.equal(restarted[0], restarted[1])
    assert not torch.equal(restarted[0][1], restarted[0][2])  # three draws, not one latent copied three times
