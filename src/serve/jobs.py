"""A request as the model worker sees it: rows of (prompt, negative prompt, seed) and the sampler options.

Image i of a request uses seed + i, as everywhere in tokenpaint, so a row's image does not depend on the other rows
of its batch: text-to-image jobs with the same options are sampled together (`sample_jobs`, then `finish_jobs`
decodes them; `run_jobs` does both). An edit job (an input image) runs alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

from PIL import Image

from ..pipeline import check_edit_mode
from ..sampling import OptionError, check_option, check_seeds
from .errors import RequestError
from .images import encode_png

OPTION_NAMES = ("steps", "guidance_scale", "top_k", "top_p", "temperature")  # the SampleOptions a request may set


@dataclass
class Edit:
    image: Image.Image
    mask: Optional[Image.Image]
    mode: str
    strength: float
    keep_rows: Optional[int]

    def digest(self) -> str:
        h = hashlib.sha256()
        for im in (self.image, self.mask):
            if im is not None:
                h.update(f"{im.mode}{im.size}".encode())
                h.update(im.tobytes())
        return h.hexdigest()


@dataclass
class Job:
    prompts: list[str]  # one per image (row)
    seeds: list[int]
    negatives: list[str]  # "" = no negative prompt
    options: dict  # resolved sampler options: the batching key
    edit: Optional[Edit] = None
    # filled in by the queue
    future: object = field(default=None, repr=False)
    loop: object = field(default=None, repr=False)
    enqueued: float = 0.0

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def batch_key(self):
        """Jobs with equal keys can share a batch; an edit job has its own key (it never shares)."""
        return ("edit", id(self)) if self.edit is not None else tuple(sorted(self.options.items()))

    def cache_key(self) -> str:
        edit = None if self.edit is None else [self.edit.digest(), self.edit.mode, self.edit.strength,
                                               self.edit.keep_rows]
        return json.dumps([self.prompts, self.seeds, self.negatives, sorted(self.options.items()), edit])


def random_seed() -> int:
    return random.randrange(2**31 - 1)


def resolve_options(pipe, given: dict, names: Optional[dict] = None) -> dict:
    """Check the sampler options a request gave (None = the model's default) and fill in the defaults.
    `names` maps tokenpaint's option names to the request's own (cfg_scale for guidance_scale) for the 422.
    `lora` ({adapter name: scale}, the server's --lora adapters; 0 = off) becomes sorted (name, scale) pairs, so
    that only requests with the same scales share a batch."""
    names = names or {}
    given = {name: value for name, value in given.items() if value is not None}
    lora = _lora_scales(pipe, given.pop("lora", None), names.get("lora", "lora"))
    for name, value in given.items():
        try:
            check_option(name, value)
        except OptionError as e:
            raise RequestError(422, str(e).replace(name, names.get(name, name), 1), names.get(name, name)) from None
    resolved = pipe.options.replace(**given)
    options = {name: getattr(resolved, name) for name in OPTION_NAMES}
    if lora:
        options["lora"] = lora
    return options


def _lora_scales(pipe, scales: Optional[dict], field: str) -> tuple:
    if not scales:
        return ()
    loaded = pipe.loras
    for name, scale in scales.items():
        if name not in loaded:
            raise RequestError(422, f"no LoRA named {name!r} on this server (loaded: {sorted(loaded) or 'none'})",
                               field)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise RequestError(422, f"the scale of LoRA {name!r} must be a number, got {scale!r}", field)
    return tuple(sorted((name, float(scale)) for name, scale in scales.items()))


def make_job(pipe, settings, prompts: list[str], num_images: int, seed: Optional[int], negative: str,
             options: dict, edit: Optional[Edit] = None, count_field: str = "num_images") -> Job:
    """prompts x num_images rows (prompt-major), seeds seed + i; seed None or -1 draws one."""
    total = len(prompts) * num_images
    if num_images < 1:
        raise RequestError(422, f"{count_field} must be >= 1, got {num_images}", count_field)
    if total > settings.max_images_per_request:
        raise RequestError(400, f"{total} images requested, over this server's limit of "
                                f"{settings.max_images_per_request} per request", count_field)
    if seed is None or seed == -1:
        seed = random_seed()
    try:
        check_seeds(seed, total)
    except OptionError as e:
        raise RequestError(422, f"{e} (or -1 for a random seed)", "seed") from None
    rows = [p for p in prompts for _ in range(num_images)]
    return Job(rows, [seed + i for i in range(total)], [negative or ""] * total, options, edit)


def check_edit(pipe, edit: Edit, fields: dict) -> None:
    """What Pipeline.edit_ids would refuse, refused before queueing (422 naming the request's field)."""
    try:
        check_edit_mode(pipe.kind, edit.mode, has_mask=edit.mask is not None)
    except OptionError as e:
        raise RequestError(422, str(e), fields[e.name]) from None
    if edit.mask is not None and edit.mask.size != edit.image.size:
        raise RequestError(422, f"mask is {edit.mask.size[0]}x{edit.mask.size[1]} but the image is "
                                f"{edit.image.size[0]}x{edit.image.size[1]}", fields["mask"])
    if not 0 < edit.strength <= 1:
        raise RequestError(422, f"must be in (0, 1], got {edit.strength}", fields["strength"])
    side = pipe.tokens_per_side
    if edit.keep_rows is not None and not 0 <= edit.keep_rows <= side:
        raise RequestError(422, f"keep_rows must be in [0, {side}], got {edit.keep_rows}", fields["keep_rows"])


def run_jobs(pipe, jobs: list[Job], batch_size: int, on_step=None) -> list[list[str]]:
    """Sample every job's rows (one call: rows of different jobs share batches) -> base64 PNGs per job."""
    return list(finish_jobs(pipe, jobs, sample_jobs(pipe, jobs, batch_size, on_step)))


def sample_jobs(pipe, jobs: list[Job], batch_size: int, on_step=None):
    """The image ids of every job's rows, in job order (one Pipeline call: rows of different jobs share batches).
    on_step(done, total): the decoding steps of the call, as Pipeline reports them."""
    options = dict(jobs[0].options)
    with pipe.lora_scales(dict(options.pop("lora", ()))):  # this batch's adapter scales (the jobs share them)
        if jobs[0].edit is not None:
            (job,) = jobs
            e = job.edit
            return pipe.edit_ids(job.prompts[0], e.image, mask=e.mask, mode=e.mode, strength=e.strength,
                                 seed=job.seeds[0], num_images=job.size, batch_size=batch_size, keep_rows=e.keep_rows,
                                 negative_prompt=job.negatives[0] or None, on_step=on_step, **options)
        prompts = [p for job in jobs for p in job.prompts]
        seeds = [s for job in jobs for s in job.seeds]
        negatives = [n for job in jobs for n in job.negatives]
        return pipe.sample_rows(prompts, seeds, negatives, batch_size=batch_size, on_step=on_step, **options)


def finish_jobs(pipe, jobs: list[Job], ids) -> Iterator[list[str]]:
    """Image ids (sample_jobs') -> base64 PNGs per job, job by job as each is done (each image decoded on its own)."""
    start = 0
    for job in jobs:
        yield [encode_png(im) for im in pipe.decode(ids[start : start + job.size])]
        start += job.size
