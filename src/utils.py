"""Small helpers shared across the package."""
from __future__ import annotations

import errno
import math
import os
import re
import secrets
import shutil
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

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


# temp_path_for's names (and tempfile.mkstemp's, used before it), and the `NAME.tmpPID` of older token caches
_TEMP_NAME = re.compile(r"^(\..+\.[0-9a-z_]{8}\.tmp|.+\.tmp\d+)$")


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


# ----------------------------------------------------------------------------- config values: type and range


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Check(NamedTuple):
    """The type and range of one config value: `ok(value)`, and what is wanted, for the error message."""

    ok: Callable[[Any], bool]
    wanted: str

    def or_none(self, meaning: str = "") -> "Check":
        return Check(lambda v: v is None or self.ok(v), f"{self.wanted}, or null{f' ({meaning})' if meaning else ''}")


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An integer (not a bool, not a float or a string) in [lo, hi)."""
    ok = lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v < hi)  # noqa: E731
    wanted = "an integer" if lo is None and hi is None else f"an integer >= {lo}" if hi is None else \
        f"an integer in [{lo}, {hi})"
    return Check(ok, wanted)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number (an int is fine) between lo and hi, each end closed unless `*_open`."""
    def ok(v):
        return _is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
    if hi is None:
        wanted = "a number" if lo is None else f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        wanted = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Check(ok, wanted)


def one_of(*choices: Any) -> Check:
    return Check(lambda v: any(v is c or (type(v) is type(c) and v == c) for c in choices),
                 "one of " + ", ".join(yaml.safe_dump(c).split("\n")[0] for c in choices))


# a training seed: the seeds derived from it (seed * 100003 + epoch, ...) must stay within torch's 64 bits
TRAIN_SEED = integer(0, 2**32)
BOOLEAN = Check(lambda v: isinstance(v, bool), "true or false")
STRING = Check(lambda v: isinstance(v, str), "a string")


def number_list(length: int, item: Check) -> Check:
    return Check(lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(item.ok(x) for x in v),
                 f"a list of {length} numbers, each {item.wanted.replace('a number ', '')}")


def _check_for_default(default: Any) -> Check | None:
    """The type a key's default implies (None: any type); a float default accepts ints too."""
    if isinstance(default, bool):
        return BOOLEAN
    if isinstance(default, int):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return STRING
    if isinstance(default, (list, tuple)):
        return Check(lambda v: isinstance(v, (list, tuple)), "a list")
    return None


ANY = Check(lambda v: True, "anything")


def field_check(f) -> Check:
    """The type a dataclass field's annotation names (int, float, bool, str, Optional[...], tuples as lists of
    integers); ANY for other annotations."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = text.startswith("Optional[") or text.endswith("| None")
    text = text[len("Optional["):-1] if text.startswith("Optional[") else text.replace("| None", "").strip()
    if text.lower().startswith(("tuple", "list")):
        check = Check(lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) for x in v), "a list of integers")
    else:
        check = {"int": integer(), "float": number(), "bool": BOOLEAN, "str": STRING}.get(text, ANY)
    return check.or_none() if optional and check is not ANY else check


class Section(NamedTuple):
    """A config section: defaults (merged under what the file gives) and the checks of its keys. A key's type is
    also implied by its default (see _check_for_default); `checks` adds ranges and covers keys without defaults.
    `validate(values)` checks the section as a whole (e.g. builds the config class it describes, whose own checks
    then run when the file is read); its error is reported at the line of the first key it names."""

    defaults: dict[str, Any]
    checks: dict[str, Check]
    validate: Optional[Callable[[dict], Any]] = None


def _as_section(spec: Any) -> Section | None:
    """dict of defaults | Section | dataclass type (its fields, typed by their annotations; no defaults merged) |
    set of key names | None (a free-form section)."""
    if spec is None or isinstance(spec, Section):
        return spec
    if isinstance(spec, dict):
        return Section(spec, {})
    if is_dataclass(spec):
        build = getattr(spec, "from_dict", None) or (lambda values: spec(**values))
        return Section({}, {f.name: field_check(f) for f in fields(spec)}, build)
    return Section({}, {k: ANY for k in spec})


def load_config(path: str, schema: dict[str, Any]) -> dict[str, dict]:
    """Read a YAML config of sections. `schema` maps section -> Section | dict of defaults | dataclass type |
    set of keys | None (free).

    Dict sections are merged over their defaults (dataclass and set sections are not). Unknown sections or keys and
    values of the wrong type or out of range raise ValueError naming the file, line and key, so a typo never silently
    falls back to a default and a bad value fails before any work, not steps later.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(schema)}), got {type(raw).__name__}")

    def where(section: str | None, key: str) -> str:
        line = _key_line(path, section, key)
        return f"{path}{f', line {line}' if line else ''}"

    out: dict[str, dict] = {}
    for section, body in raw.items():
        if section not in schema:
            raise ValueError(f"{where(None, section)}: unknown section {section!r} (expected one of {sorted(schema)})")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ValueError(f"{where(None, section)}: section {section!r} must be a mapping, got "
                             f"{type(body).__name__}")
        spec = _as_section(schema[section])
        if spec is None:
            continue
        allowed = set(spec.defaults) | set(spec.checks)
        for key, value in body.items():
            if key not in allowed:
                raise ValueError(f"{where(section, key)}: unknown key {key!r} in section {section!r} "
                                 f"(allowed: {', '.join(sorted(allowed))})")
            check = spec.checks.get(key) or _check_for_default(spec.defaults.get(key))
            if check is not None and not check.ok(value):
                raise ValueError(f"{where(section, key)}: {section}.{key} must be {check.wanted}, got {value!r}")
        if spec.validate is not None:
            try:
                spec.validate(dict(body))
            except (TypeError, ValueError) as e:
                named = [k for k in body if re.search(rf"\b{re.escape(str(k))}\b", str(e))]
                at = where(section, named[0]) if named else path
                raise ValueError(f"{at}: section {section!r}: {e}") from None
    for section, spec in schema.items():
        body = dict(raw.get(section) or {})
        defaults = spec.defaults if isinstance(spec, Section) else spec if isinstance(spec, dict) else {}
        out[section] = {**defaults, **body}
    return out
