"""Autoregressive sampling speed at gpt_base size (random weights), measured side by side in one run.

    python benchmarks/ar_sampling_speed.py                    # both sections, defaults (~5 min on 2 cores)
    python benchmarks/ar_sampling_speed.py --section cache --full-uncached   # really run the uncached sampler
    python benchmarks/ar_sampling_speed.py --layers 2 --image-size 8          # a quick look

Section "cache": one image, float32, `sample_autoregressive(use_kv_cache=True)` against re-running the whole
sequence each step (`use_kv_cache=False`, what taming / minGPT / EasyNLP do).
  * Same ids: both samplers run end to end at full width and depth on a smaller image (--check-image-size) and the
    ids are asserted equal.
  * Full-size time: the cached sampler is timed end to end. The uncached one would take minutes, so by default its
    per-step work (forward over [text ; ids < p] + the top-k draw, exactly what the sampler does at step p) is timed
    at --uncached-points positions, linearly interpolated over every position 0..N-1 and summed; the output says so,
    and the same extrapolation is checked against a full uncached run at the check size. --full-uncached runs it.
Section "dtype": batch 8 with classifier-free guidance (a doubled batch of 16), cached sampler: float32 against
bfloat16 cast once (`prepare_for_inference(torch.bfloat16)`) and float32 weights under `torch.autocast` (weights
re-cast on every call). Uses a smaller image (--dtype-image-size) and one run per variant without warmup
(--dtype-repeats, --dtype-warmup) to stay within the time budget: each run lasts seconds to a minute, so the
first-call overhead (milliseconds on CPU) does not matter; the ratio is a per-step one.
Section "threads": one cached decode step and a 3072-float GELU at 1 thread vs all cores (on an oversubscribed
machine every multi-threaded op waits for a descheduled worker).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from _common import add_common_args, build_generator, print_table, random_text, setup, timed
from tokenpaint.sampling import sample_autoregressive, sample_from_logits


def sample(model, text, *, kv: bool, seed: int, guidance: float = 1.0, prefix=None):
    g = torch.Generator().manual_seed(seed)
    return sample_autoregressive(model, text, guidance_scale=guidance, top_k=100, generator=g,
                                 use_kv_cache=kv, prefix_ids=prefix)


def warm(model, text, guidance: float = 1.0, kv: bool = True):
    """A short run (the last 4 tokens only) to warm up allocators and kernels."""
    n = model.config.num_image_tokens
    prefix = torch.zeros(text.shape[0], n - 4, dtype=torch.long)
    sample(model, text, kv=kv, seed=0, guidance=guidance, prefix=prefix)


@torch.inference_mode()
def uncached_step_seconds(model, text, pos: int, repeats: int) -> float:
    """Time of the uncached sampler's work at step `pos`: a forward over [text ; pos+1 image slots] + the draw."""
    ids = torch.randint(0, model.config.codebook_size, (text.shape[0], pos + 1))
    g = torch.Generator().manual_seed(0)

    def step():
        logits, _ = model(text, ids)
        sample_from_logits(logits[:, pos], g, top_k=100)

    return timed(step, repeats=repeats, warmup=1)[0]


def extrapolate_uncached(model, text, points: int, repeats: int) -> tuple[float, list[tuple[int, float]]]:
    """Sum over every position of the per-step time, interpolated from `points` measured positions."""
    n = model.config.num_image_tokens
    positions = sorted({int(round(p)) for p in np.linspace(0, n - 1, points)})
    measured = [(p, uncached_step_seconds(model, text, p, repeats)) for p in positions]
    xs, ys = zip(*measured)
    total = float(np.interp(np.arange(n), xs, ys).sum())
    return total, measured


def section_cache(args) -> None:
    print(f"## KV cache vs re-running the sequence: {args.layers} layers x {args.width} wide, one image, float32\n")
    text = random_text(1)
    model = build_generator("gpt", layers=args.layers, width=args.width, heads=args.heads,
                            image_size=args.check_image_size).prepare_for_inference()
    n_check = model.config.num_image_tokens
    warm(model, text)
    t_cached_small, _ = timed(lambda: sample(model, text, kv=True, seed=args.seed), repeats=1, warmup=0)
    ids_cached = sample(model, text, kv=True, seed=args.seed)
    t_uncached_small, _ = timed(lambda: sample(model, text, kv=False, seed=args.seed), repeats=1, warmup=0)
    ids_uncached = sample(model, text, kv=False, seed=args.seed)
    same = torch.equal(ids_cached, ids_uncached)
    est_small, _ = extrapolate_uncached(model, text, args.uncached_points, 1)
    print(f"same ids (cached vs uncached, {n_check} tokens, seed {args.seed}): {same}")
    print(f"extrapolation check at {n_check} tokens: measured uncached {t_uncached_small:.2f} s, "
          f"interpolated from {args.uncached_points} positions {est_small:.2f} s "
          f"({100 * (est_small / t_uncached_small - 1):+.0f}%)\n")
    assert same, "cached and uncached sampling returned different ids"

    # the full-size model: same state dict shapes except the image position tables
    model = build_generator("gpt", layers=args.layers, width=args.width, heads=args.heads,
                            image_size=args.image_size).prepare_for_inference()
    n = model.config.num_image_tokens
    warm(model, text)
    t_cached, samples = timed(lambda: sample(model, text, kv=True, seed=args.seed), repeats=args.repeats, warmup=0)
    if args.full_uncached:
        t_uncached, _ = timed(lambda: sample(model, text, kv=False, seed=args.seed), repeats=1, warmup=0)
        how = "measured end to end (1 run)"
        detail = []
    else:
        t_uncached, detail = extrapolate_uncached(model, text, args.uncached_points, args.step_repeats)
        how = f"EXTRAPOLATED: per-step time measured at positions {[p for p, _ in detail]}, interpolated, summed"
    rows = [
        ["KV cache (use_kv_cache=True)", n, t_cached, n / t_cached, 1.0],
        ["re-run sequence (use_kv_cache=False)", n, t_uncached, n / t_uncached, t_uncached / t_cached],
    ]
    print(f"{model.config.text_len} text + {n} image tokens; cached: median of {args.repeats} runs {[round(s, 2) for s in samples]}")
    print(f"uncached: {how}")
    for p, s in detail:
        print(f"    step at position {p:3d}: {s * 1e3:8.1f} ms   (cached average {t_cached / n * 1e3:.1f} ms/step)")
    print()
    print_table(["sampler", "tokens", "s / image", "tokens/s", "slowdown vs cached"], rows)
    print(f"KV cache speedup: {t_uncached / t_cached:.1f}x (target >= 8x)\n")


def section_dtype(args) -> None:
    b, guidance = args.dtype_batch, 3.0
    print(f"## float32 vs bfloat16: cached sampler, batch {b} with guidance {guidance} (doubled batch {2 * b}), "
          f"{args.dtype_image_size ** 2} image tokens, {args.layers} layers x {args.width}\n")
    text = random_text(b)
    fp32 = build_generator("gpt", layers=args.layers, width=args.width, heads=args.heads,
                           image_size=args.dtype_image_size).prepare_for_inference()
    bf16 = copy.deepcopy(fp32).prepare_for_inference(torch.bfloat16)

    def autocast_run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(fp32, text, kv=True, seed=args.seed, guidance=guidance)

    def autocast_warm():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            warm(fp32, text, guidance)

    variants = [
        ("float32", lambda: sample(fp32, text, kv=True, seed=args.seed, guidance=guidance),
         lambda: warm(fp32, text, guidance)),
        ("bfloat16, cast once", lambda: sample(bf16, text, kv=True, seed=args.seed, guidance=guidance),
         lambda: warm(bf16, text, guidance)),
        ("float32 weights + autocast bf16", autocast_run, autocast_warm),
    ]
    times = {}
    for name, run, warmup in variants:
        if args.dtype_warmup:
            warmup()
        times[name], _ = timed(run, repeats=args.dtype_repeats, warmup=0)
    base = times["float32"]
    rows = [[name, t, b / t, base / t] for name, t in times.items()]
    print_table(["variant", "s / batch", "images/s", "speedup vs float32"], rows)
    print(f"bf16 cast-once speedup: {base / times['bfloat16, cast once']:.2f}x (target >= 1.5x on a CPU with "
          f"native bf16 matmul)\n")


def section_threads(args) -> None:
    """One cached decode step (batch 1) and a tiny elementwise op at 1 thread vs --threads threads."""
    import os

    counts = sorted({1, args.threads, os.cpu_count() or 1})
    print(f"## threads: one cached decode step at batch 1, {args.layers} layers x {args.width}, threads {counts}\n")
    model = build_generator("gpt", layers=args.layers, width=args.width, heads=args.heads,
                            image_size=args.image_size).prepare_for_inference()
    text = random_text(1)
    small = torch.randn(1, 1, 4 * args.width)
    rows = []
    with torch.inference_mode():
        _, cache = model.prefill(text)
        token = torch.zeros(1, dtype=torch.long)
        pos = model.config.num_image_tokens // 2

        def step():
            cache.index = model.config.text_len + pos  # re-run the step at the middle image position
            model.decode_step(token, pos, cache)

        for n in counts:
            torch.set_num_threads(n)
            t_step, _ = timed(step, repeats=5, warmup=2)
            t_gelu, _ = timed(lambda: torch.nn.functional.gelu(small), repeats=50, warmup=5)
            rows.append([n, t_step * 1e3, t_gelu * 1e3])
    torch.set_num_threads(args.threads)
    print_table(["threads", "decode step ms", f"gelu on {4 * args.width} floats ms"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--section", choices=["all", "cache", "dtype", "threads"], default="all")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--image-size", type=int, default=16, help="image tokens per side (16 -> 256 tokens)")
    p.add_argument("--check-image-size", type=int, default=6, help="image side for the same-ids check")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the cached sampler")
    p.add_argument("--uncached-points", type=int, default=5, help="positions at which an uncached step is timed")
    p.add_argument("--step-repeats", type=int, default=2, help="timed repeats per uncached position")
    p.add_argument("--full-uncached", action="store_true", help="run the uncached sampler end to end (minutes)")
    p.add_argument("--dtype-batch", type=int, default=8)
    p.add_argument("--dtype-image-size", type=int, default=6)
    p.add_argument("--dtype-repeats", type=int, default=1)
    p.add_argument("--dtype-warmup", action="store_true",
                   help="warm each variant up first (a prefill of all but 4 tokens: slow in emulated bf16)")
    args = p.parse_args()
    setup(args)
    print()
    if args.section in ("all", "cache"):
        section_cache(args)
    if args.section in ("all", "dtype"):
        section_dtype(args)
    if args.section in ("all", "threads"):
        section_threads(args)


if __name__ == "__main__":
    main()
