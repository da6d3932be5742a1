"""Speculative Jacobi decoding against one-token decoding, side by side in one run: forward passes and wall-clock.

    python benchmarks/jacobi_speed.py --threads 1 --run demo              # the demo GPT (make demo) + gpt_base size
    python benchmarks/jacobi_speed.py --threads 1 --run demo --windows 4 8 16 --sections demo

Section "demo": the demo GPT of --run (RUN/gpt) with its shipped sampler settings (the `sample:` section of its
train_config.yaml), held-out prompts as in benchmarks/demo_quality.py. For each batch size (--batches) and decoder
(one-token, then each --windows W), the same --prompts prompts x --images-per-prompt images with the same per-image
seeds: forward passes per image (prefill included), passes per generated token, the time of a pass split into the
model call and the sampler's work around it, seconds per image and the speedup over one-token decoding (the decoders
alternate, --repeats rounds, median). The images are judged against their prompts (measure_scene) at the first batch
size: held-out "match" of each decoder (the target: within 0.02 of one-token decoding; both are samples of the same
distribution, so the difference is sampling noise).
Section "base": a random-weight GPT at gpt_base width and depth on a --base-image-size image (random weights
predict near-uniform tokens, so this shows the cost of a window pass more than the acceptance of a trained model).
Targets (issue): >= 1.5x wall-clock at batch 1 on the demo GPT, <= 0.6 forward passes per generated token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from _common import add_common_args, build_generator, print_table, random_text, setup
from tokenpaint.sampling import sample_autoregressive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PassCounter:
    """Counts the model's cached forward passes (prefill, decode_step, decode_window) and the seconds spent in them."""

    def __init__(self, model):
        self.count, self.seconds = 0, 0.0
        for name in ("prefill", "decode_step", "decode_window"):
            original = getattr(model, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(model, name, counted)


def run_decoder(model, text, sampler: dict, window: int, seeds, batch: int) -> torch.Tensor:
    """ids [M, N] for text [M, T], image i with generator seed seeds[i], in batches of `batch`."""
    out = []
    for start in range(0, text.shape[0], batch):
        rows = range(start, min(start + batch, text.shape[0]))
        gens = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        out.append(sample_autoregressive(model, text[start: rows.stop], generator=gens, jacobi_window=window,
                                         **sampler))
    return torch.cat(out)


def compare(model, text, sampler, windows, batch, repeats, seeds):
    """Per decoder: (passes per image, seconds per image, model seconds per pass, ids of the last round)."""
    counter = PassCounter(model)
    decoders = [1, *windows]
    seconds = {w: [] for w in decoders}
    passes, per_pass, ids = {}, {w: [] for w in decoders}, {}
    for _ in range(repeats):
        for w in decoders:
            counter.count, counter.seconds = 0, 0.0
            start = time.perf_counter()
            ids[w] = run_decoder(model, text, sampler, w, seeds, batch)
            seconds[w].append((time.perf_counter() - start) / text.shape[0])
            per_pass[w].append(counter.seconds / counter.count)
            batches = -(-text.shape[0] // batch)
            passes[w] = counter.count / batches  # per batch = per image of the batch
    return {w: (passes[w], statistics.median(seconds[w]), statistics.median(per_pass[w]), ids[w]) for w in decoders}


def table_rows(results, n_tokens: int, batch: int, label: str):
    """One row per decoder. A pass's time splits into the model call and the sampler's own work around it (filtering,
    drawing, verification, bookkeeping: the image's time not spent in the model, per pass)."""
    base = results[1][1]
    rows = []
    for w, (p, s, model_s, _) in results.items():
        sampler_ms = (s * batch - p * model_s) / p * 1e3  # s is per image; a batch's passes serve `batch` images
        rows.append([label, batch, "one-token" if w == 1 else f"jacobi W={w}", p, p / n_tokens, model_s * 1e3,
                     sampler_ms, s, base / s])
    return rows


HEADERS = ["model", "batch", "decoder", "passes / image", "passes / token", "model ms / pass", "sampler ms / pass",
           "s / image", "speedup"]


def demo_section(args) -> None:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from demo_quality import held_out_prompts
    from tokenpaint import Pipeline
    from tokenpaint.demo import judge, summarize_verdicts

    run = os.path.join(args.run, "gpt")
    if not os.path.isfile(os.path.join(run, "model.safetensors")):
        raise SystemExit(f"{run}: no trained demo GPT (run `make demo` or `python -m tokenpaint.demo --out {args.run}`)")
    pipe = Pipeline.from_pretrained(run, dtype=args.dtype)
    sampler = {k: getattr(pipe.options, k) for k in ("guidance_scale", "temperature", "top_k", "top_p")}
    prompts = held_out_prompts(args.prompts, os.path.join(args.run, "data", "train.tsv"), args.seed)
    k = args.images_per_prompt
    text = pipe.encode_text(prompts).repeat_interleave(k, dim=0)
    seeds = [args.seed + i for i in range(text.shape[0])]
    n_tokens = pipe.model.config.num_image_tokens
    print(f"## demo GPT {run}: {n_tokens} tokens, sampler {sampler}, {len(prompts)} held-out prompts x {k}, "
          f"weights {args.dtype}")
    rows, quality = [], []
    for i, batch in enumerate(args.batches):
        results = compare(pipe.model, text, sampler, args.windows, batch, args.repeats, seeds)
        rows += table_rows(results, n_tokens, batch, "demo")
        if i == 0:
            for w, (_, _, _, ids) in results.items():
                images = pipe.decode(ids.view(-1, pipe.tokens_per_side, pipe.tokens_per_side))
                scores = summarize_verdicts([judge(im, prompts[j // k]) for j, im in enumerate(images)])
                quality.append(["one-token" if w == 1 else f"jacobi W={w}", scores["match"], scores["all"]])
    print_table(HEADERS, rows)
    print(f"## demo GPT held-out match (batch {args.batches[0]}, same prompts and seeds)")
    base = quality[0][1]
    print_table(["decoder", "match", "all", "match - one-token"], [q + [q[1] - base] for q in quality])


def base_section(args) -> None:
    model = build_generator("gpt", image_size=args.base_image_size, layers=args.layers).eval()
    if args.dtype == "int8":
        model.quantize("int8")
    sampler = dict(guidance_scale=1.0, temperature=1.0, top_k=100, top_p=1.0)
    n_tokens = model.config.num_image_tokens
    print(f"## gpt_base size, random weights, {n_tokens} tokens, weights {args.dtype}, no guidance, top-k 100")
    rows = []
    for batch in args.base_batches:
        text = random_text(batch)
        results = compare(model, text, sampler, args.windows, batch, 1, list(range(batch)))
        rows += table_rows(results, n_tokens, batch, "gpt_base")
    print_table(HEADERS, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sections", nargs="+", choices=["demo", "base"], default=["demo", "base"])
    p.add_argument("--run", default=os.path.join(ROOT, "demo"), help="output directory of `make demo`")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("-k", "--images-per-prompt", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed rounds (the decoders alternate)")
    p.add_argument("--dtype", default="float32", choices=["float32", "int8"])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--base-image-size", type=int, default=8, help="tokens per side at gpt_base size")
    p.add_argument("--base-batches", type=int, nargs="+", default=[1])
    args = p.parse_args(argv)
    setup(args)
    if "demo" in args.sections:
        demo_section(args)
    if "base" in args.sections:
        base_section(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
