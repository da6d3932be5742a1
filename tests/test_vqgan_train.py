"""The VQGAN training stage end to end on tiny models and tiny synthetic TSVs: learning, run-dir layout, exact resume
(in-process and after SIGTERM to train.py), NaN guard, bad rows, and 2-process DDP equivalence."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training_common import write_shapes_tsv

from tokenpaint.training import vqgan_stage
from tokenpaint.data import TSVImageText
from tokenpaint.training.common import CheckpointManager, NonFiniteLossError, TrainOptions, cosine_lr, set_seed
from tokenpaint.training.vqgan_stage import train_vqgan
from tokenpaint.vqgan import VQGAN, VQGANConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(embed_dim=16, n_embed=32, quantizer="l2", codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                  attn_resolutions=[], z_channels=32, resolution=16)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return write_shapes_tsv(d / "train.tsv", 48, seed=0), write_shapes_tsv(d / "val.tsv", 8, seed=1)


def write_config(path, disc=True, restart=True, shuffle=True, loss=None, **train):
    cfg = {"model": TINY_MODEL,
           "loss": dict(perceptual_weight=0.0, discriminator=disc, disc_start=2, disc_ndf=8, disc_num_layers=1,
                        **(loss or {})),
           "train": dict(dict(batch_size=4, lr=2e-3, log_every=1, sample_every=1000, ckpt_every=1000,
                              restart_after=2 if restart else None, usage_window=4), **train),
           "data": dict(resolution=16, shuffle=shuffle, shuffle_buffer=8)}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def opts(data, config, out, **kw):
    return TrainOptions(stage="vqgan", data=data[0], config=config, out=str(out), **kw)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(dir_a, dir_b):
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"
    ca = CheckpointManager.load(CheckpointManager(os.path.join(dir_a, "checkpoints")).latest())
    cb = CheckpointManager.load(CheckpointManager(os.path.join(dir_b, "checkpoints")).latest())
    assert ca["step"] == cb["step"]
    for k, v in ca["disc"].items():
        assert torch.equal(v, cb["disc"][k]), f"discriminator differs at {k}"
    assert torch.equal(ca["opt_g"]["state"][0]["exp_avg"], cb["opt_g"]["state"][0]["exp_avg"])
    assert torch.equal(ca["codebook"]["last_used"], cb["codebook"]["last_used"])


def test_tiny_vqgan_learns_and_writes_a_loadable_run_dir(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", disc=False, sample_every=20, log_every=2, restart_after=10)
    out = tmp_path / "run"
    summary = train_vqgan(opts(data, config, out, val=data[1], max_steps=60))
    metrics = read_metrics(out)
    train_rows = [m for m in metrics if "loss" in m]
    val_rows = [m for m in metrics if "val_psnr" in m]
    assert all({"step", "loss", "usage", "perplexity", "rec_loss", "lr"} <= m.keys() for m in train_rows)
    first, last = train_rows[0]["rec_loss"], sum(m["rec_loss"] for m in train_rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert [m["step"] for m in val_rows] == [20, 40, 60]
    # The same initial weights (seeded) before training, on the same val images:
    set_seed(0)
    untrained = VQGAN(VQGANConfig.from_dict(TINY_MODEL))
    before, _ = vqgan_stage.evaluate(untrained, TSVImageText(data[1], 16), 4, 8, torch.device("cpu"), False)
    assert val_rows[-1]["val_psnr"] > before["val_psnr"] + 3.0, (before, val_rows)
    assert summary["val"]["val_psnr"] == val_rows[-1]["val_psnr"] and summary["step"] == 60

    vq = VQGAN.from_pretrained(str(out))
    assert vq.config.n_embed == TINY_MODEL["n_embed"] and vq.config.quantizer == "l2"
    card = (out / "README.md").read_text(encoding="utf-8")  # the run is ready to publish
    assert "steps: 60 of 60;" in card and f"| val_psnr | {val_rows[-1]['val_psnr']:.6g} | 60 |" in card
    assert "- `checkpoints/`" in card and "- `samples/`" in card
    scope = {}
    exec(card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(out)), scope)
    assert scope["x_hat"].shape == (1, 3, 16, 16)
    assert os.path.exists(out / "samples" / "recon_00000060.png")
    assert yaml.safe_load((out / "train_config.yaml").read_text())["model"]["ch_mult"] == [1, 2]
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train_vqgan(opts(data, config, out, max_steps=61))


def test_reconstruction_loss_weights_l1_and_l2(data, tmp_path):
    """loss = l1_weight * L1 + l2_weight * MSE + codebook term (no LPIPS, no discriminator here); MSE alone learns."""
    def rows(name, steps, **loss):
        config = write_config(tmp_path / f"{name}.yaml", disc=False, restart=False, loss=loss)
        train_vqgan(opts(data, config, tmp_path / name, max_steps=steps))
        return [m for m in read_metrics(tmp_path / name) if "loss" in m]

    for m in rows("l1", 3):  # the default: taming's L1 only
        assert m["loss"] == pytest.approx(m["rec_loss"] + m["q_loss"], rel=1e-5)
    mse_rows = rows("mse", 40, l1_weight=0.0, l2_weight=2.0)
    for m in mse_rows:
        assert m["loss"] == pytest.approx(2.0 * m["l2_loss"] + m["q_loss"], rel=1e-5)
    first, last = mse_rows[0]["l2_loss"], sum(m["l2_loss"] for m in mse_rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)


def test_resume_gives_the_same_weights_as_a_straight_run(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", ema_decay=0.9)  # discriminator, restarts and EMA all active
    train_vqgan(opts(data, config, tmp_path / "straight", max_steps=8))
    train_vqgan(opts(data, config, tmp_path / "split", max_steps=4))
    summary = train_vqgan(opts(data, None, tmp_path / "split", max_steps=8, resume=True))
    assert summary["step"] == 8
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == list(range(1, 9))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_vqgan(opts(data, config, tmp_path / "empty", resume=True))


def test_sigterm_saves_exits_zero_and_resume_matches(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "vqgan", "--data", data[0], "--config", config,
           "--out", str(out), "--max-steps", "100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = CheckpointManager.load(CheckpointManager(str(out / "checkpoints")).latest())["step"]
    assert f"stopped at step {stopped_at}/100000 (SIGTERM)" in err
    assert "resume with:" in err and " ".join(cmd[1:]) + " --resume" in err

    train_vqgan(opts(data, config, out, max_steps=stopped_at + 2, resume=True))
    train_vqgan(opts(data, config, tmp_path / "straight", max_steps=stopped_at + 2))
    assert_same_run(out, tmp_path / "straight")


def test_time_budget_stops_cleanly_validates_and_saves(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", disc=False)
    out = tmp_path / "run"
    summary = train_vqgan(opts(data, config, out, val=data[1], max_steps=10_000, max_minutes=1e-4))
    assert summary["stopped"] == "time budget" and 1 <= summary["step"] < 10_000
    assert CheckpointManager.load(summary["checkpoint"])["step"] == summary["step"]
    assert [m["step"] for m in read_metrics(out) if "val_psnr" in m] == [summary["step"]]
    VQGAN.from_pretrained(str(out))


def test_time_budget_drives_the_cosine_decay_and_is_recorded(data, tmp_path, monkeypatch):
    now = [0.0]
    real_budget, real_lr = vqgan_stage.TimeBudget, vqgan_stage._learning_rate

    def lr_one_second_per_step(*args):
        now[0] += 1.0
        return real_lr(*args)

    monkeypatch.setattr(vqgan_stage, "TimeBudget", lambda m, spent=0.0: real_budget(m, spent, clock=lambda: now[0]))
    monkeypatch.setattr(vqgan_stage, "_learning_rate", lr_one_second_per_step)
    config = write_config(tmp_path / "cfg.yaml", disc=False, lr_schedule="cosine", min_lr=1e-4, max_steps=1000)
    summary = train_vqgan(opts(data, config, tmp_path / "run", max_minutes=6 / 60))  # 6 "seconds"
    assert summary["stopped"] == "time budget" and summary["step"] == 6
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run") if "lr" in m]
    assert lrs == pytest.approx([cosine_lr(s, 0, 1000, 2e-3, 1e-4, time_fraction=s / 6) for s in range(6)])
    assert CheckpointManager.load(summary["checkpoint"])["train_seconds"] == 6.0


def test_compile_flag_gives_the_same_training_run(data, tmp_path, monkeypatch):
    from tokenpaint.training import common

    monkeypatch.setattr(common, "COMPILE_BACKEND", "eager")  # Dynamo tracing (incl. the latent hook), no C++ build
    config = write_config(tmp_path / "cfg.yaml", disc=False, max_steps=3)
    train_vqgan(opts(data, config, tmp_path / "plain"))
    train_vqgan(opts(data, config, tmp_path / "compiled", compile=True))
    plain, compiled = (read_metrics(tmp_path / run) for run in ("plain", "compiled"))
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in plain], rel=1e-5)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "compiled"))
    assert a.keys() == b.keys()


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    class NaNAtFifthStep(VQGAN):
        calls = 0

        def forward(self, x):
            x_hat, q = super().forward(x)
            NaNAtFifthStep.calls += 1
            return (x_hat * float("nan") if NaNAtFifthStep.calls == 5 else x_hat), q

    monkeypatch.setattr(vqgan_stage, "VQGAN", NaNAtFifthStep)
    config = write_config(tmp_path / "cfg.yaml", disc=False, ckpt_every=2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"at step 5;.*step_00000004\.pt is intact"):
        train_vqgan(opts(data, config, out, max_steps=10))
    mgr = CheckpointManager(str(out / "checkpoints"))
    state = mgr.load(mgr.latest())
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_bad_rows_skip_counts_and_error_names_line(tmp_path):
    tsv = write_shapes_tsv(tmp_path / "bad.tsv", 12, bad_lines=(2, 5))
    config = write_config(tmp_path / "cfg.yaml", disc=False, shuffle=False)
    summary = train_vqgan(TrainOptions(stage="vqgan", data=tsv, config=config, out=str(tmp_path / "skip"),
                                       max_steps=2, bad_rows="skip"))
    assert summary["bad_rows_skipped"] == 2
    with pytest.raises(ValueError, match=r"bad\.tsv:2: "):
        train_vqgan(TrainOptions(stage="vqgan", data=tsv, config=config, out=str(tmp_path / "err"), max_steps=2))


def test_config_typo_is_an_error_naming_file_and_key(data, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  n_embedd: 16\n")
    with pytest.raises(ValueError, match=r"typo\.yaml, line 2: unknown key 'n_embedd' in section 'model'"):
        train_vqgan(opts(data, str(path), tmp_path / "run"))


def _ddp_worker(rank, world_size, port, data, config, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_vqgan(TrainOptions(stage="vqgan", data=data, config=config, out=out, max_steps=3))


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    # No discriminator (BatchNorm statistics are per process) and no restarts (drawn from rank 0's batch).
    single = write_config(tmp_path / "single.yaml", disc=False, restart=False, shuffle=False, batch_size=4)
    double = write_config(tmp_path / "double.yaml", disc=False, restart=False, shuffle=False, batch_size=2)
    train_vqgan(TrainOptions(stage="vqgan", data=data[0], config=single, out=str(tmp_path / "one"), max_steps=3))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, data[0], double, str(tmp_path / "two")), nprocs=2)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # Biases feeding straight into a GroupNorm of one channel per group have zero true gradient; Adam turns their
    # float noise into +-lr steps, so compare them through the function they compute (they cancel there).
    for k in one:
        if not k.endswith("bias"):
            assert torch.allclose(one[k], two[k], atol=1e-4), k
    x = torch.stack([row["image"] for row in TSVImageText(data[1], 16)])
    with torch.no_grad():
        out_one = VQGAN.from_pretrained(str(tmp_path / "one"))(x)[0]
        out_two = VQGAN.from_pretrained(str(tmp_path / "two"))(x)[0]
    # Weights agree to 1e-4; through the whole decoder the float noise of the two reduction orders grows to ~1.1e-4,
    # a real DDP mistake (summed instead of averaged gradients, one rank's batch only) shows in the weights above.
    assert torch.allclose(out_one, out_two, atol=5e-4)
    steps = [m["step"] for m in read_metrics(tmp_path / "two")]
    assert steps == [1, 2, 3]  # rank 0 alone writes
