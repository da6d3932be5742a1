"""Do captioners name what the demo's held-out images show? And, judged by a captioner, do text-to-image runs draw
what their prompts ask for (a round trip, next to demo_quality's pixel judge)? No downloaded weights (no CLIP).

    python benchmarks/caption_quality.py --captioner RUN [RUN ...] [--val demo/data/val.tsv] [--images 256]
        [--temperature T] [--top-k K] [--max-length N] [--round-trip T2I_RUN ...] [--judge CAPTIONER_RUN]
        [--prompts 48] [-k 2] [--seed 0] [--target 0.9] [--threads 1] [--json OUT.json]

Caption accuracy: each --captioner (a run whose model.directions hold i2t: configs/demo/captioner.yaml or
gpt_both.yaml) captions the first --images images of --val (the demo's val.tsv: images and captions that are not in
the training TSV), with the run's caption options (greedy unless its `sample:` section or --temperature / --top-k /
--max-length say otherwise; a sampled caption i uses seed + i). The colour, shape, size and position words of each caption (English or Chinese,
`parse_caption`) are compared with those of the image's own caption: "attrs" is the fraction of the five attributes
right (the target: >= --target), "all5" the fraction of captions with all five right, then per attribute and by the
caption's language. A caption that names no colour, shape or size counts as wrong on all five.

Round trip: each --round-trip run (text -> image) draws -k images for each of --prompts held-out prompts (those of
benchmarks/demo_quality.py); each image is judged by pixels (demo_quality's judge: measure_scene) and by the --judge
captioner (default: the first --captioner), whose caption's attributes are compared with the prompt's. Prints "match"
(colour, shape and position right) by each judge, the captioner's attribute accuracy, and how often the judges agree.
Exit status 1 if a captioner's "attrs" is below --target.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_quality import held_out_prompts  # noqa: E402
from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.sampling import CAPTION_OPTIONS, OptionError, check_option  # noqa: E402
from tokenpaint.data import iter_rows, parse_caption  # noqa: E402
from tokenpaint.data.tsv import load_image_field  # noqa: E402
from tokenpaint.data.datasets import get_dataset, judge  # noqa: E402

ATTRIBUTES = get_dataset("shapes").attributes  # colour, shape, size, horizontal, vertical

_CJK = re.compile(r"[\u4e00-\u9fff]")


def attribute_verdict(text: str, wanted) -> dict[str, bool]:
    """Which of the five attributes a caption gets right against `wanted` (SceneAttributes), plus "match" (colour,
    shape, position) and "all5". A caption naming no colour, shape or size is wrong on every count."""
    got = parse_caption(text, strict=False)
    if got.color is None and got.shape is None and got.size is None:
        verdict = dict.fromkeys(ATTRIBUTES, False)
    else:
        verdict = {name: getattr(got, name) == getattr(wanted, name) for name in ATTRIBUTES}
    verdict["match"] = verdict["color"] and verdict["shape"] and verdict["horizontal"] and verdict["vertical"]
    verdict["all5"] = all(verdict[name] for name in ATTRIBUTES)
    return verdict


def summarize(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    out = {name: sum(v[name] for v in verdicts) / len(verdicts) for name in (*ATTRIBUTES, "match", "all5")}
    out["attrs"] = sum(out[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    return out


def language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def caption_accuracy(run: str, val_tsv: str, limit: int, batch_size: int, decoding: dict, seed: int) -> dict:
    rows = []
    for row in iter_rows(val_tsv):
        rows.append(row)
        if len(rows) == limit:
            break
    images = [load_image_field(row.image, val_tsv, row.line) for row in rows]
    pipe = Pipeline.from_pretrained(run)
    t0 = time.monotonic()
    captions = pipe.caption(images, batch_size=batch_size, seed=seed, **decoding)
    seconds = time.monotonic() - t0
    verdicts = [attribute_verdict(text, parse_caption(row.text)) for text, row in zip(captions, rows)]
    scores = summarize(verdicts)
    for lang in ("en", "zh"):
        picked = [v for v, text in zip(verdicts, captions) if language(text) == lang]
        scores[f"attrs_{lang}"] = summarize(picked)["attrs"] if picked else float("nan")
        scores[f"share_{lang}"] = len(picked) / len(verdicts)
    scores.update(images=len(rows), ms_per_caption=1000 * seconds / len(rows),
                  examples=[[row.text, text] for row, text in zip(rows[:6], captions[:6])])
    return scores


def round_trip(run: str, judge_pipe: Pipeline, prompts: list[str], k: int, seed: int, batch_size: int,
               decoding: dict) -> dict:
    pipe = Pipeline.from_pretrained(run)
    images = pipe(prompts, num_images=k, seed=seed, batch_size=batch_size)  # prompt-major
    captions = judge_pipe.caption(images, batch_size=batch_size, seed=seed, **decoding)
    pixel = [judge(image, prompts[i // k]) for i, image in enumerate(images)]
    text = [attribute_verdict(c, parse_caption(prompts[i // k])) for i, c in enumerate(captions)]
    by_text = summarize(text)
    return {"pixel_match": sum(v["match"] for v in pixel) / len(pixel), "caption_match": by_text["match"],
            "caption_attrs": by_text["attrs"], "agree": sum(p["match"] == t["match"] for p, t in zip(pixel, text))
            / len(pixel), "images": len(images), "sampler": pipe.options.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captioner", nargs="+", default=[], metavar="RUN", help="runs that caption (directions: i2t)")
    p.add_argument("--val", default=os.path.join(ROOT, "demo", "data", "val.tsv"), help="held-out image TSV")
    p.add_argument("--images", type=int, default=256, help="val images to caption")
    for name, kind in (("temperature", float), ("top_k", int), ("max_length", int)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"caption {name} (default: the run's caption_{name}; temperature 0 = greedy)")
    p.add_argument("--round-trip", nargs="+", default=[], metavar="RUN", help="text-to-image runs to judge")
    p.add_argument("--judge", metavar="RUN", help="the captioner of the round trip (default: the first --captioner)")
    p.add_argument("--train", help="training TSV the held-out prompts avoid (default: beside --val)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("-k", "--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--target", type=float, default=0.9, help="minimum attribute accuracy per captioner")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on a shared machine)")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)
    if not args.captioner and not args.round_trip:
        p.error("give --captioner RUN ... and/or --round-trip RUN ...")
    if args.round_trip and not (args.judge or args.captioner):
        p.error("--round-trip needs a captioner: --judge RUN or --captioner RUN")
    for flag, runs in (("--captioner", args.captioner), ("--round-trip", args.round_trip),
                       ("--judge", [args.judge] if args.judge else [])):
        for run in runs:
            if not os.path.isfile(os.path.join(run, "config.json")):
                p.error(f"{flag}: {run} is not a transformer run directory (no config.json)")
    if not os.path.isfile(args.val):
        p.error(f"--val: {args.val} does not exist (run `make demo` or give the demo's data/val.tsv)")
    decoding = {name: getattr(args, name) for name in CAPTION_OPTIONS if getattr(args, name, None) is not None}
    try:
        for name, value in decoding.items():
            check_option("caption_" + name, value, name)
    except OptionError as e:
        p.error(f"--{e.name.replace('_', '-')}: {e}")
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")

    results, failed = {"captioners": {}, "round_trip": {}}, []
    if args.captioner:
        columns = ("attrs", "all5", *ATTRIBUTES, "attrs_en", "attrs_zh")
        how = ", ".join(f"{k} {v}" for k, v in decoding.items()) or "each run's caption options"
        print(f"\ncaption accuracy on {args.images} held-out images of {args.val} ({how})")
        print(f"{'':<28}" + "".join(f"{c:>11}" for c in columns) + "  zh share  ms/caption")
        for run in args.captioner:
            scores = caption_accuracy(run, args.val, args.images, args.batch_size, decoding, args.seed)
            results["captioners"][run] = scores
            print(f"{os.path.basename(os.path.normpath(run)):<28}" + "".join(f"{scores[c]:>11.3f}" for c in columns)
                  + f"  {scores['share_zh']:>8.2f}  {scores['ms_per_caption']:>10.1f}", flush=True)
            for truth, text in scores["examples"][:3]:
                print(f"    {truth!r} -> {text!r}")
            if scores["attrs"] < args.target:
                failed.append(run)
    if args.round_trip:
        judge_run = args.judge or args.captioner[0]
        judge_pipe = Pipeline.from_pretrained(judge_run)
        train_tsv = args.train or os.path.join(os.path.dirname(os.path.abspath(args.val)), "train.tsv")
        prompts = held_out_prompts(args.prompts, train_tsv, args.seed)
        print(f"\nround trip: {len(prompts)} held-out prompts x {args.images_per_prompt} images, captioned by "
              f"{judge_run}")
        print(f"{'':<28}{'pixel match':>13}{'caption match':>15}{'caption attrs':>15}{'judges agree':>14}")
        for run in args.round_trip:
            r = round_trip(run, judge_pipe, prompts, args.images_per_prompt, args.seed, args.batch_size, decoding)
            results["round_trip"][run] = r
            print(f"{os.path.basename(os.path.normpath(run)):<28}{r['pixel_match']:>13.3f}{r['caption_match']:>15.3f}"
                  f"{r['caption_attrs']:>15.3f}{r['agree']:>14.3f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**results, "args": vars(args), "load_average": os.getloadavg()}, f, indent=1)
    if failed:
        print(f"below the target {args.target}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
