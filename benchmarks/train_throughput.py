"""Training throughput (forward + backward + AdamW step) of gpt_base and mim_base, and its share of this machine's
own matmul peak, measured in the same run.

    python benchmarks/train_throughput.py                       # both models, float32 and bf16 autocast, batch 2
    python benchmarks/train_throughput.py --models gpt --dtypes float32 --profile   # where does the time go
    python benchmarks/train_throughput.py --layers 2 --compile  # does torch.compile help the step?

Model FLOPs per step (nanoGPT's estimate, backward = 2x forward): 6 * (trunk params * sequence tokens + head params
* image tokens) * batch + 12 * layers * seq^2 * width * batch (attention scores and values, no causal discount).
tokens/s counts sequence tokens (text + image). The peak is an n x n matmul in the same dtype, timed in this run
(best of before and after the steps);
"MFU" = model FLOP/s / that peak (bf16 is also shown against the float32 peak: on a CPU without native bf16 matmul
the bf16 "peak" is far below the float32 one). bf16 runs at --bf16-layers / --bf16-batch-size (default 2 layers,
batch 1: emulated bf16 is slow), next to a float32 run of that same shape.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import add_common_args, build_generator, make_step, matmul_peak, print_table, setup, timed

DTYPES = {"float32": None, "bf16-autocast": torch.bfloat16}


def step_flops(model, batch: int) -> tuple[float, int]:
    c = model.config
    n = c.num_image_tokens
    seq = c.text_len + n - (1 if c.kind == "gpt" else 0)
    trunk = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.ln_f.parameters())
    head = model.head.weight.numel()
    flops = 6 * (trunk * seq + head * n) * batch + 12 * c.n_layer * seq * seq * c.n_embd * batch
    return float(flops), seq * batch


def profile_step(step, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"### profile of one step: {label}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", nargs="+", choices=["gpt", "mim"], default=["gpt", "mim"])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bf16-autocast"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--bf16-layers", type=int, default=2, help="depth for the bf16 runs (0 = --layers)")
    p.add_argument("--bf16-batch-size", type=int, default=1, help="batch for the bf16 runs (0 = --batch-size)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the float32 peak")
    p.add_argument("--peak-n-bf16", type=int, default=1024, help="matmul size for the bf16 peak (slow if emulated)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for one step of each")
    p.add_argument("--profile-rows", type=int, default=14)
    p.add_argument("--foreach-adamw", action="store_true",
                   help="AdamW(foreach=True) instead of the library's fused one, to see what fusing saves")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd float32 step")
    args = p.parse_args()
    setup(args)

    def measure_peaks(when: str) -> dict[str, float]:
        peaks = {"float32": matmul_peak(torch.float32, args.peak_n),
                 "bf16-autocast": matmul_peak(torch.bfloat16, args.peak_n_bf16)}
        print(f"matmul peak ({when}): float32 {peaks['float32'] / 1e9:.1f} GFLOP/s ({args.peak_n}^3), "
              f"bfloat16 {peaks['bf16-autocast'] / 1e9:.1f} GFLOP/s ({args.peak_n_bf16}^3)", flush=True)
        return peaks

    print()
    first = measure_peaks("before")

    # (dtype, layers, batch): bf16 is emulated on CPUs without avx512_bf16, so by default it runs at a reduced
    # depth and batch, next to float32 at the same reduced shape for a like-for-like ratio
    runs = [(d, args.layers, args.batch_size) for d in args.dtypes if d == "float32"]
    if "bf16-autocast" in args.dtypes:
        small = (args.bf16_layers or args.layers, args.bf16_batch_size or args.batch_size)
        if small != (args.layers, args.batch_size) and "float32" in args.dtypes:
            runs.append(("float32", *small))
        runs.append(("bf16-autocast", *small))
    if args.compile:
        runs.append(("float32+compile", args.layers, args.batch_size))
    rows = []
    for kind in args.models:
        for dtype_name, layers, batch in runs:
            torch.manual_seed(args.seed)
            model = build_generator(kind, layers=layers, width=args.width, heads=args.heads,
                                    image_size=args.image_size)
            flops, tokens = step_flops(model, batch)
            compile_s = None
            if dtype_name == "float32+compile":
                model = torch.compile(model)
                model.config = model._orig_mod.config  # the step closure reads the config
                step = make_step(model, batch, None, args.seed, args.foreach_adamw)
                start = time.perf_counter()
                step()  # compiles
                compile_s = time.perf_counter() - start
            else:
                step = make_step(model, batch, DTYPES[dtype_name], args.seed, args.foreach_adamw)
            seconds, samples = timed(step, repeats=args.repeats, warmup=args.warmup)
            achieved = flops / seconds  # MFU columns filled in below, against the best peak of the run
            name = f"{kind}_base" if layers == 12 and args.width == 768 else f"{kind} {layers}x{args.width}"
            rows.append([name, dtype_name, batch, seconds, tokens / seconds, achieved / 1e9,
                         "", "",
                         "" if compile_s is None else f"{compile_s:.0f}"])
            print(f"{kind} {layers} layers {dtype_name} batch {batch}: {flops / 1e9:.1f} GFLOP/step, steps {[round(s, 2) for s in samples]} s",
                  flush=True)
            if args.profile:
                profile_step(step, f"{kind} {layers} layers {dtype_name} batch {batch}", args.profile_rows)
            del model, step
    # other processes share the cores: the peak is the best of a measurement before and after the steps
    last = measure_peaks("after")
    peaks = {k: max(first[k], last[k]) for k in first}
    for row in rows:
        peak = peaks["float32" if row[1].startswith("float32") else row[1]]
        row[6] = f"{100 * row[5] * 1e9 / peak:.0f}%"
        row[7] = f"{100 * row[5] * 1e9 / peaks['float32']:.0f}%"
    print()
    print_table(["model", "dtype", "batch", "s / step", "tokens/s", "model GFLOP/s", "MFU (same-dtype peak)",
                 "vs fp32 peak", "compile s"], rows)


if __name__ == "__main__":
    main()
