"""LlamaGen tokenizer checkpoints: keys renamed, architecture and l2 quantizer read off the weights, the same ids and
images as LlamaGen's own VQModel on the same weights, and pickled training checkpoints refused.

LlamaGen is not pip-installable, so the reference below re-implements its tokenizer (tokenizer/tokenizer_image/
vq_model.py in FoundationVision/LlamaGen) with its module names and its own forward arithmetic: attention by bmm,
swish as x * sigmoid(x), level lists built the way its constructors build them, distances as z^2 + e^2 - 2 z.e over
l2-normalised vectors.
"""
import argparse

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images
from torch import nn

from tokenpaint.vqgan import VQGAN, UnsafeCheckpointError, VQGANConfig


# -- the reference: LlamaGen's VQModel ---------------------------------------------------------------------------
def group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class LGResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.dropout = nn.Dropout(0.0)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class LGAttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1, 1, 0) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c**-0.5  # [b, hw, hw]
        w = F.softmax(w, dim=2)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class LGDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class LGUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def lg_middle(c):
    return nn.ModuleList([LGResnetBlock(c, c), LGAttnBlock(c), LGResnetBlock(c, c)])


class LGEncoder(nn.Module):
    """Attention only at the last (lowest-resolution) level, after each of its res blocks."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.num_res_blocks, n = num_res_blocks, len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        in_mult = (1,) + tuple(ch_mult)
        for level in range(n):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            c_in, c_out = ch * in_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                block.res.append(LGResnetBlock(c_in, c_out))
                c_in = c_out
                if level == n - 1:
                    block.attn.append(LGAttnBlock(c_in))
            if level != n - 1:
                block.downsample = LGDownsample(c_in)
            self.conv_blocks.append(block)
        self.mid = lg_middle(c_in)
        self.norm_out, self.conv_out = group_norm(c_in), nn.Conv2d(c_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, block in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks):
                h = block.res[j](h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if level != len(self.conv_blocks) - 1:
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class LGDecoder(nn.Module):
    """conv_blocks[0] is the lowest resolution (built for levels n-1 .. 0); num_res_blocks + 1 blocks per level."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.num_res_blocks, n = num_res_blocks, len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, 1, 1)
        self.mid = lg_middle(c_in)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            c_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                block.res.append(LGResnetBlock(c_in, c_out))
                c_in = c_out
                if level == n - 1:
                    block.attn.append(LGAttnBlock(c_in))
            if level != 0:
                block.upsample = LGUpsample(c_in)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = group_norm(c_in), nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for i, block in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks + 1):
                h = block.res[j](h)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if i != len(self.conv_blocks) - 1:
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LGQuantizer(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.e_dim = e_dim
        self.embedding = nn.Embedding(n_e, e_dim)
        self.register_buffer("codebook_used", torch.zeros(65536))  # usage statistics of training

    def ids(self, z):  # z [b, c, h, w] -> ids [b*h*w]
        z_flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, self.e_dim), p=2, dim=-1)
        e = F.normalize(self.embedding.weight, p=2, dim=-1)
        d = (z_flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * torch.einsum("bd,dn->bn", z_flat, e.t())
        return d.argmin(dim=1)

    def get_codebook_entry(self, ids, shape):  # shape (b, c, h, w)
        z_q = F.normalize(self.embedding.weight, p=2, dim=-1)[ids]
        return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()


class LGVQModel(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, codebook_size=16384,
                 codebook_embed_dim=8):
        super().__init__()
        self.encoder = LGEncoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = LGDecoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = LGQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def encode_ids(self, x):
        h = self.quant_conv(self.encoder(x))
        return self.quantize.ids(h).view(h.shape[0], h.shape[2], h.shape[3])

    def decode_code(self, ids):
        b, hh, ww = ids.shape
        z_q = self.quantize.get_codebook_entry(ids.flatten(), (b, self.quantize.e_dim, hh, ww))
        return self.decoder(self.post_quant_conv(z_q))


def random_llamagen(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = LGVQModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm's default (1, 0) would hide a swapped weight and bias
                p.add_(0.1 * torch.randn_like(p))
        model.quantize.embedding.weight.normal_()
        model.quantize.codebook_used.random_(0, 64)
    return model


TINY = [
    dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=32, codebook_size=64, codebook_embed_dim=8),  # VQ-16-like
    dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, codebook_size=96, codebook_embed_dim=4),  # VQ-8-like
]


# -- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY)
def test_llamagen_checkpoint_gives_llamagen_ids_and_images(tmp_path, arch):
    ref = random_llamagen(**arch)
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": ref.state_dict()}, path)
    vq = VQGAN.from_pretrained(path).eval()
    cfg = vq.config
    assert cfg.quantizer == "l2" and cfg.code_dim == arch["codebook_embed_dim"]
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.n_embed) == (
        arch["ch"], arch["ch_mult"], arch["num_res_blocks"], arch["z_channels"], arch["codebook_size"])
    assert cfg.mid_attention and cfg.attn_resolutions == (256 // 2 ** (len(arch["ch_mult"]) - 1),)  # the last level
    x = random_images(3, 32, seed=1)
    with torch.inference_mode():
        ids, ref_ids = vq.encode(x), ref.encode_ids(x)
        assert len(ref_ids.unique()) > 5  # the comparison is not between constant grids
        assert torch.equal(ids, ref_ids)
        images, ref_images = vq.decode(ids), ref.decode_code(ids)
    assert images.shape == (3, 3, 32, 32)
    assert (images - ref_images).abs().max().item() < 1e-4


def test_ema_weights_are_preferred_and_a_saved_copy_round_trips(tmp_path):
    model, ema = random_llamagen(0, **TINY[1]), random_llamagen(1, **TINY[1])
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "both.pt")
    vq = VQGAN.from_pretrained(tmp_path / "both.pt")
    assert torch.equal(vq.quantize.embedding.weight, ema.quantize.embedding.weight)
    vq.save_pretrained(tmp_path / "saved")  # tokenpaint's own format from then on
    again = VQGAN.from_pretrained(tmp_path / "saved")
    assert again.config == vq.config
    x = random_images(2, 32)
    with torch.inference_mode():
        assert torch.equal(again.encode(x), ema.encode_ids(x))


def test_full_size_vq16_and_vq8_keys_map_onto_tokenpaint_exactly(tmp_path):
    """The published architectures, on the meta device: every renamed key and shape fits, nothing is left over."""
    from tokenpaint.vqgan.formats import llamagen_to_tokenpaint
    from tokenpaint.vqgan.io import infer_config

    counts = []
    for ch_mult in [(1, 1, 2, 2, 4), (1, 2, 2, 4)]:
        with torch.device("meta"):
            sd = LGVQModel(ch_mult=ch_mult).state_dict()
        counts.append(len(sd))
        renamed = llamagen_to_tokenpaint(sd)
        assert len(renamed) == len(sd) - 1  # only quantize.codebook_used is dropped
        cfg = infer_config(renamed)
        assert cfg.ch_mult == ch_mult and cfg.code_dim == 8 and cfg.n_embed == 16384 and cfg.z_channels == 256
        with torch.device("meta"):
            ours = VQGAN(VQGANConfig(**{**cfg.to_dict(), "quantizer": "l2"})).state_dict()
        assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert counts[0] == 344  # the entries of the published vq_ds16_c2i.pt, its codebook_used buffer included


def test_training_checkpoint_with_pickled_args_is_refused(tmp_path):
    ref = random_llamagen(**TINY[1])
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=96, lr=1e-4)
    path = tmp_path / "0100000.pt"
    torch.save({"model": ref.state_dict(), "optimizer": {}, "steps": 100000, "args": args}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        VQGAN.from_pretrained(path)
    assert str(path) in str(e.value) and "argparse.Namespace" in str(e.value)
    vq = VQGAN.from_pretrained(path, allow_unsafe_pickle=True)  # the user vouches for the file
    assert torch.equal(vq.quantize.embedding.weight, ref.quantize.embedding.weight)


def test_a_mismatched_decoder_names_the_keys(tmp_path):
    sd = random_llamagen(**TINY[0]).state_dict()
    sd["decoder.conv_blocks.0.res.0.conv1.weight"] = torch.zeros(1)
    del sd["decoder.conv_blocks.2.res.1.norm1.bias"]
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        VQGAN.from_pretrained(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "LlamaGen" in msg
    assert "decoder.up.0.block.1.norm1.bias" in msg and "decoder.up.2.block.0.conv1.weight" in msg
