"""Small helpers shared across the package."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import fields, is_dataclass
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


def _key_line(path: str, section: str | None, key: str) -> int | None:
    """1-based line of `key` (inside `section`) in a YAML file, for error messages."""
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f)
    except Exception:
        return None
    if section is not None and isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if k.value == section), None)
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return k.start_mark.line + 1
    return None


def _allowed_keys(spec: Any) -> set[str] | None:
    if spec is None:
        return None  # free-form section
    if is_dataclass(spec):
        return {f.name for f in fields(spec)}
    return set(spec)


def load_config(path: str, schema: dict[str, Any]) -> dict[str, dict]:
    """Read a YAML config of sections. `schema` maps section -> dict of defaults | dataclass type | None (free).

    Dict sections are merged over their defaults. Unknown sections or keys raise ValueError naming the file, line
    and key, so a typo never silently falls back to a default.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(schema)}), got {type(raw).__name__}")
    out: dict[str, dict] = {}
    for section, body in raw.items():
        if section not in schema:
            line = _key_line(path, None, section)
            raise ValueError(f"{path}{f', line {line}' if line else ''}: unknown section {section!r} "
                             f"(expected one of {sorted(schema)})")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping, got {type(body).__name__}")
        allowed = _allowed_keys(schema[section])
        for key in body:
            if allowed is not None and key not in allowed:
                line = _key_line(path, section, key)
                raise ValueError(f"{path}{f', line {line}' if line else ''}: unknown key {key!r} in section "
                                 f"{section!r} (allowed: {', '.join(sorted(allowed))})")
    for section, spec in schema.items():
        body = dict(raw.get(section) or {})
        out[section] = {**spec, **body} if isinstance(spec, dict) else body
    return out
