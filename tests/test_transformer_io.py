"""Saving and loading generators (strict, exact, no pickles), config dicts, optimiser groups."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenpaint.transformer import GPT, GPTConfig, MaskedTransformer, MaskedTransformerConfig, load_generator

SMALL = dict(text_vocab_size=30, text_len=4, codebook_size=20, image_size=3, n_layer=1, n_head=2, n_embd=16)


def build(kind, **overrides):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig(**{**SMALL, **overrides}))
    return MaskedTransformer(MaskedTransformerConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    model = build(kind, label_smoothing=0.2) if kind == "mim" else build(kind, bias=False)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kind"] == kind and config["n_embd"] == 16

    for loaded in (type(model).from_pretrained(tmp_path), load_generator(tmp_path)):
        assert type(loaded) is type(model) and loaded.config == model.config
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        text = torch.randint(0, 30, (2, 4))
        image = torch.randint(0, 20, (2, 9))
        torch.testing.assert_close(loaded.eval()(text, image)[0], model.eval()(text, image)[0], atol=0, rtol=0)


def test_mismatched_weights_name_the_keys_and_the_file(tmp_path):
    build("gpt").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(2)
    state["embed.text_tok.weight"] = torch.zeros(31, 16)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained(tmp_path)
    message = str(info.value)
    for part in ("model.safetensors", "missing keys (1): head.weight", "unexpected keys (1): extra.weight",
                 "embed.text_tok.weight: file (31, 16) vs model (30, 16)"):
        assert part in message, message


def test_config_mismatch_and_unknown_kind_are_clear(tmp_path):
    build("mim").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kind is 'mim', expected 'gpt'"):
        GPT.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kind"] = "diffusion"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown generator kind 'diffusion'"):
        load_generator(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_generator(tmp_path / "nowhere")


def test_config_dicts_round_trip_and_reject_unknown_or_bad_fields():
    config = MaskedTransformerConfig(**SMALL, label_smoothing=0.05)
    assert MaskedTransformerConfig.from_dict(config.to_dict()) == config
    assert config.mask_token_id == 20 and config.image_vocab_size == 21
    with pytest.raises(ValueError, match=r"unknown keys \['n_layers'\]"):
        GPTConfig.from_dict({**SMALL, "n_layers": 3}, source="cfg.json")
    with pytest.raises(ValueError, match=r"GPTConfig.n_layer must be int, got .12. \(in x.yaml\)"):
        GPTConfig.from_dict({**SMALL, "n_layer": "12"}, source="x.yaml")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(**{**SMALL, "n_embd": 15})
    with pytest.raises(ValueError, match="label_smoothing"):
        MaskedTransformerConfig(**SMALL, label_smoothing=1.0)


def test_optimizer_decays_only_linear_weights():
    model = build("gpt")
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "head.weight" in decayed and "blocks.0.attn.c_attn.weight" in decayed
    assert not any("embed." in n or "ln" in n or n.endswith(".bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind,bias", [("gpt", True), ("gpt", False), ("mim", True)])
def test_num_params_matches_the_architecture(kind, bias):
    """Counted from the layer shapes: per block two LayerNorms, qkv + output projections and a 4x MLP."""
    model = build(kind, bias=bias)
    c = model.config
    C, ln = c.n_embd, (2 if bias else 1) * c.n_embd  # a LayerNorm: weight (+ bias)
    linear = lambda n_in, n_out: n_in * n_out + (n_out if bias else 0)  # noqa: E731
    block = 2 * ln + linear(C, 3 * C) + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C)
    image_vocab = c.codebook_size + (1 if kind == "mim" else 0)  # the masked model embeds [MASK] too
    embeddings = (c.text_vocab_size + c.text_len + image_vocab + 2 * c.image_size) * C  # tokens, positions, row/col
    head = C * c.codebook_size  # no bias
    assert model.num_params() == c.n_layer * block + ln + head + embeddings
    assert model.num_params(exclude_embeddings=True) == c.n_layer * block + ln + head
