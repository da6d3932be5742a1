"""Data: streaming EasyNLP-style TSVs, the caption tokenizer, the VQGAN token cache and the built-in demo dataset."""

from .cache import TokenCache, build_token_cache
from .demo import (DEMO_PROMPTS, DEMO_VOCAB_SIZE, SceneAttributes, caption, describe_scene, draw_scene,
                   make_demo_dataset, measure_scene, parse_caption, random_attributes)
from .text import NULL_TEXT_ID, TextTokenizer
from .tsv import (BadRowError, TSVImageText, encode_png_base64, iter_rows, pil_to_tensor, read_images, read_prompts,
                  resize_center_crop, tensor_to_pil, write_output_tsv, write_text_tsv)

__all__ = [
    "BadRowError", "TSVImageText", "iter_rows", "read_prompts", "read_images", "write_output_tsv", "write_text_tsv", "encode_png_base64",
    "pil_to_tensor", "tensor_to_pil", "resize_center_crop",
    "TextTokenizer", "NULL_TEXT_ID",
    "TokenCache", "build_token_cache",
    "make_demo_dataset", "DEMO_PROMPTS", "DEMO_VOCAB_SIZE", "SceneAttributes", "draw_scene", "caption",
    "describe_scene", "parse_caption", "measure_scene", "random_attributes",
]
