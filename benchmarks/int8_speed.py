"""int8 weights against float32 (and bf16 where it is native), side by side in one run, at gpt_base / mim_base size.

    python benchmarks/int8_speed.py --threads 1                       # every section (~10 min on a busy 2-core box)
    python benchmarks/int8_speed.py --threads 1 --sections step memory
    python benchmarks/int8_speed.py --threads 1 --layers 2            # a quick look

Sections:
  bandwidth  this machine's memory bandwidth: a copy of --copy-mb MB (read + write), median of 5, measured first.
  kernels    one 768 -> 3072 Linear x 12 copies (113 MB float32, larger than the caches) at M rows: float32
             F.linear, the weight-only int8 kernel (_weight_int8pack_mm, bf16 activations) and dynamic int8
             activations (torch._int_mm); the library's choice (tokenpaint.transformer.quantize: dynamic on CPU,
             weight-only up to 16 rows on CUDA) comes from here.
  step       one cached GPT decode step (batch 1 and 8, no guidance: 1 and 8 rows per matmul), float32 vs int8 ms,
             each also as a multiple of its bandwidth floor = bytes of the weights a step reads (every Linear,
             the head included; one embedding row) / the measured bandwidth. Float32 and int8 steps alternate,
             --repeats rounds of --steps steps each, median per step. bf16 cast once too where it is native.
  image      a whole image, cached sampler, batch 1, top-k 100: float32 vs int8 seconds.
  masked     masked decoding at mim_base size, --mim-steps steps, batch 1, no guidance: float32 vs int8.
  memory     generator weight bytes (parameters and buffers), float32 vs int8.
  error      int8 logits vs float32 logits (random weights at gpt_base size): relative error and argmax agreement
             over a full forward and over cached decode steps.
  demo       with --run DIR (the output of `make demo`): the demo GPT's decoding of --demo-prompts held-out prompts
             (ids sampled in float32 with the run's sampler settings), replayed through cached decode steps in float32
             and in int8: share of positions whose guided argmax agrees, and the logits' relative error.
Targets (issue): int8 >= 2x float32 per decode step at batch 1, >= 1.8x per whole image; float32 decode step within
1.5x of its floor; weight memory 4x lower.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import add_common_args, build_generator, has_fast_bf16, print_table, random_text, setup, timed
from tokenpaint.sampling import sample_autoregressive, sample_masked
from tokenpaint.transformer.quantize import Int8Embedding, Int8Linear, quantize_int8, weight_bytes, weight_only_max_rows

SECTIONS = ("bandwidth", "kernels", "step", "image", "masked", "memory", "error", "demo")


def bandwidth_gbs(megabytes: int) -> float:
    """Bytes moved per second by a large copy (each byte read once and written once)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), repeats=5, warmup=1)
    return 2 * src.numel() * 4 / seconds / 1e9


def step_bytes(model) -> int:
    """Bytes one decode step reads: every Linear weight (+ scales, biases) and one row of each token table."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        elif isinstance(m, Int8Linear):
            total += sum(t.numel() * t.element_size() for t in (m.weight_int8, m.scale, m.bias) if t is not None)
        elif isinstance(m, (torch.nn.Embedding, Int8Embedding)):
            w = m.weight if isinstance(m, torch.nn.Embedding) else m.weight_int8
            total += w.shape[1] * w.element_size()
    return total


@torch.inference_mode()
def kernels_section(rows_list, repeats):
    linears = [torch.nn.Linear(768, 3072, bias=False) for _ in range(12)]
    q = [Int8Linear(m) for m in linears]
    table, limit = [], weight_only_max_rows(torch.device("cpu"))
    for rows in rows_list:
        x = torch.randn(rows, 768)
        t_f32, _ = timed(lambda: [m(x) for m in linears], repeats=repeats)
        t_wo, _ = timed(lambda: [m._weight_only(x) for m in q], repeats=repeats)
        t_dyn, _ = timed(lambda: [m._dynamic_int8(x) for m in q], repeats=repeats)
        table.append([rows, t_f32 * 1e3, t_wo * 1e3, t_dyn * 1e3, t_f32 / t_wo, t_f32 / t_dyn,
                      "weight-only" if rows <= limit else "dynamic"])
    print("## kernels: 12 x Linear(768, 3072), ms per pass over the 12")
    print_table(["rows", "float32", "int8 weight-only", "int8 dynamic", "x wo", "x dyn", "library uses"], table)


@torch.inference_mode()
def decode_step_ms(models: dict, batch: int, steps: int, repeats: int) -> dict:
    """Median ms per cached decode step of each model, the models alternating round by round."""
    text = random_text(batch)
    tokens = torch.randint(0, 16384, (batch, steps))
    samples = {name: [] for name in models}
    for _ in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            _, cache = model.prefill(text)
            start = time.perf_counter()
            for pos in range(steps):
                model.decode_step(tokens[:, pos], pos, cache)
            samples[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: sorted(s[1:])[len(s[1:]) // 2] for name, s in samples.items()}


@torch.inference_mode()
def error_section(f32, int8):
    text = random_text(2, seed=1)
    ids = torch.randint(0, 16384, (2, f32.config.num_image_tokens), generator=torch.Generator().manual_seed(1))
    ref, _ = f32(text, ids)
    out, _ = int8(text, ids)
    rows = [["full forward (dynamic int8 activations)", _rel(out, ref), _agree(out, ref)]]
    step_ref, step_out = [], []
    for model, sink in ((f32, step_ref), (int8, step_out)):
        logits, cache = model.prefill(text)
        sink.append(logits)
        for pos in range(16):
            logits, cache = model.decode_step(ids[:, pos], pos, cache)
            sink.append(logits)
    rows.append(["17 cached steps (this CPU's decode-step kernel)", _rel(torch.stack(step_out), torch.stack(step_ref)),
                 _agree(torch.stack(step_out), torch.stack(step_ref))])
    print("## error: int8 vs float32 logits, random weights")
    print_table(["path", "relative error", "argmax agreement"], rows)


@torch.inference_mode()
def demo_section(run: str, n_prompts: int, seed: int) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from demo_quality import held_out_prompts
    from tokenpaint import Pipeline
    from tokenpaint.sampling.guidance import guidance_enabled, prepare_text_pair, split_guidance

    pipe = Pipeline.from_pretrained(os.path.join(run, "gpt"))
    scale = pipe.options.guidance_scale
    text = pipe.encode_text(held_out_prompts(n_prompts, os.path.join(run, "data", "train.tsv"), seed))
    ids = sample_autoregressive(pipe.model, text, guidance_scale=scale, temperature=pipe.options.temperature,
                                top_k=pipe.options.top_k, top_p=pipe.options.top_p,
                                generator=torch.Generator().manual_seed(seed))
    use_guidance = guidance_enabled(scale)
    text_in = prepare_text_pair(text, None, use_guidance)
    doubled = torch.cat([ids, ids]) if use_guidance else ids
    logits = {}
    for name, model in (("float32", pipe.model), ("int8", quantize_int8(copy.deepcopy(pipe.model)))):
        out, cache = model.prefill(text_in)
        steps = [out]
        for pos in range(ids.shape[1] - 1):
            out, cache = model.decode_step(doubled[:, pos], pos, cache)
            steps.append(out)
        logits[name] = split_guidance(torch.stack(steps, dim=1), scale, use_guidance)  # [B, N, V]
    print(f"## demo: the demo GPT's decoding of {n_prompts} held-out prompts ({ids.numel()} positions, guidance "
          f"{scale}), float32 vs int8 cached steps")
    print_table(["argmax agreement", "relative error"],
                [[_agree(logits["int8"], logits["float32"]), _rel(logits["int8"], logits["float32"])]])


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _agree(a, b) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--copy-mb", type=int, default=512)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--mim-steps", type=int, default=4, help="masked decoding steps (time is linear in them)")
    p.add_argument("--image-size", type=int, default=16, help="image tokens per side for the whole-image section")
    p.add_argument("--run", help="demo output directory for the demo section (skipped without it)")
    p.add_argument("--demo-prompts", type=int, default=48)
    args = p.parse_args(argv)
    setup(args)
    sections = set(args.sections)

    bw = bandwidth_gbs(args.copy_mb)
    print(f"## bandwidth: {bw:.1f} GB/s (copy of {args.copy_mb} MB, read + write, 1 pass = {2 * args.copy_mb} MB)\n")
    if "kernels" in sections:
        kernels_section([1, 8, 16, 32, 288], repeats=args.repeats)

    f32 = build_generator("gpt", layers=args.layers).eval()
    int8 = quantize_int8(copy.deepcopy(f32))
    if sections & {"step", "memory"}:
        mem = [["float32", weight_bytes(f32) / 1e6, step_bytes(f32) / 1e6, 1.0],
               ["int8", weight_bytes(int8) / 1e6, step_bytes(int8) / 1e6, weight_bytes(f32) / weight_bytes(int8)]]
        print("## memory: gpt generator weights")
        print_table(["weights", "total MB", "read per decode step MB", "x smaller"], mem)
    if "step" in sections:
        models = {"float32": f32, "int8": int8}
        if has_fast_bf16():
            models["bfloat16 (native here)"] = copy.deepcopy(f32).prepare_for_inference(torch.bfloat16)
        table = []
        for batch in args.batches:
            ms = decode_step_ms(models, batch, args.steps, args.repeats)
            for name, model in models.items():
                floor = step_bytes(model) / (bw * 1e9) * 1e3
                table.append([batch, name, ms[name], floor, ms[name] / floor, ms["float32"] / ms[name]])
        print("## step: one cached GPT decode step (ms, median)")
        print_table(["batch", "weights", "ms / step", "floor ms", "x floor", "speedup vs float32"], table)
    if "image" in sections:
        small = dict(layers=args.layers, image_size=args.image_size)
        f32_img, int8_img = build_generator("gpt", **small).eval(), None
        int8_img = quantize_int8(copy.deepcopy(f32_img))
        text = random_text(1)
        times = {}
        for name, model in (("float32", f32_img), ("int8", int8_img)):
            run = lambda m=model: sample_autoregressive(m, text, guidance_scale=1.0, top_k=100,  # noqa: E731
                                                        generator=torch.Generator().manual_seed(0))
            times[name], _ = timed(run, repeats=1, warmup=0)
        n = args.image_size**2
        print(f"## image: {n} tokens, batch 1, cached sampler, no guidance")
        print_table(["weights", "s / image", "tokens / s", "speedup vs float32"],
                    [[k, v, n / v, times["float32"] / v] for k, v in times.items()])
        del f32_img, int8_img
    if "error" in sections:
        error_section(f32, int8)
    del f32, int8
    if "demo" in sections and args.run:
        demo_section(args.run, args.demo_prompts, args.seed)
    if "masked" in sections:
        mim = build_generator("mim", layers=args.layers).eval()
        mim_int8 = quantize_int8(copy.deepcopy(mim))
        text = random_text(1)
        times = {}
        for name, model in (("float32", mim), ("int8", mim_int8)):
            run = lambda m=model: sample_masked(m, text, steps=args.mim_steps, guidance_scale=1.0,  # noqa: E731
                                                generator=torch.Generator().manual_seed(0))
            times[name], _ = timed(run, repeats=1, warmup=1)
        print(f"## masked: mim_base size, {args.mim_steps} steps, batch 1, no guidance "
              f"(288 rows per matmul: the dynamic int8 kernel)")
        print_table(["weights", "s / image", "s / step", "speedup vs float32"],
                    [[k, v, v / args.mim_steps, times["float32"] / v] for k, v in times.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
