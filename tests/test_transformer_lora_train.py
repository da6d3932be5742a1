"""train.py transformer --init-from BASE --lora RANK: a frozen base, a trained adapter file, resume, errors, DDP."""
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from test_transformer_train import _ddp_worker, _free_port, env, load_cli, metrics, options, write_config  # noqa: F401
from tokenpaint import Pipeline
from tokenpaint.training.transformer_stage import train_transformer
from tokenpaint.transformer import load_generator
from tokenpaint.transformer.lora import base_hash


def lora_config(path, words=("red",), **train):
    """A LoRA config: no model section (the base's model), a `lora:` section."""
    cfg = {"train": {"batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "max_steps": 20, "log_every": 1,
                     "val_every": 1000, "sample_every": 1000, "ckpt_every": 1000, **train},
           "lora": {"rank": 4, "targets": ["attn", "mlp"], "words": list(words)}}
    Path(path).write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base(env):
    out = env["root"] / "base"
    train_transformer(options(env, out, write_config(env["root"] / "base.yaml", "mim", max_steps=20, val_every=1000)))
    return out


def test_cli_lora_run_trains_only_the_adapter_and_writes_a_small_file(env, base, tmp_path):
    out = tmp_path / "lora"
    config = lora_config(tmp_path / "l.yaml", max_steps=30)
    rc = load_cli().main(["transformer", "--data", env["train"], "--init-from", str(base), "--lora", "2",
                          "--lora-alpha", "4", "--lora-targets", "qkv,mlp", "--config", config, "--out", str(out),
                          "--threads", "1"])
    assert rc == 0
    assert not (out / "model.safetensors").exists() and not (out / "vqgan").exists()
    meta = json.loads((out / "lora.json").read_text())
    base_model = load_generator(base)
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["words"]) == (2, 4.0, ["qkv", "mlp"], ["red"])
    assert meta["base_sha256"] == base_hash(base_model)
    tensors = load_file(out / "lora.safetensors")
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("text_embedding.") for k in tensors)
    assert not any(k.endswith(".lora_B") and v.abs().max() == 0 for k, v in tensors.items())  # B learned
    assert tensors["text_embedding.delta"].abs().max() > 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert load_file(base / "model.safetensors").keys() == base_model.state_dict().keys()

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "LoRA adapter (mim)" in card and meta["base_sha256"] in card and "- lora\n" in card
    usage = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(usage.replace("path/to/this/folder", str(out)).replace("path/to/base", str(base)), scope)  # it loads
    assert scope["pipe"].loras == {"lora": 0.8}

    pipe = Pipeline.from_pretrained(base)
    text, image = pipe.encode_text(["a small red circle"]), torch.full((1, 16), 32)  # all [MASK]
    with torch.no_grad():
        before = pipe.model(text, image)[0]
        pipe.load_lora(out, scale=1.0)
        assert (pipe.model(text, image)[0] - before).abs().max() > 1e-3


def test_lora_resume_after_n_steps_equals_2n_straight_steps(env, base, tmp_path):
    config = lora_config(tmp_path / "l.yaml", max_steps=6, decay_steps=6, grad_accum=2, batch_size=4)
    straight = train_transformer(options(env, tmp_path / "a", config, init_from=str(base), vqgan_dir=None))
    train_transformer(options(env, tmp_path / "b", config, init_from=str(base), vqgan_dir=None, max_steps=3))
    resumed = train_transformer(options(env, tmp_path / "b", None, resume=True, max_steps=6, vqgan_dir=None))
    assert resumed["step"] == straight["step"] == 6
    a, b = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]


def test_lora_errors_before_any_work(env, base, tmp_path, capsys):
    config = lora_config(tmp_path / "l.yaml")
    no_rank = tmp_path / "n.yaml"
    no_rank.write_text(yaml.safe_dump({"train": {"max_steps": 2}}))
    cli = load_cli()
    for argv, message in (
            (["--vqgan", env["vq"], "--lora", "4"], "--lora needs --init-from"),
            (["--init-from", str(base), "--lora", "4", "--lora-targets", "attn,atn"], "unknown LoRA target 'atn'"),
            (["--init-from", str(base), "--lora", "0"], "lora.rank must be an integer >= 1"),
            (["--init-from", str(base), "--lora-alpha", "8", "--config", str(no_rank)], "need --lora RANK")):
        rc = cli.main(["transformer", "--data", env["train"], "--config", config, "--out", str(tmp_path / "x"), *argv])
        assert rc == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "x" / "cache").exists()
    bad_layer = lora_config(tmp_path / "b.yaml")
    cfg = yaml.safe_load(Path(bad_layer).read_text())
    cfg["lora"]["targets"] = ["blocks.9.attn.c_attn"]
    Path(bad_layer).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="unknown LoRA target 'blocks.9.attn.c_attn'"):
        train_transformer(options(env, tmp_path / "y", bad_layer, init_from=str(base), vqgan_dir=None))

    # resuming onto a base whose weights changed: both hashes named
    moved = tmp_path / "base_copy"
    load_generator(base).save_pretrained(moved)
    for name in ("tokenizer.model", "train_config.yaml"):
        (moved / name).write_bytes((base / name).read_bytes())
    (moved / "vqgan").mkdir()
    for f in (base / "vqgan").iterdir():
        (moved / "vqgan" / f.name).write_bytes(f.read_bytes())
    train_transformer(options(env, tmp_path / "r", lora_config(tmp_path / "r.yaml", max_steps=4), init_from=str(moved),
                              vqgan_dir=None, max_steps=2))
    old = base_hash(load_generator(moved))
    changed = load_generator(moved)
    with torch.no_grad():
        changed.head.weight.add_(1.0)
    changed.save_pretrained(moved)
    with pytest.raises(ValueError, match=f"{old}, the directory now holds {base_hash(changed)}"):
        train_transformer(options(env, tmp_path / "r", None, resume=True, vqgan_dir=None))


def test_lora_ddp_two_processes_match_one_process(env, base, tmp_path):
    config = lora_config(tmp_path / "l.yaml", max_steps=3)
    train_transformer(options(env, tmp_path / "one", config, init_from=str(base), vqgan_dir=None, batch_size=8))
    double = options(env, tmp_path / "two", config, init_from=str(base), vqgan_dir=None, batch_size=4)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True, start_method="fork")
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
