"""Small helpers shared across the package."""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
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


class DiskFullError(OSError):
    """A write failed, or would fail, for lack of disk space; the message names the file and the free space."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")  # temp_path_for (and tempfile.mkstemp's names before it)


def temp_path_for(path: PathLike) -> str:
    """A fresh temporary name beside `path` (`.NAME.XXXXXXXX.tmp`), the one pattern remove_stale_temp_files knows."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(directory: PathLike, depth: int = 2) -> list[str]:
    """Delete the temporary files that writes killed midway (kill -9, power loss) left in `directory` and its
    subfolders down to `depth`; returns their paths. Only for a directory this process holds (a RunLock): a live
    writer's temp file would be deleted too."""
    removed = []
    root = os.fspath(directory)
    for folder, subdirs, files in os.walk(root):
        if folder[len(root):].count(os.sep) >= depth:
            subdirs[:] = []
        for name in files:
            if _TEMP_NAME.match(name):
                path = os.path.join(folder, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed


def _is_disk_full(error: BaseException, directory: str, need_bytes: int) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    if "No space left" in str(error):
        return True
    try:  # torch.save reports a full disk as "unexpected pos" / "file write failed": ask the filesystem
        return shutil.disk_usage(directory).free < max(need_bytes, 1 << 20)
    except OSError:
        return False


def atomic_write(path: PathLike, write: Callable[[str], None], need_bytes: int = 0) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, fsync it, then `os.replace`: readers (and a run killed
    mid-write) never see half a file under the final name, and a failed write leaves no temporary file behind.

    The file gets the mode a plain `open` would (0666 less the umask). With `need_bytes`, the free space is checked
    first; a write that fails for lack of space (checked or not) raises DiskFullError naming the file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if need_bytes:
        free = shutil.disk_usage(directory).free
        if free < need_bytes:
            raise DiskFullError(f"not enough disk space to write {path}: {need_bytes / 2**20:.1f} MiB needed, "
                                f"{free / 2**20:.1f} MiB free in {directory}")
    tmp = temp_path_for(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as with open()
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and _is_disk_full(e, directory, need_bytes):
            free = shutil.disk_usage(directory).free
            raise DiskFullError(f"disk full while writing {path} ({free / 2**20:.1f} MiB free in {directory}): "
                                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") \
                from e
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
