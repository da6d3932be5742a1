"""The masked transformer: [MASK] id, bidirectional attention, loss on masked positions with label smoothing, learning."""
import pytest
import torch
import torch.nn.functional as F

from tiny_generators import CODES, SIDE, random_batch, tiny_mim


def test_mask_token_is_one_past_the_codebook_and_the_head_predicts_codes_only():
    model = tiny_mim()
    assert model.mask_token_id == CODES == model.config.mask_token_id
    assert model.embed.image_tok.num_embeddings == CODES + 1
    text, image = random_batch()
    all_masked = torch.full_like(image, model.mask_token_id)
    logits, loss = model(text, all_masked)
    assert logits.shape == (3, SIDE * SIDE, CODES) and loss is None


def test_attention_is_bidirectional():
    model = tiny_mim()
    text, image = random_batch()
    changed = image.clone()
    changed[:, -1] = (changed[:, -1] + 1) % CODES
    a, _ = model(text, image)
    b, _ = model(text, changed)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the last token moves the first position's logits


def test_loss_counts_masked_positions_only_with_label_smoothing():
    model = tiny_mim(label_smoothing=0.1)
    text, image = random_batch()
    g = torch.Generator().manual_seed(3)
    inputs, targets = model.masked_training_batch(image, g)
    masked = inputs == model.mask_token_id
    assert masked.any(dim=1).all() and (~masked).any()
    assert torch.equal(targets[masked], image[masked]) and (targets[~masked] == -100).all()

    logits, loss = model(text, inputs, targets)
    # manual label-smoothed CE over the masked positions only
    logp = F.log_softmax(logits[masked].float(), dim=-1)  # [M, V]
    nll = -logp.gather(1, image[masked][:, None]).squeeze(1)
    smooth = -logp.mean(dim=-1)
    manual = (0.9 * nll + 0.1 * smooth).mean()
    torch.testing.assert_close(loss, manual)
    without_smoothing = F.cross_entropy(logits[masked], image[masked])
    assert not torch.allclose(loss, without_smoothing)

    # what sits at the unmasked positions of the targets does not count as long as it is -100,
    # and a position counts exactly when its target is not -100
    one_more = targets.clone()
    pos = (~masked).nonzero()[0]
    one_more[pos[0], pos[1]] = image[pos[0], pos[1]]
    _, loss_more = model(text, inputs, one_more)
    assert not torch.allclose(loss_more, loss)


def test_all_ignored_targets_are_an_error():
    model = tiny_mim()
    text, image = random_batch()
    with pytest.raises(ValueError, match="all -100"):
        model(text, image, torch.full_like(image, -100))


def test_image_ids_must_be_full_length_and_in_range():
    model = tiny_mim()
    text, image = random_batch()
    with pytest.raises(ValueError, match=r"image_ids must be \[B, N=16\]"):
        model(text, image[:, :5])
    with pytest.raises(ValueError, match=r"image_ids must be in \[0, 25\)"):
        model(text, image + CODES + 1)
    with pytest.raises(ValueError, match="targets must be in"):
        model(text, image, image + CODES)


def test_tiny_masked_model_overfits_four_samples():
    model = tiny_mim(seed=0, n_embd=48, label_smoothing=0.0).train()
    text, image = random_batch(batch=4, seed=2)
    opt = model.configure_optimizers(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(150):
        inputs, targets = model.masked_training_batch(image, g)
        _, loss = model(text, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    # evaluate on a fixed, heavily masked batch: the model must reconstruct the images from the captions
    model.eval()
    inputs, targets = model.masked_training_batch(image, torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits, loss = model(text, inputs, targets)
    assert loss.item() < 0.1 * first, (first, loss.item())
    masked = inputs == model.mask_token_id
    assert (logits.argmax(-1)[masked] == image[masked]).float().mean() > 0.95
