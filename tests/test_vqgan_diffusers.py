"""diffusers' VQModel format, both ways, with the real diffusers package as the reference: a diffusers directory loads
with the same ids and images, `save_pretrained(format="diffusers")` writes one that diffusers loads with the same ids
and images, aMUSEd's layout (no middle attention) included, and configs tokenpaint cannot represent are refused."""
import json
import sys

import pytest
import torch

if sys.version_info < (3, 11):
    pytest.skip("the pinned diffusers release (the reference) needs Python 3.11+", allow_module_level=True)
import diffusers  # noqa: E402  the reference; a test-only dependency installed by `make venv` (setup.cfg, extra test)
from conftest import random_images, tiny_config  # noqa: E402

from tokenpaint.vqgan import VQGAN  # noqa: E402



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local directories only: nothing is downloaded


def random_diffusers_vq(seed=0, **config):
    base = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=16,
                vq_embed_dim=8, num_vq_embeddings=64, sample_size=32, lookup_from_codebook=True)
    torch.manual_seed(seed)
    model = diffusers.VQModel(**{**base, **config}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm's default (1, 0) would hide a swapped weight and bias
                p.add_(0.1 * torch.randn_like(p))
        model.quantize.embedding.weight.normal_(std=0.5)  # on the latents' scale: well-separated nearest codes
    return model


def diffusers_ids_and_images(model, x):
    """diffusers' own path: encode -> quantize ids; decode(ids, force_not_quantize=True) looks the codes up."""
    with torch.inference_mode():
        h = model.encode(x).latents  # [B, D, h, w]
        _, _, (_, _, ids) = model.quantize(h)  # [B*h*w]
        b, d, hh, ww = h.shape
        images = model.decode(ids, force_not_quantize=True, shape=(b, hh, ww, d)).sample
    return ids.view(b, hh, ww), images


def ours(vq, x):
    with torch.inference_mode():
        ids = vq.encode(x)
        return ids, vq.decode(ids)


def assert_same(a, b):
    (ids_a, img_a), (ids_b, img_b) = a, b
    assert len(ids_b.unique()) > 5  # not a comparison of constant grids
    assert torch.equal(ids_a, ids_b)
    assert img_a.dtype == img_b.dtype == torch.float32
    assert (img_a - img_b).abs().max().item() <= 1e-4


AMUSED_LIKE = dict(  # aMUSEd's VQ (ch 128, ch_mult (1,2,2,4,6), 8192 x 64 codes), scaled down: no attention anywhere
    block_out_channels=(32, 64, 64, 96), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=32, vq_embed_dim=16,
    num_vq_embeddings=128, mid_block_add_attention=False)


@pytest.mark.parametrize("config", [{}, AMUSED_LIKE], ids=["attention", "amused"])
def test_a_diffusers_directory_loads_with_diffusers_ids_and_images(tmp_path, config):
    ref = random_diffusers_vq(**config)
    ref.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").is_file()
    vq = VQGAN.from_pretrained(tmp_path / "vq").eval()
    assert vq.config.mid_attention == config.get("mid_block_add_attention", True)
    assert [vq.config.ch * m for m in vq.config.ch_mult] == list(ref.config.block_out_channels)
    x = random_images(2, 32, seed=1)
    assert_same(ours(vq, x), diffusers_ids_and_images(ref, x))


def test_a_pickle_free_bin_file_loads_too(tmp_path):
    ref = random_diffusers_vq()
    ref.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin, read with weights_only
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    x = random_images(1, 32)
    assert_same(ours(VQGAN.from_pretrained(tmp_path), x), diffusers_ids_and_images(ref, x))


def test_pre_0_14_attention_names_load(tmp_path):
    """Older diffusers files name the attention layers query / key / value / proj_attn (diffusers still reads them)."""
    from safetensors.torch import load_file, save_file

    ref = random_diffusers_vq()
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
    renamed = {}
    for key, value in load_file(weights).items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, weights)
    x = random_images(1, 32)
    assert_same(ours(VQGAN.from_pretrained(tmp_path), x), diffusers_ids_and_images(ref, x))


def test_a_diffusers_pipeline_folder_loads_its_vqvae(tmp_path):
    ref = random_diffusers_vq(**AMUSED_LIKE)
    ref.save_pretrained(tmp_path / "amused" / "vqvae")  # the layout of a Hub pipeline such as amused/amused-256
    vq = VQGAN.from_pretrained(tmp_path / "amused")
    x = random_images(1, 32)
    assert_same(ours(vq, x), diffusers_ids_and_images(ref, x))


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(mid_attention=False, attn_resolutions=()), dict(ch_mult=(1, 2, 2), num_res_blocks=2,
                                                                  attn_resolutions=(32, 8), z_channels=32)],
    ids=["attention", "no-mid-attention", "three-levels"],
)
def test_save_pretrained_diffusers_is_loaded_by_diffusers(tmp_path, overrides):
    torch.manual_seed(0)
    vq = VQGAN(tiny_config(**overrides)).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(std=0.5)
        for name, p in vq.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    vq.save_pretrained(tmp_path / "vq", format="diffusers")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json",
                                                                   "diffusion_pytorch_model.safetensors"]
    ref = diffusers.VQModel.from_pretrained(tmp_path / "vq").eval()
    x = random_images(2, 32, seed=2)
    assert_same(ours(vq, x), diffusers_ids_and_images(ref, x))
    back = VQGAN.from_pretrained(tmp_path / "vq")  # and back: the same weights and architecture
    assert back.config == vq.config
    sd = vq.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items()) and back.state_dict().keys() == sd.keys()
    vq.save_pretrained(tmp_path / "vq")  # tokenpaint's format over it: its config.json decides, not the leftover file
    assert VQGAN.from_pretrained(tmp_path / "vq").config == vq.config


def test_what_diffusers_cannot_represent_is_refused_before_writing(tmp_path):
    vq = VQGAN(tiny_config(quantizer="l2", codebook_dim=8))
    with pytest.raises(ValueError, match="quantizer='l2'"):
        vq.save_pretrained(tmp_path / "l2", format="diffusers")
    assert not (tmp_path / "l2").exists()
    with pytest.raises(ValueError, match="format"):
        VQGAN(tiny_config()).save_pretrained(tmp_path / "x", format="ckpt")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(norm_type="spatial"), "norm_type"),
        (dict(norm_num_groups=16), "norm_num_groups"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "up_block_types"),  # other levels
        (dict(down_block_types=["DownEncoderBlock2D", "SimpleDown"]), "down_block_types"),
        (dict(_class_name="AutoencoderKL"), "_class_name"),
        (dict(block_out_channels=[32, 48]), "block_out_channels"),
        (dict(new_option=1), "new_option"),
        (dict(sample_size="big"), "sample_size"),
    ],
)
def test_configs_tokenpaint_cannot_represent_are_refused_naming_the_field(tmp_path, change, field):
    random_diffusers_vq().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=field) as e:
        VQGAN.from_pretrained(tmp_path)
    assert str(path) in str(e.value)
