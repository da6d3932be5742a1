"""VQGAN model behaviour: config, shapes, quantizer forms, inference preparation, bad input, a tiny model learns."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_config

from tokenpaint.vqgan import VQGAN, VQGANConfig, QuantizeOutput
from tokenpaint.vqgan.quantize import VectorQuantizer, nearest_code_ids


# -- config ----------------------------------------------------------------------------------------------------
def test_default_config_is_taming_f16_16384():
    cfg = VQGANConfig()
    assert (cfg.embed_dim, cfg.n_embed, cfg.ch, cfg.ch_mult) == (256, 16384, 128, (1, 1, 2, 2, 4))
    assert (cfg.num_res_blocks, cfg.attn_resolutions, cfg.z_channels, cfg.resolution) == (2, (16,), 256, 256)
    assert (cfg.quantizer, cfg.beta, cfg.codebook_dim, cfg.dropout) == ("legacy", 0.25, None, 0.0)
    assert cfg.downsample_factor == 16


def test_config_dict_round_trip_and_unknown_keys():
    cfg = tiny_config(quantizer="l2", codebook_dim=8)
    d = cfg.to_dict()
    assert d["ch_mult"] == [1, 2] and VQGANConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown keys \['bogus', 'n_embd'\]"):
        VQGANConfig.from_dict({**d, "bogus": 1, "n_embd": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quantizer="fsq"), "quantizer must be one of"),
        (dict(ch=24), "multiples of 32"),
        (dict(double_z=True), "double_z"),
        (dict(n_embed=0), "n_embed must be positive"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


# -- shapes and API --------------------------------------------------------------------------------------------
def test_encode_decode_shapes_and_types(tiny_vqgan):
    x = random_images(2, (32, 64))
    with torch.no_grad():
        ids = tiny_vqgan.encode(x)
        assert ids.shape == (2, 16, 32) and ids.dtype == torch.long
        assert 0 <= int(ids.min()) and int(ids.max()) < tiny_vqgan.codebook_size == 64
        x_hat = tiny_vqgan.decode(ids)
        assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
        z_q = tiny_vqgan.codebook_lookup(ids)
        assert z_q.shape == (2, 16, 16, 32)
        torch.testing.assert_close(tiny_vqgan.decode_latents(z_q), x_hat)
        # encode() agrees with the quantizer that training uses
        q = tiny_vqgan.quantize(tiny_vqgan.encode_latents(x))
        assert torch.equal(q.ids, ids) and torch.equal(q.z_q, z_q)
    assert tiny_vqgan.downsample_factor == 2


def test_forward_returns_reconstruction_and_quantize_output(tiny_vqgan):
    x_hat, q = tiny_vqgan(random_images(2, 32))
    assert isinstance(q, QuantizeOutput) and x_hat.shape == (2, 3, 32, 32)
    assert q.ids.shape == (2, 16, 16) and q.z_q.shape == (2, 16, 16, 16)
    assert 1.0 <= q.perplexity.item() <= 64.0
    assert q.loss.requires_grad


def test_nearest_code_ids_is_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    assert torch.equal(nearest_code_ids(z, codebook), torch.cdist(z, codebook).argmin(dim=1))


@pytest.mark.parametrize("kind", ["legacy", "standard", "l2"])
def test_quantizer_loss_forms(kind):
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, beta=0.25, kind=kind)
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    q = vq(z)
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    codes = vq.embedding.weight.detach()
    if kind == "l2":
        z_flat, codes = F.normalize(z_flat, dim=1), F.normalize(codes, dim=1)
    mse = (codes[q.ids.flatten()] - z_flat).square().mean()
    torch.testing.assert_close(q.codebook_loss, mse)
    torch.testing.assert_close(q.commitment_loss, mse)
    # the two terms differ in where the gradient goes, which fixes how beta weights them
    vq.embedding.weight.grad = None
    q.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and vq.embedding.weight.grad.abs().sum() > 0
    vq.embedding.weight.grad = None
    q.commitment_loss.backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and vq.embedding.weight.grad is None
    torch.testing.assert_close(q.loss, mse + 0.25 * mse)
    # straight-through: z_q passes the gradient on as if it were z (after the l2 normalisation, for "l2")
    z.grad = None
    q.z_q.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) if kind == "l2" else z2).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_legacy_and_standard_weight_beta_on_different_terms():
    torch.manual_seed(0)
    z = torch.randn(1, 8, 4, 4, requires_grad=True)
    losses = {}
    for kind in ("legacy", "standard"):
        vq = VectorQuantizer(16, 8, beta=0.25, kind=kind)
        torch.nn.init.normal_(vq.embedding.weight, generator=torch.Generator().manual_seed(1))
        z.grad = None
        vq(z).loss.backward()
        losses[kind] = (z.grad.clone(), vq.embedding.weight.grad.clone())
    # encoder gradient: weight 1 in legacy (commitment unweighted), beta in standard; codebook the other way round
    torch.testing.assert_close(losses["standard"][0], 0.25 * losses["legacy"][0])
    torch.testing.assert_close(losses["legacy"][1], 0.25 * losses["standard"][1])


def test_l2_quantizer_uses_low_dim_unit_codes():
    torch.manual_seed(0)
    model = VQGAN(tiny_config(quantizer="l2", codebook_dim=8, beta=0.25)).eval()
    assert model.quant_conv.weight.shape == (8, 16, 1, 1)
    assert model.post_quant_conv.weight.shape == (16, 8, 1, 1)
    assert model.quantize.embedding.weight.shape == (64, 8)
    x = random_images(2, 32)
    with torch.no_grad():
        ids = model.encode(x)
        z_q = model.codebook_lookup(ids)
        torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 16, 16))
        # for unit vectors, nearest = most similar in cosine
        z = F.normalize(model.encode_latents(x), dim=1)
        cos = torch.einsum("bdhw,kd->bhwk", z, F.normalize(model.quantize.embedding.weight, dim=1))
        assert torch.equal(ids, cos.argmax(dim=-1))
        assert model.decode(ids).shape == x.shape


# -- inference preparation -------------------------------------------------------------------------------------
def test_prepare_for_inference_channels_last_is_exact_enough(tiny_vqgan):
    x = random_images(2, 32)
    with torch.no_grad():
        ids, ref = tiny_vqgan.encode(x), tiny_vqgan.decode(tiny_vqgan.encode(x))
    tiny_vqgan.prepare_for_inference()
    assert not tiny_vqgan.training and not any(p.requires_grad for p in tiny_vqgan.parameters())
    assert tiny_vqgan.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(tiny_vqgan.encode(x), ids)
        torch.testing.assert_close(tiny_vqgan.decode(ids), ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_cast_once_stays_close(tiny_vqgan):
    torch.nn.init.normal_(tiny_vqgan.quantize.embedding.weight, std=0.5)
    ids = tiny_vqgan.encode(random_images(2, 32)).detach()
    with torch.no_grad():
        ref = tiny_vqgan.decode(ids)
    tiny_vqgan.prepare_for_inference(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in tiny_vqgan.parameters())
    with torch.inference_mode():
        out = tiny_vqgan.decode(ids)
        assert out.dtype == torch.bfloat16
        assert tiny_vqgan.encode(random_images(1, 32)).dtype == torch.long  # float32 input is cast once
    mse = (out.float() - ref).square().mean().item()
    assert 10 * math.log10(4.0 / mse) > 35.0  # PSNR over the [-1, 1] range


def test_same_seed_same_model_same_ids():
    x = random_images(1, 32)
    out = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            out.append(VQGAN(tiny_config()).eval().encode(x))
    assert torch.equal(out[0], out[1])


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny_vqgan):
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\].*\(2, 1, 32, 32\)"):
        tiny_vqgan.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny_vqgan.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 63\], got range \[0, 64\]"):
        tiny_vqgan.decode(torch.tensor([[[0, 64]]]))
    with pytest.raises(ValueError, match="integer tensor"):
        tiny_vqgan.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"shape \[B, h, w\]"):
        tiny_vqgan.decode(torch.zeros(4, dtype=torch.long))


# -- it learns -------------------------------------------------------------------------------------------------
def test_tiny_vqgan_learns_to_reconstruct():
    torch.manual_seed(0)
    model = VQGAN(tiny_config(quantizer="standard", n_embed=32, embed_dim=8, attn_resolutions=(), resolution=16))
    model.train()
    # smooth images (a few colour blobs) so an 8x8 grid of 32 codes can represent them
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        x_hat, q = model(x)
        rec = (x_hat - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        (rec + q.loss).backward()
        opt.step()
        losses.append(rec.item())
    assert losses[-1] < 0.5 * losses[0], losses
