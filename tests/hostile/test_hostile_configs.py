"""Hostile configs: a value of the wrong type or out of range fails when the YAML is read, before any work, naming the
file, the line and the key (one checker, tokenpaint.utils.load_config, for both stages' schemas)."""
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from tokenpaint.transformer.presets import load_transformer_yaml

ROOT = Path(__file__).resolve().parents[2]
VQGAN = {"model": dict(ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], z_channels=8, embed_dim=8,
                       n_embed=16, resolution=16),
         "loss": dict(perceptual_weight=0.0, discriminator=False),
         "train": dict(batch_size=2, max_steps=10, ckpt_every=5, log_every=1),
         "data": dict(resolution=16)}
TRANSFORMER = {"model": dict(kind="gpt", n_layer=1, n_head=2, n_embd=32), "tokenizer": dict(vocab_size=100),
               "train": dict(batch_size=2, max_steps=10, log_every=5), "sample": dict(steps=3, guidance_scale=2.0)}


def load_cli():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path, base, section, key, value):
    cfg = {name: dict(body) for name, body in base.items()}
    cfg.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines = path.read_text().splitlines()
    start = lines.index(f"{section}:")
    line = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{key}:")) + 1
    return str(path), line


CASES = [  # (stage, section, key, value, what the message says is wanted)
    ("vqgan", "train", "max_steps", "10", "an integer >= 1"),
    ("vqgan", "train", "lr", "fast", "a number >= 0, or null"),
    ("vqgan", "train", "log_every", "25", "an integer >= 1"),
    ("vqgan", "train", "ckpt_every", 0, "an integer >= 1"),
    ("vqgan", "train", "seed", 2**64, "an integer in [0, 4294967296)"),
    ("vqgan", "train", "betas", [0.5], "a list of 2 numbers"),
    ("vqgan", "train", "bf16", "yes please", "one of true, false, auto"),
    ("vqgan", "train", "ema_decay", 1.0, "a number in (0, 1), or null"),
    ("vqgan", "loss", "disc_start", -1, "an integer >= 0"),
    ("vqgan", "loss", "l1_weight", float("nan"), "a number >= 0"),
    ("vqgan", "model", "ch", "32", "an integer"),
    ("vqgan", "model", "ch_mult", "1,2", "a list of integers"),
    ("vqgan", "data", "resolution", 0, "an integer >= 1, or null"),
    ("transformer", "train", "max_steps", "10", "an integer >= 1"),
    ("transformer", "train", "lr", -0.1, "a number >= 0"),
    ("transformer", "train", "log_every", "25", "an integer >= 1"),
    ("transformer", "train", "ckpt_every", 0, "an integer >= 1"),
    ("transformer", "train", "warmup_steps", -5, "an integer >= 0"),
    ("transformer", "train", "seed", -1, "an integer in [0, 4294967296)"),
    ("transformer", "train", "label_smoothing", 1.0, "a number in [0, 1)"),
    ("transformer", "model", "n_embd", "32", "an integer"),
    ("transformer", "model", "kind", "diffusion", "one of gpt, mim"),
    ("transformer", "model", "dropout", "0.1", "a number"),
    ("transformer", "tokenizer", "vocab_size", "8000", "an integer >= 4"),
    ("transformer", "sample", "guidance_scale", "1.5", "a number"),
    ("transformer", "data", "shuffle", "no", "true or false"),
]


@pytest.mark.parametrize("stage, section, key, value, wanted", CASES,
                         ids=[f"{c[0]}-{c[1]}.{c[2]}={c[3]!r}" for c in CASES])
def test_a_bad_value_names_file_line_and_key_before_any_work(tmp_path, capsys, stage, section, key, value, wanted):
    config, line = write(tmp_path / "cfg.yaml", VQGAN if stage == "vqgan" else TRANSFORMER, section, key, value)
    data = tmp_path / "train.tsv"
    data.write_text("0\ta caption\tnot-read\n")
    out = tmp_path / "run"
    args = [stage, "--data", str(data), "--config", config, "--out", str(out)]
    rc = load_cli().main(args + (["--vqgan", str(tmp_path / "no-vqgan")] if stage == "transformer" else []))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: {config}, line {line}: {section}.{key} must be {wanted}" in err, err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("section, key, value, wanted", [
    ("train", "batch_size", 2.5, "an integer >= 1"), ("model", "preset", "huge", "one of gpt_base"),
    ("train", "grad_clip", -1, "a number >= 0, or null"),
])
def test_load_transformer_yaml_applies_the_same_checks(tmp_path, section, key, value, wanted):
    config, line = write(tmp_path / "cfg.yaml", TRANSFORMER, section, key, value)
    with pytest.raises(ValueError, match=rf"^{config}, line {line}: {section}\.{key} must be {wanted}"):
        load_transformer_yaml(config)


def test_null_where_null_means_something_and_ints_for_floats_are_accepted(tmp_path):
    config, _ = write(tmp_path / "cfg.yaml", TRANSFORMER, "train", "grad_clip", None)
    cfg = load_transformer_yaml(write(tmp_path / "cfg.yaml", yaml.safe_load(Path(config).read_text()),
                                      "train", "lr", 1)[0])
    assert cfg["train"]["grad_clip"] is None and cfg["train"]["lr"] == 1


@pytest.mark.parametrize("key, value, wanted", [
    ("top_p", 2.0, "a number in [0, 1], or null"), ("top_k", 0, "an integer >= 1, or null"),
    ("temperature", 0, "a number > 0"), ("steps", 1.5, "an integer >= 1"),
    ("guidance_scale", float("inf"), "a number >= 0"),
])
def test_sample_section_is_checked_at_training_time_not_at_generation(tmp_path, key, value, wanted):
    config, line = write(tmp_path / "cfg.yaml", TRANSFORMER, "sample", key, value)
    with pytest.raises(ValueError, match=rf"^{config}, line {line}: sample\.{key} must be {re.escape(wanted)}"):
        load_transformer_yaml(config)


@pytest.mark.parametrize("stage, key, value, message", [
    ("vqgan", "ch", 16, "ch * ch_mult must be multiples of 32"),
    ("vqgan", "quantizer", "fancy", "quantizer must be one of"),
    ("transformer", "n_head", 3, "n_embd (32) must be divisible by n_head (3)"),
    ("transformer", "dropout", 1.5, "dropout must be in [0, 1)"),
])
def test_the_model_section_is_checked_by_its_config_class_when_read(tmp_path, capsys, stage, key, value, message):
    """Rules between keys (and ranges the config classes own) also fail when the file is read, at a line."""
    config, line = write(tmp_path / "cfg.yaml", VQGAN if stage == "vqgan" else TRANSFORMER, "model", key, value)
    data = tmp_path / "train.tsv"
    data.write_text("0\ta caption\tnot-read\n")
    args = [stage, "--data", str(data), "--config", config, "--out", str(tmp_path / "run")]
    rc = load_cli().main(args + (["--vqgan", str(tmp_path / "no-vqgan")] if stage == "transformer" else []))
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {config}, line {line}: section 'model': " in err and message in err, err
