"""Other projects' VQGAN layouts, mapped onto tokenpaint's (= taming's) state-dict keys and VQGANConfig.

- LlamaGen tokenizers (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`): taming's design under other names (`conv_blocks.i.res.j`,
  `mid.0/1/2`, decoder levels stored lowest-resolution first), an l2-normalised low-dim codebook and a
  `quantize.codebook_used` usage buffer that inference does not need.
- diffusers `VQModel` directories (`config.json` + `diffusion_pytorch_model.safetensors`), aMUSEd's VQ among them:
  `down_blocks.i.resnets.j`, `mid_block.attentions.0.to_q` as Linear layers, decoder levels lowest-resolution first.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from .config import VQGANConfig

StateDict = Dict[str, torch.Tensor]
Rule = Tuple[str, Any]


def _rename(sd: Mapping[str, torch.Tensor], rules: List[Rule]) -> StateDict:
    """Apply every (regex, replacement) rule in order to each key."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _reversed_level(prefix: str, n_levels: int, tail: str) -> Callable[[re.Match], str]:
    """A replacement that maps level index i to n_levels - 1 - i (decoder levels stored in the other order)."""
    return lambda m: f"{prefix}.{n_levels - 1 - int(m.group(1))}.{tail}"


def _count_levels(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------------------------
# LlamaGen
# ---------------------------------------------------------------------------------------------------------------
def is_llamagen(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("encoder.conv_blocks.") for k in sd)


def llamagen_to_tokenpaint(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """LlamaGen VQModel keys -> tokenpaint's; drops the training-only `quantize.codebook_used` buffer."""
    n = _count_levels(sd, r"decoder\.conv_blocks\.(\d+)\.")
    mid = [(r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."), (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
           (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2.")]
    rules = mid + [
        (r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
        (r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1."),  # attn.j, downsample.conv
        (r"^decoder\.conv_blocks\.(\d+)\.res\.", _reversed_level("decoder.up", n, "block.")),
        (r"^decoder\.conv_blocks\.(\d+)\.", _reversed_level("decoder.up", n, "")),  # attn.j, upsample.conv
    ]
    return _rename({k: v for k, v in sd.items() if k != "quantize.codebook_used"}, rules)


# ---------------------------------------------------------------------------------------------------------------
# diffusers VQModel
# ---------------------------------------------------------------------------------------------------------------
DIFFUSERS_CLASS = "VQModel"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this format was checked against
# diffusers' VQModel defaults, for keys a config.json leaves out
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                          up_block_types=["UpDecoderBlock2D"], block_out_channels=[64], layers_per_block=1,
                          act_fn="silu", latent_channels=3, sample_size=32, num_vq_embeddings=256, norm_num_groups=32,
                          vq_embed_dim=None, norm_type="group", mid_block_add_attention=True)
# keys that change nothing about the ids or images tokenpaint computes
DIFFUSERS_IGNORED = {"scaling_factor", "lookup_from_codebook", "force_upcast", "_class_name", "_diffusers_version",
                     "_name_or_path"}
DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # -> has attention
UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def config_from_diffusers(d: Mapping[str, Any], source: str) -> VQGANConfig:
    """A diffusers VQModel config.json -> VQGANConfig; a setting tokenpaint cannot represent is an error naming it."""

    def refuse(field: str, why: str):
        raise ValueError(f"{source}: {field}={d.get(field)!r}: {why}")

    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        refuse("_class_name", f"not a {DIFFUSERS_CLASS} (only diffusers' VQModel is a VQGAN tokenizer)")
    unknown = sorted(k for k in d if k not in DIFFUSERS_DEFAULTS and k not in DIFFUSERS_IGNORED)
    if unknown:
        raise ValueError(f"{source}: unknown VQModel config keys {unknown}: cannot tell what they change")
    c = {**DIFFUSERS_DEFAULTS, **d}
    if c["norm_type"] != "group":
        refuse("norm_type", "only 'group' (GroupNorm) is supported")
    if c["norm_num_groups"] != 32:
        refuse("norm_num_groups", "tokenpaint's GroupNorm has 32 groups")
    if c["act_fn"] != "silu":
        refuse("act_fn", "tokenpaint's blocks use silu (swish)")
    widths = [int(w) for w in c["block_out_channels"]]
    n = len(widths)
    for field, types in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        if len(c[field]) != n:
            refuse(field, f"needs one entry per block_out_channels ({n})")
        bad = [t for t in c[field] if t not in types]
        if bad:
            refuse(field, f"block types {bad} are not supported (known: {sorted(types)})")
    enc_attn = [DOWN_TYPES[t] for t in c["down_block_types"]]
    dec_attn = [UP_TYPES[t] for t in reversed(c["up_block_types"])]  # up_blocks run lowest resolution first
    if enc_attn != dec_attn:
        refuse("up_block_types", f"attention at other levels than down_block_types {c['down_block_types']}")
    ch = widths[0] if widths else 0
    if ch <= 0 or any(w % ch for w in widths):
        refuse("block_out_channels", "every width must be a positive multiple of the first")
    f = 2 ** (n - 1)
    sample_size = c["sample_size"]
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = max(sample_size)
    if not isinstance(sample_size, int) or sample_size <= 0:
        refuse("sample_size", "expected a positive integer")
    resolution = f * max(1, -(-sample_size // f))  # sample_size, rounded up to a multiple of f
    code_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else c["latent_channels"]
    try:
        return VQGANConfig(
            embed_dim=int(code_dim), n_embed=int(c["num_vq_embeddings"]), ch=ch,
            ch_mult=tuple(w // ch for w in widths), num_res_blocks=int(c["layers_per_block"]),
            attn_resolutions=tuple(resolution // 2**i for i, a in enumerate(enc_attn) if a),
            z_channels=int(c["latent_channels"]), resolution=resolution, in_channels=int(c["in_channels"]),
            out_ch=int(c["out_channels"]), mid_attention=bool(c["mid_block_add_attention"]), quantizer="legacy")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_diffusers(config: VQGANConfig) -> dict:
    """VQGANConfig -> a diffusers VQModel config.json; raises ValueError for what diffusers cannot represent."""
    from .modules import decoder_attn_levels, encoder_attn_levels

    if config.quantizer == "l2":
        raise ValueError("VQGANConfig.quantizer='l2': diffusers' VQModel has no l2-normalised quantizer "
                         "(its nearest-code search would pick other ids)")
    enc_attn = encoder_attn_levels(config)
    if enc_attn != decoder_attn_levels(config):
        raise ValueError(f"VQGANConfig.attn_resolutions={config.attn_resolutions} puts attention at other levels in "
                         f"the encoder ({enc_attn}) than in the decoder; diffusers' block types cannot say that")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": [("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in enc_attn],
        "up_block_types": [("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in reversed(enc_attn)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "sample_size": config.resolution,
        "num_vq_embeddings": config.n_embed,
        "norm_num_groups": 32,
        "vq_embed_dim": config.code_dim,
        "norm_type": "group",
        "mid_block_add_attention": config.mid_attention,
        "lookup_from_codebook": True,  # so that diffusers' decode(ids, force_not_quantize=True, shape=...) works
    }


_ATTN_NAMES = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
_ATTN_WEIGHTS = re.compile(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$")  # Linear in diffusers, 1x1 conv here


def diffusers_to_tokenpaint(sd: Mapping[str, torch.Tensor]) -> StateDict:
    n = _count_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    attn = r"((?:encoder|decoder)\.(?:down_blocks|up_blocks|mid_block)\.\d*\.?attentions\.\d+\.)"
    rules: List[Rule] = [(attn + re.escape(theirs) + r"\.", r"\1" + ours + ".") for ours, theirs in _ATTN_NAMES]
    # diffusers' pre-0.14 attention names, still found in older saved models
    rules += [(attn + old + r"\.", r"\1" + ours + ".")
              for old, ours in [("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")]]
    rules += [
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", _reversed_level("decoder.up", n, "block.")),
        (r"^decoder\.up_blocks\.(\d+)\.attentions\.", _reversed_level("decoder.up", n, "attn.")),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", _reversed_level("decoder.up", n, "upsample.")),
    ]
    out = _rename(sd, rules)
    return {k: (v[:, :, None, None] if _ATTN_WEIGHTS.search(k) and v.dim() == 2 else v) for k, v in out.items()}


def tokenpaint_to_diffusers(sd: Mapping[str, torch.Tensor], n_levels: int) -> StateDict:
    rules: List[Rule] = [
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", _reversed_level("decoder.up_blocks", n_levels, "resnets.")),
        (r"^decoder\.up\.(\d+)\.attn\.", _reversed_level("decoder.up_blocks", n_levels, "attentions.")),
        (r"^decoder\.up\.(\d+)\.upsample\.", _reversed_level("decoder.up_blocks", n_levels, "upsamplers.0.")),
    ]
    attn = r"(\.attentions\.\d+\.)"
    rules += [(attn + ours + r"\.", r"\1" + theirs + ".") for ours, theirs in _ATTN_NAMES]
    out = {}
    for key, value in sd.items():
        if _ATTN_WEIGHTS.search(key):
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
