"""README.md model card of a run directory: what the model is, its config, the data and steps it trained on, the last
metrics and how to load it, so that the directory can be published as a model repository as it is."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..utils import atomic_write

CARD_NAME = "README.md"
# what a run directory holds that a published model does not need
NOT_FOR_UPLOAD = {"checkpoints/": "training state for --resume (optimizer too; large)",
                  "cache/": "the token cache and the tokenizer's training files",
                  "samples/": "previews written during training"}


def last_metrics(run_dir) -> dict:
    """{name: (value, step)}: the latest logged value of every metric in run_dir/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    latest = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill: the others still count
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    latest[name] = (value, record.get("step"))
    return latest


def _data_line(path: Optional[str], rows: Optional[int]) -> str:
    if path is None:
        return "none"
    size = "size unknown"
    if os.path.isfile(path):
        n = os.path.getsize(path)
        size = f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
    return f"`{os.path.basename(path)}` ({f'{rows} rows, ' if rows is not None else ''}{size})"


def write_model_card(run_dir, *, title: str, description: str, usage: str, steps: int, max_steps: int,
                     stop_reason: str, images_seen: int, data: Optional[str], data_rows: Optional[int] = None,
                     val: Optional[str] = None, val_rows: Optional[int] = None, tags=()) -> Path:
    """Write run_dir/README.md (atomically) from the run's train_config.yaml and metrics.jsonl."""
    run_dir = Path(run_dir)
    config_path = run_dir / "train_config.yaml"
    config = config_path.read_text(encoding="utf-8").rstrip() if config_path.is_file() else "(not found)"
    metrics = last_metrics(run_dir)
    rows = "\n".join(f"| {name} | {value:.6g} | {step} |" for name, (value, step) in sorted(metrics.items()))
    stopped = "" if stop_reason in ("max_steps",) else f" (stopped early: {stop_reason})"
    leave_out = "\n".join(f"- `{d}` {why}" for d, why in NOT_FOR_UPLOAD.items() if (run_dir / d).exists())
    tag_lines = "".join(f"- {t}\n" for t in ("tokenpaint", "text-to-image", *tags))
    text = f"""---
library_name: tokenpaint
tags:
{tag_lines}---

# {title}

{description}

## Training

- data: {_data_line(data, data_rows)}; validation: {_data_line(val, val_rows)}
- steps: {steps} of {max_steps}{stopped}; images seen: {images_seen}
- metrics over the run: `metrics.jsonl` (one JSON object per logged step)

## Last metrics

| metric | value | step |
|---|---|---|
{rows or "| (none logged) | | |"}

## Use

```python
{usage.strip()}
```

## Config (`train_config.yaml`)

```yaml
{config}
```

## Files

Publishing this folder as a model repository: leave out
{leave_out or "- nothing: it holds only what loading needs"}
"""
    atomic_write(run_dir / CARD_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return run_dir / CARD_NAME
