"""`make demo`: the whole pipeline on the built-in dataset, on CPU, in minutes.

    python -m tokenpaint.demo [--dataset shapes|glyphs] [--out DIR] [--minutes-vqgan M] [--minutes-mim M]
                              [--minutes-gpt M] [--skip-gpt] [--threads N] [--seed S] [--num-train N]

Writes a built-in dataset (--dataset shapes: coloured shapes, the default; glyphs: coloured letters and digits) and a
word-level caption tokenizer (OUT/data/), trains the demo VQGAN (OUT/vqgan/), the demo masked transformer (OUT/mim/)
and the demo GPT (OUT/gpt/) with the configs in configs/demo/ (the same for both datasets), then draws a grid of
samples for the dataset's prompts (English and Chinese) from each generator into OUT/samples.png, the prompt under
each image (Chinese prompts in their English rendering, marked "zh:", when no CJK font is found).

The recipe is a step count per stage (train.max_steps of each demo config), and the lr decays over those steps, so
the result does not depend on how fast the machine is: with the same --threads, two runs give byte-identical weights
and samples, however busy the machine. A slower machine only takes longer (the progress bars show the ETA from the
measured step rate). --minutes-* are optional caps: a stage stopped by one says what share of its recipe it trained,
in the summary and under the samples, and its quality is lower.

The two generators train side by side, each in its own process with half the CPU threads: models this small do not
keep two cores busy, so each runs its steps ~1.3-1.5x as fast as it would on all cores one after the other
(benchmarks/side_by_side.py; --one-at-a-time turns this off, same models). Their output goes to OUT/logs/{mim,gpt}.log;
a progress bar per stage is shown.

Running it again reuses what is there: a stage that trained to its end (or its cap) is skipped, one that was cut off
(Ctrl-C or SIGTERM, which save a checkpoint and stop the demo, or a kill) resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing
import os
import pickle
import queue
import sys
import time
import traceback
from typing import Optional, Sequence

from .data import DEMO_VOCAB_SIZE, TextTokenizer, iter_rows
from .data.datasets import DATASETS, get_dataset, judge  # noqa: F401  (judge: for the benchmarks)
from .demo_grid import find_cjk_font, sample_grid
from .resources import configs_dir
from .utils import atomic_write_bytes

CONFIG_DIR = configs_dir() / "demo"  # shipped with the package (configs/demo/ in the repository)
# The generators train side by side, so the wall time is vqgan + max(mim, gpt) + data, caches, sampling (~1 min) + venv.
STAGES = ("vqgan", "mim", "gpt")
# Seconds per optimizer step of the recipe on a quiet 2-core AMD EPYC (AVX-512): the VQGAN on 2 threads (1000 steps in
# 198-246 s), each generator on 1 thread beside the other (the masked one 0.084-0.093 s, the GPT with dropout 0.108 s):
# the expected time printed up front.
REFERENCE_SECONDS_PER_STEP = {"vqgan": 0.23, "mim": 0.09, "gpt": 0.108}
REFERENCE_MACHINE = "a quiet 2-core AVX-512 machine"
DEFAULT_THREADS = 2  # the VQGAN's; each generator gets half. Fixed (not the core count): the same bits everywhere


# ----------------------------------------------------------------------------------------------------------------------
# judging generated images against their prompts (judge: tokenpaint.data.datasets; also benchmarks/demo_quality.py)


def summarize_verdicts(verdicts: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Fraction of images that pass each check."""
    if not verdicts:
        raise ValueError("summarize_verdicts: no verdicts")
    return {name: sum(v[name] for v in verdicts) / len(verdicts) for name in verdicts[0]}


# ----------------------------------------------------------------------------------------------------------------------
# stages


FINISHED_RECORD = "demo_finished.json"  # written once a stage has trained to its end: the recipe's steps, or its cap


class StageStopped(KeyboardInterrupt):
    """A stage stopped by Ctrl-C or SIGTERM: it saved a checkpoint, and the next run of the demo resumes it."""


def stage_state(run_dir: str) -> str:
    """"done" (trained to the end, final model saved), "partial" (checkpoints to resume: a stage cut off by Ctrl-C,
    SIGTERM or a kill) or "new". A stage stopped by a signal also saves its model, so the model alone does not mean
    done; a model with no checkpoints beside it (put there by hand) does."""
    has_model = os.path.isfile(os.path.join(run_dir, "model.safetensors")) and os.path.isfile(
        os.path.join(run_dir, "config.json"))
    has_checkpoints = bool(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))
    if has_model and (os.path.isfile(os.path.join(run_dir, FINISHED_RECORD)) or not has_checkpoints):
        return "done"
    return "partial" if has_checkpoints else "new"


def prepare_data(data_dir: str, num_train: int, num_val: int, seed: int,
                 dataset: str = "shapes") -> tuple[str, str, str]:
    """The built-in dataset in data_dir, written once: reused while its parameters are unchanged (rewriting would
    change the files' mtimes and so invalidate the trained stages' token caches)."""
    params = {"num_train": num_train, "num_val": num_val, "resolution": 32, "seed": seed}
    if dataset != "shapes":  # (the shapes' record predates the choice)
        params["dataset"] = dataset
    marker = os.path.join(data_dir, "dataset.json")
    paths = tuple(os.path.join(data_dir, name) for name in ("train.tsv", "val.tsv", "prompts.tsv"))
    if os.path.isfile(marker) and all(os.path.isfile(p) for p in paths):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return paths
    stale_tokenizer = os.path.join(data_dir, "tokenizer.model")
    if os.path.isfile(stale_tokenizer):  # trained on the captions being replaced
        os.remove(stale_tokenizer)
    paths = get_dataset(dataset).make(data_dir, num_train=num_train, num_val=num_val, resolution=32, seed=seed)
    atomic_write_bytes(marker, json.dumps(params).encode())  # written last: a half-written dataset is rebuilt
    return paths


def prepare_tokenizer(train_tsv: str, path: str, dataset: str = "shapes") -> str:
    """The demo's caption tokenizer (word-level pieces in English and Chinese), trained once; both generators use it."""
    if not os.path.isfile(path):
        prefix = os.path.join(os.path.dirname(path), "spm", "tokenizer")
        trained = TextTokenizer.train((row.text for row in iter_rows(train_tsv)), prefix, vocab_size=DEMO_VOCAB_SIZE,
                                      user_defined_symbols=list(get_dataset(dataset).pieces))
        with open(trained.model_file, "rb") as f:
            atomic_write_bytes(path, f.read())  # a half-written tokenizer is never reused
    return path


def recipe_steps(config_dir: str) -> dict[str, int]:
    """The demo's recipe: train.max_steps of each stage's config in config_dir."""
    from .utils import read_yaml

    steps = {}
    for name in STAGES:
        path = os.path.join(config_dir, f"{name}.yaml")
        value = ((read_yaml(path) or {}).get("train") or {}).get("max_steps")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: train.max_steps (the demo's recipe for the {name} stage) must be an integer "
                             f">= 1, got {value!r}")
        steps[name] = value
    return steps


def run_stage(name: str, run_dir: str, steps: int, minutes: Optional[float] = None, *, data: str, val: str,
              config: str, seed: int, vqgan_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> str:
    """Train one stage in-process for `steps` optimizer steps (the lr decays over them), stopping early at `minutes`
    if given, unless its run directory already holds a finished model. Returns what it did."""
    from .training.common import COMPLETE_STOPS, BudgetSpent, TrainOptions

    state = stage_state(run_dir)
    if state == "done":
        return "reused"
    resume = state == "partial"
    stage = "vqgan" if name == "vqgan" else "transformer"
    argv = ["train.py", stage, "--data", data, "--val", val, "--out", run_dir, "--max-steps", str(steps),
            *(["--max-minutes", f"{minutes:g}"] if minutes is not None else []), "--seed", str(seed),
            *([] if resume else ["--config", config])]
    if vqgan_dir is not None and not resume:
        argv += ["--vqgan", vqgan_dir] + (["--tokenizer", tokenizer] if tokenizer else [])
    opts = TrainOptions(stage=stage, data=data, val=val, config=None if resume else config, out=run_dir,
                        max_steps=steps, max_minutes=minutes, seed=None if resume else seed, resume=resume,
                        vqgan_dir=None if resume else vqgan_dir, tokenizer=None if resume else tokenizer, argv=argv)
    try:
        if stage == "vqgan":
            from .training.vqgan_stage import train_vqgan

            summary = train_vqgan(opts)
        else:
            from .training.transformer_stage import train_transformer

            summary = train_transformer(opts)
    except BudgetSpent as e:  # it trained its whole budget but was not recorded as finished (killed at the very end)
        if not os.path.isfile(os.path.join(run_dir, "model.safetensors")):  # killed before the final model was saved
            raise ValueError(f"{name}: {e} (here: --minutes-{name}), or delete {run_dir} to train it again") from e
        from .training.common import CheckpointManager

        saved = CheckpointManager(os.path.join(run_dir, "checkpoints")).list()
        _record_finished(run_dir, {"step": saved[-1][0] if saved else None, "max_steps": steps,
                                   "stopped": "time budget"})
        return "reused"
    if summary["stopped"] not in COMPLETE_STOPS:
        raise StageStopped(f"{name} stopped at step {summary['step']} ({summary['stopped']}); its checkpoint is in "
                           f"{os.path.join(run_dir, 'checkpoints')}")
    _record_finished(run_dir, {"step": summary["step"], "max_steps": summary["max_steps"],
                               "stopped": summary["stopped"]})
    if stage_state(run_dir) != "done":
        raise RuntimeError(f"{name} stage finished without a model in {run_dir}")
    return f"{'resumed' if resume else 'trained'} to step {summary['step']}"


def _record_finished(run_dir: str, what: dict) -> None:
    atomic_write_bytes(os.path.join(run_dir, FINISHED_RECORD), json.dumps(what).encode())


def recipe_share(name: str, run_dir: str, minutes: Optional[float]) -> Optional[str]:
    """For a finished stage that a --minutes-* cap stopped early: what share of its recipe it trained and that its
    quality is lower (one line); None for a stage that trained its whole recipe."""
    try:
        with open(os.path.join(run_dir, FINISHED_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("stopped") != "time budget":
        return None
    step, total = record.get("step"), record.get("max_steps")
    share = f"{step}/{total} steps, {step / total:.0%} of the recipe" if step and total else "part of the recipe"
    cap = f" --minutes-{name} {minutes:g}" if minutes is not None else f" --minutes-{name}"
    return f"{name}: stopped by{cap} at {share}: quality will be lower than the recipe's"


def _stage_process(name: str, stage_kwargs: dict, threads: int, log_path: str, results) -> None:
    """One stage in a child process: `threads` torch threads, stdout/stderr into log_path, the outcome on `results`."""
    import torch

    torch.set_num_threads(threads)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            results.put((name, run_stage(name, **stage_kwargs), None))
        except BaseException as e:  # noqa: B902  (reported to the parent, which re-raises it)
            traceback.print_exc()
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            results.put((name, None, e))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _last_logged(run_dir: str) -> tuple[int, Optional[float]]:
    """(step, loss) of the last line of run_dir/metrics.jsonl that has a loss; (0, None) before there is one."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0, None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # the first line of the window may be cut, the last one half-written
            continue
        if "loss" in record:
            return int(record["step"]), float(record["loss"])
    return 0, None


def run_stages_side_by_side(stages: dict[str, dict], threads: int, log_dir: str) -> dict[str, str]:
    """Train stages at the same time, one process each with `threads` torch threads (run_stage's keyword arguments
    per stage name). Shows a progress bar per stage from its metrics.jsonl (steps of its recipe, ETA from the measured
    step rate); re-raises the first stage's error (its log's tail printed). Returns what each stage did."""
    from tqdm.auto import tqdm

    os.makedirs(log_dir, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    results = context.Queue()
    logs = {name: os.path.join(log_dir, f"{name}.log") for name in stages}
    processes = {name: context.Process(target=_stage_process, args=(name, kwargs, threads, logs[name], results),
                                       name=f"demo-{name}") for name, kwargs in stages.items()}
    bars = {name: tqdm(desc=name, unit="step", total=stages[name]["steps"], position=i, dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0) for i, name in enumerate(stages)}
    outcomes: dict[str, tuple[Optional[str], Optional[BaseException]]] = {}
    for process in processes.values():
        process.start()
    try:
        while len(outcomes) < len(stages):
            try:
                name, what, error = results.get(timeout=1.0)
                outcomes[name] = (what, error)
            except queue.Empty:
                pass
            for name, bar in bars.items():
                step, loss = _last_logged(stages[name]["run_dir"])
                bar.update(step - bar.n)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            for name, process in processes.items():
                if name not in outcomes and not process.is_alive() and results.empty():
                    outcomes[name] = (None, RuntimeError(f"the {name} process died (exit code {process.exitcode})"))
    finally:  # Ctrl-C reaches the children too: they save a checkpoint and stop, so wait for them
        for process in processes.values():
            process.join()
        for bar in bars.values():
            bar.close()
    for name, (what, error) in outcomes.items():
        if error is not None:
            try:
                with open(logs[name], encoding="utf-8", errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
            except OSError:  # the process died before it wrote anything
                tail = "(nothing)"
            print(f"[demo] {name} failed; the end of {logs[name]}:\n{tail}", file=sys.stderr, flush=True)
            raise error
    return {name: what for name, (what, _) in outcomes.items()}


# ----------------------------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenpaint.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dataset", choices=tuple(DATASETS), default="shapes",
                   help="built-in dataset: coloured shapes (default) or coloured letters and digits in three fonts")
    p.add_argument("--out", help="output directory (default: demo, or demo_glyphs with --dataset glyphs)")
    for stage in STAGES:
        p.add_argument(f"--minutes-{stage}", type=float, metavar="M",
                       help=f"optional cap on the {stage} stage's training time: it stops after M minutes even if it "
                            f"has not trained its recipe's steps (reported, lower quality; default: no cap)")
    p.add_argument("--skip-gpt", action="store_true", help="train and sample only the masked transformer")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="train the two generators one after the other, not side by side (the same models, slower)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch CPU threads: the VQGAN and the sampling get N, each generator N // 2 (default "
                        f"{DEFAULT_THREADS}); the same N gives the same bits, whatever else the machine runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset, the training runs and the samples")
    p.add_argument("--num-train", type=int, metavar="N",
                   help="training rows of the built-in dataset (default: the dataset's own, shapes 4000, glyphs 16000)")
    p.add_argument("--num-val", type=int, default=256, help="validation rows of the built-in dataset")
    p.add_argument("--images-per-prompt", type=int, default=2, help="sample rows per generator in samples.png")
    p.add_argument("--config-dir", default=str(CONFIG_DIR), help="where vqgan.yaml, mim.yaml and gpt.yaml live")
    return p


def fill_defaults(args) -> None:
    """The defaults that depend on --dataset: the output directory and the number of training rows."""
    if args.out is None:
        args.out = "demo" if args.dataset == "shapes" else f"demo_{args.dataset}"
    if args.num_train is None:
        args.num_train = get_dataset(args.dataset).num_train


def check_args(args) -> None:
    for stage in STAGES:
        value = getattr(args, f"minutes_{stage}")
        if value is not None and value <= 0:
            raise ValueError(f"--minutes-{stage} must be positive, got {value}")
    for flag in ("num_train", "images_per_prompt", "threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_val < 1:
        raise ValueError(f"--num-val must be >= 1, got {args.num_val}")
    for name in ("vqgan", "mim", "gpt"):
        path = os.path.join(args.config_dir, f"{name}.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config-dir {args.config_dir}: no {name}.yaml there (the demo configs ship in "
                                    f"{CONFIG_DIR})")


def expected_minutes(steps: dict[str, int], names: Sequence[str], side_by_side: bool) -> float:
    """Training minutes of the stages `names` on the reference machine (the generators overlap when side by side)."""
    seconds = {name: steps[name] * REFERENCE_SECONDS_PER_STEP[name] for name in names}
    generators = [seconds[name] for name in names if name != "vqgan"]
    return (seconds.get("vqgan", 0.0) + (max(generators, default=0.0) if side_by_side else sum(generators))) / 60


def run_demo(args) -> dict:
    """Everything `make demo` does; returns {"timings": {stage: seconds}, "samples": path, "scores": {...},
    "capped": [one line per stage a --minutes-* cap stopped early]}."""
    fill_defaults(args)
    check_args(args)
    import torch

    from . import Pipeline

    steps = recipe_steps(args.config_dir)
    torch.set_num_threads(args.threads)  # the VQGAN stage and the sampling; fixed, so the bits are too
    generator_threads = max(1, args.threads // 2)
    out = args.out
    os.makedirs(out, exist_ok=True)
    timings, scores = {}, {}

    def log(stage: str, seconds: float, what: str) -> None:
        timings[stage] = seconds
        print(f"[demo] {stage:<8} {seconds:7.1f} s  {what}", flush=True)

    vqgan_dir = os.path.join(out, "vqgan")
    kinds = ["mim"] + ([] if args.skip_gpt else ["gpt"])
    to_train = [name for name in ["vqgan", *kinds] if stage_state(os.path.join(out, name)) != "done"]
    side_by_side = len([k for k in kinds if k in to_train]) > 1 and not args.one_at_a_time
    if to_train:
        caps = [f"--minutes-{name} {getattr(args, f'minutes_{name}'):g}" for name in to_train
                if getattr(args, f"minutes_{name}") is not None]
        print(f"[demo] recipe: {', '.join(f'{name} {steps[name]} steps' for name in to_train)} "
              f"({args.config_dir}); expected ~{expected_minutes(steps, to_train, side_by_side) + 1:.0f} min on "
              f"{REFERENCE_MACHINE}, longer on a slower or busier one, with the same result"
              f"{'; capped by ' + ', '.join(caps) if caps else ''}", flush=True)

    t0 = start = time.monotonic()
    marker = os.path.join(out, "data", "dataset.json")
    before = os.stat(marker).st_mtime_ns if os.path.isfile(marker) else None
    train_tsv, val_tsv, _ = prepare_data(os.path.join(out, "data"), args.num_train, args.num_val, args.seed,
                                         args.dataset)
    trained = [name for name in STAGES if stage_state(os.path.join(out, name)) != "new"]
    if before is not None and os.stat(marker).st_mtime_ns != before and trained:
        print(f"[demo] note: the dataset changed (--num-train/--num-val/--seed) but {', '.join(trained)} in {out} "
              f"were trained on the old one and are reused; `make clean-demo` (rm -rf {out}) starts over", flush=True)
    tokenizer = prepare_tokenizer(train_tsv, os.path.join(out, "data", "tokenizer.model"), args.dataset)
    log("data", time.monotonic() - t0,
        f"{args.num_train} training rows of {args.dataset} in {os.path.join(out, 'data')}")

    def stage_kwargs(name: str) -> dict:
        return dict(run_dir=os.path.join(out, name), steps=steps[name], minutes=getattr(args, f"minutes_{name}"),
                    data=train_tsv, val=val_tsv, config=os.path.join(args.config_dir, f"{name}.yaml"), seed=args.seed,
                    vqgan_dir=None if name == "vqgan" else vqgan_dir, tokenizer=None if name == "vqgan" else tokenizer)

    together = [kind for kind in kinds if kind in to_train] if side_by_side else []
    for name in ["vqgan", *[kind for kind in kinds if kind not in together]]:
        t0 = time.monotonic()
        if stage_state(os.path.join(out, name)) != "done":
            print(f"[demo] {name}: training {steps[name]} steps -> {os.path.join(out, name)}", flush=True)
        threads = args.threads if name == "vqgan" else generator_threads
        torch.set_num_threads(threads)
        try:
            what = run_stage(name, **stage_kwargs(name))
        finally:
            torch.set_num_threads(args.threads)
        seconds = time.monotonic() - t0
        log(name, seconds, f"{what} ({os.path.join(out, name)})")
        if name == "vqgan" and what.startswith("trained") and to_train[1:]:
            pace = seconds / (steps["vqgan"] * REFERENCE_SECONDS_PER_STEP["vqgan"])
            rest = expected_minutes(steps, to_train[1:], side_by_side) * pace
            print(f"[demo] this machine ran the VQGAN at {1 / pace:.2f}x the reference pace: the generators should "
                  f"take ~{rest:.0f} min", flush=True)
    if together:
        t0 = time.monotonic()
        print(f"[demo] {' + '.join(together)}: training side by side, {generator_threads} thread(s) each, "
              f"{' / '.join(str(steps[name]) for name in together)} steps -> "
              f"{', '.join(os.path.join(out, name) for name in together)} (logs in {os.path.join(out, 'logs')})",
              flush=True)
        done = run_stages_side_by_side({name: stage_kwargs(name) for name in together}, generator_threads,
                                       os.path.join(out, "logs"))
        for name in together:
            log(name, time.monotonic() - t0, f"{done[name]} ({os.path.join(out, name)}, side by side)")
    capped = [line for name in ["vqgan", *kinds]
              if (line := recipe_share(name, os.path.join(out, name), getattr(args, f"minutes_{name}")))]

    t0 = time.monotonic()
    prompts = list(get_dataset(args.dataset).prompts)
    rows = []
    for kind in kinds:
        pipe = Pipeline.from_pretrained(os.path.join(out, kind))
        images = pipe(prompts, num_images=args.images_per_prompt, seed=args.seed)  # prompt-major
        verdicts = [judge(image, prompts[i // args.images_per_prompt], args.dataset) for i, image in enumerate(images)]
        scores[kind] = summarize_verdicts(verdicts)
        for j in range(args.images_per_prompt):
            rows.append((kind, images[j::args.images_per_prompt]))
    cjk_font = find_cjk_font()
    samples = os.path.join(out, "samples.png")
    png = io.BytesIO()
    sample_grid(rows, prompts, cjk_font, notes=capped, dataset=args.dataset).save(png, format="PNG")
    atomic_write_bytes(samples, png.getvalue())
    log("samples", time.monotonic() - t0, f"{len(rows)} rows x {len(prompts)} prompts -> {samples}")
    if cjk_font is None:
        print("[demo] no CJK font on this system (fc-list :lang=zh): Chinese prompts are labelled with their English "
              "rendering, marked 'zh:'", flush=True)
    for kind, score in scores.items():
        print(f"[demo] {kind}: {score['match']:.0%} of the samples match their prompt in colour, "
              f"{get_dataset(args.dataset).identity} and position (judged from the pixels; "
              f"benchmarks/demo_quality.py measures this on held-out prompts)", flush=True)
    for line in capped:
        print(f"[demo] note: {line}; without the cap (after rm -rf {out}) it trains the whole recipe", flush=True)
    print(f"[demo] done in {(time.monotonic() - start) / 60:.1f} min: samples in {samples}; try\n"
          f"  python generate.py --model {os.path.join(out, kinds[0])} --prompt \"{prompts[0]}\" "
          f"--out-dir {os.path.join(out, 'generated')}", flush=True)
    return {"timings": timings, "samples": samples, "scores": scores, "capped": capped}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the stages saved their checkpoints
        print(f"\n[demo] stopped: {e or 'interrupted'}; run it again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
