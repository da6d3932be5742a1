"""Text -> images from a transformer run directory: `Pipeline.from_pretrained(run_dir)(prompts)`, plus editing.

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
from typing import Optional, Sequence, Union

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

from .sampling import continue_image, img2img, inpaint, outpaint, pixel_mask_to_token_mask, sample_autoregressive
from .sampling import sample_masked
from .sampling.editing import pixel_mask_to_bool
from .transformer.lora import DEFAULT_SCALE as LORA_SCALE
from .transformer.lora import LoRAAdapter, LoRASet, base_hash
from .transformer.quantize import QUANT_DTYPES, is_quantized
from .utils import read_yaml

# used when train_config.yaml has no `sample:` section (the same values as tokenpaint.transformer.SAMPLE_DEFAULTS)
BUILTIN_DEFAULTS = dict(steps=12, guidance_scale=3.0, top_k=100, top_p=1.0, temperature=1.0, jacobi_window=1)
SAMPLE_KEYS = ("steps", "guidance_scale", "top_k", "top_p", "temperature", "choice_temperature", "schedule",
               "guidance_schedule", "jacobi_window")
EDIT_MODES = ("inpaint", "outpaint", "img2img", "continue")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFERENCE_DTYPES = (*DTYPES, *QUANT_DTYPES)  # what from_pretrained / generate.py --dtype accept


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64); image i of a request uses seed + i
MAX_IMAGES_PER_PROMPT = 10_000


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_options(*, num_images=1, batch_size=1, steps=None, guidance_scale=None, top_k=None, top_p=None,
                     temperature=None, strength=None, mode=None, seed=None, num_seeds: int = 1,
                     jacobi_window=None) -> None:
    """Raise ValueError naming the first bad argument; None means "use the default" and is always fine.
    `seed` must leave room for `num_seeds` consecutive seeds (image i uses seed + i)."""
    checks = [
        ("num_images", num_images, lambda v: _int(v) and 1 <= v <= MAX_IMAGES_PER_PROMPT,
         f"an integer in [1, {MAX_IMAGES_PER_PROMPT}]"),
        ("batch_size", batch_size, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("steps", steps, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("guidance_scale", guidance_scale, lambda v: _number(v) and v >= 0, "a finite number >= 0 (1 = no guidance)"),
        ("top_k", top_k, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("top_p", top_p, lambda v: _number(v) and 0 <= v <= 1, "in [0, 1] (0 = only the most likely id)"),
        ("temperature", temperature, lambda v: _number(v) and v > 0, "a finite number > 0"),
        ("jacobi_window", jacobi_window, lambda v: _int(v) and v >= 1, "an integer >= 1 (1 = one token per step)"),
        ("strength", strength, lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
        ("mode", mode, lambda v: v in EDIT_MODES, f"one of {list(EDIT_MODES)}"),
        ("seed", seed, lambda v: _int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**64)"),
    ]
    for name, value, ok, wanted in checks:
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
    if seed is not None and seed + num_seeds > SEED_LIMIT:
        raise ValueError(f"seed must leave room for the {num_seeds} images of the request (image i uses seed + i, "
                         f"below 2**64): at most {SEED_LIMIT - num_seeds}, got {seed}")


def read_sample_defaults(path: Path) -> dict:
    """The sampler defaults: BUILTIN_DEFAULTS updated by the `sample:` section of train_config.yaml if present."""
    defaults = dict(BUILTIN_DEFAULTS)
    if not path.is_file():
        return defaults
    config = read_yaml(path) or {}
    section = config.get("sample") if isinstance(config, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{path}: section 'sample' must be a mapping, got {type(section).__name__}")
    # top_k / top_p null = no filtering (as in the training-time samples); other nulls keep the built-in default
    defaults.update({k: v for k, v in (section or {}).items()
                     if k in SAMPLE_KEYS and (v is not None or k in ("top_k", "top_p"))})
    try:
        validate_options(**{k: defaults[k] for k in BUILTIN_DEFAULTS})
    except ValueError as e:
        raise ValueError(f"{path}: section 'sample': {e}") from None
    return defaults


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


def to_pil(x: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [-1, 1] (clamped) -> RGB PIL."""
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(rearrange(pixels, "c h w -> h w c").cpu().numpy(), "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0


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
    """A generator (GPT or masked transformer), its text tokenizer and its VQGAN, ready for inference."""

    def __init__(self, model, tokenizer, vqgan, defaults: Optional[dict] = None):
        self.model, self.tokenizer, self.vqgan = model, tokenizer, vqgan
        self.kind = model.config.kind
        self.defaults = dict(BUILTIN_DEFAULTS if defaults is None else defaults)
        self.device = next(model.parameters()).device
        self._lora = None  # a LoRASet once an adapter is loaded (load_lora)
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
        model = load_generator(run_dir, map_location=device)
        sha256 = base_hash(model) if dtype not in (None, torch.float32) else None  # LoRA files name the saved weights
        model.prepare_for_inference(dtype)  # a one-time cast: autocast would re-cast weights at every decode step
        vqgan = VQGAN.from_pretrained(run_dir / "vqgan", map_location=str(device)).prepare_for_inference()
        tokenizer = TextTokenizer(str(run_dir / "tokenizer.model"))
        pipe = cls(model, tokenizer, vqgan, read_sample_defaults(run_dir / "train_config.yaml"))
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
        An adapter trained on other base weights is refused (both hashes named). Returns its name (default: the
        directory's name)."""
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ValueError(f"LoRA scale must be a number, got {scale!r}")
        self._refuse_if_quantized("load_lora")
        adapter = LoRAAdapter.load(path, map_location=self.device)
        if self._lora is None:
            self._lora = LoRASet(self.model, self._base_sha256)
        name = name or Path(adapter.source).name
        self._lora.add(adapter, scale, name)
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
        """Remove every adapter, fused or not: the base weights are back bit for bit."""
        if self._lora is not None:
            self._refuse_if_quantized("unload_lora")
            self._lora.unload()
        return self

    # ------------------------------------------------------------------ text -> images
    def __call__(self, prompts, num_images: int = 1, seed: int = 0, batch_size: int = 8, steps=None,
                 guidance_scale=None, negative_prompt=None, top_k=None, top_p=None, temperature=None,
                 use_kv_cache: bool = True, jacobi_window=None, progress: bool = False) -> list[Image.Image]:
        """num_images images per prompt, prompt-major; image i uses the seed `seed + i`. jacobi_window W > 1 (GPT):
        speculative Jacobi decoding, fewer forward passes for the same distribution (docs/PERFORMANCE.md)."""
        ids = self.generate_ids(prompts, num_images=num_images, seed=seed, batch_size=batch_size, steps=steps,
                                guidance_scale=guidance_scale, negative_prompt=negative_prompt, top_k=top_k,
                                top_p=top_p, temperature=temperature, use_kv_cache=use_kv_cache,
                                jacobi_window=jacobi_window, progress=progress)
        return self.decode(ids)

    def generate_ids(self, prompts, num_images: int = 1, seed: int = 0, batch_size: int = 8, steps=None,
                     guidance_scale=None, negative_prompt=None, top_k=None, top_p=None, temperature=None,
                     use_kv_cache: bool = True, jacobi_window=None, progress: bool = False) -> torch.Tensor:
        """Like __call__ but returns the image ids long [len(prompts) * num_images, h, w]."""
        prompts = _as_prompt_list(prompts)
        validate_options(num_images=num_images, seed=seed, num_seeds=len(prompts) * num_images)
        negatives = negative_prompt
        if negative_prompt is not None and not isinstance(negative_prompt, str):  # one per prompt -> one per row
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) not in (1, len(prompts)):
                raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negatives * (len(prompts) // len(negatives)) for _ in range(num_images)]
        rows = [p for p in prompts for _ in range(num_images)]
        return self.sample_rows(rows, [seed + i for i in range(len(rows))], negatives, batch_size=batch_size,
                                steps=steps, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                temperature=temperature, use_kv_cache=use_kv_cache, jacobi_window=jacobi_window,
                                progress=progress)

    def sample_rows(self, prompts: Sequence[str], seeds: Sequence[int], negative_prompts=None, batch_size: int = 8,
                    steps=None, guidance_scale=None, top_k=None, top_p=None, temperature=None,
                    use_kv_cache: bool = True, jacobi_window=None, progress: bool = False) -> torch.Tensor:
        """One image per row: row r is prompts[r] sampled with its own generator seeded seeds[r] (negative prompt:
        None = the empty prompt, one string for all rows, or one per row). Rows never depend on each other, so
        rows of different requests can share a batch (tokenpaint.serve does). Returns ids long [R, h, w]."""
        prompts = _as_prompt_list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} prompts")
        for seed in seeds:
            validate_options(seed=seed)
        validate_options(batch_size=batch_size, steps=steps, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                         temperature=temperature, jacobi_window=jacobi_window)
        options = self._options(steps, guidance_scale, top_k, top_p, temperature, use_kv_cache, jacobi_window)
        text = self.encode_text(prompts)  # [R, T]
        negative = self._negative_ids(negative_prompts, len(prompts))
        total = text.shape[0]
        out = []
        bar = tqdm(total=total, desc="images", disable=not progress)
        for start in range(0, total, batch_size):
            rows = slice(start, min(start + batch_size, total))
            gens = self._seeded_generators(seeds[rows])
            out.append(self._sample(text[rows], negative[rows], gens, options))
            bar.update(rows.stop - rows.start)
        bar.close()
        return torch.cat(out).view(total, self.tokens_per_side, self.tokens_per_side)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> list[Image.Image]:
        """Image ids [M, h, w] -> M PIL images, decoded one at a time (so that no image depends on its batch)."""
        return [to_pil(self.vqgan.decode(row[None].to(self.device))[0]) for row in ids]

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text ids [B, text_len] on the device (a too long prompt is truncated with a warning)."""
        return self.tokenizer.encode(list(prompts), length=self.model.config.text_len).to(self.device)

    # ------------------------------------------------------------------ editing
    def edit(self, prompt: str, image, mask=None, mode: str = "inpaint", strength: float = 0.6, seed: int = 0,
             **kwargs) -> list[Image.Image]:
        """Edit `image` under `prompt` and return PIL images; the arguments are those of `edit_ids`."""
        return self.decode(self.edit_ids(prompt, image, mask=mask, mode=mode, strength=strength, seed=seed, **kwargs))

    def edit_ids(self, prompt: str, image, mask=None, mode: str = "inpaint", strength: float = 0.6, seed: int = 0,
                 num_images: int = 1, batch_size: int = 8, keep_rows: Optional[int] = None,
                 offset: Optional[tuple[int, int]] = None, steps=None, guidance_scale=None, negative_prompt=None,
                 top_k=None, top_p=None, temperature=None, use_kv_cache: bool = True, jacobi_window=None,
                 progress: bool = False) -> torch.Tensor:
        """Edit `image` (PIL or path) under `prompt`; returns num_images images (image i uses seed + i).

        inpaint: regenerate where `mask` (same size as the image; white / True = regenerate) is set.
        outpaint: place the image (scaled down to fit if needed) on the canvas at `offset` = (left, top) pixels
        (default: centred) and generate the rest. img2img (masked model): re-generate a `strength` fraction of the
        tokens. continue: keep the top `keep_rows` token rows (default: the rows above the mask, else half).
        Returns image ids long [num_images, h, w].
        """
        validate_options(num_images=num_images, batch_size=batch_size, steps=steps, guidance_scale=guidance_scale,
                         top_k=top_k, top_p=top_p, temperature=temperature, strength=strength, mode=mode, seed=seed,
                         num_seeds=num_images, jacobi_window=jacobi_window)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        image = _open_image(image, "image").convert("RGB")
        token_mask = None
        if mask is not None:
            if mode in ("img2img", "outpaint"):
                raise ValueError(f"mask is not used in mode {mode!r}; use mode='inpaint' to regenerate a region")
            token_mask = self._token_mask(mask, image.size)
        if mode == "inpaint" and token_mask is None:
            raise ValueError("mask is required for mode='inpaint'")
        if mode == "img2img" and self.kind != "mim":
            raise ValueError("mode='img2img' needs a masked (mim) model; use 'inpaint' or 'continue' with a GPT")
        options = self._options(steps, guidance_scale, top_k, top_p, temperature, use_kv_cache, jacobi_window)
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
        out = []
        bar = tqdm(total=num_images, desc="images", disable=not progress)
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            gens = self._generators(seed, range(start, start + count))
            kwargs = dict(self._sampler_kwargs(options, negative.expand(count, -1)), generator=gens)
            text_ids, known = text.expand(count, -1), known_ids.expand(count, -1, -1)
            if mode == "inpaint":
                ids = inpaint(self.model, text_ids, known, token_mask, **kwargs)
            elif mode == "outpaint":
                ids = outpaint(self.model, text_ids, known, top=top, left=left, **kwargs)
            elif mode == "img2img":
                ids = img2img(self.model, text_ids, known, strength, **kwargs)
            else:
                ids = continue_image(self.model, text_ids, known, keep_rows, **kwargs)
            out.append(ids)
            bar.update(count)
        bar.close()
        return torch.cat(out).view(num_images, side, side)

    # ------------------------------------------------------------------ helpers
    def _options(self, steps, guidance_scale, top_k, top_p, temperature, use_kv_cache, jacobi_window=None) -> dict:
        given = dict(steps=steps, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                     jacobi_window=jacobi_window)
        options = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        options["use_kv_cache"] = use_kv_cache
        return options

    def _sampler_kwargs(self, options: dict, negative_ids) -> dict:
        """The keyword arguments of the sampler this model uses (sample_autoregressive or sample_masked)."""
        common = dict(negative_text_ids=negative_ids, guidance_scale=float(options["guidance_scale"]),
                      temperature=float(options["temperature"]), top_k=options["top_k"])
        if self.kind == "gpt":
            return dict(common, top_p=options["top_p"], use_kv_cache=bool(options["use_kv_cache"]),
                        jacobi_window=int(options.get("jacobi_window", 1)))
        extra = {k: options[k] for k in ("choice_temperature", "schedule", "guidance_schedule") if k in options}
        return dict(common, steps=int(options["steps"]), **extra)

    def _sample(self, text_ids, negative_ids, generators, options) -> torch.Tensor:
        kwargs = self._sampler_kwargs(options, negative_ids)
        sampler = sample_masked if self.kind == "mim" else sample_autoregressive
        return sampler(self.model, text_ids, generator=generators, **kwargs)

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

    def _generators(self, seed: int, indices) -> list[torch.Generator]:
        return self._seeded_generators([seed + i for i in indices])

    def _seeded_generators(self, seeds) -> list[torch.Generator]:
        bad = [s for s in seeds if not isinstance(s, int)]
        if bad:
            raise ValueError(f"seed must be an integer, got {bad[0]!r}")
        return [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    @torch.inference_mode()
    def _encode_image(self, image: Image.Image) -> torch.Tensor:
        return self.vqgan.encode(from_pil(image)[None].to(self.device))  # [1, h, w]

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
