"""Generators over [text ids ; image ids]: a causal GPT (with a KV cache; it may also caption, over [image ids ; text
ids]) and a bidirectional masked transformer."""
from .config import GeneratorConfig
from .gpt import DIRECTIONS, GPT, GPTConfig, KVCache, caption_targets
from .kinds import CONFIG_CLASSES, GENERATORS, generator_class, load_generator
from .masked import MaskedTransformer, MaskedTransformerConfig
from .presets import (
    PRESETS,
    SAMPLE_DEFAULTS,
    TRAIN_DEFAULTS,
    load_transformer_yaml,
    model_config_from_yaml,
    preset_config,
)
from .schedule import (MASK_SCHEDULES, NULL_TEXT_ID, check_mask_schedule, drop_condition, mask_ratio,
                       masked_training_batch, sample_mask)

__all__ = [
    "GeneratorConfig",
    "GPT",
    "GPTConfig",
    "KVCache",
    "DIRECTIONS",
    "caption_targets",
    "MaskedTransformer",
    "MaskedTransformerConfig",
    "load_generator",
    "GENERATORS",
    "CONFIG_CLASSES",
    "generator_class",
    "PRESETS",
    "SAMPLE_DEFAULTS",
    "TRAIN_DEFAULTS",
    "load_transformer_yaml",
    "model_config_from_yaml",
    "preset_config",
    "MASK_SCHEDULES",
    "check_mask_schedule",
    "NULL_TEXT_ID",
    "drop_condition",
    "mask_ratio",
    "masked_training_batch",
    "sample_mask",
]
