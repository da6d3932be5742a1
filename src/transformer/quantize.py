"""int8 weights for inference: per-output-channel symmetric int8 for the Linear layers and the token embeddings.

`quantize_int8(model)` replaces, in place, every `nn.Linear` by an `Int8Linear` and every `nn.Embedding` of at least
`min_embedding_rows` rows (the text and image token tables; the small position tables stay float) by an
`Int8Embedding`. Weights are stored as int8 with one float scale per output channel (per row of an embedding):
4x less weight memory, and the cached one-token decode step, which reads every weight once, reads 4x fewer bytes.

The matmuls are torch's own int8 kernels; neither converts the weight matrix to float at run time:
- dynamic int8 activations (one scale per row) and `torch._int_mm` (int8 x int8 -> int32, oneDNN on CPU, cuBLAS on
  CUDA), rescaled by the row and channel scales. Used on CPU at every row count: it beat the weight-only kernel from
  one row up, with VNNI and with oneDNN capped to AVX2 alike, and by 2-5x at the 288+ rows of masked decoding.
- weight-only: `torch.ops.aten._weight_int8pack_mm` with bfloat16 activations, for up to 16 rows on CUDA (decode
  steps, Jacobi windows), where `torch._int_mm` needs more than 16 rows. (On CPU its vectorised path takes bf16/fp16
  activations only; with float32 ones it is a scalar loop, slower than float32.)
docs/PERFORMANCE.md has the measurements (benchmarks/int8_speed.py, section "kernels").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_ONLY_MAX_ROWS = 16  # CUDA: torch._int_mm needs more rows than this
QUANT_DTYPES = ("int8",)


def weight_only_max_rows(device: torch.device) -> int:
    """Up to how many rows the weight-only kernel is used on `device` (above: dynamic int8 activations)."""
    return 0 if device.type == "cpu" else WEIGHT_ONLY_MAX_ROWS


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [R, C] float -> (int8 [R, C], float32 scale [R]); weight ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights [out, in] and per-output-channel float32 scales (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_int8", q)  # [out, in]
        self.register_buffer("scale", scale)  # [out] float32
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)  # for the weight-only kernel
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        # _weight_int8pack_mm reads garbage past the row when in_features is not a multiple of 16 (measured on CPU)
        self.weight_only_ok = self.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, out_dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        rows = x2.shape[0]
        if self.weight_only_ok and rows <= weight_only_max_rows(x2.device):
            y = self._weight_only(x2)
        else:
            y = self._dynamic_int8(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def _weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        act = x2 if x2.dtype in (torch.bfloat16, torch.float16) else x2.to(torch.bfloat16)
        scale = self.scale_bf16 if act.dtype == torch.bfloat16 else self.scale.to(act.dtype)
        return torch.ops.aten._weight_int8pack_mm(act.contiguous(), self.weight_int8, scale).float()  # [M, out]

    def _dynamic_int8(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.float()
        row_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [M, 1]
        xq = torch.round(x2 / row_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight_int8.t())  # [M, out] int32; the transposed view is column-major
        return acc.float() * row_scale * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one float32 scale per row (inference only)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight_int8", q)  # [V, C]
        self.register_buffer("scale", scale)  # [V]
        self.out_dtype = embedding.weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).float()  # [..., C], only the looked-up rows are converted
        return (rows * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def check_int8_shape(name: str, linear: nn.Linear, device: torch.device) -> None:
    """ValueError naming the layer when its sizes do not fit the int8 kernels on `device` (CUDA only: the CPU
    kernels take any size)."""
    if device.type == "cuda" and (linear.in_features % 16 or linear.out_features % 8):
        raise ValueError(f"int8 on CUDA: {name} is {linear.in_features} -> {linear.out_features}; the int8 kernels "
                         f"need in_features % 16 == 0 and out_features % 8 == 0")


def quantize_int8(model: nn.Module, min_embedding_rows: int = 256) -> nn.Module:
    """Replace the Linear layers and the large embeddings of `model` by int8 versions, in place; returns the model.

    Inference only (the int8 modules hold buffers, not parameters). Call after any dtype cast: the activations keep
    the model's float dtype. On CUDA every Linear needs in_features % 16 == 0 and out_features % 8 == 0 (the
    kernels' tile sizes); on CPU any size works (odd sizes take the dynamic-activation kernel).
    """
    model.eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                check_int8_shape(f"{name + '.' if name else ''}{child_name}", child, child.weight.device)
                setattr(module, child_name, Int8Linear(child))
            elif isinstance(child, nn.Embedding) and child.num_embeddings >= min_embedding_rows:
                setattr(module, child_name, Int8Embedding(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (the weights a forward pass reads)."""
    state = model.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


__all__ = ["quantize_int8", "check_int8_shape", "Int8Linear", "Int8Embedding", "quantize_rows", "is_quantized",
           "weight_bytes", "QUANT_DTYPES", "WEIGHT_ONLY_MAX_ROWS", "weight_only_max_rows"]
