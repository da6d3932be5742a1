"""Training checkpoints: `DIR/step_XXXXXXXX.pt`, written atomically after a free-space check, loaded weights-only,
and on resume the newest one that loads."""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch

from ..utils import DiskFullError, atomic_write


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside nested dicts / lists (a checkpoint's size, give or take its plain values)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class CheckpointManager:
    """`DIR/step_XXXXXXXX.pt` files written atomically (temp file, fsync, os.replace); keeps the last `keep_last`.

    Only complete files named exactly `step_<8 digits>.pt` count, so a temp file left by a killed write is never
    `latest()`. The free space is checked before each write, and the older checkpoints are removed only after the
    new one is complete: a full disk stops the run with DiskFullError and the previous checkpoint intact.
    Loading uses `torch.load(weights_only=True)`: a checkpoint that needs code to unpickle is refused.
    """

    PATTERN = re.compile(r"^step_(\d{8})\.pt$")

    def __init__(self, directory: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = directory
        self.keep_last = keep_last

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:08d}.pt")

    def list(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = self.PATTERN.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    def latest(self) -> str | None:
        found = self.list()
        return found[-1][1] if found else None

    def save(self, state: dict, step: int) -> str:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path_for(step)
        previous = self.latest()
        need = _tensor_bytes(state) + (16 << 20)  # the tensors, plus room for the plain values and the zip
        try:
            atomic_write(path, lambda tmp: torch.save(state, tmp), need_bytes=need)
        except DiskFullError as e:
            kept = (f"the previous checkpoint {previous} is intact: free some space, then continue with --resume"
                    if previous else "no earlier checkpoint exists")
            raise DiskFullError(f"{e}; training stopped at step {step}; {kept}") from None
        for _, old in self.list()[: -self.keep_last]:
            os.remove(old)
        return path

    @staticmethod
    def load(path: str) -> dict:
        """A training checkpoint, weights-only; CheckpointError (a ValueError) naming the file if it cannot be."""
        from ..vqgan.io import CheckpointError, read_torch_checkpoint

        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = read_torch_checkpoint(path)
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'step' entry)")
        return state

    def load_latest(self) -> tuple[str, dict]:
        """(path, state) of the newest checkpoint that loads. Newer ones that do not (truncated by a crash, corrupt)
        are renamed `*.unreadable` so that they no longer count, and each is reported on stderr."""
        from ..vqgan.io import CheckpointError

        found = self.list()
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.directory} to resume from")
        failures = []
        for _, path in reversed(found):
            try:
                state = self.load(path)
            except CheckpointError as e:
                failures.append((path, e))
                continue
            for bad, error in failures:
                os.replace(bad, bad + ".unreadable")
                print(f"warning: {error}\n  set aside as {bad}.unreadable; resuming from the newest loadable "
                      f"checkpoint, {path} (step {state['step']})", file=sys.stderr)
            return path, state
        reasons = "; ".join(str(e) for _, e in failures)
        raise CheckpointError(f"--resume: no checkpoint in {self.directory} can be loaded: {reasons}")
