"""The one sampler dispatch: `sample(model, text_ids, options)` picks the sampler of `model.config.kind` and passes
it the SampleOptions fields its signature names. The Pipeline, editing, training-time samples and the server call it.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .autoregressive import sample_autoregressive
from .filters import Generators, StepCallback
from .masked import sample_masked
from .options import SampleOptions

# kind (model.config.kind, see tokenpaint.transformer.GENERATORS) -> its sampler
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"gpt": sample_autoregressive, "mim": sample_masked}


def sampler_for(model) -> Callable[..., torch.Tensor]:
    kind = model.config.kind
    if kind not in SAMPLERS:
        raise ValueError(f"no sampler for generator kind {kind!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[kind]


def sample(
    model,
    text_ids: torch.Tensor,
    options: Optional[SampleOptions] = None,
    *,
    negative_text_ids: Optional[torch.Tensor] = None,
    generator: Generators = None,
    init_ids: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    prefix_ids: Optional[torch.Tensor] = None,
    progress: bool = False,
    on_step: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Image ids long [B, N] for text_ids [B, T] with the sampler of the model's kind.

    options: SampleOptions (default: SAMPLE_DEFAULTS). negative_text_ids [T], [1, T] or [B, T]: replaces the empty
    prompt of guidance. generator: one torch.Generator for the batch or one per row. init_ids [B, N] + known_mask
    (bool [N] or [B, N]): keep the known tokens, generate the rest. prefix_ids [B, P] (gpt): continue from the first
    P tokens. on_step(done, total): called after each decoding step (masked steps; GPT tokens or Jacobi passes).
    """
    options = SampleOptions() if options is None else options
    if not isinstance(options, SampleOptions):
        raise TypeError(f"options must be a SampleOptions, got {type(options).__name__}")
    sampler = sampler_for(model)
    inputs = dict(negative_text_ids=negative_text_ids, generator=generator, init_ids=init_ids, known_mask=known_mask,
                  progress=progress, on_step=on_step)
    if prefix_ids is not None:
        if "prefix_ids" not in inspect.signature(sampler).parameters:
            raise ValueError(f"prefix_ids: the {model.config.kind!r} sampler takes no prefix; pass init_ids and "
                             f"known_mask instead")
        inputs["prefix_ids"] = prefix_ids
    return sampler(model, text_ids, **options.kwargs_for(sampler), **inputs)


__all__ = ["sample", "sampler_for", "SAMPLERS"]
