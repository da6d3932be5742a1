"""Do the demo generators draw what their prompts ask for? Judged from pixels, on held-out prompts.

    python benchmarks/demo_quality.py [--run demo] [--dataset shapes|glyphs] [--kinds mim gpt] [--prompts 96] [-k 4]
                                      [--seed 0]
                                      [--guidance-scale G] [--steps T] [--temperature T] [--top-k K]
                                      [--choice-temperature C] [--jacobi-window W] [--dtype int8] [--recon] [--grid]
                                      [--json OUT.json]

--run is the output directory of `python -m tokenpaint.demo` (`make demo`); if it holds no trained generators, the
demo is run first (its recipe). For each generator, K images are sampled for each of --prompts
held-out prompts (random scenes, half English and half Chinese, whose caption text is not in the training TSV), each
image is read back from its pixels by the dataset's judge (colour, shape or character, size, position; nothing drawn =
a miss) and compared with what the prompt asks for. Prints the fraction of images that match in colour, shape (or
character) and position ("match", the target: >= 0.8), with size too ("all"), and per attribute and per language. The
dataset is the one the run was made with (OUT/data/dataset.json), unless --dataset says otherwise. Sampler options
default to the `sample:` section of the run's train_config.yaml. --recon also judges the VQGAN's reconstructions of
the val images against their captions: the ceiling the generators can reach through that tokenizer.
Exit status 1 if a generator's "match" is below --target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.data import iter_rows  # noqa: E402
from tokenpaint.data.datasets import DATASETS, get_dataset  # noqa: E402
from tokenpaint.demo import judge, sample_grid, summarize_verdicts  # noqa: E402


def columns(dataset: str) -> tuple[str, ...]:
    return ("match", "all", *get_dataset(dataset).attributes)


def run_dataset(run_dir: str) -> str:
    """The dataset a demo run was made with (its data/dataset.json; shapes when it does not say)."""
    try:
        with open(os.path.join(run_dir, "data", "dataset.json"), encoding="utf-8") as f:
            return json.load(f).get("dataset", "shapes")
    except (OSError, ValueError):
        return "shapes"


def held_out_prompts(count: int, train_tsv: str | None, seed: int, dataset: str = "shapes") -> list[str]:
    """`count` captions of random scenes, alternating English / Chinese, none of them verbatim in train_tsv."""
    seen = {row.text for row in iter_rows(train_tsv, bad_rows="skip")} if train_tsv and os.path.isfile(train_tsv) \
        else set()
    rng = np.random.default_rng([seed, 7919])  # not the dataset's streams ([seed, split])
    ds = get_dataset(dataset)
    prompts: list[str] = []
    for _ in range(1000 * count):
        text = ds.caption(ds.random(rng), "en" if len(prompts) % 2 == 0 else "zh", rng)
        if text not in seen and text not in prompts:
            prompts.append(text)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"could not find {count} prompts outside {train_tsv}; ask for fewer (--prompts)")


def format_row(name: str, scores: dict, dataset: str, extra: str = "") -> str:
    return f"{name:<14}" + "".join(f"{scores[c]:>11.2f}" for c in columns(dataset)) + (f"  {extra}" if extra else "")


def header(dataset: str) -> str:
    return f"{'':<14}" + "".join(f"{c:>11}" for c in columns(dataset))


@torch.inference_mode()
def judge_reconstructions(run_dir: str, val_tsv: str, limit: int, dataset: str) -> dict:
    """measure_scene on VQGAN reconstructions of the val images vs their captions (the tokenizer's ceiling)."""
    from tokenpaint.data import TSVImageText
    from tokenpaint.data import tensor_to_pil
    from tokenpaint.vqgan import VQGAN

    vqgan = VQGAN.from_pretrained(os.path.join(run_dir, "vqgan")).eval()
    verdicts = []
    for row in TSVImageText(val_tsv, vqgan.config.resolution):
        x = row["image"][None]
        verdicts.append(judge(tensor_to_pil(vqgan.decode(vqgan.encode(x))[0]), row["text"], dataset))
        if len(verdicts) == limit:
            break
    return summarize_verdicts(verdicts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.path.join(ROOT, "demo"), help="output directory of `make demo` (default: demo/)")
    p.add_argument("--dataset", choices=tuple(DATASETS), help="judge as this dataset (default: the run's)")
    p.add_argument("--kinds", nargs="+", default=["mim", "gpt"], choices=["mim", "gpt"])
    p.add_argument("--prompts", type=int, default=96,
                   help="number of held-out prompts (scores varied by up to 0.13 between two sets of 48)")
    p.add_argument("-k", "--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.8, help="minimum 'match' fraction per generator")
    for name, kind in (("guidance-scale", float), ("steps", int), ("temperature", float), ("top-k", int),
                       ("top-p", float), ("choice-temperature", float), ("jacobi-window", int)):
        p.add_argument(f"--{name}", type=kind, help="sampler override (default: the run's sample: section)")
    p.add_argument("--dtype", default="float32", help="generator weights: float32, bfloat16 or int8 (quantized)")
    p.add_argument("--recon", action="store_true", help="also judge VQGAN reconstructions of the val images")
    p.add_argument("--grid", action="store_true", help="save RUN/quality_KIND.png (one row per prompt)")
    p.add_argument("--json", metavar="OUT.json", help="also write the scores as JSON")
    args = p.parse_args(argv)

    kinds_present = [k for k in args.kinds if os.path.isfile(os.path.join(args.run, k, "model.safetensors"))]
    if len(kinds_present) < len(args.kinds):
        from tokenpaint.demo import main as demo_main

        print(f"{args.run}: no trained {' / '.join(sorted(set(args.kinds) - set(kinds_present)))}: "
              f"running the demo first", flush=True)
        flags = [] if "gpt" in args.kinds else ["--skip-gpt"]
        flags += ["--dataset", args.dataset] if args.dataset else []
        if demo_main(["--out", args.run, "--seed", str(args.seed), *flags]) != 0:
            return 2
    dataset = args.dataset or run_dataset(args.run)

    train_tsv = os.path.join(args.run, "data", "train.tsv")
    prompts = held_out_prompts(args.prompts, train_tsv, args.seed, dataset)
    overrides = {k: getattr(args, k) for k in ("guidance_scale", "steps", "temperature", "top_k", "top_p",
                                               "jacobi_window") if getattr(args, k) is not None}
    print(f"{dataset}: {len(prompts)} held-out prompts x {args.images_per_prompt} images; "
          f"overrides: {overrides or 'none'}; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print(header(dataset))
    results, failed = {}, []
    if args.recon:
        val_tsv = os.path.join(args.run, "data", "val.tsv")
        results["vqgan_recon"] = judge_reconstructions(args.run, val_tsv, 256, dataset)
        print(format_row("vqgan recon", results["vqgan_recon"], dataset, "(val images through the VQGAN: the ceiling)"))
    for kind in args.kinds:
        pipe = Pipeline.from_pretrained(os.path.join(args.run, kind), dtype=args.dtype)
        if args.choice_temperature is not None:
            pipe.options = pipe.options.replace(choice_temperature=args.choice_temperature)
        t0 = time.monotonic()
        images = pipe(prompts, num_images=args.images_per_prompt, seed=args.seed, **overrides)  # prompt-major
        seconds = time.monotonic() - t0
        k = args.images_per_prompt
        verdicts = [judge(image, prompts[i // k], dataset) for i, image in enumerate(images)]
        scores = summarize_verdicts(verdicts)
        by_lang = {lang: summarize_verdicts([v for i, v in enumerate(verdicts) if (i // k) % 2 == j])["match"]
                   for j, lang in enumerate(("en", "zh"))}
        results[kind] = dict(scores, match_en=by_lang["en"], match_zh=by_lang["zh"], seconds=seconds,
                             images=len(images), sampler=pipe.options.replace(**overrides).to_dict())
        print(format_row(kind, scores, dataset, f"en {by_lang['en']:.2f} zh {by_lang['zh']:.2f}; "
                                       f"{seconds / len(images) * 1000:.0f} ms/image"), flush=True)
        if scores["match"] < args.target:
            failed.append(kind)
        if args.grid:
            rows = [(f"#{j}", images[j::k]) for j in range(k)]
            path = os.path.join(args.run, f"quality_{kind}.png")
            sample_grid(rows, prompts, dataset=dataset).save(path)
            print(f"  grid: {path}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"dataset": dataset, "prompts": prompts, "results": results, "load_average": os.getloadavg()}, f,
                      indent=1)
    if failed:
        print(f"below the target {args.target}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
