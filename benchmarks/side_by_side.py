"""Why `make demo` trains its two generators side by side: steps per second of the demo masked transformer and GPT
trained one after the other on all threads, then both at once, each in its own process with half the threads.

    python benchmarks/side_by_side.py [--seconds 20] [--threads N]

In the same wall time W, one after the other gives each model W/2 at its all-threads rate; side by side gives each W
at its half-threads rate (both running). The printed ratio, 2 x side-by-side rate / alone rate, is how many more
steps each generator gets in the demo's minutes. Batches are random ids (the data pipeline is not measured); the
models are the demo_gpt / demo_mim presets with the demo's shapes (8x8 image ids, 1024 codes, 16 text ids) and the
batch size of configs/demo/{mim,gpt}.yaml.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

from _common import add_common_args, make_step, print_table, setup

KINDS = ("mim", "gpt")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo")


def demo_batch_size(kind: str) -> int:
    from tokenpaint.transformer import load_transformer_yaml

    return load_transformer_yaml(os.path.join(CONFIGS, f"{kind}.yaml"))["train"]["batch_size"]


def steps_per_second(kind: str, threads: int, seconds: float, seed: int) -> float:
    from tokenpaint.transformer import GPT, MaskedTransformer, preset_config

    torch.set_num_threads(threads)
    config = preset_config(f"demo_{kind}", image_size=8, codebook_size=1024, text_vocab_size=400, text_len=16)
    step = make_step((GPT if kind == "gpt" else MaskedTransformer)(config), demo_batch_size(kind), None, seed)
    for _ in range(3):
        step()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - start)


def _child(kind, threads, seconds, seed, results):
    results.put((kind, steps_per_second(kind, threads, seconds, seed)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="timed training per measurement")
    add_common_args(p)
    args = p.parse_args()
    setup(args)
    alone = {kind: steps_per_second(kind, args.threads, args.seconds, args.seed) for kind in KINDS}
    half = max(1, args.threads // 2)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    children = [context.Process(target=_child, args=(kind, half, args.seconds, args.seed, results)) for kind in KINDS]
    for child in children:
        child.start()
    together = dict(results.get() for _ in children)
    for child in children:
        child.join()
    print_table(["model", f"alone, {args.threads} threads (steps/s)", f"side by side, {half} each (steps/s)",
                 "steps in the same wall time (side by side / one after the other)"],
                [[kind, alone[kind], together[kind], 2 * together[kind] / alone[kind]] for kind in KINDS])


if __name__ == "__main__":
    main()
