"""The causal GPT: causality, conditioning on text, KV-cache parity with the full pass, learning, input errors."""
import pytest
import torch

from tokenpaint.transformer import KVCache

from tiny_generators import CODES, SIDE, TEXT_LEN, TEXT_VOCAB, random_batch, tiny_gpt


def test_forward_shapes_and_loss_is_cross_entropy_over_all_image_tokens():
    model = tiny_gpt()
    text, image = random_batch()
    logits, loss = model(text, image, targets=image)
    assert logits.shape == (3, SIDE * SIDE, CODES)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, CODES), image.reshape(-1))
    torch.testing.assert_close(loss, manual)
    assert model(text, image)[1] is None


def test_changing_a_later_image_token_never_changes_earlier_logits():
    model = tiny_gpt()
    text, image = random_batch()
    logits, _ = model(text, image)
    for i in (0, 5, SIDE * SIDE - 1):
        changed = image.clone()
        changed[:, i] = (changed[:, i] + 1) % CODES
        logits2, _ = model(text, changed)
        # logits[:, j] predicts token j from tokens < j: positions <= i must not move, position i+1 must
        torch.testing.assert_close(logits2[:, : i + 1], logits[:, : i + 1], atol=0, rtol=0)
        if i + 1 < SIDE * SIDE:
            assert not torch.allclose(logits2[:, i + 1], logits[:, i + 1])


def test_text_tokens_condition_every_image_position():
    model = tiny_gpt()
    text, image = random_batch()
    changed = text.clone()
    changed[:, 0] = (changed[:, 0] + 1) % TEXT_VOCAB
    a, _ = model(text, image)
    b, _ = model(changed, image)
    assert (a - b).abs().amax(dim=-1).min() > 0  # every row and position moved


@pytest.mark.parametrize("prefix_len", [0, 1, 7])
def test_kv_cache_steps_equal_the_full_forward_pass(prefix_len):
    model = tiny_gpt()
    text, image = random_batch()
    full, _ = model(text, image)  # [B,N,V]
    with torch.inference_mode():
        prefix = image[:, :prefix_len] if prefix_len else None
        logits, cache = model.prefill(text, image_prefix=prefix)
        steps = [logits]
        for pos in range(prefix_len, SIDE * SIDE - 1):
            logits, cache = model.decode_step(image[:, pos], pos, cache)
            steps.append(logits)
    stepwise = torch.stack(steps, dim=1)  # [B, N-P, V]
    torch.testing.assert_close(stepwise, full[:, prefix_len:], atol=1e-5, rtol=1e-5)
    assert cache.index == TEXT_LEN + SIDE * SIDE - 1 == cache.max_len


def test_prefill_without_cache_reuse_matches_forward_for_any_prefix():
    # The uncached path: re-prefill each step (what a no-KV-cache sampler may do).
    model = tiny_gpt()
    text, image = random_batch()
    full, _ = model(text, image)
    for p in (0, 3, SIDE * SIDE - 1):
        logits, _ = model.prefill(text, image_prefix=image[:, :p] if p else None)
        torch.testing.assert_close(logits, full[:, p], atol=1e-5, rtol=1e-5)


def test_cache_is_preallocated_and_written_in_place():
    model = tiny_gpt()
    text, image = random_batch()
    _, cache = model.prefill(text)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (2, 3, 2, TEXT_LEN + SIDE * SIDE - 1, 16)
    storage = cache.k.data_ptr()
    _, cache2 = model.decode_step(image[:, 0], 0, cache)
    assert cache2 is cache and cache.k.data_ptr() == storage and cache.index == TEXT_LEN + 1


def test_decode_step_errors_name_the_argument():
    model = tiny_gpt()
    text, image = random_batch()
    _, cache = model.prefill(text, image_prefix=image[:, :2])
    with pytest.raises(ValueError, match="pass pos=2"):
        model.decode_step(image[:, 0], 0, cache)
    with pytest.raises(ValueError, match=r"token must be \[B=3\]"):
        model.decode_step(image[:2, 2], 2, cache)
    _, small = model.prefill(text, max_len=TEXT_LEN + 1)
    model.decode_step(image[:, 0], 0, small)
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(image[:, 1], 1, small)
    with pytest.raises(ValueError, match="image_prefix"):
        model.prefill(text, image_prefix=image)  # N tokens leave nothing to predict
    with pytest.raises(ValueError, match="max_len"):
        model.prefill(text, max_len=TEXT_LEN - 1)


def test_bad_inputs_give_clear_errors():
    model = tiny_gpt()
    text, image = random_batch()
    with pytest.raises(ValueError, match=r"text_ids must be \[B, text_len=6\]"):
        model(text[:, :3], image)
    with pytest.raises(ValueError, match=r"image_ids must be in \[0, 24\)"):
        model(text, image + CODES)
    with pytest.raises(ValueError, match=r"text_ids must be in \[0, 40\)"):
        model(text + TEXT_VOCAB, image)
    with pytest.raises(ValueError, match="targets must have shape"):
        model(text, image, targets=image[:, :4])


def test_bf16_inference_casts_once_and_decodes():
    model = tiny_gpt().prepare_for_inference(torch.bfloat16)
    assert not model.training and all(p.dtype == torch.bfloat16 for p in model.parameters())
    text, image = random_batch()
    logits, cache = model.prefill(text)
    assert cache.k.dtype == torch.bfloat16 and logits.dtype == torch.float32
    logits, _ = model.decode_step(image[:, 0], 0, cache)
    assert torch.isfinite(logits).all()


def test_tiny_gpt_overfits_four_samples():
    model = tiny_gpt(seed=0, n_embd=48).train()
    text, image = random_batch(batch=4, seed=2)
    opt = model.configure_optimizers(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(80):
        _, loss = model(text, image, targets=image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
