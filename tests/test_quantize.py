"""int8 weights: the int8 layers against their float originals, both generator kinds, the Pipeline and the CLI."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tiny_generators import CODES, SIDE, random_batch, tiny_gpt, tiny_mim
from tokenpaint.sampling import sample_autoregressive, sample_masked
from tokenpaint.transformer.quantize import (
    WEIGHT_ONLY_MAX_ROWS,
    Int8Embedding,
    Int8Linear,
    check_int8_shape,
    is_quantized,
    quantize_int8,
    quantize_rows,
    weight_bytes,
)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rows_round_trip_and_scale():
    w = torch.randn(7, 33)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest entry maps to +-127
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # within half a step


@pytest.mark.parametrize("shape", [(32, 48), (96, 288), (100, 30), (7, 5)])  # odd sizes: dynamic kernel only
@pytest.mark.parametrize("rows", [1, WEIGHT_ONLY_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS + 24])
def test_int8_linear_matches_float(shape, rows):
    torch.manual_seed(0)
    linear = nn.Linear(*shape)
    x = torch.randn(2, rows, shape[0])
    layer = Int8Linear(linear)
    y = layer(x)
    assert y.shape == (2, rows, shape[1]) and y.dtype == torch.float32
    assert rel_err(y, linear(x)) < 0.02
    x2 = x.reshape(-1, shape[0])
    bias = linear.bias.detach()
    kernels = [layer._dynamic_int8] + ([layer._weight_only] if layer.weight_only_ok else [])
    for kernel in kernels:  # each kernel on its own, whichever this CPU picks
        assert rel_err(kernel(x2) + bias, linear(x2)) < 0.02


def test_kernel_choice_per_device_and_bf16_activations(monkeypatch):
    """The CUDA rules without a GPU: which kernel a row count takes, the size check, bf16 activations in and out."""
    from tokenpaint.transformer import quantize

    assert quantize.weight_only_max_rows(torch.device("cpu")) == 0
    assert quantize.weight_only_max_rows(torch.device("cuda", 0)) == WEIGHT_ONLY_MAX_ROWS
    check_int8_shape("blocks.0.mlp.c_fc", nn.Linear(96, 384), torch.device("cuda"))
    check_int8_shape("odd", nn.Linear(100, 30), torch.device("cpu"))  # any size on CPU
    with pytest.raises(ValueError, match=r"odd is 100 -> 30.*in_features % 16"):
        check_int8_shape("odd", nn.Linear(100, 30), torch.device("cuda"))

    monkeypatch.setattr(quantize, "weight_only_max_rows", lambda device: WEIGHT_ONLY_MAX_ROWS)  # CUDA's rule here
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer, calls = Int8Linear(linear), []
    for kernel in ("_weight_only", "_dynamic_int8"):
        original = getattr(layer, kernel)
        monkeypatch.setattr(layer, kernel, lambda x, k=kernel, f=original: calls.append(k) or f(x))
    for rows, kernel in ((1, "_weight_only"), (WEIGHT_ONLY_MAX_ROWS, "_weight_only"),
                         (WEIGHT_ONLY_MAX_ROWS + 1, "_dynamic_int8")):
        for dtype in (torch.float32, torch.bfloat16):  # a float32 model, and a bf16 one quantized after its cast
            x = torch.randn(rows, 64).to(dtype)
            y = layer(x)
            assert calls[-1] == kernel and y.dtype == dtype and y.shape == (rows, 40)
            assert rel_err(y, linear(x.float())) < 0.03


def test_int8_embedding_matches_float():
    emb = nn.Embedding(300, 16)
    ids = torch.randint(0, 300, (3, 5))
    out = Int8Embedding(emb)(ids)
    assert out.shape == (3, 5, 16) and rel_err(out, emb(ids)) < 0.01


def test_quantize_replaces_linears_and_token_tables_not_small_position_tables():
    model = quantize_int8(tiny_gpt(codebook_size=300))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.embed.image_tok, Int8Embedding)  # 300 rows
    assert isinstance(model.embed.text_pos, nn.Embedding)  # read through .weight; a few rows
    assert is_quantized(model) and model.dtype == torch.float32


def test_weight_memory_about_four_times_lower():
    model = tiny_gpt(n_embd=128, n_layer=2, codebook_size=512, text_vocab_size=512)
    before = weight_bytes(model)
    after = weight_bytes(quantize_int8(model))
    assert 3.5 < before / after < 4.0


@pytest.mark.parametrize("build", [tiny_gpt, tiny_mim])
def test_quantized_logits_close_and_argmax_agrees(build):
    model = build(n_embd=64)
    with torch.no_grad():
        model.head.weight.mul_(30)  # spread the logits as a trained model does
    text, image = random_batch(batch=4)
    if build is tiny_mim:
        image = image.masked_fill(torch.rand(image.shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                                  model.mask_token_id)
    ref, _ = model(text, image)
    out, _ = quantize_int8(model)(text, image)
    assert rel_err(out, ref) < 0.03
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_quantized_gpt_cached_steps_match_its_full_forward():
    model = quantize_int8(tiny_gpt(n_embd=64))
    text, image = random_batch(batch=2)
    full, _ = model(text, image)
    logits, cache = model.prefill(text)
    steps = [logits]
    for pos in range(SIDE * SIDE - 1):
        logits, cache = model.decode_step(image[:, pos], pos, cache)
        steps.append(logits)
    # the full pass has many rows, a step few (on CUDA the steps take the weight-only kernel)
    assert rel_err(torch.stack(steps, dim=1), full) < 0.03


def test_quantized_samplers_run_and_are_deterministic():
    text, _ = random_batch(batch=2)
    gpt, mim = quantize_int8(tiny_gpt()), quantize_int8(tiny_mim())
    for sampler, model in ((sample_autoregressive, gpt), (sample_masked, mim)):
        a = sampler(model, text, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        b = sampler(model, text, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.shape == (2, SIDE * SIDE) and 0 <= a.min() and a.max() < CODES


def test_quantized_model_refuses_save_and_bad_dtype(tmp_path):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="int8"):
        model.quantize("int4")
    model.quantize("int8")
    with pytest.raises(ValueError, match="int8 weights"):
        model.save_pretrained(tmp_path / "q")


def test_pipeline_int8(tmp_path):
    from test_pipeline import CAPTIONS, build_run, tiny_vqgan
    from tokenpaint import Pipeline
    from tokenpaint.data import TextTokenizer

    tokenizer = TextTokenizer.train(CAPTIONS, tmp_path / "spm" / "tok", vocab_size=400)
    run = build_run(tmp_path, "gpt", tokenizer, tiny_vqgan())
    pipe = Pipeline.from_pretrained(run, dtype="int8")
    assert is_quantized(pipe.model)
    images = pipe(["a red circle"], num_images=2, seed=0)
    assert len(images) == 2
    float_pipe = Pipeline.from_pretrained(run).quantize("int8")
    assert torch.equal(float_pipe.generate_ids(["a red circle"], seed=0), pipe.generate_ids(["a red circle"], seed=0))
    with pytest.raises(ValueError, match="dtype must be one of"):
        Pipeline.from_pretrained(run, dtype="int4")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate  # the script at the repository root

    out = tmp_path / "cli"
    assert generate.main(["--model", str(run), "--prompt", "a red circle", "--dtype", "int8", "--out-dir", str(out),
                          "--threads", "1"]) == 0
    assert (out / "0_0.png").is_file()
    with pytest.raises(ValueError, match="int8 weights"):
        pipe.load_lora(tmp_path)  # adapters go on the float weights, before quantizing
