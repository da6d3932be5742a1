"""Token cache: every training image encoded once by the VQGAN into ids on disk, plus the caption ids.

The transformer stage then reads ids through memory maps and never runs the VQGAN per step. The cache is keyed by a
fingerprint of the TSV, the VQGAN weights, the tokenizer and the preprocessing, and is rebuilt when any of them changes.

Layout of `cache_dir`: `image_ids.u16` (raw uint16 [N, h*w]; `image_ids.u32`, uint32, for a codebook of more than
65536 codes), `text_ids.i32` (raw int32 [N, text_len]),
`captions.jsonl` (one {"idx", "text", "line"} per row) and `meta.json` (fingerprint, shapes), which is written last:
a build killed midway leaves no `meta.json` that matches, so the next call rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils import temp_path_for
from .images import ImageLimits
from .text import TextTokenizer
from .tsv import TSVImageText

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_HEAD_TAIL_BYTES = 1 << 20
_TEXT_FILE = ("text_ids.i32", np.int32)
_IMAGE_FILES = {"uint16": ("image_ids.u16", np.uint16), "uint32": ("image_ids.u32", np.uint32)}


def image_ids_dtype(codebook_size) -> str:
    """The narrowest stored id width for a codebook: uint16 up to 65536 codes, uint32 above (None: uint16)."""
    return "uint32" if codebook_size is not None and int(codebook_size) > 65536 else "uint16"


def _files(ids_dtype: str) -> dict:
    """{name: (file name, numpy dtype)} of the raw arrays in a cache whose image ids are stored as ids_dtype."""
    return {"image_ids": _IMAGE_FILES[ids_dtype], "text_ids": _TEXT_FILE}


def file_fingerprint(path) -> dict:
    """Path, size, mtime and a hash of the first and last MB: cheap, and catches in-place edits of either end."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_HEAD_TAIL_BYTES))
        if stat.st_size > _HEAD_TAIL_BYTES:
            f.seek(max(_HEAD_TAIL_BYTES, stat.st_size - _HEAD_TAIL_BYTES))
            digest.update(f.read())
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_tail_sha256": digest.hexdigest()}


def state_dict_hash(module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state_dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: TextTokenizer) -> str:
    return hashlib.sha256(tokenizer.proto).hexdigest()  # the model as loaded, with any added words


def cache_fingerprint(tsv_path, vqgan, tokenizer, resolution: int, text_len: int,
                      limits: ImageLimits = ImageLimits()) -> dict:
    """What the cached ids depend on; the image limits decide which rows are read at all."""
    return {"format": CACHE_FORMAT, "tsv": file_fingerprint(tsv_path), "vqgan_sha256": state_dict_hash(vqgan),
            "tokenizer_sha256": tokenizer_hash(tokenizer), "resolution": resolution, "text_len": text_len,
            "image_limits": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(limits).items()}}


class TokenCache(Dataset):
    """Memory-mapped token cache; item i is (text_ids long [text_len], image_ids long [h*w])."""

    def __init__(self, cache_dir, reused: bool = False):
        self.cache_dir = os.fspath(cache_dir)
        meta_path = os.path.join(self.cache_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no token cache in {self.cache_dir} (missing meta.json)")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        self.reused = reused
        self._open()

    def _open(self) -> None:
        n = self.meta["num_rows"]
        widths = {"image_ids": self.meta["tokens_per_image"], "text_ids": self.meta["fingerprint"]["text_len"]}
        for name, (filename, dtype) in _files(self.meta.get("image_ids_dtype", "uint16")).items():
            path = os.path.join(self.cache_dir, filename)
            expected = n * widths[name] * np.dtype(dtype).itemsize
            if not os.path.isfile(path) or os.path.getsize(path) != expected:
                raise ValueError(f"token cache {path} is missing or not {expected} bytes; delete {self.cache_dir}")
            array = np.memmap(path, dtype=dtype, mode="r", shape=(n, widths[name])) if n else \
                np.zeros((0, widths[name]), dtype=dtype)  # np.memmap refuses empty files
            setattr(self, name, array)

    def __getstate__(self):  # memmaps would be pickled as full copies: reopen them in the worker instead
        return {"cache_dir": self.cache_dir, "meta": self.meta, "reused": self.reused}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def fingerprint(self) -> dict:
        return self.meta["fingerprint"]

    @property
    def image_grid(self) -> tuple[int, int]:
        return tuple(self.meta["image_grid"])

    @property
    def text_len(self) -> int:
        return self.meta["fingerprint"]["text_len"]

    def __len__(self) -> int:
        return self.meta["num_rows"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        text_ids = torch.from_numpy(self.text_ids[i].astype(np.int64))
        image_ids = torch.from_numpy(self.image_ids[i].astype(np.int64))
        return text_ids, image_ids

    def captions(self) -> list[dict]:
        """[{"idx", "text", "line"}] for every cached row, in order."""
        with open(os.path.join(self.cache_dir, "captions.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _input_placement(module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (a VQGAN cast to bf16 wants bf16 input)."""
    params = [p for p in getattr(module, "parameters", lambda: [])() if p.is_floating_point()]
    return (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)


def build_token_cache(tsv_path, vqgan, tokenizer: TextTokenizer, cache_dir, resolution: int, text_len: int = 32,
                      batch_size: int = 32, bad_rows: str = "error", progress: bool = True,
                      num_workers: int = 0, limits: ImageLimits = ImageLimits()) -> TokenCache:
    """Encode every row of `tsv_path` once (`vqgan.encode(x) -> long [B,h,w]`, tokenizer ids) into `cache_dir`, or
    reuse the cache there if its fingerprint matches. The VQGAN runs in eval mode on its own device and dtype.
    Single-process: under DDP, build on rank 0 first, then let the other ranks call this (they will reuse it).
    Images given as paths inside the TSV are not part of the fingerprint: editing them in place needs a rebuild
    (delete cache_dir)."""
    fingerprint = cache_fingerprint(tsv_path, vqgan, tokenizer, resolution, text_len, limits)
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("fingerprint") == fingerprint:
                return TokenCache(cache_dir, reused=True)
            changed = sorted(k for k in fingerprint if stored.get("fingerprint", {}).get(k) != fingerprint[k])
            logger.info("token cache %s is stale (%s changed): rebuilding", cache_dir, ", ".join(changed))
        except (ValueError, KeyError, OSError) as e:  # unreadable or inconsistent cache: rebuild it
            logger.warning("token cache %s is unusable (%s): rebuilding", cache_dir, e)
        os.remove(meta_path)  # from here on, the old files no longer count as a cache

    os.makedirs(cache_dir, exist_ok=True)
    ids_dtype = image_ids_dtype(getattr(vqgan, "codebook_size", None))
    files = _files(ids_dtype)
    id_max = int(np.iinfo(files["image_ids"][1]).max)
    # temp names a later run can recognise and remove (utils.remove_stale_temp_files) if this build is killed
    tmp = {name: temp_path_for(os.path.join(cache_dir, filename)) for name, (filename, _) in files.items()}
    tmp["captions"] = temp_path_for(os.path.join(cache_dir, "captions.jsonl"))
    dataset = TSVImageText(tsv_path, resolution, bad_rows=bad_rows, rank=0, world_size=1, limits=limits)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    device, dtype = _input_placement(vqgan)
    was_training = getattr(vqgan, "training", False)
    if hasattr(vqgan, "eval"):
        vqgan.eval()
    num_rows, truncated, grid = 0, 0, None
    meta_tmp = tmp["meta"] = temp_path_for(meta_path)
    try:
        with open(tmp["image_ids"], "wb") as image_file, open(tmp["text_ids"], "wb") as text_file, \
                open(tmp["captions"], "w", encoding="utf-8") as caption_file, torch.inference_mode():
            for batch in tqdm(loader, desc=f"tokenising {os.path.basename(tsv_path)}", unit="batch",
                              disable=not progress):
                ids = vqgan.encode(batch["image"].to(device=device, dtype=dtype))  # long [B,h,w]
                if ids.dim() != 3 or ids.shape[0] != batch["image"].shape[0] or grid not in (None, ids.shape[1:]):
                    raise ValueError(f"vqgan.encode returned shape {tuple(ids.shape)}, expected [B,h,w] "
                                     f"with the same h, w for every batch")
                grid = tuple(ids.shape[1:])
                if ids.min() < 0 or ids.max() > id_max:
                    raise ValueError(f"vqgan.encode returned ids outside [0, {id_max}]: cannot store them as "
                                     f"{ids_dtype} (its codebook_size is {getattr(vqgan, 'codebook_size', 'unknown')})")
                image_file.write(ids.reshape(ids.shape[0], -1).cpu().numpy().astype(files["image_ids"][1]).tobytes())
                text_ids = tokenizer.encode(batch["text"], length=text_len, warn=False)  # long [B,text_len]
                truncated += sum(n > text_len for n in tokenizer.num_tokens(batch["text"]))
                text_file.write(text_ids.numpy().astype(np.int32).tobytes())
                for idx, text, line in zip(batch["idx"], batch["text"], batch["line"].tolist()):
                    caption_file.write(json.dumps({"idx": idx, "text": text, "line": line}, ensure_ascii=False) + "\n")
                num_rows += ids.shape[0]
        if num_rows == 0:
            raise ValueError(f"{tsv_path}: no usable rows to cache")
        for name, (filename, _) in files.items():
            os.replace(tmp[name], os.path.join(cache_dir, filename))
        for other, (filename, _) in _IMAGE_FILES.items():  # ids of a previous build at the other width
            if other != ids_dtype and os.path.exists(os.path.join(cache_dir, filename)):
                os.remove(os.path.join(cache_dir, filename))
        os.replace(tmp["captions"], os.path.join(cache_dir, "captions.jsonl"))
        meta = {"fingerprint": fingerprint, "num_rows": num_rows, "image_grid": list(grid),
                "tokens_per_image": grid[0] * grid[1], "image_ids_dtype": ids_dtype, "captions_truncated": truncated,
                "bad_rows_skipped": dataset.bad_rows_skipped, "bad_row_counts": dataset.bad_row_counts}
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        os.replace(meta_tmp, meta_path)  # the commit point
    finally:
        if was_training:
            vqgan.train()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    if dataset.bad_rows_skipped:
        logger.warning(dataset.summary())
    if truncated:
        warnings.warn(f"{tsv_path}: {truncated} of {num_rows} captions were longer than text_len={text_len} tokens "
                      "and were truncated", stacklevel=2)
    return TokenCache(cache_dir, reused=False)
