"""Helpers shared by the benchmark scripts: threads, timing (warmup + median), machine description, tables.

The scripts are run as `python benchmarks/NAME.py`, so this module is importable as `_common` from them.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def add_common_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores). On an oversubscribed shared machine "
                             "1 thread can be much faster: see docs/PERFORMANCE.md")
    parser.add_argument("--seed", type=int, default=0)


def setup(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(machine_info(args.threads))


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_fast_bf16() -> bool:
    """A CPU whose matmul units take bf16 natively (AVX512-BF16 or AMX); without them bf16 is emulated (slow)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine_info(threads: int) -> str:
    flags = cpu_flags()
    simd = ",".join(sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))) or "?"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
        f"capability {torch.backends.cpu.get_cpu_capability()}",
        f"# CPU: {cpu_model_name()}  cores {os.cpu_count()}  threads used {threads}  SIMD {simd}",
        f"# native bf16 matmul (avx512_bf16/amx_bf16): {'yes' if has_fast_bf16() else 'NO (bf16 is emulated)'}",
        f"# load average {load} (other processes share these cores: absolute times are noisy, ratios less so)",
    ]
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines.append("# WARNING: load average above the core count; multi-threaded timings suffer scheduler stalls")
    return "\n".join(lines)


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls; also returns every sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def matmul_peak(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of an n x n by n x n product in `dtype` (median of `repeats`, one warmup).

    Through `F.linear`, the kernel nn.Linear uses (in bf16 it goes to oneDNN, which beats a plain bf16 `a @ b`).
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds, _ = timed(lambda: torch.nn.functional.linear(a, b), repeats=repeats, warmup=1)
    return 2 * n**3 / seconds


def build_generator(kind: str, *, layers: int = 12, width: int = 768, heads: int = 12, image_size: int = 16,
                    codebook_size: int = 16384, text_vocab_size: int = 8000, dtype: Optional[torch.dtype] = None):
    """A random-weight GPT ("gpt") or MaskedTransformer ("mim"); defaults = the gpt_base / mim_base sizes."""
    from tokenpaint.transformer import GPT, MaskedTransformer, preset_config

    config = preset_config(f"{kind}_base", n_layer=layers, n_embd=width, n_head=heads, image_size=image_size,
                           codebook_size=codebook_size, text_vocab_size=text_vocab_size)
    model_class = GPT if kind == "gpt" else MaskedTransformer
    if dtype is None:
        return model_class(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in dtype: no float32 copy in the peak RSS
    try:
        return model_class(config)
    finally:
        torch.set_default_dtype(previous)


def random_text(batch: int, text_len: int = 32, vocab: int = 8000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, text_len), generator=g)


def make_step(model, batch: int, autocast_dtype, seed: int, foreach_adamw: bool = False):
    """A closure running one optimiser step on a fixed random batch (the data pipeline is not measured)."""
    c = model.config
    text = random_text(batch, c.text_len, c.text_vocab_size, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.codebook_size, (batch, c.num_image_tokens), generator=g)
    if c.kind == "mim":
        inputs, targets = model.masked_training_batch(ids, g)
    else:
        inputs, targets = ids, ids
    opt = model.configure_optimizers(weight_decay=0.05, lr=3e-4)
    if foreach_adamw:  # the per-tensor-group AdamW the library used before fused=True on CPU, for comparison
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=3e-4, betas=opt.defaults["betas"], foreach=True)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = model(text, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-markdown table (pastes straight into docs/PERFORMANCE.md)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    print(flush=True)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return f"{x:.3e}"
    return str(x)
