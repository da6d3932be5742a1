"""Tiny generator configs and random batches shared by the GPT and masked-transformer tests."""
import torch

from tokenpaint.transformer import GPT, GPTConfig, MaskedTransformer, MaskedTransformerConfig

TEXT_VOCAB, TEXT_LEN, CODES, SIDE = 40, 6, 24, 4  # N = 16 image tokens


def _tiny(model_class, config_class, seed, overrides):
    torch.manual_seed(seed)
    cfg = dict(text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN, codebook_size=CODES, image_size=SIDE,
               n_layer=2, n_head=2, n_embd=32)
    return model_class(config_class(**{**cfg, **overrides})).eval()


def tiny_gpt(seed=0, **overrides) -> GPT:
    return _tiny(GPT, GPTConfig, seed, overrides)


def tiny_mim(seed=0, **overrides) -> MaskedTransformer:
    return _tiny(MaskedTransformer, MaskedTransformerConfig, seed, overrides)


def random_batch(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TEXT_VOCAB, (batch, TEXT_LEN), generator=g)
    image = torch.randint(0, CODES, (batch, SIDE * SIDE), generator=g)
    return text, image
