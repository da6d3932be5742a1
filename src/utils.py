"""Small helpers shared across the package."""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Callable, Mapping, Union

import yaml

PathLike = Union[str, os.PathLike]


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 10) -> str:
    """"" when `found` (tensors from a file) fits `expected` (a model's state_dict) key for key and shape for shape;
    otherwise one line naming the missing keys, the unexpected keys and the shape mismatches (the first `limit` of
    each, with their counts). Every strict loader in the package reports through it."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    shapes = [f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{what} ({len(items)}): {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside `directory` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, fsync it, then `os.replace`: readers (and a run killed
    mid-write) never see half a file under the final name, and a failed write leaves no temporary file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponents without a dot (`lr: 3e-4`) as floats, as YAML 1.2 does: PyYAML's 1.1
    rules make them strings, which then fail far from the config (in the optimizer)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(path: PathLike) -> Any:
    """Parse a YAML file (safe: plain data only); malformed YAML -> ValueError naming the file."""
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"{os.fspath(path)}: invalid YAML: {e}") from None
