"""SampleOptions (one table of defaults, one set of checks) and the one sampler dispatch, `sampling.sample`."""
import inspect

import pytest
import torch

from tiny_generators import random_batch, tiny_gpt, tiny_mim
from tokenpaint.sampling import (CAPTION_OPTIONS, SAMPLE_DEFAULTS, SAMPLERS, OptionError, SampleOptions, check_option,
                                 sample, sample_autoregressive, sample_caption, sample_masked)
from tokenpaint.transformer import GENERATORS


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_defaults_come_from_the_one_table():
    assert SampleOptions().to_dict() == SAMPLE_DEFAULTS  # every option has a default there, and nothing else is
    for sampler in (sample_autoregressive, sample_masked):  # the free samplers' keyword defaults agree
        for name, parameter in inspect.signature(sampler).parameters.items():
            if name in SAMPLE_DEFAULTS:
                assert parameter.default == SAMPLE_DEFAULTS[name], (sampler.__name__, name)
    caption = inspect.signature(sample_caption).parameters  # and the caption decoder's, of the caption_* options
    assert {name: caption[name].default for name in CAPTION_OPTIONS} == \
        {name: SAMPLE_DEFAULTS["caption_" + name] for name in CAPTION_OPTIONS}
    assert SAMPLE_DEFAULTS["caption_temperature"] == 0  # captions are greedy unless a run says otherwise
    assert set(SAMPLERS) == set(GENERATORS)  # a sampler for every generator kind


@pytest.mark.parametrize("name, value", [
    ("steps", 0), ("steps", 2.5), ("steps", True), ("guidance_scale", -1), ("guidance_scale", "3"), ("top_k", 0),
    ("top_p", -0.1), ("top_p", 1.5), ("temperature", 0), ("choice_temperature", -0.1), ("schedule", "cubic"),
    ("guidance_schedule", "cubic"), ("use_kv_cache", 1), ("caption_temperature", -0.5), ("caption_top_k", 0),
    ("caption_top_p", 2.0), ("caption_max_length", 0),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(OptionError, match=rf"^{name} must be .*got {value!r}") as info:
        SampleOptions(**{name: value})
    assert info.value.name == name
    with pytest.raises(OptionError):
        SampleOptions().replace(**{name: value})  # variants are checked too


def test_replace_from_dict_and_request_options():
    options = SampleOptions().replace(steps=4, top_k=None)
    assert options.steps == 4 and options.top_k is None and options.temperature == SAMPLE_DEFAULTS["temperature"]
    assert SampleOptions.from_dict({"steps": 4, "top_k": None}) == options
    with pytest.raises(OptionError, match=r"cfg.yaml: unknown sample options \['step'\]"):
        SampleOptions.from_dict({"step": 4}, source="cfg.yaml")
    with pytest.raises(OptionError, match="unknown sample options"):
        options.replace(stepz=3)
    assert SampleOptions(schedule=lambda r: 1 - r).kwargs_for(sample_masked)["schedule"](0.25) == 0.75
    check_option("strength", 0.5)
    for name, value in (("strength", 0.0), ("num_images", 0), ("batch_size", 1.5), ("seed", "1")):
        with pytest.raises(OptionError, match=f"^{name} must be"):
            check_option(name, value)


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_sample_dispatches_on_the_kind_with_the_options_the_sampler_takes(kind):
    model = tiny_gpt() if kind == "gpt" else tiny_mim()
    text, _ = random_batch(2)
    options = SampleOptions(steps=3, guidance_scale=2.0, top_k=5, top_p=0.9, temperature=1.3)
    got = sample(model, text, options, generator=gen(0))
    if kind == "gpt":
        expected = sample_autoregressive(model, text, guidance_scale=2.0, top_k=5, top_p=0.9, temperature=1.3,
                                         generator=gen(0))
    else:
        expected = sample_masked(model, text, steps=3, guidance_scale=2.0, top_k=5, temperature=1.3, generator=gen(0))
    assert got.shape == (2, 16) and torch.equal(got, expected)
    assert torch.equal(sample(model, text, generator=gen(1)), sample(model, text, SampleOptions(), generator=gen(1)))


def test_sample_checks_its_inputs():
    text, image = random_batch(2)
    with pytest.raises(ValueError, match="prefix_ids: the 'mim' sampler takes no prefix"):
        sample(tiny_mim(), text, prefix_ids=image[:, :4])
    with pytest.raises(TypeError, match="options must be a SampleOptions"):
        sample(tiny_gpt(), text, {"steps": 3})
    for model in (tiny_gpt(), tiny_mim()):  # one validator of editing inputs for both samplers
        with pytest.raises(ValueError, match=r"known tokens must be image ids in \[0, 24\)"):
            sample(model, text, init_ids=torch.full((2, 16), 24), known_mask=torch.ones(16, dtype=torch.bool))
        with pytest.raises(ValueError, match="must be given together"):
            sample(model, text, init_ids=image)
