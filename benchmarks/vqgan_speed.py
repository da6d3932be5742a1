"""VQGAN encode+decode throughput: tokenpaint vs taming-transformers' own modules, same random weights, one run.

    python benchmarks/vqgan_speed.py                     # taming f16/16384 at 256x256, batch 1
    python benchmarks/vqgan_speed.py --small --repeats 5  # a tiny config, for a quick check

Prints the median images/s (encode + decode of the ids) for taming float32, tokenpaint float32 (channels_last, SDPA,
inference_mode) and tokenpaint bfloat16 (cast once), and the PSNR of the bf16 decode against the float32 one
(same ids, images clamped to [-1, 1], peak-to-peak 2).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time

import torch

from tokenpaint.vqgan import VQGANConfig
from tokenpaint.vqgan.io import build_from_state_dict


def build_taming(cfg: VQGANConfig):
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    dd = dict(ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, dropout=0.0, in_channels=cfg.in_channels,
              resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=False)
    with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
        parts = {
            "encoder": Encoder(**dd), "decoder": Decoder(**dd),
            "quantize": VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25),
            "quant_conv": torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1),
            "post_quant_conv": torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1),
        }
    # a codebook on the latents' scale (taming's +-1/n init makes every image map to a handful of codes)
    torch.nn.init.normal_(parts["quantize"].embedding.weight, std=0.2)
    return torch.nn.ModuleDict(parts).eval()


def taming_roundtrip(t, x):
    z = t["quant_conv"](t["encoder"](x))
    _, _, (_, _, ids) = t["quantize"](z)  # taming's path: one-hot encodings included
    b, _, h, w = z.shape
    z_q = t["quantize"].get_codebook_entry(ids.view(-1), (b, h, w, z.shape[1]))
    return t["decoder"](t["post_quant_conv"](z_q))


def tokenpaint_roundtrip(model, x):
    return model.decode(model.encode(x))


def images_per_second(fns: dict, x, repeats: int, warmup: int) -> dict:
    """Median images/s per candidate; repeats run round-robin so drifting load on a shared machine hits all alike."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny config (ch 32, ch_mult 1,2, 64 codes) at 32x32")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default: the config's resolution)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = (VQGANConfig(ch=32, ch_mult=(1, 2), attn_resolutions=(16,), resolution=32, n_embed=64, embed_dim=16,
                       z_channels=16) if args.small else VQGANConfig())
    res = args.resolution or cfg.resolution
    taming = build_taming(cfg)
    sd = {f"{name}.{k}": v for name, mod in taming.items() for k, v in mod.state_dict().items()}
    ours = build_from_state_dict(cfg, {k: v.clone() for k, v in sd.items()}, "benchmark").prepare_for_inference()
    ours_bf16 = build_from_state_dict(cfg, {k: v.clone() for k, v in sd.items()}, "benchmark")
    ours_bf16.prepare_for_inference(dtype=torch.bfloat16)

    x = torch.rand(args.batch, 3, res, res, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    print(f"config: ch {cfg.ch}, ch_mult {cfg.ch_mult}, n_embed {cfg.n_embed}, {res}x{res}, batch {args.batch}, "
          f"repeats {args.repeats}, threads {torch.get_num_threads()}, torch {torch.__version__}")

    with torch.inference_mode():
        ids = ours.encode(x)
        same_ids = (ids.flatten() == taming["quantize"](taming["quant_conv"](taming["encoder"](x)))[2][2].flatten())
        x32, x16 = ours.decode(ids), ours_bf16.decode(ids)
        max_diff = (x32 - taming_roundtrip(taming, x)).abs().max().item()

    ips = images_per_second({
        "taming float32": lambda v: taming_roundtrip(taming, v),
        "tokenpaint float32": lambda v: tokenpaint_roundtrip(ours, v),
        "tokenpaint bfloat16": lambda v: tokenpaint_roundtrip(ours_bf16, v),
    }, x, args.repeats, args.warmup)
    t_ips, o_ips, b_ips = ips.values()
    print(f"{'model':<28}{'images/s':>10}{'vs taming':>11}")
    print(f"{'taming float32':<28}{t_ips:>10.3f}{1.0:>10.2f}x")
    print(f"{'tokenpaint float32':<28}{o_ips:>10.3f}{o_ips / t_ips:>10.2f}x")
    print(f"{'tokenpaint bfloat16':<28}{b_ips:>10.3f}{b_ips / t_ips:>10.2f}x")
    print(f"ids equal to taming's: {same_ids.float().mean().item() * 100:.2f}%; "
          f"max |decode - taming| float32: {max_diff:.2e}")
    print(f"bf16 decode vs float32 decode: PSNR {psnr(x16, x32):.2f} dB "
          f"(float32 output std {x32.float().std().item():.3f})")


if __name__ == "__main__":
    main()
