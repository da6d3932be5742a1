"""Masked decoding (MaskGIT, 16 steps) vs KV-cached autoregressive decoding at the same width and depth.

    python benchmarks/mim_vs_ar.py                         # gpt_base / mim_base sizes, batch 1 and 8, float32
    python benchmarks/mim_vs_ar.py --batch-sizes 1 --layers 4   # quicker
    python benchmarks/mim_vs_ar.py --compile               # also with torch.compile'd blocks (Pipeline.compile)

Random weights (speed does not depend on them). No guidance by default (--guidance 3 doubles both batches).
Prints images/s for each sampler and batch size, the ratio, and the work each does: masked decoding runs
`steps` full forwards over text + N image tokens (compute bound: big matmuls), cached AR runs one prefill and
N-1 one-token steps (each step reads every weight once for a handful of rows: memory-bandwidth and latency bound).
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import add_common_args, build_generator, print_table, random_text, setup, timed
from tokenpaint.sampling import sample_autoregressive, sample_masked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="masked decoding steps")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="then compile both models' blocks (generate.py --compile) and time them again")
    args = p.parse_args()
    setup(args)

    sizes = dict(layers=args.layers, width=args.width, heads=args.heads, image_size=args.image_size)
    gpt = build_generator("gpt", **sizes).prepare_for_inference()
    mim = build_generator("mim", **sizes).prepare_for_inference()
    n, t_len = gpt.config.num_image_tokens, gpt.config.text_len
    trunk = sum(p.numel() for p in gpt.blocks.parameters())
    head = gpt.head.weight.numel()
    print(f"\n## masked ({args.steps} steps) vs cached AR: {args.layers} layers x {args.width}, {t_len} text + {n} "
          f"image tokens, float32, guidance {args.guidance}\n")

    def run_ar(text, seed=args.seed, prefix=None):
        g = torch.Generator().manual_seed(seed)
        return sample_autoregressive(gpt, text, guidance_scale=args.guidance, top_k=100, generator=g,
                                     prefix_ids=prefix)

    def run_mim(text, steps=args.steps, seed=args.seed):
        g = torch.Generator().manual_seed(seed)
        return sample_masked(mim, text, steps=steps, guidance_scale=args.guidance, top_k=None, generator=g)

    def measure(label: str) -> list[list]:
        rows = []
        for b in args.batch_sizes:
            text = random_text(b)
            start = time.perf_counter()
            run_ar(text, prefix=torch.zeros(b, n - 4, dtype=torch.long))  # warmup: prefill + 4 steps
            run_mim(text, steps=1)  # warmup: one full pass
            warmup_s = time.perf_counter() - start  # with --compile: mostly compilation
            t_ar, _ = timed(lambda: run_ar(text), repeats=args.repeats, warmup=0)
            t_mim, _ = timed(lambda: run_mim(text), repeats=args.repeats, warmup=0)
            rows.append([b, f"cached AR{label}", t_ar, b / t_ar, t_ar / (n - 1) * 1e3, 1.0, warmup_s])
            rows.append([b, f"masked, {args.steps} steps{label}", t_mim, b / t_mim, t_mim / args.steps * 1e3,
                         t_ar / t_mim, ""])
        return rows

    rows = measure("")
    if args.compile:
        eager = {(r[0], r[1]): r[2] for r in rows}
        gpt.compile_blocks()
        mim.compile_blocks()
        compiled = measure(", compiled")
        for r in compiled:
            r.append(eager[(r[0], r[1].replace(", compiled", ""))] / r[2])
        rows = [r + [""] for r in rows] + compiled
    print_table(["batch", "sampler", "s / batch", "images/s", "ms / step", "speedup vs AR", "warmup s"]
                + (["compiled vs eager"] if args.compile else []), rows)

    # the work, per image: forward FLOPs ~ 2 * params * tokens (+ attention), weight bytes read per step
    mult = 2 if args.guidance not in (0.0, 1.0) else 1
    ar_flops = 2 * (trunk * (t_len + n) + head * n) * mult
    mim_flops = 2 * (trunk * (t_len + n) + head * n) * args.steps * mult
    weight_mb = (trunk + head) * 4 / 1e6
    print(f"work per image: cached AR ~{ar_flops / 1e9:.0f} GFLOP in {n - 1} sequential steps that each read all "
          f"{weight_mb:.0f} MB of weights; masked ~{mim_flops / 1e9:.0f} GFLOP in {args.steps} steps "
          f"({mim_flops / ar_flops:.0f}x the FLOPs, {(n - 1) / args.steps:.0f}x fewer sequential steps)")


if __name__ == "__main__":
    main()
