"""Does the transformer stage learn on the built-in demo within a CPU budget? Both kinds, through the real CLI.

    python benchmarks/transformer_demo_train.py                      # demo data, a 2-minute demo VQGAN, 4 min each
    python benchmarks/transformer_demo_train.py --vqgan RUN/vqgan_dir --minutes 4
    python benchmarks/transformer_demo_train.py --minutes 0.5 --vqgan-minutes 0.5 --num-train 500   # quick check

Builds the demo dataset (make_demo_dataset, 32x32 captioned shapes), trains a demo VQGAN with configs/demo/vqgan.yaml
unless --vqgan is given, then runs `train.py transformer` with configs/demo/mim.yaml and configs/demo/gpt.yaml for
--minutes each, and prints the first logged loss (step 1), the last logged loss (a mean over the last log_every
steps), their ratio (target < 0.6), steps, tokens/s and the last validation loss. Exit status 1 if a kind misses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str], log_path: str) -> None:
    """python train.py ARGS, output to a log file (tqdm bars are long); raise with the log's tail on failure."""
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call([sys.executable, os.path.join(ROOT, "train.py"), *args], stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"train.py {args[0]} failed (exit {rc}); log {log_path}:\n{tail}")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(run_dir: str) -> dict:
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if len(train) < 2:
        raise SystemExit(f"{run_dir}: fewer than two logged losses; train longer")
    first, last = train[0], train[-1]
    return {"steps": last["step"], "first": first["loss"], "last": last["loss"], "ratio": last["loss"] / first["loss"],
            "tokens_per_sec": sum(r["tokens_per_sec"] for r in train[1:]) / max(1, len(train) - 1),
            "val_loss": val[-1]["val_loss"] if val else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "transformer_demo"), help="working directory")
    p.add_argument("--vqgan", help="a trained demo VQGAN (run directory); default: train one for --vqgan-minutes")
    p.add_argument("--vqgan-minutes", type=float, default=2.0)
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per transformer kind")
    p.add_argument("--kinds", nargs="+", default=["mim", "gpt"], choices=["mim", "gpt"])
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=256)
    p.add_argument("--target", type=float, default=0.6, help="last/first loss ratio to reach")
    args = p.parse_args(argv)

    from tokenpaint.data import make_demo_dataset

    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, f"data_{args.num_train}")
    train_tsv, val_tsv = os.path.join(data_dir, "train.tsv"), os.path.join(data_dir, "val.tsv")
    if not (os.path.isfile(train_tsv) and os.path.isfile(val_tsv)):
        t0 = time.monotonic()
        train_tsv, val_tsv, _ = make_demo_dataset(data_dir, num_train=args.num_train, num_val=args.num_val,
                                                  resolution=32, seed=0)
        print(f"demo dataset: {args.num_train} + {args.num_val} images in {time.monotonic() - t0:.0f}s -> {data_dir}")

    vqgan_dir = args.vqgan
    if vqgan_dir is None:
        vqgan_dir = os.path.join(args.out, "vqgan")
        if not os.path.isfile(os.path.join(vqgan_dir, "model.safetensors")):
            print(f"training a demo VQGAN for {args.vqgan_minutes} min -> {vqgan_dir}", flush=True)
            run_cli(["vqgan", "--data", train_tsv, "--val", val_tsv, "--config", "configs/demo/vqgan.yaml",
                     "--out", vqgan_dir, "--max-minutes", str(args.vqgan_minutes)],
                    os.path.join(args.out, "vqgan.log"))
        vq_val = [r for r in read_metrics(vqgan_dir) if "val_psnr" in r]
        if vq_val:
            print(f"demo VQGAN: val PSNR {vq_val[-1]['val_psnr']:.1f} dB, code usage {vq_val[-1]['val_usage']:.2f}")

    results = {}
    for kind in args.kinds:
        out = os.path.join(args.out, kind)
        if os.path.isdir(os.path.join(out, "checkpoints")):
            import shutil

            shutil.rmtree(out)  # a fresh run each time (the token cache is rebuilt: seconds on the demo)
        print(f"training {kind} for {args.minutes} min -> {out}", flush=True)
        t0 = time.monotonic()
        run_cli(["transformer", "--data", train_tsv, "--val", val_tsv, "--vqgan", vqgan_dir,
                 "--config", f"configs/demo/{kind}.yaml", "--out", out, "--max-minutes", str(args.minutes)],
                os.path.join(args.out, f"{kind}.log"))
        results[kind] = dict(summarize(out), wall_s=time.monotonic() - t0)

    print(f"\n{'kind':<5} {'steps':>6} {'first':>7} {'last':>7} {'ratio':>6} {'val':>7} {'tok/s':>8} {'wall s':>7}  "
          f"target ratio < {args.target}")
    ok = True
    for kind, r in results.items():
        hit = r["ratio"] < args.target
        ok &= hit
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        print(f"{kind:<5} {r['steps']:>6} {r['first']:>7.3f} {r['last']:>7.3f} {r['ratio']:>6.3f} {val:>7} "
              f"{r['tokens_per_sec']:>8.0f} {r['wall_s']:>7.0f}  {'ok' if hit else 'MISSED'}")
    print(f"sample grids: {', '.join(os.path.join(args.out, k, 'samples') for k in results)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
