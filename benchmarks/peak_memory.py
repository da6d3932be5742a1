"""Peak memory (RSS) of generating one image at gpt_base / mim_base size, each case in a fresh subprocess.

    python benchmarks/peak_memory.py                       # gpt float32 + bf16 (cached), mim float32 (16 steps)
    python benchmarks/peak_memory.py --cases gpt-fp32-uncached --image-size 8   # the uncached sampler, smaller

The child imports torch and tokenpaint, reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the baseline), builds
the model with random weights directly in its dtype, reads it again, samples one image, and reads the peak.
"generation" = peak - after building: the KV cache, activations, logits and sampler temporaries.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CASES = {
    "gpt-fp32-cached": ("gpt", "float32", True),
    "gpt-bf16-cached": ("gpt", "bfloat16", True),
    "gpt-fp32-uncached": ("gpt", "float32", False),
    "mim-fp32": ("mim", "float32", None),
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args) -> None:
    import torch

    from _common import build_generator, random_text
    from tokenpaint.sampling import sample_autoregressive, sample_masked

    torch.set_num_threads(args.threads)
    baseline = maxrss_mb()
    kind, dtype_name, kv = CASES[args.child]
    dtype = getattr(torch, dtype_name)
    model = build_generator(kind, layers=args.layers, width=args.width, heads=args.heads,
                            image_size=args.image_size, dtype=dtype).prepare_for_inference()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    built = maxrss_mb()
    text = random_text(1)
    g = torch.Generator().manual_seed(0)
    if kind == "gpt":
        ids = sample_autoregressive(model, text, guidance_scale=1.0, top_k=100, generator=g, use_kv_cache=kv)
    else:
        ids = sample_masked(model, text, steps=args.steps, guidance_scale=1.0, generator=g)
    assert ids.shape == (1, model.config.num_image_tokens)
    print(json.dumps(dict(baseline=baseline, built=built, peak=maxrss_mb(), weights=weights_mb)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["gpt-fp32-cached", "gpt-bf16-cached",
                                                                          "mim-fp32"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="masked decoding steps")
    p.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine_info, print_table

    print(machine_info(args.threads))
    print(f"\n## peak RSS generating one image: {args.layers} layers x {args.width}, {args.image_size ** 2} image "
          f"tokens, batch 1, no guidance (fresh process per case)\n")
    rows = []
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--threads", str(args.threads),
               "--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads),
               "--image-size", str(args.image_size), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([case, r["baseline"], r["weights"], r["built"] - r["baseline"], r["peak"] - r["built"],
                     r["peak"] - r["baseline"]])
    print_table(["case", "after imports MB", "weights MB", "build MB", "generation MB", "peak - baseline MB"], rows)


if __name__ == "__main__":
    main()
