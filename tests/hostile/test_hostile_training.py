"""Faults around a training run: a full disk (checked before a checkpoint write, named as such, the previous
checkpoint kept), a second writer on the same --out (refused; a dead process's lock taken over), temp files of
interrupted writes (removed at start), file modes (the umask), a truncated latest checkpoint (resume falls back and
says so), and flags checked before any work. On the tiny VQGAN stage: a few steps each."""
import errno
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training_common import write_shapes_tsv

from tokenpaint.training.common import CheckpointManager, RunLock
from tokenpaint.utils import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = dict(embed_dim=8, n_embed=16, ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[],
                  z_channels=8, resolution=16)


def load_cli():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    tsv = write_shapes_tsv(root / "train.tsv", 8, seed=0)
    config = root / "vq.yaml"
    config.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "loss": dict(perceptual_weight=0.0, discriminator=False),
        "train": dict(batch_size=4, lr=1e-3, log_every=1, sample_every=1000, ckpt_every=1, keep_checkpoints=3,
                      max_steps=3),
        "data": dict(resolution=16, shuffle_buffer=8)}))
    return {"tsv": tsv, "config": str(config), "cli": load_cli()}


def train(setup, out, *extra):
    return setup["cli"].main(["vqgan", "--data", setup["tsv"], "--out", str(out), *extra] +
                             ([] if "--resume" in extra else ["--config", setup["config"]]))


def steps(out):
    return [s for s, _ in CheckpointManager(os.path.join(out, "checkpoints")).list()]


def temp_files(directory):
    return [p for p in Path(directory).rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- a full disk

def _low_free_space(monkeypatch, free=1 << 20):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def _failing_save(monkeypatch, error, fill_disk=False):
    """torch.save fails from the second call on (the first checkpoint is written), as on a disk that filled up."""
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")  # what a full disk leaves: the first bytes
            if fill_disk:
                _low_free_space(monkeypatch, free=4096)
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("fault, message", [
    ("free space checked first", r"not enough disk space to write .*step_00000002\.pt: .*MiB needed, 1\.0 MiB free"),
    ("ENOSPC from the writer", r"disk full while writing .*step_00000002\.pt"),
    ("torch's 'unexpected pos' on a full disk", r"disk full while writing .*step_00000002\.pt"),
], ids=["free space checked", "ENOSPC", "unexpected pos"])
def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(setup, tmp_path, monkeypatch, capsys, fault, message):
    out = tmp_path / "run"
    if fault == "free space checked first":
        real_save = CheckpointManager.save

        def save(self, state, step):  # the disk fills up after the first checkpoint
            if step >= 2:
                _low_free_space(monkeypatch)
            return real_save(self, state, step)
        monkeypatch.setattr(CheckpointManager, "save", save)
    elif fault == "ENOSPC from the writer":
        _failing_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    else:
        _failing_save(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed ... unexpected pos"),
                      fill_disk=True)
    assert train(setup, out) == 2
    err = capsys.readouterr().err
    assert "error: " in err and re.search(message, err), err
    assert "step_00000001.pt is intact" in err and "--resume" in err
    assert steps(out) == [1] and not temp_files(out)
    monkeypatch.undo()
    assert train(setup, out, "--resume") == 0  # the run is not lost
    assert steps(out)[-1] == 3


# ----------------------------------------------------------------------------- a second writer

LOCK_HOLDER = ("import sys, time\nfrom tokenpaint.training.run_dir import RunLock\nRunLock(sys.argv[1]).acquire()\n"
               "print('locked', flush=True)\ntime.sleep(300)\n")


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(setup, out) == 2
        err = capsys.readouterr().err
        assert f"is being written by another training (pid {holder.pid} on" in err and "train.lock" in err
        assert steps(out) == [] and not (out / "metrics.jsonl").exists()  # refused before any work
    finally:
        holder.kill()  # like kill -9: the lock file stays, naming the dead process
        holder.wait()
    assert train(setup, out) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of an earlier training (pid {holder.pid}) that is no longer running" in err
    assert steps(out)[-1] == 3


def test_the_lock_is_released_when_a_run_ends(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(ValueError, match="is being written by another training"):
            subprocess_lock_attempt(tmp_path)
    assert subprocess_lock_attempt(tmp_path) == "ok"


def subprocess_lock_attempt(directory) -> str:
    code = ("import sys\nfrom tokenpaint.training.run_dir import RunLock\n"
            "try:\n    RunLock(sys.argv[1]).acquire()\n    print('ok')\nexcept ValueError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    text = result.stdout.strip()
    if text != "ok":
        raise ValueError(text)
    return text


# ----------------------------------------------------------------------------- leftovers and file modes

def test_temp_files_of_interrupted_writes_are_removed_at_start(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(setup, out, "--max-steps", "1") == 0
    stray = [out / "checkpoints" / ".step_00000002.pt.1a2b3c4d.tmp", out / ".model.safetensors.k3j_x9ab.tmp",
             out / "cache" / "train" / ".image_ids.u16.0f0f0f0f.tmp", out / "cache" / "train" / "text_ids.i32.tmp4242"]
    for path in stray:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1024)
    keep = out / "notes.tmp"  # not one of ours: left alone
    keep.write_text("mine")
    capsys.readouterr()
    assert train(setup, out, "--resume", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stray) and keep.exists()
    assert all(f"removed {p}, left by an interrupted write" in err for p in stray)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        CheckpointManager(str(tmp_path / "ck")).save({"step": 1}, 1)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "ck" / "step_00000001.pt").st_mode) == mode


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("damage", ["truncated", "empty", "pickled code"])
def test_resume_falls_back_to_the_newest_loadable_checkpoint_and_says_which(setup, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert train(setup, out) == 0
    latest = out / "checkpoints" / "step_00000003.pt"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:4000])
    elif damage == "empty":
        latest.write_bytes(b"")
    else:
        torch.save({"step": 3, "evil": _Code()}, latest)
    capsys.readouterr()
    assert train(setup, out, "--resume", "--max-steps", "4") == 0
    err = capsys.readouterr().err
    assert "step_00000003.pt" in err and "resuming from the newest loadable checkpoint" in err
    assert "step_00000002.pt (step 2)" in err
    assert (out / "checkpoints" / "step_00000003.pt.unreadable").exists()
    assert steps(out)[-1] == 4 and CheckpointManager.load(str(out / "checkpoints" / "step_00000004.pt"))["step"] == 4


class _Code:
    def __reduce__(self):
        return (os.system, ("true",))


def test_resume_with_max_steps_below_the_checkpoint_is_an_error(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(setup, out) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    assert train(setup, out, "--resume", "--max-steps", "2") == 2
    assert "--max-steps 2 is below step 3 of the checkpoint being resumed" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("flag, value, message", [
    ("--max-minutes", "nan", "--max-minutes must be a positive number of minutes, got nan"),
    ("--max-minutes", "inf", "--max-minutes must be a positive number of minutes, got inf"),
    ("--max-minutes", "0", "--max-minutes must be a positive number of minutes"),
    ("--seed", str(2**64), "--seed must be an integer in [0, 4294967296), got 18446744073709551616"),
    ("--seed", "-1", "--seed must be an integer in [0, 4294967296), got -1"),
])
def test_bad_flags_fail_before_any_work(setup, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    assert train(setup, out, flag, value) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
