"""Size presets and the transformer YAML config (`configs/gpt_base.yaml` etc.).

YAML schema (CONFIG_SCHEMA): sections `model` (GPTConfig / MaskedTransformerConfig fields plus `kind: gpt|mim` and
optionally `preset: NAME` from PRESETS; a GPT's `directions`: [t2i], [i2t] (a captioner) or [t2i, i2t]),
`tokenizer` (`vocab_size`), `train`, `sample`, `data` and `lora` (defaults below).
`codebook_size` and `image_size` come from the VQGAN and `text_vocab_size` from the tokenizer: the training loop
passes them to `model_config_from_yaml`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import fields
from typing import Any, Optional, Union

from ..utils import TRAIN_SEED, Check, Section, integer, load_config, number, number_list, one_of
from ..utils import field_check as _field_check
from .config import GeneratorConfig
from .gpt import DIRECTIONS
from .kinds import CONFIG_CLASSES
from .schedule import MASK_SCHEDULES

# ONE table of sizes; argparse can use `choices=sorted(PRESETS)`.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt_base": dict(kind="gpt", n_layer=12, n_head=12, n_embd=768),  # pai-painter-base-zh
    "gpt_large": dict(kind="gpt", n_layer=24, n_head=16, n_embd=1024),  # pai-painter-large-zh
    "mim_base": dict(kind="mim", n_layer=12, n_head=12, n_embd=768),
    "demo_gpt": dict(kind="gpt", n_layer=4, n_head=4, n_embd=96),  # 8x8 tokens, CPU demo
    "demo_mim": dict(kind="mim", n_layer=4, n_head=4, n_embd=96),
    # image -> text (captioning), and one GPT for both directions (a learned direction embedding, all else shared)
    "captioner_base": dict(kind="gpt", n_layer=12, n_head=12, n_embd=768, directions=["i2t"]),
    "gpt_both_base": dict(kind="gpt", n_layer=12, n_head=12, n_embd=768, directions=["t2i", "i2t"]),
    "demo_captioner": dict(kind="gpt", n_layer=4, n_head=4, n_embd=96, directions=["i2t"]),
    "demo_gpt_both": dict(kind="gpt", n_layer=4, n_head=4, n_embd=96, directions=["t2i", "i2t"]),
}

TRAIN_DEFAULTS: dict[str, Any] = dict(
    batch_size=32, grad_accum=1, lr=3.0e-4, min_lr=3.0e-5, warmup_steps=500, max_steps=100000, weight_decay=0.05,
    betas=[0.9, 0.95], grad_clip=1.0, bf16=False, label_smoothing=0.1, mask_schedule="cosine", log_every=10,
    val_every=500, sample_every=1000, ckpt_every=1000, keep_checkpoints=3, num_workers=0,
    decay_with_budget=True, compile=False,  # lr decay also follows --max-minutes; torch.compile the training forward
    seed=0, decay_steps=None, val_batches=8, sample_images=4, cache_batch_size=64,  # decay_steps None: max_steps
)
# The one table of sampler defaults: tokenpaint.sampling.SampleOptions (which documents each option and checks it),
# the free samplers' keyword defaults and the `sample:` section of a transformer YAML all read it.
# jacobi_window (GPT only): W > 1 = speculative Jacobi decoding with W draft tokens (sampling/jacobi.py).
# caption_*: image -> text decoding (sampling.sample_caption, Pipeline.caption): temperature 0 = greedy, max_length
# null = the model's text_len (docs/CAPTIONING.md measures greedy against sampled captions).
SAMPLE_DEFAULTS: dict[str, Any] = dict(steps=12, guidance_scale=3.0, top_k=100, top_p=1.0, temperature=1.0,
                                       choice_temperature=4.5, schedule="cosine", guidance_schedule="constant",
                                       use_kv_cache=True, jacobi_window=1, caption_temperature=0.0,
                                       caption_top_k=None, caption_top_p=None, caption_max_length=None)
TOKENIZER_DEFAULTS: dict[str, Any] = dict(vocab_size=8000)
DATA_DEFAULTS: dict[str, Any] = dict(resolution=None, shuffle=True)  # resolution None: the VQGAN's
# LoRA fine-tuning (train.py transformer --init-from BASE --lora RANK): rank null = train the whole model. alpha null
# = rank; targets: names of tokenpaint.transformer.lora.TARGET_GROUPS or Linear layer names; words: text-embedding
# rows trained too (the pieces of these words, for words the base never learned); new_words: words added to the
# tokenizer as new pieces, with new text-embedding rows trained (for words the base's tokenizer does not have).
LORA_DEFAULTS: dict[str, Any] = dict(rank=None, alpha=None, targets=["attn", "mlp"], words=[], new_words=[])
MODEL_KEYS = {"kind", "preset"} | {f.name for cls in CONFIG_CLASSES.values() for f in fields(cls)}
# Types beyond what the defaults imply, and ranges: checked when the file is read (load_config names file, line, key).
TRAIN_CHECKS: dict[str, Check] = {
    **{k: integer(1) for k in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "sample_every",
                                "ckpt_every", "keep_checkpoints", "val_batches", "cache_batch_size")},
    "lr": number(0), "min_lr": number(0), "warmup_steps": integer(0), "weight_decay": number(0),
    "betas": number_list(2, number(0, 1, hi_open=True)), "grad_clip": number(0).or_none("0 or null: no clipping"),
    "bf16": one_of(True, False, "auto"), "label_smoothing": number(0, 1, hi_open=True), "num_workers": integer(0),
    "seed": TRAIN_SEED, "decay_steps": integer(1).or_none("max_steps"), "sample_images": integer(1),
}
# The rules of the sampler options, for the YAML and for tokenpaint.sampling.SampleOptions alike (options.RULES).
SAMPLE_CHECKS: dict[str, Check] = {
    "steps": integer(1), "guidance_scale": number(0), "top_k": integer(1).or_none("no top-k"),
    "top_p": number(0, 1).or_none("no top-p"), "temperature": number(0, lo_open=True),
    "choice_temperature": number(0), "schedule": one_of(*MASK_SCHEDULES), "use_kv_cache": one_of(True, False),
    "jacobi_window": integer(1), "caption_temperature": number(0), "caption_top_k": integer(1).or_none("no top-k"),
    "caption_top_p": number(0, 1).or_none("no top-p"), "caption_max_length": integer(1).or_none("the text_len"),
}
MODEL_CHECKS: dict[str, Check] = {
    **{f.name: _field_check(f) for cls in CONFIG_CLASSES.values() for f in fields(cls)},
    "kind": one_of(*CONFIG_CLASSES), "preset": one_of(*PRESETS),
    "directions": Check(lambda v: isinstance(v, list) and 0 < len(v) == len(set(map(str, v)))
                        and all(x in DIRECTIONS for x in v), f"a list of distinct directions from {list(DIRECTIONS)}"),
}
# The one schema of a transformer YAML, for load_transformer_yaml and the training stage alike.
CONFIG_SCHEMA: dict[str, Any] = {
    "model": Section({}, MODEL_CHECKS, lambda model: model_config_from_yaml({"model": model})),  # sizes: defaults
    "tokenizer": Section(TOKENIZER_DEFAULTS, {"vocab_size": integer(4)}),
    "train": Section(TRAIN_DEFAULTS, TRAIN_CHECKS), "sample": Section(SAMPLE_DEFAULTS, SAMPLE_CHECKS),
    "data": Section(DATA_DEFAULTS, {"resolution": integer(1).or_none("the VQGAN's")}),
    "lora": Section(LORA_DEFAULTS, {"rank": integer(1).or_none("train the whole model"),
                                    "alpha": number(0, lo_open=True).or_none("the rank")})}


def load_transformer_yaml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a transformer YAML (CONFIG_SCHEMA): its sections with defaults filled in, plus "source" (the path).

    Unknown sections or keys -> ValueError naming the file and line.
    """
    path = os.fspath(path)
    out: dict[str, Any] = load_config(path, CONFIG_SCHEMA)
    # kind defaults to the preset's, then to "gpt" (see model_config_from_yaml)
    if "kind" in out["model"] and out["model"]["kind"] not in CONFIG_CLASSES:
        raise ValueError(f"{path}: model.kind must be one of {sorted(CONFIG_CLASSES)}, got {out['model']['kind']!r}")
    out["source"] = path
    return out


def model_config_from_yaml(
    cfg: dict[str, Any],
    *,
    text_vocab_size: Optional[int] = None,
    codebook_size: Optional[int] = None,
    image_size: Optional[int] = None,
) -> GeneratorConfig:
    """Model config from a `load_transformer_yaml` result; keyword arguments (from the tokenizer / VQGAN) win.

    For kind "mim", `label_smoothing` comes from `model` if given there, else from `train`.
    """
    source = cfg.get("source")
    model = dict(cfg["model"])
    preset = model.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{source}: unknown model.preset {preset!r}; expected one of {sorted(PRESETS)}")
        model = {**copy.deepcopy(PRESETS[preset]), **model}
    kind = model.pop("kind", "gpt")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"{source}: model.kind must be one of {sorted(CONFIG_CLASSES)}, got {kind!r}")
    if kind == "mim" and "label_smoothing" not in model:
        model["label_smoothing"] = cfg.get("train", {}).get("label_smoothing", 0.1)
    if text_vocab_size is None and "text_vocab_size" not in model:
        text_vocab_size = cfg.get("tokenizer", {}).get("vocab_size")
    for key, value in (("text_vocab_size", text_vocab_size), ("codebook_size", codebook_size), ("image_size", image_size)):
        if value is not None:
            model[key] = int(value)
    return CONFIG_CLASSES[kind].from_dict(model, source=f"{source} (section model)" if source else None)


def preset_config(name: str, **overrides) -> GeneratorConfig:
    """GPTConfig / MaskedTransformerConfig for a PRESETS entry, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    values = {**copy.deepcopy(PRESETS[name]), **overrides}
    kind = values.pop("kind")
    return CONFIG_CLASSES[kind].from_dict(values)
