"""VQGAN: images <-> grids of codebook ids, with taming-transformers' VQModel state-dict keys."""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VQGANConfig
from .modules import Decoder, Encoder
from .quantize import QuantizeOutput, VectorQuantizer, nearest_code_ids

logger = logging.getLogger(__name__)


def _cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native kernels for dtype here (AVX512-BF16 / AMX / AVX512-FP16); best effort."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: don't cry wolf


class VQGAN(nn.Module):
    """encoder -> quant_conv -> quantize (nearest code) -> post_quant_conv -> decoder.

    `model.quantize(z)` returns a QuantizeOutput (the quantizer module's forward); images are float [B,3,H,W] in
    [-1,1], ids long [B,H/f,W/f]. Call prepare_for_inference() once before heavy inference.
    """

    def __init__(self, config: Optional[VQGANConfig] = None):
        super().__init__()
        self.config = config = config if config is not None else VQGANConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.code_dim, config.beta, config.quantizer)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, kernel_size=1)

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _param(self) -> torch.Tensor:
        # a 3x3 kernel: unlike a 1x1 one, its strides tell channels_last from contiguous
        return self.encoder.conv_in.weight

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"images must have shape [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[2:])}")
        p = self._param()
        # Match the model's dtype/layout once here, so callers can hand in plain float32 NCHW batches.
        return x.to(device=p.device, dtype=p.dtype, memory_format=self._memory_format())

    def _memory_format(self) -> torch.memory_format:
        w = self._param()
        cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format

    # -- the pieces --------------------------------------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> z [B, code_dim, H/f, W/f] (after quant_conv, before quantization)."""
        return self.quant_conv(self.encoder(self._check_images(x)))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, code_dim, h, w] -> x_hat [B, out_ch, h*f, w*f] (raw decoder output, not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def codebook_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B, h, w] -> z_q [B, code_dim, h, w] (l2-normalised codes for the "l2" quantizer)."""
        return self.quantize.lookup(ids.to(self._param().device))

    # -- the API -----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [-1, 1] -> long ids [B, H/f, W/f]."""
        z = self.encode_latents(x)
        b, _, h, w = z.shape
        z_flat = rearrange(z, "b d h w -> (b h w) d")
        if self.config.quantizer == "l2":
            z_flat = F.normalize(z_flat, dim=1)
        ids = nearest_code_ids(z_flat, self.quantize.codebook())  # [B*h*w]
        return ids.view(b, h, w)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B, h, w] -> float [B, out_ch, h*f, w*f], not clamped."""
        return self.decode_latents(self.codebook_lookup(ids))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, QuantizeOutput]:
        q = self.quantize(self.encode_latents(x))
        return self.decode_latents(q.z_q), q

    # -- inference & persistence -------------------------------------------------------------------------------
    def prepare_for_inference(self, dtype: Optional[torch.dtype] = None, channels_last: bool = True) -> "VQGAN":
        """eval(), no grads, and a one-time cast (e.g. torch.bfloat16); autocast would re-cast on every call."""
        self.eval().requires_grad_(False)
        if dtype is not None:
            on_cpu = self._param().device.type == "cpu"
            if dtype in (torch.bfloat16, torch.float16) and on_cpu and not _cpu_has_fast(dtype):
                logger.warning(
                    "prepare_for_inference(%s): this CPU has no native %s kernels (capability %s); "
                    "expect it to run slower than float32", dtype, dtype, torch.backends.cpu.get_cpu_capability()
                )
            self.to(dtype=dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], allow_unsafe_pickle: bool = False, map_location: str = "cpu"
    ) -> "VQGAN":
        """A directory written by save_pretrained, a diffusers VQModel directory (aMUSEd's VQ too), a taming-transformers
        Lightning .ckpt or a LlamaGen tokenizer .pt (see io.load_vqgan)."""
        from .io import load_vqgan

        return load_vqgan(path, allow_unsafe_pickle=allow_unsafe_pickle, map_location=map_location)

    def save_pretrained(self, directory: Union[str, os.PathLike], format: str = "tokenpaint") -> None:
        """config.json + model.safetensors; format="diffusers" writes a directory diffusers' VQModel loads
        (config.json + diffusion_pytorch_model.safetensors; not for the "l2" quantizer, which it lacks)."""
        from .io import save_vqgan

        save_vqgan(self, directory, format=format)
