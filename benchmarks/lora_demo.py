"""LoRA on the demo data: teach a trained masked generator a colour it never saw, from ~200 captioned images.

    python benchmarks/lora_demo.py [--out lora_demo] [--new-color green] [--vqgan-steps 700] [--base-steps 2400]
                                   [--lora-steps 1500] [--rank 4] [--scales 0.8 1.0] [--prompts 48] [-k 2] [--threads 1]
                                   [--new-word zorbly,佐布色]

1. data: the built-in demo dataset with every colour (for the VQGAN and the caption tokenizer, which a real setup
   takes as general-purpose tokenizers), the same scenes without --new-color (the base generator's data) and
   --concept-rows images of --new-color only, captioned with its word (the adapter's data);
2. a demo VQGAN (--vqgan-steps) and a base masked transformer (configs/demo/mim.yaml in float32, --base-steps) that never sees
   the new colour; its text embedding of the colour's word is never trained;
3. `train.py transformer --init-from BASE --lora RANK` on the concept images (configs/demo/mim_lora.yaml, which also
   trains the text-embedding rows of the new words), --lora-steps steps, timed per step;
4. the base alone and base + adapter (Pipeline.load_lora, --scale) on held-out prompts: the new colour (none of the
   captions in the concept data) and the old colours (none in the base data), judged as benchmarks/demo_quality.py
   does ("match" = colour, shape and position read back from pixels).

--new-word EN,ZH: the new colour is named by made-up words the caption tokenizer has no piece for (in the concept
data and the held-out prompts, judged as the colour they stand for): the adapter (run `lora_EN`) adds them to the
tokenizer (lora.new_words) instead of training the rows of the colour's own words.

Every stage is defined in steps (never minutes); a stage already trained in --out is reused. Prints the table of
docs/LORA.md and exits 1 if a target is missed: new-colour match >= 0.7 with the adapter, old colours within 0.05 of
the base, adapter <= 5% of the base's parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info  # noqa: E402
from demo_quality import judge_reconstructions  # noqa: E402

from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.data import caption, iter_rows, make_demo_dataset, random_attributes  # noqa: E402
from tokenpaint.data.demo import COLOR_ZH, PALETTE  # noqa: E402
from tokenpaint.resources import config_path  # noqa: E402
from tokenpaint.utils import read_yaml  # noqa: E402
from tokenpaint.demo import judge, prepare_tokenizer, summarize_verdicts  # noqa: E402
from tokenpaint.training.common import CheckpointManager  # noqa: E402

FINISHED = "lora_demo_finished.json"


def prepare_data(out: str, new_color: str, concept_rows: int, seed: int) -> dict[str, str]:
    """The three datasets (written once) and the caption tokenizer; returns their paths."""
    old = [c for c in PALETTE if c != new_color]
    paths = {}
    for name, kwargs in (("full", dict(num_train=4000, num_val=256)),
                         ("base", dict(num_train=4000, num_val=256, colors=old)),
                         ("concept", dict(num_train=concept_rows, num_val=32, colors=[new_color]))):
        directory = os.path.join(out, "data", name)
        marker = os.path.join(directory, "dataset.json")
        params = {**kwargs, "seed": seed}
        if not (os.path.isfile(marker) and json.load(open(marker, encoding="utf-8")) == params):
            make_demo_dataset(directory, seed=seed, **kwargs)
            with open(marker, "w", encoding="utf-8") as f:
                json.dump(params, f)
        paths[name] = os.path.join(directory, "train.tsv")
        paths[f"{name}_val"] = os.path.join(directory, "val.tsv")
    paths["tokenizer"] = prepare_tokenizer(paths["full"], os.path.join(out, "data", "tokenizer.model"))
    return paths


def train(stage: str, run_dir: str, steps: int, threads: int, flags: list[str]) -> dict:
    """`train.py STAGE` for `steps` steps unless run_dir holds a finished run; resumes a cut-off one. Returns
    {"seconds": wall time of this call or None if reused, "steps": steps trained in this call}."""
    record = os.path.join(run_dir, FINISHED)
    if os.path.isfile(record):
        return {"seconds": None, "steps": 0, **json.load(open(record, encoding="utf-8"))}
    resume = bool(os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(os.path.join(run_dir, "checkpoints")))
    if resume:  # the run's own config and sources; the data paths are given again
        flags = [a for i, a in enumerate(flags) for j in (i, i - 1) if j >= 0 and flags[j] in ("--data", "--val")]
        flags = ["--resume", *flags]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), stage, "--out", run_dir, "--max-steps", str(steps),
           "--threads", str(threads), *flags]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    seconds = time.monotonic() - t0
    latest = CheckpointManager(os.path.join(run_dir, "checkpoints")).latest()
    if latest is None or int(os.path.basename(latest)[5:13]) != steps:  # stopped early (Ctrl-C, SIGTERM)
        raise SystemExit(f"{run_dir} stopped before step {steps}; run this again to resume it")
    done = {"steps_total": steps, "train_seconds": seconds, "resumed": bool(resume)}
    with open(record, "w", encoding="utf-8") as f:
        json.dump(done, f)
    return {"seconds": seconds, "steps": steps, **done}


def held_out_prompts(count: int, colors: list[str], seen_tsvs: list[str], seed: int) -> list[str]:
    """`count` captions of random scenes in `colors` (alternating English / Chinese), none of them in seen_tsvs."""
    seen = {row.text for tsv in seen_tsvs for row in iter_rows(tsv)}
    rng = np.random.default_rng([seed, 104729])  # not the datasets' streams
    prompts: list[str] = []
    for _ in range(1000 * count):
        text = caption(random_attributes(rng, colors), "en" if len(prompts) % 2 == 0 else "zh", rng)
        if text not in seen and text not in prompts:
            prompts.append(text)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"could not find {count} held-out prompts; ask for fewer (--prompts)")


def rename(text: str, names: dict) -> str:
    for old, new in names.items():
        text = text.replace(old, new)
    return text


def renamed_tsv(path: str, names: dict) -> str:
    """A copy of a TSV whose captions call the colours by other names (names: {old word: new word})."""
    if not names:
        return path
    dest = os.path.join(os.path.dirname(path), f"{'_'.join(names.values())}_{os.path.basename(path)}")
    if not os.path.isfile(dest):
        with open(path, encoding="utf-8") as f:
            rows = [line.split("\t", 2) for line in f.read().splitlines()]
        with open(f"{dest}.tmp", "w", encoding="utf-8") as f:
            f.writelines(f"{idx}\t{rename(text, names)}\t{image}\n" for idx, text, image in rows)
        os.replace(f"{dest}.tmp", dest)
    return dest


def lora_data(paths: dict, replay: int, out: str, names: dict) -> str:
    """The adapter's training TSV: the concept rows (colours renamed by `names`), then the first `replay` rows of
    the base's data (prior preservation: without them the adapter is free to paint everything in the new colour)."""
    tag = "".join(f"_{new}" for new in names.values())
    path = os.path.join(out, "data", f"lora_train_replay{replay}{tag}.tsv")
    if not os.path.isfile(path):
        with open(renamed_tsv(paths["concept"], names), encoding="utf-8") as f:
            rows = f.read().splitlines()
        with open(paths["base"], encoding="utf-8") as f:
            rows += [line for _, line in zip(range(replay), f)]
        lines = [f"{i}\t{row.split(chr(9), 1)[1]}" for i, row in enumerate(r.rstrip("\n") for r in rows)]
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(f"{path}.tmp", path)
    return path


def base_config(out: str) -> str:
    """The demo's masked-transformer config in float32 (bf16: false): with bf16 autocast a step of this small model
    was 1.5x slower even on a CPU with native bf16 (AVX512-BF16), and float32 gives the same figures everywhere."""
    cfg = read_yaml(config_path("demo", "mim.yaml"))
    cfg["train"]["bf16"] = False
    path = os.path.join(out, "base.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)
    return path


def lora_config(template: str, new_color: str, out: str, new_words: list[str]) -> str:
    """The LoRA config with lora.words = the new colour's English and Chinese words, or with lora.new_words = the
    made-up words that name it."""
    cfg = read_yaml(template)
    cfg["lora"]["words"] = [] if new_words else [new_color, COLOR_ZH[new_color]]
    cfg["lora"]["new_words"] = list(new_words)
    path = os.path.join(out, f"lora{''.join('_' + w for w in new_words)}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)
    return path


def step_seconds(run_dir: str) -> float:
    """Median seconds per training step of a run, from its metrics.jsonl (tokens per step / tokens per second)."""
    cfg = read_yaml(os.path.join(run_dir, "train_config.yaml"))
    tokens_per_step = cfg["train"]["batch_size"] * cfg["model"]["image_size"] ** 2
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rates = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r and r["step"] > 1]
    return float(np.median([tokens_per_step / r for r in rates]))


def scores(pipe: Pipeline, prompts: list[str], k: int, seed: int, names: Optional[dict] = None) -> dict:
    """The judge's fractions over k images per prompt ("match" = colour, shape and position; "color" alone). The
    prompts are given with the colours renamed by `names` and judged as the colours they stand for."""
    images = pipe([rename(p, names or {}) for p in prompts], num_images=k, seed=seed)
    return summarize_verdicts([judge(image, prompts[i // k]) for i, image in enumerate(images)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "lora_demo"))
    p.add_argument("--new-color", default="green", choices=sorted(PALETTE))
    p.add_argument("--concept-rows", type=int, default=200)
    p.add_argument("--replay", type=int, default=200,
                   help="rows of the base's own data mixed into the adapter's (prior preservation); 0 = none")
    p.add_argument("--vqgan-steps", type=int, default=700)
    p.add_argument("--base-steps", type=int, default=2400)
    p.add_argument("--lora-steps", type=int, default=1500)
    p.add_argument("--lora-config", default=str(config_path("demo", "mim_lora.yaml")))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--scales", type=float, nargs="+", default=[0.8, 1.0],
                   help="adapter scales to judge; the targets are checked at the first")
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts per group (new colour, old colours)")
    p.add_argument("-k", "--images-per-prompt", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", choices=("data", "vqgan", "base", "lora"), help="stop after this stage")
    p.add_argument("--new-word", metavar="EN,ZH", type=lambda text: text.split(","),
                   help="name the new colour by these made-up English and Chinese words (new tokenizer pieces)")
    args = p.parse_args(argv)
    new_words = args.new_word or []
    if new_words and len(new_words) != 2:
        p.error(f"--new-word takes an English and a Chinese word, got {args.new_word}")
    names = dict(zip([args.new_color, COLOR_ZH[args.new_color]], new_words))
    torch.set_num_threads(args.threads)
    print(machine_info(args.threads), flush=True)

    data = prepare_data(args.out, args.new_color, args.concept_rows, args.seed)
    if args.stop_after == "data":
        return 0
    lora_name = "lora" + (f"_{new_words[0]}" if new_words else "")
    vqgan_dir, base_dir, lora_dir = (os.path.join(args.out, name) for name in ("vqgan", "base", lora_name))
    train("vqgan", vqgan_dir, args.vqgan_steps, args.threads,
          ["--data", data["full"], "--val", data["full_val"], "--config",
           str(config_path("demo", "vqgan.yaml")), "--seed", str(args.seed)])
    if args.stop_after == "vqgan":
        return 0
    train("transformer", base_dir, args.base_steps, args.threads,
          ["--data", data["base"], "--val", data["base_val"], "--vqgan", vqgan_dir, "--tokenizer", data["tokenizer"],
           "--config", base_config(args.out), "--seed", str(args.seed)])
    if args.stop_after == "base":
        return 0
    train("transformer", lora_dir, args.lora_steps, args.threads,
          ["--data", lora_data(data, args.replay, args.out, names), "--val",
           renamed_tsv(data["concept_val"], names), "--init-from", base_dir, "--lora", str(args.rank),
           "--config", lora_config(args.lora_config, args.new_color, args.out, new_words), "--seed", str(args.seed)])
    if args.stop_after == "lora":
        return 0

    pipe = Pipeline.from_pretrained(base_dir)
    base_pieces = " / ".join(str(pipe.tokenizer.pieces(w)) for w in new_words)
    base_params = sum(t.numel() for t in pipe.model.state_dict().values())
    from safetensors.torch import load_file

    adapter_params = sum(t.numel() for t in load_file(os.path.join(lora_dir, "lora.safetensors")).values())
    new_prompts = held_out_prompts(args.prompts, [args.new_color], [data["concept"]], args.seed)
    old_prompts = held_out_prompts(args.prompts, [c for c in PALETTE if c != args.new_color], [data["base"]], args.seed)
    k = args.images_per_prompt
    rows = {"base": (scores(pipe, new_prompts, k, args.seed, names), scores(pipe, old_prompts, k, args.seed))}
    for scale in args.scales:
        pipe.unload_lora()
        pipe.load_lora(lora_dir, scale=scale)
        rows[f"base + LoRA x{scale:g}"] = (scores(pipe, new_prompts, k, args.seed, names),
                                            scores(pipe, old_prompts, k, args.seed))
    recon = judge_reconstructions(args.out, data["full_val"], 256, "shapes")
    (new_base, old_base), (new_lora, old_lora) = rows["base"], rows[f"base + LoRA x{args.scales[0]:g}"]
    new_base, old_base, new_lora, old_lora = (d["match"] for d in (new_base, old_base, new_lora, old_lora))
    if new_words:
        print(f"\nthe new colour is named {' / '.join(new_words)} (the base's tokenizer: {base_pieces}; the "
              f"adapter adds one piece each)")
    print(f"\nnew colour: {args.new_color}; {len(new_prompts)} + {len(old_prompts)} held-out prompts x {k} images; "
          f"LoRA rank {args.rank}, {args.lora_steps} steps on {args.concept_rows} images + {args.replay} replayed; "
          f"{step_seconds(lora_dir):.3f} s per training step (median; --threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"adapter: {adapter_params} parameters = {100 * adapter_params / base_params:.2f}% of the base's "
          f"{base_params}")
    print(f"the VQGAN's own reconstructions of 256 val images: match {recon['match']:.2f}, colour {recon['color']:.2f}, "
          f"shape {recon['shape']:.2f} (the ceiling of any generator through it)")
    print(f"| model | {' / '.join(new_words) or args.new_color} (new): match | colour | shape | old colours: match | "
          f"colour | shape |\n"
          f"|---|---|---|---|---|---|---|")
    for name, (new, old) in rows.items():
        print(f"| {name} | " + " | ".join(f"{d[c]:.2f}" for d in (new, old) for c in ("match", "color", "shape")) + " |")
    failed = []
    if new_lora < 0.7:
        failed.append(f"new-colour match {new_lora:.2f} < 0.7")
    if old_lora < old_base - 0.05:
        failed.append(f"old colours dropped {old_base - old_lora:.2f} > 0.05")
    if adapter_params > 0.05 * base_params:
        failed.append("adapter > 5% of the base")
    print("targets met" if not failed else "missed: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
