"""VQGANConfig: the one dataclass that fixes a VQGAN's architecture and quantizer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

QUANTIZERS = ("legacy", "standard", "l2")


@dataclass
class VQGANConfig:
    """Defaults = taming-transformers' ImageNet VQGAN f16/16384 (its `model.yaml`)."""

    embed_dim: int = 256
    n_embed: int = 16384
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    # Self-attention between the two middle res blocks of encoder and decoder (taming, LlamaGen); aMUSEd's VQ has none.
    mid_attention: bool = True
    # "legacy": taming's form, beta on the codebook term (a bug kept so the published weights train as they did);
    # "standard": beta on the commitment term; "l2": LlamaGen-style l2-normalised (low-dim) codes, beta on commitment.
    quantizer: str = "legacy"
    beta: float = 0.25
    # Dimension of the codes; None -> embed_dim. With "l2", e.g. 8: quant_conv maps z_channels -> codebook_dim.
    codebook_dim: Optional[int] = None

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"VQGANConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.double_z:
            raise ValueError("VQGANConfig.double_z must be False: a vector-quantized encoder outputs z_channels maps")
        if not self.ch_mult:
            raise ValueError("VQGANConfig.ch_mult must name at least one level")
        for name in ("embed_dim", "n_embed", "ch", "z_channels", "resolution", "in_channels", "out_ch"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VQGANConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.num_res_blocks < 0:
            raise ValueError(f"VQGANConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.codebook_dim is not None and self.codebook_dim <= 0:
            raise ValueError(f"VQGANConfig.codebook_dim must be positive or None, got {self.codebook_dim}")
        # GroupNorm(32) needs every width to be a multiple of 32.
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"VQGANConfig: ch * ch_mult must be multiples of 32 (GroupNorm(32)); got widths {bad}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def code_dim(self) -> int:
        """Width of the codebook vectors (and of quant_conv's output)."""
        return self.codebook_dim if self.codebook_dim is not None else self.embed_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQGANConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VQGANConfig: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**dict(d))

    @classmethod
    def from_taming_yaml(cls, model_cfg: Mapping[str, Any], source: str = "model.yaml") -> "VQGANConfig":
        """Build from taming's `model:` section (`params.ddconfig`, `params.n_embed`, `params.embed_dim`)."""
        try:
            params = model_cfg["params"]
            dd = dict(params["ddconfig"])
            n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{source}: expected model.params.ddconfig, n_embed and embed_dim ({e!r} missing)"
            ) from None
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(dd) - fields)
        if ignored:
            raise ValueError(f"{source}: unknown ddconfig keys {ignored}")
        try:
            return cls(n_embed=n_embed, embed_dim=embed_dim, **dd)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
