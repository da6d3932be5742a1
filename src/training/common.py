"""Training infrastructure shared by the VQGAN and transformer stages.

Options and YAML configs, atomic checkpoints (weights-only loadable), RNG capture, metrics, graceful stop, time
budget, NaN guard, LR schedule, distributed setup, weight EMA and an exactly-resumable batch iterator.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..data.images import ImageLimits
from ..data.tsv import check_tsv_path
from ..utils import (TRAIN_SEED, DiskFullError, atomic_write, atomic_write_bytes, load_config,  # noqa: F401
                     read_yaml, remove_stale_temp_files)
from .checkpoints import CheckpointManager  # noqa: F401  (re-exported)
from .run_dir import RunLock, RunLockedError  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------- options


@dataclass
class TrainOptions:
    """The command-line flags of `train.py` (both subcommands). None = take the value from the YAML config."""

    stage: str  # "vqgan" | "transformer"
    data: str
    config: str | None
    out: str
    val: str | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int | None = None
    seed: int | None = None  # None: train.seed from the config (default 0)
    resume: bool = False
    bad_rows: str = "error"
    vqgan_dir: str | None = None  # transformer: --vqgan
    tokenizer: str | None = None  # transformer: --tokenizer
    init_from: str | None = None  # transformer: --init-from
    lora_rank: int | None = None  # transformer: --lora RANK (None: the config's lora.rank)
    lora_alpha: float | None = None  # transformer: --lora-alpha
    lora_targets: list[str] | None = None  # transformer: --lora-targets attn,mlp
    lora_new_words: list[str] | None = None  # transformer: --lora-new-words zorbly,...
    compile: bool | None = None  # --compile: torch.compile the training forward (None: the config's train.compile)
    allow_outside_paths: bool = False  # --allow-outside-paths: image paths in the TSVs may leave their folder
    argv: list[str] = field(default_factory=list)  # the command line, to print the exact resume command

    def __post_init__(self):
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"--bad-rows must be 'error' or 'skip', got {self.bad_rows!r}")
        for name in ("max_steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"--max-minutes must be a positive number of minutes, got {self.max_minutes}")
        if self.seed is not None:
            check_seed(self.seed, "--seed")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(allow_outside_paths=self.allow_outside_paths)

    def check_data_paths(self) -> None:
        """--data / --val name regular files (a directory or a FIFO is a clear error, before any work)."""
        check_tsv_path(self.data, "--data")
        if self.val is not None:
            check_tsv_path(self.val, "--val")


def check_seed(seed, where: str) -> None:
    if not TRAIN_SEED.ok(seed):
        raise ValueError(f"{where} must be {TRAIN_SEED.wanted}, got {seed!r}")


def resume_command(opts: TrainOptions, max_minutes: float | None = None) -> str:
    """The exact command that continues this run (with --max-minutes set to `max_minutes` when given)."""
    argv = list(opts.argv) or ["train.py", opts.stage, "--data", opts.data, "--out", opts.out]
    if max_minutes is not None:
        if "--max-minutes" in argv:
            argv[argv.index("--max-minutes") + 1] = f"{max_minutes:g}"
        else:
            argv += ["--max-minutes", f"{max_minutes:g}"]
    if "--resume" not in argv:
        argv.append("--resume")
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable) or "python", *argv])


# ----------------------------------------------------------------------------- YAML configs


def save_yaml(path: str, data: dict) -> None:
    atomic_write_bytes(path, yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True).encode("utf-8"))


def _plain(obj: Any) -> Any:
    """Tuples -> lists so that configs survive YAML/JSON and weights-only checkpoints alike."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- atomic files and checkpoints


@contextlib.contextmanager
def claim_run_directory(opts: TrainOptions):
    """Before any work: --data / --val checked, the run directory locked against a second writer (rank 0), and the
    temp files of earlier interrupted writes removed from it."""
    opts.check_data_paths()
    if not is_main():
        yield
        return
    with RunLock(opts.out):
        for path in remove_stale_temp_files(opts.out):
            print(f"removed {path}, left by an interrupted write", file=sys.stderr)
        yield


def start_or_resume(opts: TrainOptions, ckpts: CheckpointManager, resolve) -> tuple[dict, dict | None]:
    """(config, resume_state). With --resume: the newest loadable checkpoint and the config stored in it
    (--max-steps may change, not below the checkpoint's step; --batch-size may not). Otherwise `resolve()` builds
    the config, and --out must not hold a run yet."""
    if opts.resume:
        _, state = ckpts.load_latest()
        cfg = copy.deepcopy(state["config"])
        if opts.max_steps is not None:
            if opts.max_steps < state["step"]:
                raise ValueError(f"--max-steps {opts.max_steps} is below step {state['step']} of the checkpoint "
                                 f"being resumed: nothing to train (give a larger --max-steps)")
            cfg["train"]["max_steps"] = opts.max_steps
        if opts.batch_size is not None and opts.batch_size != cfg["train"]["batch_size"]:
            raise ValueError(f"--batch-size {opts.batch_size} differs from the run being resumed "
                             f"({cfg['train']['batch_size']}); resume with the same batch size")
        return cfg, state
    if opts.config is None:
        raise ValueError("--config is required (unless --resume)")
    if ckpts.latest() is not None:
        raise ValueError(f"{opts.out} already holds a run ({ckpts.latest()}); pass --resume to continue it "
                         f"or choose another --out")
    return resolve(), None


# A run's stop reason: one of these when it trained to its end, else the name of the signal that stopped it early.
COMPLETE_STOPS = ("max_steps", "time budget")


def report_finish(opts: TrainOptions, step: int, max_steps: int, stop_reason: str, checkpoint: str | None,
                  bad_rows: int) -> None:
    """The closing lines of a run (rank 0): where it was saved, how to resume an early stop, skipped bad rows."""
    if not is_main():
        return
    print(f"saved {opts.out} (step {step}); checkpoint: {checkpoint}", file=sys.stderr)
    if stop_reason == "time budget":  # the budget counts the whole run: continuing needs a larger one
        print(f"stopped at step {step}/{max_steps}, {step / max_steps:.0%} of the steps (time budget of "
              f"{opts.max_minutes:g} minutes spent); "
              f"checkpoint: {checkpoint}\ntrain longer with: {resume_command(opts, 2 * opts.max_minutes)}",
              file=sys.stderr, flush=True)
    elif stop_reason not in COMPLETE_STOPS:
        print(f"stopped at step {step}/{max_steps} ({stop_reason}); checkpoint: {checkpoint}\n"
              f"resume with: {resume_command(opts)}", file=sys.stderr, flush=True)
    if opts.bad_rows == "skip":
        print(f"bad rows skipped: {bad_rows} ({opts.data})", file=sys.stderr)


# ----------------------------------------------------------------------------- RNG, seeds


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """All global RNG states as tensors and plain values (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- distributed


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------- loop helpers


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (fast) here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_bf16(setting: Any, device: torch.device, where: str = "train.bf16") -> bool:
    """A config's bf16 switch: true | false | "auto" (= native_bf16). Without native support autocast emulates
    bf16: on an AVX2-only CPU a training step was ~10x slower than float32, so true warns there."""
    if setting == "auto":
        return native_bf16(device)
    if not isinstance(setting, bool):
        raise ValueError(f"{where} must be true, false or 'auto', got {setting!r}")
    if setting and not native_bf16(device) and is_main():
        print(f"warning: {where} is true but this {device.type.upper()} has no native bf16 (AVX512-BF16/AMX): "
              f"autocast will be much slower than float32; use bf16: auto", file=sys.stderr)
    return setting


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: str | None = None) -> None:
    """Raise before the optimizer step if the loss is NaN/inf, so weights and checkpoints stay good."""
    if not torch.isfinite(loss.detach()).all():
        kept = (f"the last good checkpoint {last_checkpoint} is intact; lower the learning rate or check the "
                f"data, then continue with --resume") if last_checkpoint else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"non-finite loss ({loss.detach().float().item()}) at step {step}; "
                                 f"training stopped, nothing was saved for this step; {kept}")


COMPILE_BACKEND = "inductor"  # tests swap in "eager" (Dynamo tracing only, no C++ build)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile(module) for the training forward when train.compile / --compile asks for it. The module itself
    keeps the weights: checkpoints and save_pretrained never see the compiled wrapper's `_orig_mod.` prefix."""
    return torch.compile(module, backend=COMPILE_BACKEND) if enabled else module


def cosine_lr(step: int, warmup: int, max_steps: int, lr: float, min_lr: float = 0.0,
              time_fraction: float = 0.0) -> float:
    """Linear warmup over `warmup` steps to `lr`, then half-cosine decay to `min_lr` at `max_steps`.

    `time_fraction` (the share of a --max-minutes budget used, see TimeBudget) moves the decay along when time runs
    out before the steps do, so a time-limited run still ends at `min_lr` instead of being cut off at full lr."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = max((step - warmup) / max(1, max_steps - warmup), time_fraction)
    if progress >= 1.0:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class GracefulStop:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0. A second signal aborts at once."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested:  # second signal: the user really wants out
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if is_main():
            print(f"\n{self.signal_name} received: finishing the current step, then saving a checkpoint "
                  f"(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


def settle_decay_with_budget(train: dict, opts: TrainOptions) -> None:
    """Whether the lr decay follows the time budget, decided once at the start and stored in the run's config (a
    resume keeps it): only for a time-budget run, --max-minutes without --max-steps (and train.decay_with_budget, the
    default). With --max-steps too, or without --max-minutes, the lr follows the steps: the recipe is the step count,
    and --max-minutes only caps it (a capped run reports the share of its steps it trained)."""
    train["decay_with_budget"] = bool(train["decay_with_budget"]) and opts.max_minutes is not None and \
        opts.max_steps is None


class BudgetSpent(ValueError):
    """A resumed run has already used its whole --max-minutes."""


class TimeBudget:
    """--max-minutes: the training time a run may use in all, counted across resumes like --max-steps
    (`spent_seconds` comes from the checkpoint), and the share of it used so far (for the lr schedule)."""

    def __init__(self, max_minutes: float | None, spent_seconds: float = 0.0, clock=time.monotonic):
        self.total_seconds = None if max_minutes is None else 60.0 * max_minutes
        self._clock = clock
        self._start = clock() - spent_seconds

    def spent_seconds(self) -> float:
        return self._clock() - self._start

    def fraction(self) -> float:
        """0 without a budget; 1 or more once it is spent."""
        return 0.0 if self.total_seconds is None else self.spent_seconds() / self.total_seconds

    def expired(self) -> bool:
        return self.fraction() >= 1.0

    def check_not_spent(self, checkpoint: str | None) -> None:
        """A resumed run whose budget is already used up would stop after one step: say so instead."""
        if self.total_seconds is not None and self.expired():
            raise BudgetSpent(f"--max-minutes {self.total_seconds / 60:g}: the run in {checkpoint} has already trained "
                             f"{self.spent_seconds() / 60:.1f} minutes (the budget counts the whole run, like "
                             f"--max-steps); pass a larger --max-minutes to train on")


def sync_progress(stop_requested: bool, time_fraction: float, device: torch.device) -> tuple[bool, float]:
    """(stop?, share of the time budget used), the same on every rank: any rank's stop request stops all, and the
    largest time fraction sets everyone's lr (ranks with different lrs would drift apart)."""
    if not is_distributed():
        return stop_requested, time_fraction
    t = torch.tensor([1.0 if stop_requested else 0.0, time_fraction], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item()), float(t[1].item())


class MetricsLogger:
    """Appends one JSON object per line to DIR/metrics.jsonl (rank 0 only), flushed per line.

    On resume from step S, lines logged after S by the interrupted run are dropped so the file stays one history.
    """

    def __init__(self, directory: str, resume_step: int | None = None):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled = is_main()
        self._file = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item()
            record[k] = v
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress_bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not is_main(), dynamic_ncols=True,
                unit="step", file=sys.stderr, mininterval=1.0)


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (float32 shadow copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)}")
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: torch.nn.Module) -> None:
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})


# ----------------------------------------------------------------------------- data


class ResumableBatches:
    """Endless batches from an IterableDataset, epoch after epoch, resumable mid-epoch exactly.

    Epoch e calls `dataset.set_epoch(e)` (reseeding its shuffle) and builds a DataLoader whose worker seeds come from
    its own generator (seed, epoch), not the global RNG. The position is (epoch, batches consumed in the epoch);
    resuming replays the epoch's order and skips the consumed batches. Partial final batches are dropped.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, seed: int = 0, name: str = "data"):
        self.dataset, self.batch_size, self.num_workers, self.seed, self.name = (
            dataset, batch_size, num_workers, seed, name)
        self.epoch = 0
        self.batches_in_epoch = 0
        self.bad_rows_before_epoch = 0
        self._dataset_count_at_epoch_start = 0
        self._iter: Iterator | None = None
        self._to_skip = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "samples_in_epoch": self.batches_in_epoch * self.batch_size,
                "batch_size": self.batch_size, "bad_rows_before_epoch": self.bad_rows_before_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"cannot resume {self.name} with batch size {self.batch_size}: the checkpoint was "
                             f"written with batch size {state['batch_size']}")
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.bad_rows_before_epoch = state["bad_rows_before_epoch"]
        self._iter, self._to_skip = None, self.batches_in_epoch

    def _dataset_count(self) -> int:
        # The dataset's counter is cumulative and shared with its workers (tokenpaint.data.TSVImageText).
        return int(getattr(self.dataset, "bad_rows_skipped", 0))

    @property
    def bad_rows_skipped(self) -> int:
        """Bad rows skipped over the whole run (replayed rows after a resume are not counted twice)."""
        if self._iter is None:
            return self.bad_rows_before_epoch
        return self.bad_rows_before_epoch + self._dataset_count() - self._dataset_count_at_epoch_start

    def _start_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self._dataset_count_at_epoch_start = self._dataset_count()
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size,
            num_workers=self.num_workers, drop_last=True, generator=generator,
            persistent_workers=False)
        self._iter = iter(loader)
        for i in range(self._to_skip):  # replay the consumed part of the epoch (same order: same seed/epoch)
            if next(self._iter, None) is None:
                raise ValueError(f"cannot resume {self.name}: the epoch now has {i} batches, the checkpoint had "
                                 f"consumed {self._to_skip} (did the data file change?)")
        self._to_skip = 0

    def __iter__(self):
        return self

    def __next__(self):
        for attempt in range(2):
            if self._iter is None:
                self._start_epoch()
            batch = next(self._iter, None)
            if batch is not None:
                self.batches_in_epoch += 1
                return batch
            if self.batches_in_epoch == 0:
                raise ValueError(f"{self.name} yields fewer than one batch of {self.batch_size} samples per "
                                 f"process: lower --batch-size or add data")
            self.bad_rows_before_epoch = self.bad_rows_skipped
            self.epoch, self.batches_in_epoch, self._iter = self.epoch + 1, 0, None
        raise ValueError(f"{self.name} yields no batches")  # pragma: no cover - guarded above
