"""Loading and saving VQGANs: save_pretrained directories, taming-transformers Lightning checkpoints, LlamaGen
tokenizer checkpoints and diffusers VQModel directories (both ways; key mappings in formats.py).

Loading never runs pickled code unless the caller opts in (`allow_unsafe_pickle=True`), is strict, and names the file
and every mismatched key. A taming checkpoint's architecture comes from a `model.yaml` beside it, or else is read off
the weights themselves, as is a LlamaGen checkpoint's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import types
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import formats
from .config import VQGANConfig
from ..utils import atomic_write, read_yaml, state_dict_mismatch

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """torch.load(weights_only=True) refused the file because it holds pickled Python objects."""


# ---------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------

SAVE_FORMATS = ("tokenpaint", "diffusers")


def save_vqgan(model, directory: PathLike, format: str = "tokenpaint") -> None:
    """directory/config.json + directory/model.safetensors (tensors stored contiguous, in the model's dtype);
    format="diffusers": a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "diffusers":  # check that diffusers can represent the model before writing anything
        config = formats.config_to_diffusers(model.config)
        tensors = formats.tokenpaint_to_diffusers(tensors, len(model.config.ch_mult))
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        weights_name = formats.DIFFUSERS_WEIGHTS
    else:
        config, weights_name = model.config.to_dict(), WEIGHTS_NAME
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / weights_name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------
class _StubObject(dict):
    """Stands in for classes whose module is not installed (e.g. Lightning callbacks) in an opted-in unsafe load;
    a dict so that pickled state arriving as items or via __setstate__ both land somewhere harmless."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self["__state__"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubObject,), {"__module__": module})


# a `pickle_module` for torch.load: pickle with a lenient Unpickler
_lenient_pickle = types.ModuleType("tokenpaint_lenient_pickle")
_lenient_pickle.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()


_REFUSED_OBJECT = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class)\s+([\w.]+)")
# torch's preamble and advice around a weights-only refusal (it suggests weights_only=False: never repeat that)
_TORCH_NOISE = ("Weights only load failed", "In PyTorch 2.6", "Re-running", "Please file an issue",
                "Check the documentation")


def read_torch_checkpoint(path: PathLike, allow_unsafe_pickle: bool = False, map_location="cpu") -> Mapping:
    """torch.load with weights_only=True; turns every failure into one CheckpointError naming the file. A file that
    holds pickled Python objects is an UnsafeCheckpointError, worded the same whatever torch's own message."""
    path = Path(path)
    try:
        if allow_unsafe_pickle:
            return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_lenient_pickle)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_OBJECT.search(str(e))
        if refused and not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refused: the file holds a pickled Python object ({refused.group(1)}), not just tensors and "
                f"plain values; unpickling it could run arbitrary code, so tokenpaint loads weights only and nothing "
                f"in the file was run"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable weights-only checkpoint (corrupt, or it holds data beyond tensors and plain "
            f"values; nothing in it was run): {_first_line(e)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """The informative line of an exception: torch's weights-only errors bury it among a preamble and advice."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_TORCH_NOISE) and "weights_only" not in line]
    return lines[0] if lines else type(e).__name__


def read_safetensors(path: PathLike) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {_first_line(e)}") from None


def read_json_object(path: PathLike) -> dict:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_json_config(path: PathLike) -> VQGANConfig:
    d = read_json_object(path)
    try:
        return VQGANConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_taming_yaml(path: PathLike) -> VQGANConfig:
    doc = read_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError(f"{path}: expected a taming config with a top-level `model:` section")
    return VQGANConfig.from_taming_yaml(doc["model"], source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# taming checkpoints
# ---------------------------------------------------------------------------------------------------------------
# where checkpoints keep their weights, in LlamaGen's order of preference (EMA weights first); else a bare state dict
WEIGHT_ENTRIES = ("ema", "model", "state_dict")


def extract_state_dict(ckpt: Mapping, source: PathLike) -> Tuple[StateDict, int]:
    """Lightning ckpt, LlamaGen .pt (or a bare state dict) -> (model weights, number of `loss.*` keys set aside)."""
    sd = None
    if isinstance(ckpt, Mapping):
        sd = next((ckpt[k] for k in WEIGHT_ENTRIES if isinstance(ckpt.get(k), Mapping)), ckpt)
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: no weights found (expected a Lightning checkpoint with a 'state_dict', "
                              "or a LlamaGen checkpoint with 'ema' or 'model')")
    weights = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return weights, len(sd) - len(weights)


def _prefix_indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: Mapping[str, torch.Tensor], source: PathLike = "checkpoint", resolution: int = 256) -> VQGANConfig:
    """Read a taming VQModel's architecture off its weights (given the training `resolution`, 256 by default)."""

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"{source}: cannot infer the architecture, weight {key!r} is missing")
        return tuple(sd[key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _prefix_indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: cannot infer the architecture, encoder.down.* levels are {levels}")
    num_res_blocks = len(_prefix_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    ch_mult = []
    for i in levels:
        width = shape(f"encoder.down.{i}.block.0.conv2.weight")[0]
        if width % ch:
            raise CheckpointError(f"{source}: encoder level {i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    mid_attention = "encoder.mid.attn_1.q.weight" in sd
    if mid_attention != ("decoder.mid.attn_1.q.weight" in sd):
        raise CheckpointError(f"{source}: the encoder's and decoder's middle blocks differ in having attention")
    enc_attn = [f"encoder.down.{i}.attn.0.q.weight" in sd for i in levels]
    dec_attn = [f"decoder.up.{i}.attn.0.q.weight" in sd for i in levels]
    if enc_attn != dec_attn:
        raise CheckpointError(
            f"{source}: encoder attention levels {enc_attn} differ from decoder's {dec_attn}; "
            "one attn_resolutions cannot describe this model (give a model.yaml)"
        )
    n_embed, code_dim = shape("quantize.embedding.weight")
    z_channels = shape("quant_conv.weight")[1]
    if shape("encoder.conv_out.weight")[0] != z_channels:
        raise CheckpointError(f"{source}: encoder.conv_out has {shape('encoder.conv_out.weight')[0]} outputs "
                              f"but quant_conv takes {z_channels} (double_z models are not vector-quantized)")
    return VQGANConfig(
        embed_dim=code_dim,
        n_embed=n_embed,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i, a in zip(levels, enc_attn) if a),
        z_channels=z_channels,
        resolution=resolution,
        in_channels=in_channels,
        out_ch=shape("decoder.conv_out.weight")[0],
        mid_attention=mid_attention,
        quantizer="legacy",
    )


# ---------------------------------------------------------------------------------------------------------------
# strict loading
# ---------------------------------------------------------------------------------------------------------------
def check_state_dict(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    problems = state_dict_mismatch(expected, sd)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model configuration: {problems}")


def build_from_state_dict(config: VQGANConfig, sd: StateDict, source: str):
    """Construct without random init (meta device), check strictly, then adopt the loaded tensors."""
    from .model import VQGAN

    with torch.device("meta"):
        model = VQGAN(config)
    check_state_dict(model.state_dict(), sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) > 1:  # a mixed file: settle on the codebook's dtype so every op sees one dtype
        model.to(sd["quantize.embedding.weight"].dtype)
    return model


def load_vqgan(path: PathLike, allow_unsafe_pickle: bool = False, map_location="cpu"):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VQGAN not found: {path} (expected a save_pretrained directory, a diffusers VQModel "
                                "directory, a taming .ckpt or a LlamaGen .pt)")
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() and (path / "vqvae" / CONFIG_NAME).is_file():
            path = path / "vqvae"  # a diffusers pipeline (aMUSEd) keeps its VQ model there
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        diffusers_weights = [path / formats.DIFFUSERS_WEIGHTS, (path / formats.DIFFUSERS_WEIGHTS).with_suffix(".bin")]
        if config_path.is_file() and ("_class_name" in read_json_object(config_path) or (
                not weights_path.is_file() and any(p.is_file() for p in diffusers_weights))):
            model = load_diffusers_directory(path)
        else:
            for p in (config_path, weights_path):
                if not p.is_file():
                    raise FileNotFoundError(f"{p} not found: {path} is not a VQGAN save_pretrained directory")
            model = build_from_state_dict(read_json_config(config_path), read_safetensors(weights_path),
                                          str(weights_path))
    elif path.suffix == ".safetensors":
        config_path = path.with_name(CONFIG_NAME)
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: a bare {path.name} needs its config.json beside it")
        model = build_from_state_dict(read_json_config(config_path), read_safetensors(path), str(path))
    else:
        model = load_torch_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    return model.to(map_location)


def load_torch_checkpoint(path: PathLike, allow_unsafe_pickle: bool = False):
    """A taming Lightning .ckpt, a LlamaGen tokenizer .pt or a bare state dict saved with torch.save."""
    path = Path(path)
    sd, n_loss = extract_state_dict(read_torch_checkpoint(path, allow_unsafe_pickle), path)
    if n_loss:
        logger.warning("%s: set aside %d loss.* weights (LPIPS / discriminator; unused for inference)", path, n_loss)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if formats.is_llamagen(sd):
        # LlamaGen's tokenizers: l2-normalised codes of the width quant_conv maps to, beta on the commitment term
        sd = formats.llamagen_to_tokenpaint(sd)
        config = dataclasses.replace(infer_config(sd, path), quantizer="l2")
        logger.info("%s: LlamaGen tokenizer, architecture inferred from the weights: %s", path, config)
        return build_from_state_dict(config, sd, f"{path} (LlamaGen layout)")
    yaml_path = path.with_name("model.yaml")
    if yaml_path.is_file():
        config, source = read_taming_yaml(yaml_path), f"{path} (architecture from {yaml_path})"
    else:
        config, source = infer_config(sd, path), str(path)
        logger.info("%s: architecture inferred from the weights: %s", path, config)
    return build_from_state_dict(config, sd, source)


def load_diffusers_directory(path: Path):
    """A diffusers VQModel directory: config.json + diffusion_pytorch_model.safetensors (or the .bin, read with
    weights_only=True)."""
    config = formats.config_from_diffusers(read_json_object(path / CONFIG_NAME), str(path / CONFIG_NAME))
    weights = path / formats.DIFFUSERS_WEIGHTS
    if weights.is_file():
        sd = read_safetensors(weights)
    elif weights.with_suffix(".bin").is_file():
        weights = weights.with_suffix(".bin")
        sd, _ = extract_state_dict(read_torch_checkpoint(weights), weights)
    else:
        raise FileNotFoundError(f"{weights} not found: {path} has a diffusers config.json but no weights")
    return build_from_state_dict(config, formats.diffusers_to_tokenpaint(sd), f"{weights} (diffusers layout)")
