"""Saving and loading: save_pretrained round trips, taming Lightning checkpoints, and clear errors for bad files."""
import json
import logging
import sys
import types

import pytest
import torch
import yaml
from conftest import build_taming_vqmodel, random_images, tiny_config

from tokenpaint.vqgan import VQGAN, CheckpointError, UnsafeCheckpointError, VQGANConfig


def fake_lightning_ckpt(path, sd, n_loss=3):
    """What taming's training writes: weights under "state_dict", with the loss module's weights beside them."""
    loss = {f"loss.discriminator.main.{i}.weight": torch.randn(4, 4) for i in range(n_loss)}
    torch.save({"state_dict": {**sd, **loss}, "global_step": 0, "epoch": 3}, path)
    return path


def outputs(model, x):
    with torch.inference_mode():
        ids = model.encode(x)
        return ids, model.decode(ids)


# -- save_pretrained -------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(tiny_config(quantizer="l2", codebook_dim=8)).eval()
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["quantizer"] == "l2"
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config
    x = random_images(2, 32)
    ids, x_hat = outputs(model, x)
    ids2, x_hat2 = outputs(loaded, x)
    assert torch.equal(ids, ids2) and torch.equal(x_hat, x_hat2)
    # a model prepared for inference (channels_last weights) saves the same tensors
    model.prepare_for_inference().save_pretrained(tmp_path / "vq2")
    ids3, x_hat3 = outputs(VQGAN.from_pretrained(str(tmp_path / "vq2")), x)
    assert torch.equal(ids3, ids) and torch.equal(x_hat3, x_hat)


def test_save_pretrained_overwrites_atomically(tmp_path):
    torch.manual_seed(0)
    a, b = VQGAN(tiny_config()), VQGAN(tiny_config())
    a.save_pretrained(tmp_path)
    b.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    assert torch.equal(loaded.quantize.embedding.weight, b.quantize.embedding.weight)
    assert len(list(tmp_path.iterdir())) == 2


# -- taming checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(ch_mult=(1, 2), attn_resolutions=(16,), n_embed=64),
        dict(ch=64, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(32, 8), n_embed=128, embed_dim=8),
        dict(ch_mult=(2, 4), attn_resolutions=(), n_embed=32, z_channels=32, embed_dim=32),
    ],
)
def test_lightning_ckpt_architecture_inferred_from_weights(tmp_path, caplog, overrides):
    cfg = tiny_config(**overrides)
    taming, sd = build_taming_vqmodel(cfg)
    ckpt = fake_lightning_ckpt(tmp_path / "last.ckpt", sd, n_loss=3)
    with caplog.at_level(logging.INFO, logger="tokenpaint.vqgan.io"):
        model = VQGAN.from_pretrained(ckpt)
    assert "set aside 3 loss.* weights" in caplog.text and str(ckpt) in caplog.text
    got = model.config
    assert (got.ch, got.ch_mult, got.num_res_blocks, got.n_embed, got.embed_dim, got.z_channels) == (
        cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.n_embed, cfg.embed_dim, cfg.z_channels)
    # resolution defaults to 256; attention sits on the same levels
    levels = lambda c: [c.resolution // 2**i in c.attn_resolutions for i in range(len(c.ch_mult))]  # noqa: E731
    assert got.resolution == 256 and levels(got) == levels(cfg)
    assert got.quantizer == "legacy"
    x = random_images(1, 32)
    ids, x_hat = outputs(model, x)
    with torch.no_grad():
        _, _, (_, _, ref_ids) = taming["quantize"](taming["quant_conv"](taming["encoder"](x)))
    assert torch.equal(ids.flatten(), ref_ids.flatten())


def test_model_yaml_beside_the_ckpt_gives_the_architecture(tmp_path):
    cfg = tiny_config(ch_mult=(1, 2), attn_resolutions=(16,))
    _, sd = build_taming_vqmodel(cfg)
    ckpt = fake_lightning_ckpt(tmp_path / "last.ckpt", sd)
    dd = {k: v for k, v in cfg.to_dict().items() if k in
          ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "in_channels",
           "out_ch", "dropout", "double_z")}
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": dd,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPS"}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc))
    model = VQGAN.from_pretrained(ckpt)
    assert model.config == cfg  # resolution 32 from the yaml, not the inferred 256
    # a yaml that disagrees with the weights: one error naming both files and the mismatched shapes
    doc["model"]["params"]["n_embed"] = 99
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError) as e:
        VQGAN.from_pretrained(ckpt)
    msg = str(e.value)
    assert str(ckpt) in msg and "model.yaml" in msg
    assert "quantize.embedding.weight: file (64, 16) vs model (99, 16)" in msg


def test_bare_state_dict_file_loads(tmp_path):
    _, sd = build_taming_vqmodel(tiny_config())
    torch.save(sd, tmp_path / "weights.pt")
    model = VQGAN.from_pretrained(tmp_path / "weights.pt")
    assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])


# -- errors ----------------------------------------------------------------------------------------------------
def test_wrong_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VQGAN.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQGAN.from_pretrained(tmp_path / "empty")


def test_truncated_ckpt_names_the_file(tmp_path):
    _, sd = build_taming_vqmodel(tiny_config())
    ckpt = fake_lightning_ckpt(tmp_path / "last.ckpt", sd)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{ckpt}: truncated or corrupt"):
        VQGAN.from_pretrained(ckpt)
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(ckpt)):
        VQGAN.from_pretrained(ckpt)
    ckpt.write_bytes(bytes(range(256)) * 8)  # not a checkpoint at all
    with pytest.raises(CheckpointError, match=str(ckpt)):
        VQGAN.from_pretrained(ckpt)


def test_corrupt_safetensors_names_the_file(tmp_path):
    VQGAN(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated or corrupt safetensors"):
        VQGAN.from_pretrained(tmp_path)


def test_bad_config_json_names_file_and_line(tmp_path):
    VQGAN(tiny_config()).save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text('{\n  "ch": 32,\n  oops\n}')
    with pytest.raises(ValueError, match=rf"{cfg}: invalid JSON at line 3"):
        VQGAN.from_pretrained(tmp_path)
    cfg.write_text(json.dumps({**tiny_config().to_dict(), "n_layers": 2}))
    with pytest.raises(ValueError, match=rf"{cfg}: .*unknown keys \['n_layers'\]"):
        VQGAN.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_name_keys_and_shapes(tmp_path):
    VQGAN(tiny_config()).save_pretrained(tmp_path)
    d = tiny_config(n_embed=128, ch_mult=(1, 2, 2), attn_resolutions=()).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        VQGAN.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "model.safetensors") in msg
    assert "missing keys (28)" in msg and "encoder.down.2.block.0.conv1.weight" in msg
    assert "unexpected keys (30)" in msg and "decoder.up.1.attn.0.q.weight" in msg
    assert "quantize.embedding.weight: file (64, 16) vs model (128, 16)" in msg


def test_ckpt_with_pickled_object_is_refused_unless_opted_in(tmp_path):
    _, sd = build_taming_vqmodel(tiny_config())
    # a Lightning-like callback class from a module the loading side does not have
    fake = types.ModuleType("fake_lightning_callbacks")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "x"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = fake.__name__, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    sys.modules[fake.__name__] = fake
    try:
        ckpt = tmp_path / "last.ckpt"
        torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"k": 1}}, "obj": ModelCheckpoint()}, ckpt)
    finally:
        del sys.modules[fake.__name__]
    with pytest.raises(UnsafeCheckpointError) as e:
        VQGAN.from_pretrained(ckpt)
    msg = str(e.value)
    assert str(ckpt) in msg and "refused" in msg and "fake_lightning_callbacks" in msg
    assert "weights_only=False" not in msg and "allow_unsafe_pickle" not in msg  # no advice to turn the check off
    model = VQGAN.from_pretrained(ckpt, allow_unsafe_pickle=True)  # the module is gone: stubs stand in
    assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])


def test_ckpt_without_weights_is_an_error(tmp_path):
    torch.save({"global_step": 3}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"x.ckpt: no weights found"):
        VQGAN.from_pretrained(tmp_path / "x.ckpt")
    _, sd = build_taming_vqmodel(tiny_config())
    del sd["encoder.conv_in.weight"]
    torch.save({"state_dict": sd}, tmp_path / "y.ckpt")
    with pytest.raises(CheckpointError, match=r"y.ckpt: cannot infer the architecture, weight 'encoder.conv_in"):
        VQGAN.from_pretrained(tmp_path / "y.ckpt")


def test_default_config_state_dict_keys_match_taming_names():
    with torch.device("meta"):
        sd = VQGAN(VQGANConfig()).state_dict()
    for key in ["encoder.down.4.attn.1.proj_out.weight", "encoder.down.3.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.up.4.block.2.norm1.bias", "decoder.up.1.upsample.conv.weight",
                "decoder.up.4.attn.2.k.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.bias"]:
        assert key in sd, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert sum(v.numel() for v in sd.values()) == 76_073_859
