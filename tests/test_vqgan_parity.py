"""Parity with taming-transformers' own Encoder / Decoder / VectorQuantizer loaded with the same weights."""
import pytest
import torch
from conftest import build_taming_vqmodel, random_images, tiny_config

from tokenpaint.vqgan import VQGAN, VQGANConfig
from tokenpaint.vqgan.io import build_from_state_dict


def taming_encode(t, x):
    z = t["quant_conv"](t["encoder"](x))
    z_q, loss, (perplexity, _, ids) = t["quantize"](z)
    return z, z_q, loss, perplexity, ids.view(z.shape[0], z.shape[2], z.shape[3])


def taming_decode(t, ids):
    b, h, w = ids.shape
    z_q = t["quantize"].get_codebook_entry(ids.reshape(-1), (b, h, w, t["quantize"].e_dim))
    return t["decoder"](t["post_quant_conv"](z_q))


def assert_parity(cfg: VQGANConfig, x: torch.Tensor, channels_last: bool = False):
    taming, sd = build_taming_vqmodel(cfg)
    ours = VQGAN(cfg).eval()
    ours.load_state_dict(sd, strict=True)  # identical keys and shapes, or this raises
    if channels_last:
        ours.prepare_for_inference()
    with torch.no_grad():
        z_ref, _, loss_ref, ppl_ref, ids_ref = taming_encode(taming, x)
        x_ref = taming_decode(taming, ids_ref)
        z = ours.encode_latents(x)
        ids = ours.encode(x)
        x_hat = ours.decode(ids)
        q = ours.quantize(z)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    assert ids.dtype == torch.long and torch.equal(ids, ids_ref)
    assert torch.equal(q.ids, ids_ref)
    assert (x_hat - x_ref).abs().max().item() < 1e-4
    torch.testing.assert_close(q.loss, loss_ref, atol=1e-6, rtol=1e-4)  # legacy form = taming's value
    torch.testing.assert_close(q.perplexity, ppl_ref, atol=1e-4, rtol=1e-5)
    return ids


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, 32),  # attention at 16 (the lower level)
        (dict(ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(32, 8)), 32),  # attention at two levels
        (dict(ch_mult=(1, 2), attn_resolutions=()), (32, 48)),  # no level attention, non-square images
    ],
)
def test_tiny_configs_match_taming(overrides, size):
    assert_parity(tiny_config(**overrides), random_images(2, size))


def test_channels_last_inference_matches_taming():
    assert_parity(tiny_config(), random_images(2, 32), channels_last=True)


def test_quantizer_matches_taming_on_identical_latents():
    cfg = tiny_config()
    taming, sd = build_taming_vqmodel(cfg)
    ours = VQGAN(cfg)
    ours.load_state_dict(sd)
    z = torch.randn(3, cfg.embed_dim, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    z_ref, z_our = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    zq_ref, loss_ref, (ppl_ref, _, ids_ref) = taming["quantize"](z_ref)
    q = ours.quantize(z_our)
    assert torch.equal(q.ids.flatten(), ids_ref.flatten())
    torch.testing.assert_close(q.z_q, zq_ref, atol=0, rtol=0)
    torch.testing.assert_close(q.loss, loss_ref, atol=0, rtol=1e-6)
    # the gradients of the legacy loss (and the straight-through path) reach z and the codebook alike
    (loss_ref + zq_ref.square().sum()).backward()
    (q.loss + q.z_q.square().sum()).backward()
    torch.testing.assert_close(z_our.grad, z_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        ours.quantize.embedding.weight.grad, taming["quantize"].embedding.weight.grad, atol=1e-6, rtol=1e-5
    )


def test_training_gradients_match_taming():
    cfg = tiny_config()
    taming, sd = build_taming_vqmodel(cfg)
    ours = VQGAN(cfg)
    ours.load_state_dict(sd)
    x = random_images(2, 32, seed=3)
    z_q, loss, _ = taming["quantize"](taming["quant_conv"](taming["encoder"](x)))
    x_ref = taming["decoder"](taming["post_quant_conv"](z_q))
    ((x_ref - x).abs().mean() + loss).backward()
    x_hat, q = ours(x)
    ((x_hat - x).abs().mean() + q.loss).backward()
    torch.testing.assert_close(x_hat, x_ref, atol=1e-4, rtol=1e-4)
    theirs = {f"{n}.{k}": p.grad for n, m in taming.items() for k, p in m.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow  # 76M parameters built twice at 256x256
def test_full_f16_16384_config_at_256_matches_taming():
    cfg = VQGANConfig()  # taming's ImageNet f16/16384
    taming, sd = build_taming_vqmodel(cfg, codebook_std=0.2)
    assert sum(v.numel() for v in sd.values()) == 76_073_859  # 76.07M without the loss
    ours = build_from_state_dict(cfg, sd, "test")  # no second random init of 76M weights
    x = random_images(1, 256)
    with torch.inference_mode():
        z_ref, _, loss_ref, _, ids_ref = taming_encode(taming, x)
        x_ref = taming_decode(taming, ids_ref)
        del taming
        ours.prepare_for_inference()
        ids = ours.encode(x)
        x_hat = ours.decode(ids)
    assert ids.shape == (1, 16, 16)
    assert torch.equal(ids, ids_ref)
    assert (x_hat - x_ref).abs().max().item() < 1e-4
