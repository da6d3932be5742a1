"""VQGAN image tokenizer: 256x256 images <-> 16x16 grids of codebook ids (taming-transformers compatible)."""
from .config import VQGANConfig
from .io import CheckpointError, UnsafeCheckpointError, infer_config
from .model import VQGAN
from .quantize import QuantizeOutput, VectorQuantizer

__all__ = [
    "VQGAN",
    "VQGANConfig",
    "QuantizeOutput",
    "VectorQuantizer",
    "CheckpointError",
    "UnsafeCheckpointError",
    "infer_config",
]
