"""train.py transformer: end to end on a tiny random VQGAN and 16 demo images of 16x16 (4x4 ids), both kinds.

Covers learning, the run directory (Pipeline loads it), token-cache reuse, exact resume, --init-from, graceful stop,
the time budget, the NaN guard, config errors and (2 gloo processes) DDP = one process with the same global batch.
"""
import importlib.util
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tokenpaint import Pipeline
from tokenpaint.data import make_demo_dataset
from tokenpaint.training import transformer_stage
from tokenpaint.training.common import NonFiniteLossError, TrainOptions, cosine_lr
from tokenpaint.training.transformer_stage import train_transformer
from tokenpaint.vqgan import VQGAN, VQGANConfig

ROOT = Path(__file__).resolve().parents[1]


def load_cli():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tt")
    train, val, _ = make_demo_dataset(root / "data", num_train=16, num_val=8, resolution=16, seed=0)
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(embed_dim=8, n_embed=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, resolution=16))  # f4: 4x4 ids, 32 codes
    vqgan.save_pretrained(root / "vq")
    return {"root": root, "train": str(train), "val": str(val), "vq": str(root / "vq")}


def write_config(path, kind, model=None, **train):
    cfg = {"model": {"kind": kind, "n_layer": 1, "n_head": 2, "n_embd": 32, "text_len": 16, **(model or {})},
           "tokenizer": {"vocab_size": 400},
           "train": {"batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 30, "log_every": 5,
                     "val_every": 10, "sample_every": 1000, "ckpt_every": 1000, **train},
           "sample": {"steps": 3, "guidance_scale": 2.0, "top_k": None}}
    Path(path).write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def options(env, out, config, **kw):
    kw.setdefault("vqgan_dir", env["vq"])
    return TrainOptions(stage="transformer", data=env["train"], config=config, out=str(out), **kw)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(env):
    """One run per kind through the real CLI (tokenizer trained on the captions, --val), 30 steps."""
    cli, runs = load_cli(), {}
    for kind in ("gpt", "mim"):
        out = env["root"] / f"run_{kind}"
        config = write_config(env["root"] / f"{kind}.yaml", kind)
        rc = cli.main(["transformer", "--data", env["train"], "--val", env["val"], "--vqgan", env["vq"],
                       "--config", config, "--out", str(out), "--seed", "3", "--threads", "1"])
        assert rc == 0
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_cli_run_learns_and_writes_a_self_contained_run_directory(trained, kind):
    out = trained[kind]
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < 0.75 * losses[0], losses  # overfits 16 images
    assert any("val_loss" in m for m in metrics(out))
    assert json.loads((out / "config.json").read_text())["kind"] == kind
    for name in ("model.safetensors", "tokenizer.model", "vqgan/config.json", "vqgan/model.safetensors",
                 "checkpoints/step_00000030.pt", "samples/sample_00000030.png", "samples/captions.txt"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["sample"]["steps"] == 3 and saved["train"]["seed"] == 3 and saved["data"]["resolution"] == 16
    assert saved["model"]["codebook_size"] == 32 and saved["model"]["image_size"] == 4

    pipe = Pipeline.from_pretrained(out)
    assert pipe.kind == kind and pipe.options.guidance_scale == 2.0
    images = pipe(["a small red circle at the top left"], num_images=1, seed=0)
    assert images[0].size == (16, 16) and images[0].mode == "RGB"


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_run_directory_has_a_model_card_that_loads_it(trained, kind):
    out = trained[kind]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: tokenpaint\n") and f"- {kind}\n" in card
    assert "steps: 30 of 30;" in card and "images seen: 240" in card  # 30 steps x batch 8
    assert "`train.tsv` (16 rows, " in card and "`val.tsv` (8 rows, " in card
    last = [m for m in metrics(out) if "loss" in m][-1]
    assert f"| loss | {last['loss']:.6g} | 30 |" in card
    assert "val_loss" in card and (out / "train_config.yaml").read_text().rstrip() in card
    for folder in ("checkpoints/", "cache/", "samples/"):
        assert f"- `{folder}`" in card
    usage = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(usage.replace("path/to/this/folder", str(out)), scope)  # the card's own loading code works
    assert scope["pipe"].kind == kind and scope["images"][0].size == (16, 16)


def test_token_cache_is_built_once_and_reused_on_resume(env, trained):
    out = trained["gpt"]
    meta = out / "cache" / "train" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    summary = train_transformer(options(env, out, None, val=env["val"], resume=True, max_steps=32, vqgan_dir=None))
    assert summary["cache_reused"] == {"train": True, "val": True}
    assert meta.stat().st_mtime_ns == stamp
    assert summary["step"] == 32 and [m["step"] for m in metrics(out) if "loss" in m][-1] == 32


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_resume_after_n_steps_equals_2n_straight_steps(env, tmp_path, kind):
    # dropout + condition dropout + masks + grad accumulation + an epoch boundary (2 steps per epoch)
    tokenizer = str(next(iter(Path(env["root"]).glob("run_*/tokenizer.model"))))
    config = write_config(tmp_path / "c.yaml", kind, model={"dropout": 0.1, "cond_dropout": 0.3}, batch_size=4,
                          grad_accum=2, decay_steps=6, max_steps=6, val_every=1000, log_every=1)
    straight = train_transformer(options(env, tmp_path / "a", config, tokenizer=tokenizer))
    train_transformer(options(env, tmp_path / "b", config, tokenizer=tokenizer, max_steps=3))
    resumed = train_transformer(options(env, tmp_path / "b", None, resume=True, max_steps=6, vqgan_dir=None))
    assert resumed["step"] == straight["step"] == 6
    assert resumed["cache_reused"]["train"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(m["step"], m["loss"], m["lr"]) for m in metrics(tmp_path / run)] for run in "ab"]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_init_from_starts_from_the_run_and_checks_it_matches(env, trained, tmp_path):
    source = trained["gpt"]
    frozen = write_config(tmp_path / "frozen.yaml", "gpt", lr=0.0, min_lr=0.0, max_steps=1, val_every=1000)
    train_transformer(options(env, tmp_path / "ft", frozen, init_from=str(source), vqgan_dir=None))
    a, b = load_file(source / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the weights are the source's
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()

    wider = write_config(tmp_path / "wide.yaml", "gpt", model={"n_embd": 64})
    with pytest.raises(ValueError, match="shape mismatches.*blocks"):
        train_transformer(options(env, tmp_path / "w", wider, init_from=str(source), vqgan_dir=None))
    with pytest.raises(ValueError, match="holds a 'gpt' model"):
        train_transformer(options(env, tmp_path / "m", write_config(tmp_path / "m.yaml", "mim"),
                                  init_from=str(source), vqgan_dir=None))
    torch.manual_seed(1)
    other = VQGAN(VQGANConfig(embed_dim=8, n_embed=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                              attn_resolutions=(), z_channels=8, resolution=16))
    other.save_pretrained(tmp_path / "other_vq")
    with pytest.raises(ValueError, match="--vqgan .* is not the VQGAN"):
        train_transformer(options(env, tmp_path / "v", frozen, init_from=str(source),
                                  vqgan_dir=str(tmp_path / "other_vq")))


def test_cli_rejects_a_bad_thread_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(["transformer", "--data", "x.tsv", "--out", "o", "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_bad_config_key_is_named_with_its_line(env, tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", "gpt", lr_warmup=10)
    rc = load_cli().main(["transformer", "--data", env["train"], "--vqgan", env["vq"], "--config", config,
                          "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "'lr_warmup'" in err and "line" in err and "'train'" in err
    rc = load_cli().main(["transformer", "--data", env["train"], "--config", write_config(tmp_path / "ok.yaml", "gpt"),
                          "--out", str(tmp_path / "o")])
    assert rc == 2 and "--vqgan" in capsys.readouterr().err
    config = write_config(tmp_path / "bad_model.yaml", "mim", model={"n_layers": 2})
    with pytest.raises(ValueError, match="n_layers"):
        train_transformer(options(env, tmp_path / "o2", config))


def test_sigterm_and_time_budget_stop_cleanly_and_save(env, trained, tmp_path, monkeypatch):
    tokenizer = str(trained["mim"] / "tokenizer.model")
    config = write_config(tmp_path / "c.yaml", "mim", max_steps=50, val_every=1000)
    original, calls = transformer_stage.corrupt, []

    def corrupt_then_signal(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # during step 3: the loop finishes it, saves and returns
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kw)

    monkeypatch.setattr(transformer_stage, "corrupt", corrupt_then_signal)
    summary = train_transformer(options(env, tmp_path / "sig", config, tokenizer=tokenizer))
    assert summary["stopped"] == "SIGTERM" and summary["step"] == 3
    assert (tmp_path / "sig" / "checkpoints" / "step_00000003.pt").is_file()
    assert (tmp_path / "sig" / "model.safetensors").is_file()
    monkeypatch.undo()

    summary = train_transformer(options(env, tmp_path / "budget", config, tokenizer=tokenizer, max_minutes=1e-6))
    assert summary["stopped"] == "time budget" and summary["step"] == 1
    assert (tmp_path / "budget" / "checkpoints" / "step_00000001.pt").is_file()


class StepClock:
    """A fake clock for TimeBudget that advances one second per training step (at each batch corruption)."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        real_budget, real_corrupt = transformer_stage.TimeBudget, transformer_stage.corrupt
        monkeypatch.setattr(transformer_stage, "TimeBudget",
                            lambda minutes, spent=0.0: real_budget(minutes, spent, clock=lambda: self.now))

        def corrupt(*args, **kw):
            self.now += 1.0
            return real_corrupt(*args, **kw)

        monkeypatch.setattr(transformer_stage, "corrupt", corrupt)


def test_time_budget_decays_the_lr_to_min_lr_and_counts_across_resume(env, trained, tmp_path, monkeypatch):
    StepClock(monkeypatch)
    tokenizer = str(trained["gpt"] / "tokenizer.model")
    config = write_config(tmp_path / "c.yaml", "gpt", warmup_steps=2, max_steps=1000, log_every=1, val_every=1000)
    out = tmp_path / "run"
    summary = train_transformer(options(env, out, config, tokenizer=tokenizer, max_minutes=10 / 60))  # 10 "seconds"
    assert summary["stopped"] == "time budget" and summary["step"] == 10
    lrs = [m["lr"] for m in metrics(out) if "lr" in m]
    assert len(lrs) == 10 and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    # step index s runs with the share of the budget used before it (s seconds of 10), not s / 1000 steps
    assert lrs[9] == pytest.approx(cosine_lr(9, 2, 1000, 3e-3, 3e-4, time_fraction=0.9))
    assert lrs[9] < 0.2 * cosine_lr(9, 2, 1000, 3e-3, 3e-4)  # near min_lr, where the step schedule is near lr
    assert torch.load(out / "checkpoints" / "step_00000010.pt", weights_only=True)["train_seconds"] == 10.0

    with pytest.raises(ValueError, match="already trained 0.2 minutes.*larger --max-minutes"):
        train_transformer(options(env, out, None, resume=True, max_minutes=10 / 60, vqgan_dir=None))
    resumed = train_transformer(options(env, out, None, resume=True, max_minutes=20 / 60, vqgan_dir=None))
    assert resumed["step"] == 20  # 10 more "seconds"
    lrs = [m["lr"] for m in metrics(out) if "lr" in m]
    assert lrs[10] == pytest.approx(cosine_lr(10, 2, 1000, 3e-3, 3e-4, time_fraction=0.5))  # 10 s of 20


def test_decay_with_budget_false_keeps_the_step_schedule(env, trained, tmp_path, monkeypatch):
    StepClock(monkeypatch)
    config = write_config(tmp_path / "c.yaml", "gpt", warmup_steps=2, max_steps=1000, log_every=1, val_every=1000,
                          decay_with_budget=False)
    out = tmp_path / "run"
    train_transformer(options(env, out, config, tokenizer=str(trained["gpt"] / "tokenizer.model"),
                             max_minutes=5 / 60))
    lrs = [m["lr"] for m in metrics(out) if "lr" in m]
    assert lrs == pytest.approx([cosine_lr(s, 2, 1000, 3e-3, 3e-4) for s in range(5)])


def test_max_steps_with_max_minutes_keeps_the_step_schedule_and_reports_the_share(env, trained, tmp_path,
                                                                                 monkeypatch, capsys):
    StepClock(monkeypatch)
    config = write_config(tmp_path / "c.yaml", "gpt", warmup_steps=2, max_steps=1000, log_every=1, val_every=1000)
    out = tmp_path / "run"
    summary = train_transformer(options(env, out, config, tokenizer=str(trained["gpt"] / "tokenizer.model"),
                                        max_steps=40, max_minutes=5 / 60))  # the minutes only cap the 40 steps
    assert summary["stopped"] == "time budget" and summary["step"] == 5
    lrs = [m["lr"] for m in metrics(out) if "lr" in m]
    assert lrs == pytest.approx([cosine_lr(s, 2, 40, 3e-3, 3e-4) for s in range(5)])
    assert "stopped at step 5/40, 12% of the steps" in capsys.readouterr().err
    resumed = train_transformer(options(env, out, None, resume=True, vqgan_dir=None))  # no cap: the rest of the steps
    assert resumed["step"] == 40
    lrs = [m["lr"] for m in metrics(out) if "lr" in m]
    assert lrs == pytest.approx([cosine_lr(s, 2, 40, 3e-3, 3e-4) for s in range(40)])


def test_compile_flag_compiles_the_training_forward_with_the_same_result(env, trained, tmp_path, monkeypatch):
    from tokenpaint.training import common

    calls = []
    real_compile = torch.compile

    def counting_compile(module, **kw):
        calls.append(kw)
        return real_compile(module, **kw)

    monkeypatch.setattr(common, "COMPILE_BACKEND", "eager")  # Dynamo tracing without a C++ build: fast
    monkeypatch.setattr(torch, "compile", counting_compile)
    tokenizer = str(trained["gpt"] / "tokenizer.model")
    config = write_config(tmp_path / "c.yaml", "gpt", max_steps=3, log_every=1, val_every=1000)
    plain = train_transformer(options(env, tmp_path / "plain", config, tokenizer=tokenizer))
    assert calls == []
    compiled = train_transformer(options(env, tmp_path / "compiled", config, tokenizer=tokenizer, compile=True))
    assert calls == [{"backend": "eager"}]
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    saved = load_file(tmp_path / "compiled" / "model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()  # no "_orig_mod." prefix


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(env, trained, tmp_path):
    tokenizer = str(trained["gpt"] / "tokenizer.model")
    config = write_config(tmp_path / "c.yaml", "gpt", lr=1e30, min_lr=1e30, warmup_steps=0, grad_clip=0,
                          ckpt_every=1, max_steps=20)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+).*step_0000000\d\.pt is intact"):
        train_transformer(options(env, tmp_path / "nan", config, tokenizer=tokenizer))


# ----------------------------------------------------------------------------- DDP (2 gloo processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, opts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_transformer(opts)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(env, trained, tmp_path):
    tokenizer = str(trained["mim"] / "tokenizer.model")
    config = write_config(tmp_path / "c.yaml", "mim", max_steps=3, val_every=1000)  # masked: uneven counts per rank
    single = options(env, tmp_path / "one", config, tokenizer=tokenizer, batch_size=8)
    train_transformer(single)
    double = options(env, tmp_path / "two", config, tokenizer=tokenizer, batch_size=4)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True, start_method="fork")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    lb = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    assert la == pytest.approx(lb, rel=1e-5)
