#!/usr/bin/env python
"""Train tokenpaint models.

  python train.py vqgan       --data TRAIN.tsv [--val VAL.tsv] --config CFG.yaml --out DIR
  python train.py transformer --data TRAIN.tsv [--val VAL.tsv] --vqgan VQ_DIR --config CFG.yaml --out DIR
                              [--tokenizer SPM.model] [--init-from RUN_DIR]
                              [--lora RANK [--lora-alpha A] [--lora-targets attn,mlp,...]
                                           [--lora-new-words WORD,...]]
  both: [--max-steps N] [--max-minutes M] [--batch-size B] [--seed S] [--resume] [--bad-rows error|skip]
        [--threads N] [--compile] [--allow-outside-paths]

Multi-process: torchrun --nproc_per_node=N train.py ... (gloo on CPU, nccl on GPU; the global batch is
N x --batch-size x train.grad_accum). SIGTERM / Ctrl-C finish the current step, save a checkpoint and exit 0.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{vqgan,transformer}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, metavar="TRAIN.tsv",
                       help="training TSV: idx<TAB>text<TAB>image (base64 or a path relative to the TSV)")
        p.add_argument("--val", metavar="VAL.tsv", help="held-out TSV for periodic validation metrics and samples")
        p.add_argument("--config", metavar="CFG.yaml",
                       help="YAML config (see configs/); optional with --resume, which reuses the run's config")
        p.add_argument("--out", required=True, metavar="DIR", help="run directory (weights, metrics, checkpoints)")
        p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (overrides the config)")
        p.add_argument("--max-minutes", type=float, metavar="M",
                       help="time budget of the whole run (counted across --resume, like --max-steps): stop cleanly "
                            "and save after M minutes of training. Alone, it is the run's schedule: the lr decay follows it "
                            "(train.decay_with_budget); with --max-steps, the lr follows the steps and M only caps the "
                            "run")
        p.add_argument("--batch-size", type=int, metavar="B", help="per-process batch size (overrides the config)")
        p.add_argument("--seed", type=int, metavar="S", help="random seed (default: the config's train.seed, else 0)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
        p.add_argument("--bad-rows", choices=("error", "skip"), default="error",
                       help="malformed TSV rows: stop with an error naming the line (default) or skip and count them")
        p.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads for torch (default: torch's choice, all cores); on a busy machine 1 can be "
                            "much faster for small models")
        p.add_argument("--allow-outside-paths", action="store_true",
                       help="let image paths in the TSVs point outside the TSV's folder (absolute paths, ../, "
                            "symlinks out); by default such rows are bad rows")
        p.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the training forward (train.compile); helps on GPUs, not on small CPU runs")

    vq = sub.add_parser("vqgan", help="train the VQGAN image tokenizer",
                        description="Train a VQGAN (L1 and/or MSE + LPIPS + codebook loss, PatchGAN hinge "
                                    "discriminator).")
    common(vq)
    tr = sub.add_parser("transformer", help="train the text-conditioned GPT or masked transformer over image ids",
                        description="Train the generator (kind gpt or mim, from the config) over a trained VQGAN's ids.")
    common(tr)
    tr.add_argument("--vqgan", dest="vqgan_dir", metavar="VQ_DIR",
                    help="trained VQGAN: a run directory of `train.py vqgan` or a taming .ckpt (required unless --resume)")
    tr.add_argument("--tokenizer", metavar="SPM.model",
                    help="SentencePiece model for the captions (default: train one on the training captions)")
    tr.add_argument("--init-from", metavar="RUN_DIR", help="initialise the generator's weights from another run")
    tr.add_argument("--lora", dest="lora_rank", type=int, metavar="RANK",
                    help="train a LoRA adapter of this rank on the frozen --init-from model (lora.rank); writes "
                         "lora.safetensors + lora.json, for Pipeline.load_lora / generate.py --lora")
    tr.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (lora.alpha; default: the rank)")
    tr.add_argument("--lora-targets", metavar="NAMES",
                    type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                    help="comma-separated layers to adapt (lora.targets; default attn,mlp): qkv, attn_out, attn, "
                         "mlp_in, mlp_out, mlp, head, or Linear layer names")
    tr.add_argument("--lora-new-words", metavar="WORDS", type=lambda text: [w.strip() for w in text.split(",")],
                    help="comma-separated words the base's tokenizer does not have (lora.new_words): each becomes one "
                         "new piece of the tokenizer with a new trained text-embedding row, saved with the adapter")
    return parser


def main(argv: list[str] | None = None) -> int:
    prog = (sys.argv[0] or "train.py") if argv is None else "train.py"
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from tokenpaint.training.common import DiskFullError, NonFiniteLossError, TrainOptions

    try:
        opts = TrainOptions(stage=args.stage, data=args.data, config=args.config, out=args.out, val=args.val,
                            max_steps=args.max_steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
                            seed=args.seed, resume=args.resume, bad_rows=args.bad_rows,
                            vqgan_dir=getattr(args, "vqgan_dir", None), tokenizer=getattr(args, "tokenizer", None),
                            init_from=getattr(args, "init_from", None), lora_rank=getattr(args, "lora_rank", None),
                            lora_alpha=getattr(args, "lora_alpha", None),
                            lora_targets=getattr(args, "lora_targets", None),
                            lora_new_words=getattr(args, "lora_new_words", None), compile=args.compile,
                            allow_outside_paths=args.allow_outside_paths, argv=[prog, *argv])
        if args.stage == "vqgan":
            from tokenpaint.training.vqgan_stage import train_vqgan

            train_vqgan(opts)
        else:
            from tokenpaint.training.transformer_stage import train_transformer

            train_transformer(opts)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, DiskFullError) as e:  # a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted (second interrupt): nothing saved for the current step", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
