"""Editing helpers: pixel -> token masks, inpainting, outpainting, img2img and continuation."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from test_sampling_autoregressive import StandInGPT
from test_sampling_masked import StandInMIM, cosine
from tokenpaint.sampling import continue_image, img2img, inpaint, outpaint, pixel_mask_to_token_mask, random_token_mask

TEXT = torch.tensor([[3, 1, 2, 0], [5, 0, 0, 0]])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_a_token_is_regenerated_if_any_of_its_pixels_is_masked():
    mask = torch.zeros(8, 12, dtype=torch.bool)  # 2x3 tokens of 4x4 pixels
    mask[0, 0] = True  # one pixel of token (0, 0)
    mask[5:7, 9] = True  # token (1, 2)
    expected = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert torch.equal(pixel_mask_to_token_mask(mask, 4), expected)
    # the same mask as a PIL image (white = regenerate) and as a uint8 array
    as_uint8 = mask.numpy().astype(np.uint8) * 255
    assert torch.equal(pixel_mask_to_token_mask(Image.fromarray(as_uint8), 4), expected)
    assert torch.equal(pixel_mask_to_token_mask(as_uint8, 4), expected)
    assert torch.equal(pixel_mask_to_token_mask(mask.float(), 4), expected)


def test_pixel_mask_errors_name_the_sizes():
    with pytest.raises(ValueError, match="multiple of the downsample factor 4"):
        pixel_mask_to_token_mask(torch.zeros(6, 8), 4)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        pixel_mask_to_token_mask(torch.zeros(2, 3, 8, 8), 4)


@pytest.mark.parametrize("model_cls", [StandInMIM, StandInGPT])
def test_inpaint_keeps_known_tokens_and_changes_the_region(model_cls):
    model = model_cls()
    n = model.config.image_size**2
    init = torch.zeros(2, n, dtype=torch.long)
    region = torch.zeros(n, dtype=torch.bool)
    region[n // 2 :] = True
    changed = []
    for seed in range(8):
        out = inpaint(model, TEXT, init, region, generator=gen(seed), temperature=3.0)
        assert torch.equal(out[:, ~region], init[:, ~region])
        changed.append((out[:, region] != 0).float().mean().item())
    # the region is sampled anew: a kept region would change no token. The stand-ins draw id 0 there with
    # probability ~0.5 (GPT) and ~0.15 (masked), so over 8 seeds well over a quarter of the tokens differ
    assert sum(changed) / len(changed) >= 0.25


def test_outpaint_places_known_tokens_and_generates_the_rest():
    model = StandInMIM()  # 4x4 canvas
    known = torch.tensor([[[1, 2], [3, 4]]]).expand(2, -1, -1)
    out = outpaint(model, TEXT, known, top=1, left=2, generator=gen(0), schedule=cosine).reshape(2, 4, 4)
    assert torch.equal(out[:, 1:3, 2:4], known)
    centred = outpaint(model, TEXT, known, generator=gen(0), schedule=cosine).reshape(2, 4, 4)
    assert torch.equal(centred[:, 1:3, 1:3], known)
    with pytest.raises(ValueError, match="outside"):
        outpaint(model, TEXT, known, top=3, left=0, schedule=cosine)
    with pytest.raises(ValueError, match="larger than the model's canvas"):
        outpaint(model, TEXT, torch.zeros(2, 5, 5, dtype=torch.long), schedule=cosine)


@pytest.mark.parametrize("strength", [0.25, 0.6, 1.0])
def test_img2img_masks_a_strength_fraction_and_runs_that_share_of_steps(strength):
    model = StandInMIM()
    init = torch.randint(0, 8, (2, 16), generator=gen(1))
    out = img2img(model, TEXT, init, strength, steps=8, generator=gen(0), schedule=cosine, guidance_scale=1.0)
    assert len(model.inputs) == math.ceil(strength * 8)
    first = model.inputs[0][1]
    regenerated = first == model.mask_token_id
    n_regenerated = round(strength * 16)
    assert regenerated.sum(1).tolist() == [n_regenerated] * 2
    assert torch.equal(out[~regenerated], init[~regenerated])  # the rest is kept exactly
    # roughly a `strength` share of the tokens changes (a resampled token may land on its old value, ~1 in 8 here)
    changed = (out != init).sum(1)
    assert ((changed >= n_regenerated / 2) & (changed <= n_regenerated)).all(), (changed, n_regenerated)


def test_random_token_mask_is_seeded_and_exact():
    a = random_token_mask(3, 20, 0.3, gen(0))
    assert a.sum(1).tolist() == [6, 6, 6]
    assert torch.equal(a, random_token_mask(3, 20, 0.3, gen(0)))
    assert not torch.equal(a, random_token_mask(3, 20, 0.3, gen(1)))
    with pytest.raises(ValueError, match="strength"):
        random_token_mask(1, 20, 0.0, gen(0))


def test_img2img_needs_a_masked_model_and_continue_works_for_both():
    with pytest.raises(ValueError, match="masked"):
        img2img(StandInGPT(), TEXT, torch.zeros(2, 9, dtype=torch.long), 0.5)
    model = StandInMIM()
    init = torch.randint(0, 8, (2, 16), generator=gen(1))
    out = continue_image(model, TEXT, init, keep_rows=2, generator=gen(0), schedule=cosine)
    assert torch.equal(out[:, :8], init[:, :8])
    with pytest.raises(ValueError, match="keep_rows"):
        continue_image(model, TEXT, init, keep_rows=5)
