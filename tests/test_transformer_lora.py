"""LoRA adapters: identity at init, fuse == hooks, exact unload, additive mixing, file contents, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_generators import random_batch, tiny_gpt, tiny_mim
from tokenpaint.transformer.lora import (LORA_CONFIG, LORA_WEIGHTS, LoRAAdapter, LoRASet, base_hash,
                                         resolve_targets)


def trained_like(adapter: LoRAAdapter, seed: int) -> LoRAAdapter:
    """Give B (and the text rows) random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if adapter.text_delta is not None:
            adapter.text_delta.copy_(torch.randn(adapter.text_delta.shape, generator=g) * 0.5)
    return adapter


def logits(model, batch):
    with torch.no_grad():
        return model(*batch)[0]


@pytest.mark.parametrize("make", [tiny_gpt, tiny_mim])
def test_fresh_adapter_changes_nothing_and_trained_one_does(make):
    model, batch = make(), random_batch()
    before = logits(model, batch)
    lora = LoRASet(model)
    adapter = LoRAAdapter.create(model, rank=4, targets=["attn", "mlp", "head"], text_ids=[3, 5])
    lora.add(adapter, 0.8, "a")
    assert torch.equal(logits(model, batch), before)  # B = 0 and zero text rows: exactly the base
    trained_like(adapter, 0)
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)


def test_targets_resolve_to_linear_layers_and_unknown_names_fail():
    model = tiny_gpt()
    assert resolve_targets(model, ["attn"]) == ["blocks.0.attn.c_attn", "blocks.0.attn.c_proj",
                                               "blocks.1.attn.c_attn", "blocks.1.attn.c_proj"]
    assert resolve_targets(model, ["mlp_out", "head"]) == ["blocks.0.mlp.c_proj", "blocks.1.mlp.c_proj", "head"]
    assert resolve_targets(model, ["blocks.1.attn.c_attn"]) == ["blocks.1.attn.c_attn"]
    with pytest.raises(ValueError, match="unknown LoRA target 'atn'.*attn"):
        resolve_targets(model, ["atn"])
    with pytest.raises(ValueError, match="unknown LoRA target 'blocks.7.attn.c_attn'"):
        LoRAAdapter.create(model, rank=2, targets=["blocks.7.attn.c_attn"])


@pytest.mark.parametrize("make", [tiny_gpt, tiny_mim])
def test_fused_equals_unfused_and_unload_restores_base_exactly(make):
    model, batch = make(), random_batch()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRASet(model)
    lora.add(trained_like(LoRAAdapter.create(model, rank=4, targets=["attn", "mlp"], text_ids=[2, 7]), 1), 0.7, "a")
    hooked = logits(model, batch)
    lora.fuse()
    assert not lora._hooks  # fused: plain layers again
    assert torch.allclose(logits(model, batch), hooked, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.state_dict()["blocks.0.attn.c_attn.weight"], base_state["blocks.0.attn.c_attn.weight"])
    lora.unload()
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key  # bit for bit
    assert base_hash(model) == lora.base_sha256


def test_two_adapters_add_their_deltas_at_their_scales():
    model, batch = tiny_gpt(), random_batch()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    a = trained_like(LoRAAdapter.create(model, rank=2, targets=["attn"], text_ids=[4]), 1)
    b = trained_like(LoRAAdapter.create(model, rank=3, alpha=6, targets=["attn", "mlp"], text_ids=[4, 9]), 2)
    lora = LoRASet(model)
    lora.add(a, 0.5, "a")
    lora.add(b, -1.5, "b")
    hooked = logits(model, batch)
    lora.fuse()
    state = model.state_dict()
    for layer in b.config.layers:
        expected = 0.5 * a.weight_delta(layer) if layer in a.config.layers else 0
        expected = expected - 1.5 * b.weight_delta(layer)
        assert torch.allclose(state[f"{layer}.weight"] - base_state[f"{layer}.weight"], expected, atol=1e-6)
    rows = state["embed.text_tok.weight"] - base_state["embed.text_tok.weight"]
    assert torch.allclose(rows[4], 0.5 * a.text_delta[0] - 1.5 * b.text_delta[0], atol=1e-6)
    assert torch.allclose(rows[9], -1.5 * b.text_delta[1], atol=1e-6)
    assert rows[[i for i in range(rows.shape[0]) if i not in (4, 9)]].abs().max() == 0
    assert torch.allclose(logits(model, batch), hooked, atol=1e-5, rtol=1e-5)  # hooks sum the deltas too


def test_adapter_file_holds_only_adapter_tensors_and_round_trips(tmp_path):
    model, batch = tiny_mim(), random_batch()
    adapter = trained_like(LoRAAdapter.create(model, rank=4, alpha=8, targets=["qkv", "head"], text_ids=[3],
                                              words=["orange"]), 3)
    adapter.save(tmp_path / "run")
    tensors = load_file(str(tmp_path / "run" / LORA_WEIGHTS))
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("text_embedding.") for k in tensors)
    assert set(tensors) == {*(f"{layer}.lora_{ab}" for layer in adapter.config.layers for ab in "AB"),
                            "text_embedding.ids", "text_embedding.delta"}
    n_adapter = sum(t.numel() for t in tensors.values())
    assert n_adapter < 0.2 * model.num_params()
    meta = json.loads((tmp_path / "run" / LORA_CONFIG).read_text())
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["words"], meta["kind"]) == (4, 8.0, ["qkv", "head"],
                                                                                        ["orange"], "mim")
    assert meta["base_sha256"] == base_hash(model)
    loaded = LoRAAdapter.load(tmp_path / "run")
    for name, tensor in loaded.tensors().items():
        assert torch.equal(tensor, tensors[name])
    one, two = LoRASet(model), None
    one.add(adapter, 0.8, "x")
    expected = logits(model, batch)
    one.unload()
    two = LoRASet(model)
    two.add(LoRAAdapter.load(tmp_path / "run" / LORA_WEIGHTS), 0.8, "x")  # the file path works too
    assert torch.equal(logits(model, batch), expected)


def test_wrong_base_names_both_hashes_and_other_errors(tmp_path):
    model, other = tiny_gpt(seed=0), tiny_gpt(seed=1)
    LoRAAdapter.create(model, rank=2, targets=["attn"]).save(tmp_path / "a")
    adapter = LoRAAdapter.load(tmp_path / "a")
    with pytest.raises(ValueError, match=f"{base_hash(model)} vs {base_hash(other)}"):
        LoRASet(other).add(adapter, 1.0, "a")
    lora = LoRASet(model)
    lora.add(adapter, 1.0, "a")
    with pytest.raises(ValueError, match="already loaded"):
        lora.add(LoRAAdapter.load(tmp_path / "a"), 1.0, "a")
    meta = json.loads((tmp_path / "a" / LORA_CONFIG).read_text())
    (tmp_path / "a" / LORA_CONFIG).write_text(json.dumps({**meta, "layers": ["blocks.0.attn.nope"]}))
    with pytest.raises(ValueError, match="blocks.0.attn.nope"):
        LoRAAdapter.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter at .*missing"):
        LoRAAdapter.load(tmp_path / "missing")
    (tmp_path / "a" / LORA_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="no lora.json"):
        LoRAAdapter.load(tmp_path / "a")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRAAdapter.create(model, rank=0)


def test_shipped_demo_lora_config_stays_under_5_percent_of_the_demo_model():
    from tokenpaint.resources import config_path
    from tokenpaint.transformer import load_transformer_yaml, model_config_from_yaml
    from tokenpaint.transformer.kinds import generator_class

    lora = load_transformer_yaml(config_path("demo", "mim_lora.yaml"))["lora"]
    base_cfg = model_config_from_yaml(load_transformer_yaml(config_path("demo", "mim.yaml")), text_vocab_size=400,
                                      codebook_size=1024, image_size=8)
    model = generator_class("mim")(base_cfg)
    adapter = LoRAAdapter.create(model, lora["rank"], lora["alpha"], lora["targets"], text_ids=[5, 6])
    n_adapter = sum(t.numel() for t in adapter.tensors().values())
    assert 0.01 < n_adapter / model.num_params() <= 0.05
