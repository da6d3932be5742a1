"""Streaming reader/writer for EasyNLP-style text2image TSVs (`idx \\t text \\t image`).

The image column is base64 image bytes (standard or urlsafe, padded or not) or a path relative to the TSV's folder.
Files can be far larger than memory, so everything here iterates lines and never holds the file.

What an image column may make the reader touch is bounded by ImageLimits (tokenpaint.data.images): a path must
resolve (symlinks followed) inside the TSV's folder unless allow_outside_paths; a line is at most MAX_LINE_BYTES.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .images import (ImageLimits, decode_image, pil_to_tensor, read_regular_file, resize_center_crop,  # noqa: F401
                     tensor_to_pil)
from ..utils import atomic_write_bytes

logger = logging.getLogger(__name__)

BAD_ROW_KINDS = ("columns", "encoding", "text", "base64", "image", "path")
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]*$")
_MAX_PATH_LEN = 1024  # a field this long is base64, not a path
_BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 128 << 20  # base64 of a 96 MB image


class BadRowError(ValueError):
    """A malformed TSV row; the message names the file, the 1-based line number and what is wrong."""

    def __init__(self, path, line: int, kind: str, reason: str):
        self.path, self.line, self.kind, self.reason = str(path), line, kind, reason
        super().__init__(f"{path}:{line}: {reason}")

    def __reduce__(self):  # survives the trip from a DataLoader worker to the main process
        return (BadRowError, (self.path, self.line, self.kind, self.reason))


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the file
    idx: str
    text: str
    image: str  # the raw image field: base64 or a relative path


# ----------------------------------------------------------------------------------------------------------------------
# line-level helpers


def iter_lines(path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line without its newline). Blank lines are held back until a non-blank line
    follows, so that blank lines at the end of the file (a common artefact) are dropped rather than reported.
    A UTF-8 byte order mark at the start of the file is dropped; a line over `max_line_bytes` is a BadRowError
    (read no further than the cap: a file without newlines is never held whole)."""
    pending_blank: list[int] = []
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise BadRowError(path, line_no, "columns", f"line longer than {max_line_bytes} bytes")
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                pending_blank.append(line_no)
                continue
            for blank_no in pending_blank:
                yield blank_no, b""
            pending_blank.clear()
            yield line_no, raw


def parse_row(path, line_no: int, raw: bytes, num_columns: int | tuple[int, ...] = 3) -> list[str]:
    """Split one raw line into its columns, checking encoding, column count and the caption."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRowError(path, line_no, "encoding", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    allowed = (num_columns,) if isinstance(num_columns, int) else tuple(num_columns)
    fields = text.split("\t")
    if len(fields) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        what = "blank line" if not text.strip() else f"{len(fields)} tab-separated column(s)"
        raise BadRowError(path, line_no, "columns", f"{what}, expected {expected} (idx, text[, image])")
    if not fields[1].strip():
        raise BadRowError(path, line_no, "text", f"empty text for idx {fields[0]!r}")
    return fields


def iter_rows(path, bad_rows: str = "error") -> Iterator[Row]:
    """Rows of a training TSV without decoding images (for text-only passes such as tokenizer training).
    With bad_rows="skip", malformed rows (columns, encoding, empty text) are skipped and logged."""
    _check_bad_rows_arg(bad_rows)
    skipped = 0
    for line_no, raw in iter_lines(path):
        try:
            idx, text, image = parse_row(path, line_no, raw)
        except BadRowError as e:
            if bad_rows == "error":
                raise
            skipped += 1
            logger.debug("skipping %s", e)
            continue
        yield Row(line_no, idx, text, image)
    if skipped:
        logger.warning("%s: skipped %d bad row(s)", path, skipped)


def read_prompts(path) -> list[tuple[str, str]]:
    """Read a prompt TSV (`idx \\t text`; a training TSV's image column is ignored) -> [(idx, text)]."""
    return [tuple(parse_row(path, n, raw, num_columns=(2, 3))[:2]) for n, raw in iter_lines(path)]


def read_images(path) -> list[tuple[str, Image.Image]]:
    """Read an image TSV (`idx \t image`, the image as base64 or a path relative to the TSV's folder; a training
    TSV's `idx \t text \t image` is accepted too) -> [(idx, RGB PIL image)]. A bad row names the file and line."""
    out = []
    for line_no, raw in iter_lines(path):
        try:
            fields = raw.decode("utf-8").split("\t")
        except UnicodeDecodeError as e:
            raise BadRowError(path, line_no, "encoding", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if len(fields) not in (2, 3):
            what = "blank line" if not raw.strip() else f"{len(fields)} tab-separated column(s)"
            raise BadRowError(path, line_no, "columns", f"{what}, expected 2 (idx, image) or 3 (idx, text, image)")
        out.append((fields[0], load_image_field(fields[-1], path, line_no)))
    return out


def write_text_tsv(path, rows: Iterable[tuple[str, str]]) -> None:
    """Write `idx \t text` rows atomically (e.g. captions); a tab or newline inside a field is an error."""
    lines = []
    for n, (idx, text) in enumerate(rows, start=1):
        for name, value in (("idx", str(idx)), ("text", text)):
            if "\t" in value or "\n" in value or "\r" in value:
                raise ValueError(f"write_text_tsv({path}): row {n}: {name} {value!r} contains a tab or newline")
        lines.append(f"{idx}\t{text}\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# images


def decode_base64(field: str) -> bytes:
    """Decode standard or urlsafe base64, with or without '=' padding. Raises binascii.Error."""
    s = "".join(field.split()).replace("-", "+").replace("_", "/")
    s = s.rstrip("=")
    if len(s) % 4 == 1:
        raise binascii.Error(f"invalid length {len(s)} (a base64 string cannot have 4k+1 characters)")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def encode_png_base64(image: Image.Image) -> str:
    """PNG-encode a PIL image and return standard base64 text (the EasyNLP output schema)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_image_file(field: str, tsv_path, line_no: int, limits: ImageLimits = ImageLimits()) -> bytes:
    """The bytes of the image file a row names: resolved against the TSV's folder (symlinks followed) and kept inside
    it unless limits.allow_outside_paths, then read_regular_file; any refusal is a BadRowError of kind "path"."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(tsv_path)))
    real = os.path.realpath(os.path.join(folder, field))
    if not limits.allow_outside_paths and os.path.commonpath([folder, real]) != folder:
        raise BadRowError(tsv_path, line_no, "path", f"image path {field!r} resolves to {real}, outside the TSV's "
                                                     f"folder {folder} (pass --allow-outside-paths to read images "
                                                     f"from elsewhere)")
    try:
        return read_regular_file(real, limits.max_file_bytes)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BadRowError(tsv_path, line_no, "path", f"cannot read image path {field!r}: {reason}") from None


def load_image_field(field: str, tsv_path, line_no: int, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Open the image column of one row (base64 bytes or a path relative to the TSV's folder) as RGB PIL."""
    field = field.strip()
    folder = os.path.dirname(os.path.abspath(tsv_path))
    is_b64_alphabet = bool(_BASE64_CHARS.match(field))
    local = os.path.join(folder, field) if field and len(field) < _MAX_PATH_LEN else None
    if local is not None and (not is_b64_alphabet or os.path.lexists(local)):
        source = f"image file {field!r}"
        data = read_image_file(field, tsv_path, line_no, limits)
    else:
        source = "base64 image"
        if not field:
            raise BadRowError(tsv_path, line_no, "base64", "empty image column")
        if len(field) > limits.max_file_bytes * 4 // 3 + 4:
            raise BadRowError(tsv_path, line_no, "base64",
                              f"base64 image over the cap of {limits.max_file_bytes} bytes")
        try:
            data = decode_base64(field)
        except (binascii.Error, ValueError) as e:
            hint = f"; nor is it an existing file {local!r}" if local is not None and "/" in field else ""
            raise BadRowError(tsv_path, line_no, "base64", f"image column is not valid base64 ({e}){hint}") from None
    try:
        return decode_image(data, limits)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRowError(tsv_path, line_no, "image", f"{source} cannot be decoded ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------------
# sharding and shuffling (pure helpers)


def shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(shard id, number of shards) for this process: DDP rank x DataLoader worker."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    worker = get_worker_info()
    worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    return rank * num_workers + worker_id, world_size * num_workers


def shuffle_buffered(items: Iterable, buffer_size: int, generator: torch.Generator) -> Iterator:
    """Approximate shuffle in bounded memory: fill a buffer, then emit a random element for each new one."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(torch.randint(buffer_size, (1,), generator=generator))
        buffer[j], item = item, buffer[j]
        yield item
    order = torch.randperm(len(buffer), generator=generator).tolist()
    yield from (buffer[j] for j in order)


def shuffle_seed(seed: int, epoch: int, shard: int) -> int:
    """A distinct, reproducible seed per (seed, epoch, shard)."""
    return (seed * 1_000_003 + epoch) * 10_007 + shard & (2**63 - 1)


def check_tsv_path(path, flag: str = "TSV") -> None:
    """A TSV argument must name a regular file: a directory, device or FIFO gets a clear error, not a traceback or
    a hang."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; expected a TSV file")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is not a regular file (a device, FIFO or socket); expected a TSV file")


def _check_bad_rows_arg(bad_rows: str) -> None:
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")


# ----------------------------------------------------------------------------------------------------------------------


class TSVImageText(IterableDataset):
    """Stream `{"idx", "text", "image" [3,R,R] in [-1,1], "line"}` from a TSV, sharded so that each row is read by
    exactly one (DDP rank x DataLoader worker) per epoch. Row `line` goes to shard (line - 1) % num_shards.

    bad_rows="skip" skips malformed rows and counts them. The counters are shared with DataLoader worker processes
    (created before the workers start), so `summary()` in the main process covers every worker. Counts accumulate
    over epochs. Call `set_epoch(e)` before each epoch's iterator (with persistent_workers=True the workers keep
    the epoch they started with).
    """

    def __init__(self, path, resolution: int, bad_rows: str = "error", shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1024, rank: int | None = None, world_size: int | None = None,
                 limits: ImageLimits = ImageLimits()):
        check_tsv_path(path)
        _check_bad_rows_arg(bad_rows)
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.path, self.resolution, self.bad_rows = str(path), resolution, bad_rows
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size, self.limits = rank, world_size, limits
        self.epoch = 0
        self._counts = multiprocessing.Array("q", len(BAD_ROW_KINDS))  # shared with forked/spawned workers

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for a new pass (call before creating the DataLoader iterator)."""
        self.epoch = epoch

    @property
    def bad_row_counts(self) -> dict[str, int]:
        return {kind: int(n) for kind, n in zip(BAD_ROW_KINDS, self._counts[:]) if n}

    @property
    def bad_rows_skipped(self) -> int:
        return int(sum(self._counts[:]))

    def summary(self) -> str:
        counts = self.bad_row_counts
        if not counts:
            return f"{self.path}: no bad rows skipped"
        detail = ", ".join(f"{kind}: {n}" for kind, n in counts.items())
        return f"{self.path}: skipped {self.bad_rows_skipped} bad row(s) ({detail})"

    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:  # plain pickling/copy: counters become a snapshot
            state["_counts"] = list(self._counts[:])
        return state

    def __setstate__(self, state):
        if isinstance(state["_counts"], list):
            state["_counts"] = multiprocessing.Array("q", state["_counts"])
        self.__dict__.update(state)

    def _count(self, kind: str) -> None:
        with self._counts.get_lock():
            self._counts[BAD_ROW_KINDS.index(kind)] += 1

    def _shard_lines(self, shard: int, num_shards: int) -> Iterator[tuple[int, bytes]]:
        for line_no, raw in iter_lines(self.path):
            if (line_no - 1) % num_shards == shard:
                yield line_no, raw

    def load_row(self, line_no: int, raw: bytes) -> dict:
        idx, text, image_field = parse_row(self.path, line_no, raw)
        img = resize_center_crop(load_image_field(image_field, self.path, line_no, self.limits), self.resolution)
        return {"idx": idx, "text": text, "image": pil_to_tensor(img), "line": line_no}

    def __iter__(self) -> Iterator[dict]:
        shard, num_shards = shard_info(self.rank, self.world_size)
        lines = self._shard_lines(shard, num_shards)
        if self.shuffle:
            generator = torch.Generator().manual_seed(shuffle_seed(self.seed, self.epoch, shard))
            lines = shuffle_buffered(lines, self.shuffle_buffer, generator)
        for line_no, raw in lines:
            try:
                yield self.load_row(line_no, raw)
            except BadRowError as e:
                if self.bad_rows == "error":
                    raise
                if self.bad_rows_skipped == 0:
                    logger.warning("skipping bad rows (first: %s)", e)
                self._count(e.kind)


def write_output_tsv(path, rows: Iterable) -> None:
    """Write `idx \\t text \\t b64png[,b64png...]` rows. Each row is (idx, text, images) where images is one PIL image,
    a base64 string, or a list of them."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for n, (idx, text, images) in enumerate(rows, start=1):
                for name, value in (("idx", str(idx)), ("text", text)):
                    if "\t" in value or "\n" in value or "\r" in value:
                        raise ValueError(f"write_output_tsv({path}): row {n}: {name} {value!r} contains a tab or "
                                         "newline")
                images = images if isinstance(images, (list, tuple)) else [images]
                encoded = [im if isinstance(im, str) else encode_png_base64(im) for im in images]
                f.write(f"{idx}\t{text}\t{','.join(encoded)}\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
