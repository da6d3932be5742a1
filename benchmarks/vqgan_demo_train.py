"""Train the demo VQGAN for N minutes on the built-in demo data; report held-out PSNR and codebook usage.

    python benchmarks/vqgan_demo_train.py [--minutes 5] [--out runs/bench_vqgan] [--threads T]

Target (configs/demo/vqgan.yaml, 2 CPU cores, 5 minutes): PSNR >= 24 dB on the val split, >= 50% of codes used.
Usage here = distinct codes picked when encoding the val images / codebook size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_vqgan"))
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo", "vqgan.yaml"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenpaint.data import TSVImageText, make_demo_dataset
    from tokenpaint.training.common import TrainOptions
    from tokenpaint.training.vqgan_stage import train_vqgan
    from tokenpaint.vqgan import VQGAN

    data_dir = os.path.join(args.out, "data")
    train_tsv, val_tsv, _ = make_demo_dataset(data_dir, num_train=args.num_train, num_val=args.num_val,
                                              resolution=32, seed=args.seed)
    run_dir = os.path.join(args.out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.monotonic()
    summary = train_vqgan(TrainOptions(stage="vqgan", data=train_tsv, val=val_tsv, config=args.config, out=run_dir,
                                       max_minutes=args.minutes, seed=args.seed))
    minutes = (time.monotonic() - start) / 60

    vq = VQGAN.from_pretrained(run_dir).eval()
    images = torch.stack([row["image"] for row in TSVImageText(val_tsv, vq.config.resolution)])
    with torch.inference_mode():
        ids = torch.cat([vq.encode(chunk) for chunk in images.split(64)])
        recon = torch.cat([vq.decode(chunk) for chunk in ids.split(64)]).float().clamp(-1, 1)
    mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
    usage = ids.unique().numel() / vq.codebook_size
    print(f"trained {summary['step']} steps in {minutes:.1f} min ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"held-out PSNR {psnr:.2f} dB over {len(images)} images; codebook usage {usage:.1%} "
          f"({ids.unique().numel()}/{vq.codebook_size} codes)")
    ok = psnr >= 24.0 and usage >= 0.5
    print("target (PSNR >= 24 dB, usage >= 50%):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
