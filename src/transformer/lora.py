"""LoRA adapters for the generators: low-rank updates of chosen Linear layers (and rows of the text embedding).

An adapter holds, per adapted Linear layer of shape [out, in], A [rank, in] and B [out, rank]; the layer computes
y = W x + b + scale * (alpha / rank) * B A x. B starts at zero, so a fresh adapter changes nothing. Optionally it
also holds new values for some rows of the text embedding (`text_ids`, as offsets `text_delta` [n, C] added to the
base's rows), for words the base never learned, and whole new rows (`new_rows` [k, C]) for words the base's
tokenizer does not have (`new_words`: each becomes one new piece of the tokenizer, TextTokenizer.with_words).

Files, beside a `train.py transformer --lora` run: `lora.safetensors` (adapter tensors only: `<layer>.lora_A`,
`<layer>.lora_B`, `text_embedding.ids`, `text_embedding.delta`, `text_embedding.new_rows`) and `lora.json` (format,
kind, rank, alpha, targets, layers, words, new_words {word: id in the run's tokenizer}, base_sha256 = `base_hash` of
the weights it was trained on).

Adapters are applied with forward hooks (`LoRASet`), so the model's own weights and state_dict keys never change
until `fuse`, except that new words need rows in the text-embedding table: it grows (by rows the hook fills) while
such an adapter is loaded. `unload` puts back the exact base weights and table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..utils import atomic_write, state_dict_mismatch

LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora.json"
LORA_FORMAT = "tokenpaint-lora-1"
TEXT_IDS, TEXT_DELTA, TEXT_NEW_ROWS = "text_embedding.ids", "text_embedding.delta", "text_embedding.new_rows"
DEFAULT_SCALE = 0.8  # what Pipeline.load_lora and generate.py --lora apply unless told (0.7-0.9 works best)
TEXT_EMBEDDING = "embed.text_tok"  # the module whose rows an adapter can change

# The target names of `--lora-targets` / `lora.targets`: Linear layers of every block (and the output head).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.c_attn",),
    "attn_out": ("attn.c_proj",),
    "attn": ("attn.c_attn", "attn.c_proj"),
    "mlp_in": ("mlp.c_fc",),
    "mlp_out": ("mlp.c_proj",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    "head": ("head",),
}
PathLike = Union[str, os.PathLike]


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH[:SCALE]` (generate.py --lora, tokenpaint.serve --lora) -> (path, scale); the scale defaults to
    DEFAULT_SCALE. A path that exists as given is taken whole (it may hold a ':')."""
    head, sep, tail = spec.rpartition(":")
    if not sep or os.path.exists(spec):
        return spec, DEFAULT_SCALE
    try:
        return head, float(tail)
    except ValueError:
        raise ValueError(f"{spec}: the scale after ':' must be a number, got {tail!r}") from None


def base_hash(model: nn.Module) -> str:
    """sha256 of a generator's weights (names, dtypes, shapes, bytes): what an adapter records as its base."""
    from ..data.cache import state_dict_hash

    return state_dict_hash(model)


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Target names (TARGET_GROUPS keys, or full names of Linear layers such as `blocks.0.attn.c_attn`) -> the
    model's Linear layer names, in model order. Unknown names -> ValueError listing what exists."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of names, got {targets!r}")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = set()
    for target in targets:
        if target in TARGET_GROUPS:
            suffixes = TARGET_GROUPS[target]
            chosen |= {n for n in linears if n in suffixes or any(n.endswith("." + s) for s in suffixes)}
        elif target in linears:
            chosen.add(target)
        else:
            raise ValueError(f"unknown LoRA target {target!r}: expected one of {sorted(TARGET_GROUPS)} or the name "
                             f"of a Linear layer (e.g. {linears[0]})")
    return [n for n in linears if n in chosen]


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    targets: list[str]
    layers: list[str] = field(default_factory=list)  # the resolved Linear layer names
    words: list[str] = field(default_factory=list)  # words whose text-embedding rows the adapter trains
    kind: str = ""  # the generator kind (gpt | mim)
    base_sha256: str = ""
    new_words: dict[str, int] = field(default_factory=dict)  # new pieces -> their ids in the run's tokenizer

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.new_words, dict) or not all(
                isinstance(w, str) and w and isinstance(i, int) and not isinstance(i, bool) and i > 0
                for w, i in self.new_words.items()):
            raise ValueError(f"LoRA new_words must map words to ids > 0, got {self.new_words!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"format": LORA_FORMAT, "kind": self.kind, "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "layers": list(self.layers), "words": list(self.words),
                "new_words": dict(self.new_words), "base_sha256": self.base_sha256}


class LoRAAdapter(nn.Module):
    """The trainable tensors of one adapter: A/B per adapted layer, optionally text-embedding row offsets and new
    rows. `new_ids` (not saved) are the text ids its new words have in the tokenizer it is used with: those of
    `config.new_words` unless `assign_new_ids` changed them (a pipeline holding another adapter's new words)."""

    def __init__(self, config: LoRAConfig, shapes: dict[str, tuple[int, int]], text_ids: Sequence[int] = (),
                 n_embd: int = 0):
        super().__init__()
        self.config = config
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in config.layers:
            out_features, in_features = shapes[name]
            key = _key(name)
            self.lora_A[key] = nn.Parameter(torch.empty(config.rank, in_features))
            self.lora_B[key] = nn.Parameter(torch.zeros(out_features, config.rank))
            nn.init.kaiming_uniform_(self.lora_A[key], a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.register_buffer("text_ids", torch.tensor(list(text_ids), dtype=torch.long))
        self.text_delta = nn.Parameter(torch.zeros(len(text_ids), n_embd)) if len(text_ids) else None
        new_ids = list(config.new_words.values())
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long), persistent=False)
        self.new_rows = nn.Parameter(torch.zeros(len(new_ids), n_embd)) if new_ids else None

    @classmethod
    def create(cls, model: nn.Module, rank: int, alpha: Optional[float] = None, targets: Sequence[str] = ("attn",),
               text_ids: Sequence[int] = (), words: Sequence[str] = (),
               new_words: Optional[dict[str, int]] = None) -> "LoRAAdapter":
        """A fresh adapter for `model` (B = 0: the model's outputs are unchanged until it is trained). `new_words`:
        {word: its id in the extended tokenizer (TextTokenizer.with_words)}; their rows start as the mean of the
        base's text rows (padding and unknown left out)."""
        layers = resolve_targets(model, targets)
        config = LoRAConfig(rank, float(rank if alpha is None else alpha), list(targets), layers, list(words),
                            model.config.kind, base_hash(model), dict(new_words or {}))
        modules = dict(model.named_modules())
        shapes = {name: tuple(modules[name].weight.shape) for name in layers}
        text_ids = sorted(set(int(i) for i in text_ids))
        vocab = model.config.text_vocab_size
        if any(not 0 < i < vocab for i in text_ids):
            raise ValueError(f"LoRA text ids must be in [1, {vocab}), got {text_ids}")
        clash = sorted(set(text_ids) & set(config.new_words.values()))
        if clash:
            raise ValueError(f"LoRA new word ids {clash} are also ids of lora.words pieces")
        adapter = cls(config, shapes, text_ids, model.config.n_embd)
        if adapter.new_rows is not None:
            with torch.no_grad():
                table = modules[TEXT_EMBEDDING].weight
                known = table[2:]  # ids 0 and 1 are padding and unknown (TextTokenizer)
                adapter.new_rows.copy_(known.float().mean(0).expand_as(adapter.new_rows))
        return adapter.to(next(model.parameters()).device)

    @property
    def new_words(self) -> list[str]:
        return list(self.config.new_words)

    def assign_new_ids(self, ids: Sequence[int]) -> None:
        """The ids its new words have in the tokenizer it is used with (one per word, in order)."""
        if len(ids) != len(self.config.new_words):
            raise ValueError(f"{len(self.config.new_words)} new words, {len(ids)} ids")
        self.new_ids = torch.tensor(list(ids), dtype=torch.long, device=self.new_ids.device)

    def delta(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha / rank) * B A x for the adapted layer `layer`."""
        key = _key(layer)
        a, b = self.lora_A[key], self.lora_B[key]
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.config.scaling

    def weight_delta(self, layer: str) -> torch.Tensor:
        """(alpha / rank) * B @ A: the [out, in] change of the layer's weight."""
        key = _key(layer)
        return (self.lora_B[key] @ self.lora_A[key]) * self.config.scaling

    def text_rows(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[B,T] ids -> [B,T,C] offsets of the adapter's rows (zero for other ids)."""
        onehot = (text_ids[..., None] == self.text_ids).to(self.text_delta.dtype)  # [B,T,n]
        return onehot @ self.text_delta

    def put_new_rows(self, text_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """[B,T] ids, [B,T,C] their embedding -> the embedding with the new words' rows at their positions."""
        onehot = text_ids[..., None] == self.new_ids  # [B,T,k]
        rows = onehot.to(self.new_rows.dtype) @ self.new_rows
        return torch.where(onehot.any(-1, keepdim=True), rows.to(embedded.dtype), embedded)

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        """What `lora.safetensors` holds: adapter tensors only."""
        out = {}
        for name in self.config.layers:
            out[f"{name}.lora_A"] = self.lora_A[_key(name)]
            out[f"{name}.lora_B"] = self.lora_B[_key(name)]
        if self.text_delta is not None:
            out[TEXT_IDS], out[TEXT_DELTA] = self.text_ids, self.text_delta
        if self.new_rows is not None:
            out[TEXT_NEW_ROWS] = self.new_rows
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def save(self, directory: PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        atomic_write(directory / LORA_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": LORA_FORMAT}))
        config = json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False) + "\n"

        def write_config(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(config)

        atomic_write(directory / LORA_CONFIG, write_config)
        return directory

    @classmethod
    def load(cls, path: PathLike, map_location: Union[str, torch.device] = "cpu") -> "LoRAAdapter":
        """Read an adapter from a directory holding lora.safetensors + lora.json (or the .safetensors file)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no LoRA adapter at {path} (expected a directory with {LORA_WEIGHTS} and "
                                    f"{LORA_CONFIG}, or the {LORA_WEIGHTS} file)")
        directory = path if path.is_dir() else path.parent
        weights = path if path.is_file() else directory / LORA_WEIGHTS
        config_path = directory / LORA_CONFIG
        for needed in (weights, config_path):
            if not needed.is_file():
                raise FileNotFoundError(f"LoRA adapter {path}: no {needed.name} at {needed}")
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(raw, dict) or raw.get("format") != LORA_FORMAT:
            raise ValueError(f"{config_path}: not a tokenpaint LoRA config (format {LORA_FORMAT!r} expected)")
        raw.pop("format")
        try:
            config = LoRAConfig(**raw)
        except TypeError as e:
            raise ValueError(f"{config_path}: {e}") from None
        state = load_file(str(weights))
        text_ids = state.get(TEXT_IDS, torch.zeros(0, dtype=torch.long)).tolist()
        shapes = {}
        for name in config.layers:
            a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
            if a is None or b is None:
                raise ValueError(f"{weights}: no lora_A/lora_B for layer {name} listed in {config_path}")
            shapes[name] = (b.shape[0], a.shape[1])
        n_embd = next((state[k].shape[1] for k in (TEXT_DELTA, TEXT_NEW_ROWS) if k in state), 0)
        adapter = cls(config, shapes, text_ids, n_embd)
        expected = adapter.tensors()
        problems = state_dict_mismatch(expected, state)
        if problems:
            raise ValueError(f"{weights} does not match {config_path}: {problems}")
        with torch.no_grad():
            for name in config.layers:
                adapter.lora_A[_key(name)].copy_(state[f"{name}.lora_A"])
                adapter.lora_B[_key(name)].copy_(state[f"{name}.lora_B"])
            if adapter.text_delta is not None:
                adapter.text_delta.copy_(state[TEXT_DELTA])
            if adapter.new_rows is not None:
                adapter.new_rows.copy_(state[TEXT_NEW_ROWS])
        adapter.source = str(directory)
        return adapter.to(map_location)


def _key(layer: str) -> str:
    return layer.replace(".", "__")  # ParameterDict keys cannot hold dots


class LoRASet:
    """The adapters applied to one model, each with a scale: forward hooks add scale * B A x to the adapted layers'
    outputs (and the row offsets to the text embedding) and put the rows of new words (at any scale: they have no
    base value to scale from) in place. `fuse` folds them into the weights; `unload` restores the base weights and
    the text-embedding table bit for bit.

    `base_sha256`: the hash of the base weights as saved (pass it when the model was cast, e.g. to bfloat16, after
    loading); by default it is computed from the model now."""

    def __init__(self, model: nn.Module, base_sha256: Optional[str] = None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.adapters: dict[str, tuple[LoRAAdapter, float]] = {}  # applied through hooks
        self.fused: dict[str, tuple[LoRAAdapter, float]] = {}  # folded into the weights
        self.base_sha256 = base_sha256 or base_hash(model)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._originals: dict[str, torch.Tensor] = {}  # weights as they were before the first fuse
        self._base_rows = self.modules[TEXT_EMBEDDING].num_embeddings
        self._base_table = None  # (weight, config) before the table first grew for new words

    def check(self, adapter: LoRAAdapter, where: str) -> None:
        """The adapter fits this model: same base weights, same kind, its layers exist with its shapes."""
        c = adapter.config
        if c.base_sha256 != self.base_sha256:
            raise ValueError(f"LoRA {where} was trained on base weights {c.base_sha256[:16]}..., this model's are "
                             f"{self.base_sha256[:16]}... (full hashes: {c.base_sha256} vs {self.base_sha256}): "
                             f"load it onto the model it was trained from")
        if c.kind and c.kind != self.model.config.kind:
            raise ValueError(f"LoRA {where} is for a {c.kind!r} generator, this one is {self.model.config.kind!r}")
        for name in c.layers:
            module = self.modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA {where}: unknown target layer {name!r} (not a Linear layer of this model)")
            key = _key(name)
            shape = (adapter.lora_B[key].shape[0], adapter.lora_A[key].shape[1])
            if shape != tuple(module.weight.shape):
                raise ValueError(f"LoRA {where}: layer {name} is {shape} in the adapter, {tuple(module.weight.shape)} "
                                 f"in the model")
        if adapter.new_rows is not None:
            if getattr(self.model, "text_head", None) is not None:
                raise ValueError(f"LoRA {where} adds words {adapter.new_words}, but this GPT also writes captions: its "
                                 f"text head has no rows for new words")
            width = self.modules[TEXT_EMBEDDING].embedding_dim
            if adapter.new_rows.shape[1] != width:
                raise ValueError(f"LoRA {where}: its new text rows are {adapter.new_rows.shape[1]} wide, the model's "
                                 f"text embedding {width}")

    def check_new_words(self, adapter: LoRAAdapter, name: str) -> None:
        """No loaded adapter adds one of `adapter`'s new words (an error names both adapters)."""
        for word in adapter.new_words:
            for other, (loaded, _) in {**self.fused, **self.adapters}.items():
                if word in loaded.config.new_words:
                    raise ValueError(f"LoRA {name!r} ({getattr(adapter, 'source', 'not saved')}) and LoRA {other!r} "
                                     f"({getattr(loaded, 'source', 'not saved')}) both add the word {word!r}: load "
                                     f"only one of them")

    def add(self, adapter: LoRAAdapter, scale: float, name: str) -> None:
        loaded = {**self.adapters, **self.fused}
        if name in loaded:
            raise ValueError(f"a LoRA named {name!r} is already loaded; pass another name (loaded: {sorted(loaded)})")
        where = repr(getattr(adapter, "source", name))
        self.check(adapter, where)
        if adapter.new_rows is not None:
            self.check_new_words(adapter, name)
            taken = {int(i) for a, _ in {**self.fused, **self.adapters}.values() if a.new_rows is not None
                     for i in a.new_ids}
            ids = [int(i) for i in adapter.new_ids]
            if taken & set(ids) or min(ids) < 1:
                raise ValueError(f"LoRA {where}: new word ids {ids} are taken or invalid (assign_new_ids)")
        weight = next(self.model.parameters())
        adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        if adapter.new_rows is not None:
            self._grow_text_table(max(ids) + 1)
        self.adapters[name] = (adapter, float(scale))
        for layer in adapter.config.layers:
            self._hook(layer)
        if adapter.text_delta is not None or adapter.new_rows is not None:
            self._hook(TEXT_EMBEDDING)

    @torch.no_grad()
    def _grow_text_table(self, rows: int) -> None:
        """At least `rows` rows in the text-embedding table (and the model's text_vocab_size): the new ones are zero
        until the hook (or `fuse`) puts the new words' rows there."""
        module = self.modules[TEXT_EMBEDDING]
        if module.num_embeddings >= rows:
            return
        if self._base_table is None:
            self._base_table = (module.weight, self.model.config)
        weight = module.weight
        extra = weight.new_zeros(rows - module.num_embeddings, module.embedding_dim)
        module.weight = nn.Parameter(torch.cat([weight.detach(), extra]), requires_grad=weight.requires_grad)
        module.num_embeddings = rows
        self.model.config = dataclasses.replace(self.model.config, text_vocab_size=rows)

    def set_scale(self, name: str, scale: float) -> None:
        if name in self.fused:
            raise ValueError(f"LoRA {name!r} is fused into the weights: its scale is fixed (unload_lora, then load it "
                             f"again to change it)")
        if name not in self.adapters:
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.adapters)})")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"LoRA {name!r}: the scale must be a number, got {scale!r}")
        self.adapters[name] = (self.adapters[name][0], float(scale))

    def _hook(self, layer: str) -> None:
        if layer in self._hooks:
            return
        if layer == TEXT_EMBEDDING:
            def hook(module, inputs, output):
                for adapter, scale in self.adapters.values():
                    if scale and adapter.text_delta is not None:
                        output = output + scale * adapter.text_rows(inputs[0]).to(output.dtype)
                    if adapter.new_rows is not None:
                        output = adapter.put_new_rows(inputs[0], output)
                return output
        else:
            def hook(module, inputs, output):
                for adapter, scale in self.adapters.values():
                    if scale and layer in adapter.config.layers:
                        output = output + scale * adapter.delta(layer, inputs[0])
                return output
        self._hooks[layer] = self.modules[layer].register_forward_hook(hook)

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the hooked adapters (each at its scale) into the weights and drop the hooks: sampling then costs
        what the base costs. Fused adapters stay listed in `fused` until `unload`."""
        for adapter, scale in self.adapters.values():
            for layer in adapter.config.layers:
                weight = self.modules[layer].weight
                self._originals.setdefault(layer, weight.detach().clone())
                weight += (scale * adapter.weight_delta(layer)).to(weight.dtype)
            if adapter.text_delta is not None or adapter.new_rows is not None:
                weight = self.modules[TEXT_EMBEDDING].weight
                self._originals.setdefault(TEXT_EMBEDDING, weight[:self._base_rows].detach().clone())
            if adapter.text_delta is not None:
                weight[adapter.text_ids] += (scale * adapter.text_delta).to(weight.dtype)
            if adapter.new_rows is not None:
                weight[adapter.new_ids] = adapter.new_rows.to(weight.dtype)
        self._remove_hooks()
        self.fused.update(self.adapters)
        self.adapters = {}

    @torch.no_grad()
    def unload(self) -> None:
        """Remove every adapter, fused or not: the base weights (and text-embedding table) are back exactly."""
        self._remove_hooks()
        if self._base_table is not None:
            module = self.modules[TEXT_EMBEDDING]
            module.weight, self.model.config = self._base_table
            module.num_embeddings = self._base_rows
            self._base_table = None
        for layer, original in self._originals.items():
            self.modules[layer].weight.copy_(original)
        self._originals.clear()
        self.adapters, self.fused = {}, {}

    def trainable(self) -> list[nn.Parameter]:
        return [p for adapter, _ in self.adapters.values() for p in adapter.parameters()]
