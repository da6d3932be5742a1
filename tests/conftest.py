"""Shared fixtures: tiny VQGAN configs and taming-transformers reference models built on the same weights."""
import contextlib
import io
import os

import pytest
import torch

from tokenpaint.vqgan import VQGAN, VQGANConfig

# Tiny test models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP workers spin-waiting
# for a busy core made a tiny VQGAN training step 25x slower (3.4 s vs 0.16 s). Override for a quiet machine.
torch.set_num_threads(int(os.environ.get("TOKENPAINT_TEST_THREADS", "1")))


def tiny_config(**overrides) -> VQGANConfig:
    """ch 32, two levels (f2), attention at 16 on 32x32 images, 64 codes of dim 16."""
    base = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, n_embed=64,
                embed_dim=16, z_channels=16)
    base.update(overrides)
    return VQGANConfig(**base)


def build_taming_vqmodel(cfg: VQGANConfig, seed: int = 0, codebook_std: float = 0.5):
    """taming's own Encoder / Decoder / VectorQuantizer (+ quant convs) with random weights.

    Returns (modules: ModuleDict, state_dict with taming VQModel keys). The codebook is drawn on the latents' scale
    so nearest-code decisions are well separated (taming's +-1/n init puts every code within float noise of 0).
    """
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    dd = dict(ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout, in_channels=cfg.in_channels,
              resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=False)
    with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
        modules = torch.nn.ModuleDict({
            "encoder": Encoder(**dd),
            "decoder": Decoder(**dd),
            "quantize": VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.beta),
            "quant_conv": torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1),
            "post_quant_conv": torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1),
        })
    torch.nn.init.normal_(modules["quantize"].embedding.weight, std=codebook_std)
    # GroupNorm's default affine (1, 0) would hide a swapped weight/bias; perturb them
    for name, p in modules.named_parameters():
        if "norm" in name:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    sd = {f"{name}.{k}": v.clone() for name, mod in modules.items() for k, v in mod.state_dict().items()}
    return modules.eval(), sd


def random_images(batch: int, size, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(tiny_config()).eval()
