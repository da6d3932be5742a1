"""Training infrastructure: configs, atomic checkpoints, safe loading, RNG capture, resumable data, metrics."""
import base64
import io
import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tokenpaint.training.common import (EMA, CheckpointManager, GracefulStop, MetricsLogger, NonFiniteLossError,
                                        ResumableBatches, TimeBudget, TrainOptions, capture_rng, check_finite,
                                        cosine_lr, load_config, resume_command, restore_rng,
                                        settle_decay_with_budget)


def write_shapes_tsv(path, num_rows, resolution=16, seed=0, bad_lines=()):
    """A TSV of coloured rectangles/ellipses on plain backgrounds; `bad_lines` (1-based) get undecodable images."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for line in range(1, num_rows + 1):
            if line in bad_lines:
                f.write(f"{line}\tbroken row\t!!!not-base64!!!\n")
                continue
            img = Image.new("RGB", (resolution, resolution), tuple(rng.randrange(150, 256) for _ in range(3)))
            x0, y0 = rng.randrange(0, resolution // 2), rng.randrange(0, resolution // 2)
            box = (x0, y0, x0 + rng.randrange(4, resolution // 2), y0 + rng.randrange(4, resolution // 2))
            fill = tuple(rng.randrange(0, 150) for _ in range(3))
            draw = ImageDraw.Draw(img)
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            f.write(f"{line}\ta shape {line}\t{base64.b64encode(buf.getvalue()).decode()}\n")
    return str(path)


# ----------------------------------------------------------------------------- config


def test_load_config_merges_defaults_and_names_unknown_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 0.5\n  bogus_key: 3\n")
    with pytest.raises(ValueError) as err:
        load_config(str(path), {"train": {"lr": 1.0, "steps": 10}})
    msg = str(err.value)
    assert str(path) in msg and "bogus_key" in msg and "line 3" in msg and "'train'" in msg

    path.write_text("trian:\n  lr: 0.5\n")
    with pytest.raises(ValueError, match=r"line 1: unknown section 'trian'"):
        load_config(str(path), {"train": {"lr": 1.0}})

    path.write_text("train:\n  lr: 0.5\n")
    cfg = load_config(str(path), {"train": {"lr": 1.0, "steps": 10}, "free": None})
    assert cfg == {"train": {"lr": 0.5, "steps": 10}, "free": {}}
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), {})


def test_exponents_without_a_dot_read_as_floats(tmp_path):
    # PyYAML's YAML 1.1 rules read `3e-3` as the string '3e-3', which then failed inside the optimizer
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 3e-3\n  min_lr: -1E+2\n  steps: 100\n  name: run1e5\n")
    cfg = load_config(str(path), {"train": {"lr": 1.0, "min_lr": 0.0, "steps": 10, "name": ""}})
    assert cfg["train"] == {"lr": 0.003, "min_lr": -100.0, "steps": 100, "name": "run1e5"}
    assert isinstance(cfg["train"]["steps"], int)
    path.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match=r"cfg.yaml: invalid YAML"):
        load_config(str(path), {"train": {}})


def test_train_options_validate_and_resume_command():
    with pytest.raises(ValueError, match="--bad-rows"):
        TrainOptions(stage="vqgan", data="a.tsv", config="c.yaml", out="o", bad_rows="ignore")
    with pytest.raises(ValueError, match="--max-steps"):
        TrainOptions(stage="vqgan", data="a.tsv", config="c.yaml", out="o", max_steps=0)
    opts = TrainOptions(stage="vqgan", data="my data.tsv", config="c.yaml", out="o",
                        argv=["train.py", "vqgan", "--data", "my data.tsv", "--config", "c.yaml", "--out", "o"])
    assert resume_command(opts).endswith("train.py vqgan --data 'my data.tsv' --config c.yaml --out o --resume")
    # a run stopped by its (whole-run) time budget continues only with a larger one
    timed = TrainOptions(stage="vqgan", data="a.tsv", config=None, out="o", max_minutes=2.5,
                         argv=["train.py", "vqgan", "--data", "a.tsv", "--out", "o", "--max-minutes", "2.5"])
    assert resume_command(timed, 5.0).endswith("--out o --max-minutes 5 --resume")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_keep_last_k_and_ignore_partial_writes(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    for step in (1, 2, 3):
        mgr.save({"step": step, "w": torch.full((2,), float(step))}, step)
    assert [s for s, _ in mgr.list()] == [2, 3]
    # A write killed half-way leaves a temp file: never picked, even with a higher step number.
    with open(mgr.path_for(9) + ".tmp-12345", "wb") as f:
        f.write(b"\x80\x02partial")
    assert mgr.latest() == mgr.path_for(3)
    state = mgr.load(mgr.latest())
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((2,), 3.0))
    assert not any(".tmp-" in name for name in os.listdir(mgr.directory) if name.startswith("step_0000000[123]"))


class _Exploit:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file would prove code ran on load


def test_checkpoint_that_runs_code_on_unpickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    os.makedirs(mgr.directory)
    torch.save({"step": 5, "payload": exploit}, mgr.path_for(5))
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"step_00000005\.pt: refused: the file holds a pickled Python object"):
        mgr.load(mgr.latest())
    assert not marker.exists()


def test_rng_capture_restore_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(torch.load(path, weights_only=True))  # weights-only safe
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


# ----------------------------------------------------------------------------- loop helpers


def test_cosine_lr_warmup_peak_and_floor():
    assert cosine_lr(0, 10, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 10, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 10, 100, 1.0, 0.1) == pytest.approx(0.55)  # half-way through the decay
    assert cosine_lr(100, 10, 100, 1.0, 0.1) == pytest.approx(0.1)
    lrs = [cosine_lr(s, 10, 100, 1.0, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_lr_follows_the_time_budget_when_it_runs_out_first():
    # step 20 of 100 but 50% of the time budget used: the decay is half-way, as if at step 55
    assert cosine_lr(20, 10, 100, 1.0, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert cosine_lr(20, 10, 100, 1.0, 0.1, time_fraction=1.0) == pytest.approx(0.1)  # budget spent: the floor
    assert cosine_lr(80, 10, 100, 1.0, 0.1, time_fraction=0.1) == cosine_lr(80, 10, 100, 1.0, 0.1)  # steps lead
    assert cosine_lr(3, 10, 100, 1.0, 0.1, time_fraction=0.9) == pytest.approx(0.4)  # warmup stays by steps


def test_the_lr_follows_the_time_budget_only_for_a_run_without_max_steps():
    def settled(max_steps, max_minutes, configured=True):
        train = {"decay_with_budget": configured}
        settle_decay_with_budget(train, TrainOptions(stage="vqgan", data="a.tsv", config="c.yaml", out="o",
                                                     max_steps=max_steps, max_minutes=max_minutes))
        return train["decay_with_budget"]

    assert settled(None, 6.0)  # --max-minutes alone: a time-budget run decays by time
    assert not settled(1000, 6.0)  # steps are the recipe, the minutes a cap
    assert not settled(None, None) and not settled(1000, None)
    assert not settled(None, 6.0, configured=False)  # train.decay_with_budget: false


def test_time_budget_counts_the_whole_run_across_resumes():
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    budget = TimeBudget(1.0, clock=clock)  # one minute
    now[0] += 30
    assert budget.fraction() == pytest.approx(0.5) and not budget.expired()
    resumed = TimeBudget(1.0, spent_seconds=budget.spent_seconds(), clock=clock)  # what a checkpoint carries
    now[0] += 30
    assert resumed.fraction() == pytest.approx(1.0) and resumed.expired()
    with pytest.raises(ValueError, match=r"--max-minutes 1: the run in ck.pt has already trained 1\.0 minutes"):
        resumed.check_not_spent("ck.pt")
    unlimited = TimeBudget(None, clock=clock)
    now[0] += 1e6
    assert unlimited.fraction() == 0.0 and not unlimited.expired()
    unlimited.check_not_spent("ck.pt")


def test_check_finite_names_step_and_checkpoint():
    check_finite(torch.tensor(1.5), 3)
    with pytest.raises(NonFiniteLossError, match=r"at step 7;.*last good checkpoint ck/step_00000006\.pt is intact"):
        check_finite(torch.tensor(float("nan")), 7, "ck/step_00000006.pt")


def test_graceful_stop_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_metrics_logger_appends_and_truncates_on_resume(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in (1, 2, 3):
        log.log(step, loss=torch.tensor(step / 10))
    log.close()
    log = MetricsLogger(str(tmp_path), resume_step=2)  # the run crashed after step 3 but resumes from step 2
    log.log(3, loss=0.25)
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.25
    assert records[0]["loss"] == pytest.approx(0.1)


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.75))


# ----------------------------------------------------------------------------- data position


class _Numbers(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield {"value": i, "noise": torch.rand(())}  # torch.rand: the global RNG must not shift batches


def test_resumable_batches_resume_mid_epoch_exactly():
    straight = ResumableBatches(_Numbers(10), batch_size=3, seed=0)
    expected = [next(straight)["value"].tolist() for _ in range(7)]  # 3 batches/epoch (last partial one dropped)
    assert sorted(sum(expected[:3], [])) == sorted(set(sum(expected[:3], [])))  # no repeats within an epoch
    assert expected[:3] != expected[3:6]  # set_epoch reshuffles

    first = ResumableBatches(_Numbers(10), batch_size=3, seed=0)
    got = [next(first)["value"].tolist() for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["samples_in_epoch"] == 3
    resumed = ResumableBatches(_Numbers(10), batch_size=3, seed=0)
    resumed.load_state_dict(state)
    got += [next(resumed)["value"].tolist() for _ in range(3)]
    assert got == expected

    bad = ResumableBatches(_Numbers(10), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batch size 4.*batch size 3"):
        bad.load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(ResumableBatches(_Numbers(2), batch_size=3, name="tiny.tsv"))
