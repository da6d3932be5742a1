"""The shipped transformer YAML configs parse into model configs of the documented sizes."""
from pathlib import Path

import pytest
import torch

from tokenpaint.transformer import (
    GPT,
    PRESETS,
    GPTConfig,
    MaskedTransformer,
    MaskedTransformerConfig,
    load_transformer_yaml,
    model_config_from_yaml,
    preset_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = {  # file -> (kind, n_layer, n_head, n_embd, preset with the same size)
    "gpt_base.yaml": ("gpt", 12, 12, 768, "gpt_base"),
    "gpt_large.yaml": ("gpt", 24, 16, 1024, "gpt_large"),
    "mim_base.yaml": ("mim", 12, 12, 768, "mim_base"),
    "demo/captioner.yaml": ("gpt", 4, 4, 96, "demo_gpt"),
    "demo/gpt_both.yaml": ("gpt", 4, 4, 96, "demo_gpt"),
    "demo/gpt.yaml": ("gpt", 4, 4, 96, "demo_gpt"),
    "demo/mim.yaml": ("mim", 4, 4, 96, "demo_mim"),
}


def build_on_meta(config):
    cls = GPT if isinstance(config, GPTConfig) else MaskedTransformer
    with torch.device("meta"):  # no memory, no init cost
        return cls(config)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_parses_and_matches_its_preset(name):
    kind, n_layer, n_head, n_embd, preset = SHIPPED[name]
    cfg = load_transformer_yaml(CONFIGS / name)
    assert set(cfg) >= {"model", "tokenizer", "train", "sample"}
    side = 8 if name.startswith("demo") else 16
    config = model_config_from_yaml(cfg, codebook_size=512, image_size=side)
    assert config.kind == kind
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert config.text_vocab_size == cfg["tokenizer"]["vocab_size"] and config.codebook_size == 512
    assert {k: PRESETS[preset][k] for k in ("n_layer", "n_head", "n_embd", "kind")} == dict(
        kind=kind, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )
    train = cfg["train"]
    assert train["warmup_steps"] < train["max_steps"] and 0 < train["min_lr"] < train["lr"]
    assert len(train["betas"]) == 2
    if kind == "gpt":
        assert list(config.directions) == cfg["model"].get("directions", ["t2i"])
    if kind == "mim":
        assert isinstance(config, MaskedTransformerConfig)
        assert config.label_smoothing == train["label_smoothing"]
        assert cfg["sample"]["steps"] >= 1
    build_on_meta(config)


def test_gpt_base_has_pai_painter_size():
    cfg = load_transformer_yaml(CONFIGS / "gpt_base.yaml")
    config = model_config_from_yaml(cfg, codebook_size=16384, image_size=16)
    assert config.text_len == 32 and config.text_vocab_size == 8000
    assert config.block_size == 32 + 256 - 1
    n = build_on_meta(config).num_params()
    assert 85e6 <= n <= 120e6, n
    large = model_config_from_yaml(load_transformer_yaml(CONFIGS / "gpt_large.yaml"), codebook_size=16384, image_size=16)
    assert 300e6 <= build_on_meta(large).num_params() <= 400e6


def test_demo_configs_are_small_enough_for_a_cpu_demo():
    for name in ("demo/gpt.yaml", "demo/mim.yaml"):
        cfg = load_transformer_yaml(CONFIGS / name)
        config = model_config_from_yaml(cfg, codebook_size=256, image_size=8)
        assert config.num_image_tokens == 64
        assert build_on_meta(config).num_params() < 2e6
        assert cfg["train"]["bf16"] is False  # float32: the recipe was measured so, and bf16 was slower at this size


def test_bad_yaml_is_reported_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: gpt\n  n_layers: 3\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"bad.yaml, line 3: unknown key 'n_layers' in section 'model'"):
        load_transformer_yaml(bad)
    with pytest.raises(ValueError, match=r"bad.yaml.*unknown keys \['n_layers'\]"):  # a dict built by hand
        model_config_from_yaml({"model": {"kind": "gpt", "n_layers": 3}, "source": str(bad)}, codebook_size=16,
                               image_size=4)
    bad.write_text("model:\n  kind: gpt\ntrain:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"bad.yaml, line 4: unknown key 'learning_rate' in section 'train'"):
        load_transformer_yaml(bad)
    bad.write_text("model:\n  kind: gpt\ntrain:\n  seed: 3\ndata:\n  shuffle: false\n")  # training-stage keys
    cfg = load_transformer_yaml(bad)
    assert cfg["train"]["seed"] == 3 and cfg["data"] == {"resolution": None, "shuffle": False}
    bad.write_text("model:\n  kind: vae\n")
    with pytest.raises(ValueError, match=r"bad.yaml, line 2: model.kind must be one of"):
        load_transformer_yaml(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_transformer_yaml(tmp_path / "missing.yaml")
    bad.write_text("model:\n  kind: gpt\ntrain:\n  lr: 5e-4\n")  # YAML 1.2 float, a string to plain PyYAML
    assert load_transformer_yaml(bad)["train"]["lr"] == 5e-4


def test_presets_build_configs_and_yaml_can_name_a_preset(tmp_path):
    assert preset_config("demo_mim", codebook_size=64, image_size=8).kind == "mim"
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  preset: gpt_large\n  n_layer: 2\n")
    config = model_config_from_yaml(load_transformer_yaml(path), codebook_size=16, image_size=4)
    assert (config.n_layer, config.n_embd, config.kind) == (2, 1024, "gpt")  # explicit keys win over the preset
    path.write_text("model:\n  preset: mim_base\n")
    config = model_config_from_yaml(load_transformer_yaml(path), codebook_size=16, image_size=4)
    assert config.kind == "mim" and config.n_layer == 12  # the preset's kind, not the "gpt" default
    with pytest.raises(ValueError, match="unknown preset 'gpt_huge'"):
        preset_config("gpt_huge")
