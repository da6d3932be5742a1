"""How long does the demo's recipe take on this machine? Times a few steps of each stage and scales to the recipe.

    python benchmarks/demo_recipe_time.py [--dataset shapes|glyphs] [--steps 60] [--threads 2] [--out DIR]

Trains each demo stage (configs/demo, the demo's own data and tokenizer) for --steps optimizer steps, the VQGAN on
--threads torch threads and each generator on --threads // 2 (as `make demo` does), reads the step rate from the
runs' metrics (images or tokens per second over the logged windows after the first, the median), and prints the
seconds per step and the recipe's expected minutes: VQGAN + the slower generator (they train side by side) + ~1 min
of data, caches and sampling. The generators are timed one after the other: on a quiet 2-core machine each then has a
core, as it has side by side. On a busy machine the figures are that machine's, not a quiet one's: the load average is
printed with them. The step rate does not depend on the dataset (same image size, same models).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

from tokenpaint import demo


def seconds_per_step(run_dir: str, batch: int, per_image: int) -> float:
    """Median seconds per optimizer step over the logged windows after the first (which holds the warm-up)."""
    rates = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            rate = record.get("images_per_sec") or record.get("tokens_per_sec")
            if rate:
                rates.append(batch * per_image / rate)
    if len(rates) < 2:
        raise ValueError(f"{run_dir}: too few logged windows to time ({len(rates)}); pass a larger --steps")
    return statistics.median(rates[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=tuple(demo.DATASETS), default="shapes")
    p.add_argument("--steps", type=int, default=60, help="steps timed per stage")
    p.add_argument("--threads", type=int, default=demo.DEFAULT_THREADS)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--out", help="work directory (default: a temporary one)")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="demo_recipe_time_")
    recipe = demo.recipe_steps(str(demo.CONFIG_DIR))
    train_tsv, val_tsv, _ = demo.prepare_data(os.path.join(out, "data"), args.num_train, 64, 0, args.dataset)
    tokenizer = demo.prepare_tokenizer(train_tsv, os.path.join(out, "data", "tokenizer.model"), args.dataset)
    rates = {}
    for name in demo.STAGES:
        threads = args.threads if name == "vqgan" else max(1, args.threads // 2)
        torch.set_num_threads(threads)
        run_dir = os.path.join(out, name)
        demo.run_stage(name, run_dir, args.steps, data=train_tsv, val=val_tsv,
                       config=os.path.join(str(demo.CONFIG_DIR), f"{name}.yaml"), seed=0,
                       vqgan_dir=None if name == "vqgan" else os.path.join(out, "vqgan"),
                       tokenizer=None if name == "vqgan" else tokenizer)
        per_image = 1 if name == "vqgan" else 64  # tokens per image: 8x8 ids
        rates[name] = seconds_per_step(run_dir, 16, per_image)
        print(f"{name:<6} {threads} thread(s): {rates[name]:.3f} s/step -> recipe {recipe[name]} steps = "
              f"{recipe[name] * rates[name] / 60:.1f} min", flush=True)
    total = (recipe["vqgan"] * rates["vqgan"] + max(recipe[k] * rates[k] for k in ("mim", "gpt"))) / 60 + 1
    print(f"expected make demo: ~{total:.1f} min (+ the venv); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs ({'busy' if os.getloadavg()[0] > 1.5 else 'quiet'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
