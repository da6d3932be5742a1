"""Text -> images from a transformer run directory: `Pipeline.from_pretrained(run_dir)(prompts)`, plus editing, and
images -> text (`Pipeline.caption`) with a GPT trained in the caption direction.

A run directory (written by `train.py transformer`) holds config.json (with "kind": "gpt" | "mim") and
model.safetensors, tokenizer.model, vqgan/ and train_config.yaml (whose `sample:` section gives the defaults).

Reproducibility: image i of a request (prompt-major: all images of prompt 0, then prompt 1, ...) is sampled with its
own generator seeded `seed + i` and decoded on its own, so it does not depend on the batch size or on the other
prompts of the request.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.images import pil_to_tensor, resize_center_crop, tensor_to_pil
from .sampling import (CAPTION_OPTIONS, RULES, OptionError, SampleOptions, check_option, check_seeds, continue_image,
                       img2img, inpaint, outpaint, pixel_mask_to_token_mask, sample, sample_caption)
from .sampling.filters import StepCallback
from .sampling.editing import pixel_mask_to_bool
from .transformer.lora import DEFAULT_SCALE as LORA_SCALE
from .transformer.lora import LoRAAdapter, LoRASet, base_hash
from .transformer.quantize import QUANT_DTYPES, is_quantized
from .utils import read_yaml

EDIT_MODES = ("inpaint", "outpaint", "img2img", "continue")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFERENCE_DTYPES = (*DTYPES, *QUANT_DTYPES)  # what from_pretrained / generate.py --dtype accept


def read_sample_defaults(path: Path) -> SampleOptions:
    """The run's sampler defaults: SAMPLE_DEFAULTS updated by the `sample:` section of train_config.yaml if present.

    null where an option allows it (top_k / top_p: no filtering, as in the training-time samples; caption_max_length:
    text_len); other nulls keep the built-in default; keys that are no sampler option are ignored.
    """
    if not path.is_file():
        return SampleOptions()
    config = read_yaml(path) or {}
    section = config.get("sample") if isinstance(config, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{path}: section 'sample' must be a mapping, got {type(section).__name__}")
    given = {k: v for k, v in (section or {}).items()
             if k in SampleOptions.names() and (v is not None or RULES[k][0](None))}
    try:
        return SampleOptions(**given)
    except OptionError as e:
        raise OptionError(e.name, f"{path}: section 'sample': {e}") from None


RUN_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.model", "vqgan/config.json")


def check_run_dir(run_dir) -> Path:
    """The run directory as a Path if it holds what from_pretrained reads (RUN_DIR_FILES), else FileNotFoundError
    naming what is missing: checked before any weights are loaded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"model directory {run_dir} does not exist")
    missing = [name for name in RUN_DIR_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model directory {run_dir} has no {', '.join(missing)} (is it a `train.py "
                                f"transformer` run directory?)")
    return run_dir


def default_edit_mode(kind: str, has_mask: bool) -> str:
    """The edit mode when none is named: inpaint with a mask, else img2img (masked model) or continue (GPT)."""
    return "inpaint" if has_mask else "img2img" if kind == "mim" else "continue"


def check_edit_mode(kind: str, mode: str, has_mask: bool) -> None:
    """Errors (OptionError naming "mode" or "mask") for a mode that cannot run with this model kind and mask."""
    if mode not in EDIT_MODES:
        raise OptionError("mode", f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
    if mode == "inpaint" and not has_mask:
        raise OptionError("mask", "mask is required for mode='inpaint'")
    if has_mask and mode in ("img2img", "outpaint"):
        raise OptionError("mask", f"mask is not used in mode {mode!r}; use mode='inpaint' to regenerate a region")
    if mode == "img2img" and kind != "mim":
        raise OptionError("mode", "mode='img2img' needs a masked (mim) model; use 'inpaint' or 'continue' with a GPT")


def make_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images row by row into one image with `columns` columns."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _as_prompt_list(prompts, name: str = "prompts") -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError(f"{name} must hold at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name} must be strings, got {type(bad[0]).__name__}")
    return prompts


def _open_image(image, name: str) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{name}: no image file at {image}")
        with Image.open(image) as opened:
            return opened.convert("RGB") if name == "image" else opened.copy()
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image or a path, got {type(image).__name__}")
    return image


class Pipeline:
    """A generator (GPT or masked transformer), its text tokenizer and its VQGAN, ready for inference.

    `options` (SampleOptions) are the sampler defaults of every call; a call's keyword arguments (steps=8, ...) or its
    own `options=` override them.
    """

    def __init__(self, model, tokenizer, vqgan, options: Optional[SampleOptions] = None):
        self.model, self.tokenizer, self.vqgan = model, tokenizer, vqgan
        self.kind = model.config.kind
        self.options = SampleOptions() if options is None else options
        self.directions = tuple(getattr(model.config, "directions", ("t2i",)))  # a GPT may caption ("i2t")
        self.device = next(model.parameters()).device
        self._lora = None  # a LoRASet once an adapter is loaded (load_lora)
        self._base_tokenizer = tokenizer  # what unload_lora puts back (load_lora may add adapters' new words)
        self._base_sha256 = None  # the base weights' hash as saved (set by from_pretrained before a dtype cast)
        self.tokens_per_side = int(model.config.image_size)
        self.resolution = self.tokens_per_side * int(vqgan.downsample_factor)
        if tokenizer.vocab_size > model.config.text_vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the generator embeds only "
                f"{model.config.text_vocab_size} text ids (tokenizer.model from another run?)"
            )
        if vqgan.codebook_size != model.config.codebook_size:
            raise ValueError(
                f"the VQGAN has {vqgan.codebook_size} codes but the generator predicts {model.config.codebook_size}"
            )

    @classmethod
    def from_pretrained(cls, run_dir, device: Union[str, torch.device] = "cpu", dtype=None) -> "Pipeline":
        """Load a run directory; `dtype` (torch.dtype or "bfloat16"/"float32"/"float16") casts the generator once;
        "int8" quantizes its weights (int8 per output channel, float32 activations; see `quantize`)."""
        from .data import TextTokenizer
        from .transformer import load_generator
        from .vqgan import VQGAN

        run_dir = check_run_dir(run_dir)
        if isinstance(dtype, str):
            if dtype not in INFERENCE_DTYPES:
                raise ValueError(f"dtype must be one of {sorted(INFERENCE_DTYPES)}, got {dtype!r}")
            dtype = DTYPES.get(dtype, dtype)
        options = read_sample_defaults(run_dir / "train_config.yaml")
        model = load_generator(run_dir, map_location=device)
        sha256 = base_hash(model) if dtype not in (None, torch.float32) else None  # LoRA files name the saved weights
        model.prepare_for_inference(dtype)  # a one-time cast: autocast would re-cast weights at every decode step
        vqgan = VQGAN.from_pretrained(run_dir / "vqgan", map_location=str(device)).prepare_for_inference()
        tokenizer = TextTokenizer(str(run_dir / "tokenizer.model"))
        pipe = cls(model, tokenizer, vqgan, options)
        pipe._base_sha256 = sha256
        return pipe

    def quantize(self, dtype: str = "int8") -> "Pipeline":
        """int8 weights for the generator, in place (TokenTransformer.quantize): 4x less weight memory and a faster
        one-token decode step; docs/PERFORMANCE.md says when it pays. LoRA adapters must be fused first (int8 layers
        take no adapter hooks), and none can be loaded or unloaded afterwards."""
        if self._lora is not None and self._lora.adapters:
            raise ValueError("quantize: LoRA adapters are loaded; call fuse_lora() first (int8 layers take no hooks)")
        self.model.quantize(dtype)
        return self

    def _refuse_if_quantized(self, what: str) -> None:
        if is_quantized(self.model):
            raise ValueError(f"{what}: the generator holds int8 weights; load and fuse LoRA adapters before "
                             f"quantizing (generate.py --dtype int8 --lora does this)")

    def compile(self, **options) -> "Pipeline":
        """torch.compile the generator's transformer blocks in place (TokenTransformer.compile_blocks). The first
        batch pays for compilation; options go to torch.compile. Measure first: benchmarks/mim_vs_ar.py --compile."""
        self.model.compile_blocks(**options)
        return self

    # ------------------------------------------------------------------ LoRA adapters
    def load_lora(self, path, scale: float = LORA_SCALE, name: Optional[str] = None) -> str:
        """Apply a LoRA adapter (a `train.py transformer --lora` run directory, or its lora.safetensors with
        lora.json beside it) at `scale`; several can be loaded, each with its own scale, and their updates add up.
        An adapter trained on other base weights is refused (both hashes named). An adapter with new words
        (`lora.new_words`) adds them to `self.tokenizer` as new pieces, with the next free ids (two adapters adding
        the same word are refused, both named), and their rows to the text embedding. Returns its name (default:
        the directory's name)."""
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ValueError(f"LoRA scale must be a number, got {scale!r}")
        self._refuse_if_quantized("load_lora")
        adapter = LoRAAdapter.load(path, map_location=self.device)
        if self._lora is None:
            self._lora = LoRASet(self.model, self._base_sha256)
        name = name or Path(adapter.source).name
        tokenizer = self.tokenizer
        if adapter.new_words:
            self._lora.check_new_words(adapter, name)
            try:
                tokenizer = self.tokenizer.with_words(adapter.new_words)
            except ValueError as e:
                raise ValueError(f"LoRA {adapter.source}: lora.json new_words: {e}") from None
            first = self.tokenizer.vocab_size
            adapter.assign_new_ids(range(first, first + len(adapter.new_words)))
        self._lora.add(adapter, scale, name)
        self.tokenizer = tokenizer
        return name

    @property
    def loras(self) -> dict[str, float]:
        """Loaded adapters -> their scales (fused ones included)."""
        if self._lora is None:
            return {}
        return {name: scale for name, (_, scale) in {**self._lora.fused, **self._lora.adapters}.items()}

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of a loaded (not fused) adapter; 0 turns it off."""
        if self._lora is None:
            raise ValueError(f"no LoRA named {name!r} is loaded (load_lora first)")
        self._lora.set_scale(name, scale)

    @contextlib.contextmanager
    def lora_scales(self, scales: dict):
        """Within the block, the named adapters use these scales (the others keep theirs); restored afterwards."""
        before = self.loras
        try:
            for name, scale in scales.items():
                self.set_lora_scale(name, scale)
            yield self
        finally:
            for name in scales:
                if name in before and self._lora is not None and name in self._lora.adapters:
                    self._lora.set_scale(name, before[name])

    def fuse_lora(self) -> "Pipeline":
        """Fold the loaded adapters into the generator's weights (sampling then costs what the base costs);
        `unload_lora` still restores the base exactly."""
        if self._lora is None or not self._lora.adapters:
            raise ValueError("fuse_lora: no LoRA adapter is loaded (load_lora first)")
        self._lora.fuse()
        return self

    def unload_lora(self) -> "Pipeline":
        """Remove every adapter, fused or not: the base weights, text-embedding table and tokenizer are back bit for
        bit."""
        if self._lora is not None:
            self._refuse_if_quantized("unload_lora")
            self._lora.unload()
            self.tokenizer = self._base_tokenizer
        return self

    # ------------------------------------------------------------------ text -> images
    def __call__(self, prompts, **kwargs) -> list[Image.Image]:
        """num_images PIL images per prompt, prompt-major; image i uses the seed `seed + i`. Arguments: generate_ids."""
        return self.decode(self.generate_ids(prompts, **kwargs))

    def generate_ids(self, prompts, num_images: int = 1, seed: int = 0, batch_size: int = 8, negative_prompt=None,
                     options: Optional[SampleOptions] = None, progress: bool = False,
                     on_step: Optional[StepCallback] = None, **sample_options) -> torch.Tensor:
        """Image ids long [len(prompts) * num_images, h, w] for one prompt or a list of prompts.

        negative_prompt: one string for all prompts or one per prompt (replaces the empty prompt of guidance).
        options / sample_options: sampler settings (SampleOptions fields: steps, guidance_scale, top_k, top_p,
        temperature, use_kv_cache, ...); a keyword given as None keeps the pipeline's default.
        on_step(done, total): decoding steps done of the call's (every batch's steps counted), after each step.
        """
        self.check_direction("t2i")
        prompts = _as_prompt_list(prompts)
        self._check_request(num_images=num_images)
        check_seeds(seed, len(prompts) * num_images)
        negatives = negative_prompt
        if negative_prompt is not None and not isinstance(negative_prompt, str):  # one per prompt -> one per row
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) not in (1, len(prompts)):
                raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negatives * (len(prompts) // len(negatives)) for _ in range(num_images)]
        rows = [p for p in prompts for _ in range(num_images)]  # prompt-major
        return self.sample_rows(rows, [seed + i for i in range(len(rows))], negatives, batch_size=batch_size,
                                options=options, progress=progress, on_step=on_step, **sample_options)

    def sample_rows(self, prompts: Sequence[str], seeds: Sequence[int], negative_prompts=None, batch_size: int = 8,
                    options: Optional[SampleOptions] = None, progress: bool = False,
                    on_step: Optional[StepCallback] = None, **sample_options) -> torch.Tensor:
        """One image per row: row r is prompts[r] sampled with its own generator seeded seeds[r] (negative prompt:
        None = the empty prompt, one string for all rows, or one per row). Rows never depend on each other, so
        rows of different requests can share a batch (tokenpaint.serve does). Sampler settings as in generate_ids.
        Returns ids long [R, h, w]."""
        prompts = _as_prompt_list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} prompts")
        self._check_request(batch_size=batch_size)
        for seed in seeds:
            check_option("seed", seed)
        options = self._resolve(options, sample_options)
        text = self.encode_text(prompts)  # [R, T]
        negative = self._negative_ids(negative_prompts, len(prompts))

        def run(rows: slice, generators, on_batch_step) -> torch.Tensor:
            return sample(self.model, text[rows], options, negative_text_ids=negative[rows], generator=generators,
                          on_step=on_batch_step)

        return self._batched(list(seeds), batch_size, progress, run, on_step)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> list[Image.Image]:
        """Image ids [M, h, w] -> M PIL images, decoded one at a time (so that no image depends on its batch)."""
        return [tensor_to_pil(self.vqgan.decode(row[None].to(self.device))[0]) for row in ids]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text ids [B, text_len] on the device (a too long prompt is truncated with a warning)."""
        return self.tokenizer.encode(list(prompts), length=self.model.config.text_len).to(self.device)

    # ------------------------------------------------------------------ images -> text
    def check_direction(self, direction: str) -> None:
        """ValueError unless the generator was trained for `direction`: "t2i" (images from text) or "i2t" (captions)."""
        if direction == "i2t" and self.kind != "gpt":
            raise ValueError("a masked (mim) model cannot caption images: train a GPT with model.directions [i2t] "
                             "(configs/demo/captioner.yaml) or [t2i, i2t] (configs/demo/gpt_both.yaml)")
        if self.kind == "gpt":
            self.model.check_direction(direction)

    def caption(self, images, num_captions: int = 1, seed: int = 0, temperature=None, top_k=None, top_p=None,
                max_length=None, batch_size: int = 8, use_kv_cache: bool = True, progress: bool = False) -> list[str]:
        """Caption images (PIL images or paths): num_captions per image, image-major; caption i uses seed + i.

        KV-cached decoding over the text vocabulary until the padding id; temperature 0 is greedy, otherwise top_k /
        top_p filter the draws. max_length: at most this many text ids. None: the pipeline's caption_temperature,
        caption_top_k, caption_top_p, caption_max_length options (greedy up to text_len unless the run's `sample:`
        section says otherwise).
        """
        return self.tokenizer.decode(self.caption_ids(
            images, num_captions=num_captions, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
            max_length=max_length, batch_size=batch_size, use_kv_cache=use_kv_cache, progress=progress))

    def caption_ids(self, images, num_captions: int = 1, seed: int = 0, temperature=None, top_k=None, top_p=None,
                    max_length=None, batch_size: int = 8, use_kv_cache: bool = True,
                    progress: bool = False) -> torch.Tensor:
        """Like `caption` but returns the text ids long [len(images) * num_captions, max_length] (0 = padding)."""
        self.check_direction("i2t")
        try:
            check_option("num_images", num_captions)
            check_option("batch_size", batch_size)
            check_seeds(seed, num_captions * (1 if isinstance(images, (str, os.PathLike, Image.Image)) else
                                              max(1, len(images))))
            given = dict(zip(CAPTION_OPTIONS, (temperature, top_k, top_p, max_length)))
            for name, value in given.items():
                if value is not None:
                    check_option("caption_" + name, value, name)
        except OptionError as e:
            raise ValueError(str(e).replace("num_images", "num_captions")) from None
        options = {name: getattr(self.options, "caption_" + name) if value is None else value
                   for name, value in given.items()}
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not images:
            raise ValueError("images must hold at least one image")
        ids = torch.cat([self._encode_image(resize_center_crop(_open_image(image, "image").convert("RGB"),
                                                                self.resolution)).flatten(1)
                         for image in images]).repeat_interleave(num_captions, dim=0)  # [M, N], image-major
        out = []
        bar = tqdm(total=ids.shape[0], desc="captions", disable=not progress)
        for start in range(0, ids.shape[0], batch_size):
            rows = slice(start, min(start + batch_size, ids.shape[0]))
            gens = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(rows.start, rows.stop)]
            out.append(sample_caption(self.model, ids[rows], generator=gens, use_kv_cache=use_kv_cache, **options))
            bar.update(rows.stop - rows.start)
        bar.close()
        return torch.cat(out)

    # ------------------------------------------------------------------ editing
    def edit(self, prompt: str, image, mask=None, mode: Optional[str] = None, **kwargs) -> list[Image.Image]:
        """Edit `image` under `prompt` and return PIL images; the arguments are those of `edit_ids`."""
        return self.decode(self.edit_ids(prompt, image, mask=mask, mode=mode, **kwargs))

    def edit_ids(self, prompt: str, image, mask=None, mode: Optional[str] = None, strength: float = 0.6,
                 seed: int = 0, num_images: int = 1, batch_size: int = 8, keep_rows: Optional[int] = None,
                 offset: Optional[tuple[int, int]] = None, negative_prompt=None,
                 options: Optional[SampleOptions] = None, progress: bool = False,
                 on_step: Optional[StepCallback] = None, **sample_options) -> torch.Tensor:
        """Edit `image` (PIL or path) under `prompt`; returns num_images images (image i uses seed + i).

        mode (default: inpaint with a mask, else img2img for a masked model and continue for a GPT):
        inpaint: regenerate where `mask` (same size as the image; white / True = regenerate) is set.
        outpaint: place the image (scaled down to fit if needed) on the canvas at `offset` = (left, top) pixels
        (default: centred) and generate the rest. img2img (masked model): re-generate a `strength` fraction of the
        tokens. continue: keep the top `keep_rows` token rows (default: the rows above the mask, else half).
        Sampler settings as in generate_ids. Returns image ids long [num_images, h, w].
        """
        self.check_direction("t2i")
        self._check_request(num_images=num_images, batch_size=batch_size, strength=strength)
        check_seeds(seed, num_images)
        mode = default_edit_mode(self.kind, mask is not None) if mode is None else mode
        check_edit_mode(self.kind, mode, mask is not None)
        options = self._resolve(options, sample_options)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        image = _open_image(image, "image").convert("RGB")
        token_mask = self._token_mask(mask, image.size) if mask is not None else None
        side = self.tokens_per_side
        if mode == "continue":
            if keep_rows is None:
                keep_rows = (int(torch.nonzero(token_mask)[0]) // side) if token_mask is not None and token_mask.any() \
                    else side // 2
            if not 0 <= keep_rows <= side:
                raise ValueError(f"keep_rows must be in [0, {side}], got {keep_rows}")

        if mode == "outpaint":
            known_ids, (top, left) = self._outpaint_tokens(image, offset)
        else:
            known_ids = self._encode_image(image.resize((self.resolution,) * 2, Image.BICUBIC))  # [1, h, w]
        text = self.encode_text([prompt])
        negative = self._negative_ids(negative_prompt, 1)

        def run(rows: slice, generators, on_batch_step) -> torch.Tensor:
            count = rows.stop - rows.start
            text_ids, known = text.expand(count, -1), known_ids.expand(count, -1, -1)
            common = dict(negative_text_ids=negative.expand(count, -1), generator=generators, on_step=on_batch_step)
            if mode == "inpaint":
                return inpaint(self.model, text_ids, known, token_mask, options, **common)
            if mode == "outpaint":
                return outpaint(self.model, text_ids, known, options, top=top, left=left, **common)
            if mode == "img2img":
                return img2img(self.model, text_ids, known, strength, options, **common)
            return continue_image(self.model, text_ids, known, keep_rows, options, **common)

        return self._batched([seed + i for i in range(num_images)], batch_size, progress, run, on_step)

    # ------------------------------------------------------------------ helpers
    def _resolve(self, options: Optional[SampleOptions], sample_options: dict) -> SampleOptions:
        """`options` (default: the pipeline's) with the keyword options that were given (not None)."""
        base = self.options if options is None else options
        return base.replace(**{k: v for k, v in sample_options.items() if v is not None})

    @staticmethod
    def _check_request(**values) -> None:
        for name, value in values.items():
            check_option(name, value)

    def _batched(self, seeds: list, batch_size: int, progress: bool, run: Callable[..., torch.Tensor],
                 on_step: Optional[StepCallback] = None) -> torch.Tensor:
        """run(rows, generators, on_batch_step) over batches of at most batch_size rows; row i has a generator seeded
        seeds[i]. on_step(done, total) counts the steps of all batches (each batch decodes as many steps). Returns
        the ids [len(seeds), h, w]."""
        total, out = len(seeds), []
        n_batches = math.ceil(total / batch_size)
        bar = tqdm(total=total, desc="images", disable=not progress)
        for index, start in enumerate(range(0, total, batch_size)):
            rows = slice(start, min(start + batch_size, total))
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds[rows]]
            on_batch_step = None if on_step is None else \
                (lambda done, steps, index=index: on_step(index * steps + done, n_batches * steps))
            out.append(run(rows, generators, on_batch_step))
            bar.update(rows.stop - rows.start)
        bar.close()
        return torch.cat(out).view(total, self.tokens_per_side, self.tokens_per_side)

    def _negative_ids(self, negative_prompt, n_prompts: int) -> torch.Tensor:
        """Negative prompt ids [n_prompts, T]: one string for all prompts, one per prompt, or the empty prompt."""
        if negative_prompt is None:
            return torch.zeros(n_prompts, self.model.config.text_len, dtype=torch.long, device=self.device)
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * n_prompts
        if len(negatives) != n_prompts:
            raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {n_prompts} prompts")
        return self.encode_text(negatives)

    @torch.inference_mode()
    def _encode_image(self, image: Image.Image) -> torch.Tensor:
        return self.vqgan.encode(pil_to_tensor(image)[None].to(self.device))  # RGB image -> [1, h, w]

    def _token_mask(self, mask, image_size: tuple[int, int]) -> torch.Tensor:
        """A pixel mask the size of the input image -> bool [N] token mask on the model's canvas."""
        mask = _open_image(mask, "mask") if isinstance(mask, (str, os.PathLike)) else mask
        pixels = pixel_mask_to_bool(mask)
        mask_size = (pixels.shape[1], pixels.shape[0])
        if mask_size != tuple(image_size):
            raise ValueError(
                f"mask size {mask_size[0]}x{mask_size[1]} does not match the image size {image_size[0]}x{image_size[1]}"
            )
        if mask_size != (self.resolution, self.resolution):
            as_image = Image.fromarray(pixels.numpy().astype(np.uint8) * 255)
            pixels = pixel_mask_to_bool(as_image.resize((self.resolution,) * 2, Image.NEAREST))
        return pixel_mask_to_token_mask(pixels, self.vqgan.downsample_factor).to(self.device)

    def _outpaint_tokens(self, image: Image.Image, offset):
        """Fit the image into the canvas (multiples of the downsample factor) -> (ids [1, hk, wk], (top, left))."""
        f = int(self.vqgan.downsample_factor)
        scale = min(1.0, self.resolution / max(image.size))
        width, height = (max(f, int(round(s * scale)) // f * f) for s in image.size)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.BICUBIC)
        ids = self._encode_image(image)
        if offset is None:
            return ids, (None, None)
        left, top = offset
        if left % f or top % f:
            raise ValueError(f"offset {offset} must be a multiple of the downsample factor {f} (pixels)")
        return ids, (top // f, left // f)
