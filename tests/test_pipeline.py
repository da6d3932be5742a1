"""Pipeline end to end on tiny random run directories (GPT and masked transformer)."""

import functools
import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tokenpaint import Pipeline
from tokenpaint.sampling import SAMPLE_DEFAULTS, SampleOptions
from tokenpaint.data import TextTokenizer
from tokenpaint.transformer import GPT, GPTConfig, MaskedTransformer, MaskedTransformerConfig
from tokenpaint.vqgan import VQGAN, VQGANConfig

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a {c} {s} on a white background" for c in COLORS for s in SHAPES] + ["一只红色的猫", "蓝色的天空"]
RESOLUTION = 16  # 4x4 tokens with a f4 VQGAN


def tiny_vqgan():
    torch.manual_seed(0)
    config = VQGANConfig(embed_dim=8, n_embed=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                         z_channels=8, resolution=RESOLUTION)
    return VQGAN(config)


def build_run(root, kind, tokenizer, vqgan, sample=None):
    """A run directory as train.py writes it: generator + tokenizer.model + vqgan/ + train_config.yaml."""
    run = root / kind
    config_cls, model_cls = (GPTConfig, GPT) if kind == "gpt" else (MaskedTransformerConfig, MaskedTransformer)
    config = config_cls(text_vocab_size=tokenizer.vocab_size, text_len=8, codebook_size=32, image_size=4,
                        n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(1)
    model = model_cls(config)
    with torch.no_grad():  # at init (std 0.02) the logits are near uniform and ignore the text: sharpen them
        model.embed.text_tok.weight.mul_(50)
        model.head.weight.mul_(20)
    model.save_pretrained(run)
    tokenizer.save(run)
    vqgan.save_pretrained(run / "vqgan")
    if sample is not None:
        (run / "train_config.yaml").write_text(yaml.safe_dump({"sample": sample}), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tokenizer = TextTokenizer.train(CAPTIONS, root / "spm" / "tok", vocab_size=400)  # words become single pieces
    vqgan = tiny_vqgan()
    return {
        "gpt": build_run(root, "gpt", tokenizer, vqgan, sample={"guidance_scale": 2.0, "top_k": 16}),
        "mim": build_run(root, "mim", tokenizer, vqgan, sample={"steps": 4, "guidance_scale": 2.0, "top_k": None}),
    }


@pytest.fixture(scope="module")
def pipes(runs):
    return {kind: Pipeline.from_pretrained(run) for kind, run in runs.items()}


@pytest.fixture(params=["gpt", "mim"])
def pipe(request, pipes):
    return pipes[request.param]


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_from_pretrained_reads_kind_and_sample_defaults(pipes):
    gpt, mim = pipes["gpt"], pipes["mim"]
    assert gpt.kind == "gpt" and mim.kind == "mim"
    assert gpt.options.top_k == 16 and gpt.options.guidance_scale == 2.0
    assert mim.options.steps == 4 and mim.options.top_k is None  # null in the YAML = no top-k
    assert mim.options.temperature == SAMPLE_DEFAULTS["temperature"]  # not in the YAML: the built-in default
    assert gpt.resolution == RESOLUTION


def test_images_are_pil_of_the_right_size_in_prompt_major_order(pipe):
    ids = pipe.generate_ids(["a red circle", "a blue star"], num_images=2, seed=0)
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.long
    alone = pipe.generate_ids(["a blue star"], num_images=1, seed=3)  # image 3 = prompt 1, k=1
    assert torch.equal(ids[3], alone[0])
    images = pipe.decode(ids)
    assert len(images) == 4
    assert all(isinstance(im, Image.Image) and im.size == (RESOLUTION, RESOLUTION) and im.mode == "RGB"
               for im in images)


def test_same_seed_same_png_bytes_and_different_seeds_differ(pipe):
    a = [png_bytes(im) for im in pipe(["a red circle"], num_images=2, seed=7)]
    b = [png_bytes(im) for im in pipe(["a red circle"], num_images=2, seed=7)]
    c = [png_bytes(im) for im in pipe(["a red circle"], num_images=2, seed=8)]
    assert a == b
    assert a[0] != a[1]  # seed 7 and seed 8 within one request
    assert c[0] == a[1]  # image 0 of seed 8 is image 1 of seed 7
    assert c[1] not in a


def test_image_regenerated_alone_equals_image_of_a_batch(pipe):
    prompts = ["a red circle", "一只红色的猫"]
    batched = pipe(prompts, num_images=2, seed=3, batch_size=3)
    for i in (0, 3):
        alone = pipe([prompts[i // 2]], num_images=1, seed=3 + i, batch_size=1)[0]
        assert png_bytes(alone) == png_bytes(batched[i])
    small_batches = pipe(prompts, num_images=2, seed=3, batch_size=1)
    assert [png_bytes(x) for x in small_batches] == [png_bytes(x) for x in batched]


def test_on_step_counts_the_decoding_steps_of_every_batch(pipe):
    reported = []
    ids = pipe.generate_ids(["a red circle"], num_images=3, seed=5, batch_size=2,
                            on_step=lambda done, total: reported.append((done, total)))
    per_batch = 4 if pipe.kind == "mim" else 16  # masked steps; GPT tokens (4x4)
    assert reported == [(done, 2 * per_batch) for done in range(1, 2 * per_batch + 1)]  # two batches
    assert torch.equal(ids, pipe.generate_ids(["a red circle"], num_images=3, seed=5, batch_size=2))
    edits = []
    pipe.edit_ids("a red circle", random_image(), mode="continue", keep_rows=2, num_images=1, seed=0,
                  on_step=lambda done, total: edits.append((done, total)))
    assert edits[-1][0] == edits[-1][1] and len(edits) == (4 if pipe.kind == "mim" else 8)  # GPT: 2 rows of 4 left


def test_uncached_gpt_matches_cached(pipes):
    pipe = pipes["gpt"]
    cached = pipe.generate_ids(["a red circle", "a blue star"], num_images=2, seed=0)
    uncached = pipe.generate_ids(["a red circle", "a blue star"], num_images=2, seed=0, use_kv_cache=False)
    assert torch.equal(cached, uncached)


def test_negative_prompt_reaches_the_sampler(pipe, monkeypatch):
    from tokenpaint.sampling import SAMPLERS

    seen = []
    for kind, original in list(SAMPLERS.items()):

        @functools.wraps(original)  # the dispatch passes the options the wrapped sampler's signature names
        def record(model, text_ids, _original=original, **kwargs):
            seen.append(kwargs["negative_text_ids"])
            return _original(model, text_ids, **kwargs)

        monkeypatch.setitem(SAMPLERS, kind, record)
    pipe(["a red circle", "a blue star"], num_images=2, seed=0, negative_prompt="a green square", batch_size=4)
    expected = pipe.tokenizer.encode(["a green square"], length=8).expand(4, -1)
    assert torch.equal(seen[-1], expected)
    pipe(["a red circle"], seed=0)
    assert not seen[-1].any()  # no negative prompt: the empty prompt, all zeros


def test_negative_prompt_and_guidance_change_the_result(pipe):
    base = pipe.generate_ids(["a red circle"], num_images=3, seed=0)
    negative = pipe.generate_ids(["a red circle"], num_images=3, seed=0, negative_prompt="a blue star")
    unguided = pipe.generate_ids(["a red circle"], num_images=3, seed=0, guidance_scale=1.0)
    assert not torch.equal(base, negative) and not torch.equal(base, unguided)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(num_images=0), "num_images"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_raise_before_any_work(pipe, monkeypatch, kwargs, name):
    def fail(*args, **kw):
        raise AssertionError("sampling started before validation")

    monkeypatch.setattr("tokenpaint.pipeline.sample", fail)
    with pytest.raises(ValueError, match=name):
        pipe(["a red circle"], **kwargs)


def test_unknown_model_dir_and_incomplete_run(tmp_path, runs):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Pipeline.from_pretrained(missing)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Pipeline.from_pretrained(tmp_path / "partial")
    with pytest.raises(ValueError, match="dtype"):
        Pipeline.from_pretrained(runs["gpt"], dtype="int4")


def test_long_prompt_is_truncated_with_a_warning(pipe):
    long_prompt = " ".join(CAPTIONS[:6])
    with pytest.warns(UserWarning, match="truncated"):
        images = pipe([long_prompt], seed=0)
    assert len(images) == 1


def test_bfloat16_casts_the_generator_once(runs):
    pipe = Pipeline.from_pretrained(runs["gpt"], dtype="bfloat16")
    assert pipe.model.dtype == torch.bfloat16
    images = pipe(["a red circle"], num_images=2, seed=0)
    assert len(images) == 2 and images[0].size == (RESOLUTION, RESOLUTION)


@pytest.mark.parametrize("kind", ["gpt", "mim"])
def test_compiled_pipeline_gives_the_same_ids(runs, kind):
    pipe = Pipeline.from_pretrained(runs[kind])
    expected = pipe.generate_ids(["a red circle", "a blue star"], num_images=2, seed=0, guidance_scale=2.0)
    keys = set(pipe.model.state_dict())
    assert pipe.compile(backend="eager") is pipe  # Dynamo tracing, no C++ build: what --compile runs, minus codegen
    compiled = pipe.generate_ids(["a red circle", "a blue star"], num_images=2, seed=0, guidance_scale=2.0)
    assert torch.equal(compiled, expected)
    assert set(pipe.model.state_dict()) == keys  # compiled in place: the weights keep their names


# ---------------------------------------------------------------------------------------------------------------- edit


def random_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8))


def test_inpaint_keeps_the_tokens_outside_the_mask(pipe):
    image = random_image()
    mask = np.zeros((RESOLUTION, RESOLUTION), dtype=np.uint8)
    mask[8:, :] = 255  # bottom half = token rows 2 and 3
    mask_image = Image.fromarray(mask)
    ids = pipe.edit_ids("a red circle", image, mask=mask_image, mode="inpaint", num_images=2, seed=0)
    original = pipe._encode_image(image)[0]
    assert torch.equal(ids[:, :2], original[:2].expand(2, -1, -1))
    assert (ids[:, 2:] != original[2:]).float().mean() >= 0.5  # the masked rows are generated anew ...
    assert (ids[0, 2:] != ids[1, 2:]).float().mean() >= 0.25  # ... with each image's own seed
    images = pipe.edit("a red circle", image, mask=mask_image, mode="inpaint", num_images=2, seed=0)
    assert [png_bytes(x) for x in images] == [png_bytes(x) for x in pipe.decode(ids)]


def test_edit_errors(pipe):
    image = random_image()
    with pytest.raises(ValueError, match=r"mask size 8x8 does not match the image size 16x16"):
        pipe.edit("x", image, mask=Image.new("L", (8, 8)), mode="inpaint")
    with pytest.raises(ValueError, match="mask is required"):
        pipe.edit("x", image, mode="inpaint")
    with pytest.raises(ValueError, match="mode"):
        pipe.edit("x", image, mode="paint")
    with pytest.raises(ValueError, match="strength"):
        pipe.edit("x", image, mode="img2img", strength=0.0)
    if pipe.kind == "gpt":
        with pytest.raises(ValueError, match="mim"):
            pipe.edit("x", image, mode="img2img")


def test_continue_keeps_the_top_rows(pipe):
    image = random_image(1)
    ids = pipe.edit_ids("a red circle", image, mode="continue", keep_rows=1, num_images=2, seed=0)
    original = pipe._encode_image(image)[0]
    assert torch.equal(ids[:, 0], original[0].expand(2, -1))
    assert (ids[:, 1:] != original[1:]).float().mean() >= 0.5  # the rows below are generated


def test_outpaint_keeps_the_placed_image(pipe):
    small = random_image(2).resize((8, 8))
    ids = pipe.edit_ids("a red circle", small, mode="outpaint", offset=(8, 0), num_images=1, seed=0)
    placed = pipe._encode_image(small)[0]  # [2, 2]
    assert torch.equal(ids[0, 0:2, 2:4], placed)


@pytest.mark.parametrize("strength", [0.25, 0.5])
def test_img2img_masked_model(pipes, strength):
    pipe = pipes["mim"]
    image = random_image(3)
    original = pipe._encode_image(image)[0].flatten()
    ids = pipe.edit_ids("a red circle", image, mode="img2img", strength=strength, num_images=2, seed=0)
    changed = (ids.flatten(1) != original).sum(1)
    n_regenerated = round(strength * 16)  # these are re-masked and sampled again; the other tokens are kept
    assert ((changed >= n_regenerated / 2) & (changed <= n_regenerated)).all(), (changed, n_regenerated)
    assert pipe.edit_ids("a red circle", image, strength=strength, num_images=2, seed=0).equal(ids)  # the default
    again = pipe.edit_ids("a red circle", image, mode="img2img", strength=strength, num_images=2, seed=0)
    assert torch.equal(ids, again)


def test_sample_defaults_from_train_config(tmp_path):
    from tokenpaint.pipeline import read_sample_defaults

    assert read_sample_defaults(tmp_path / "missing.yaml") == SampleOptions()
    path = tmp_path / "train_config.yaml"
    path.write_text("train: {lr: 0.1}\nsample: {steps: 8, schedule: linear, every: 5}\n", encoding="utf-8")
    defaults = read_sample_defaults(path)
    assert defaults == SampleOptions(steps=8, schedule="linear")  # "every" is no sampler option: ignored
    path.write_text("sample: {caption_temperature: 0.7, top_k: null, temperature: null}\n", encoding="utf-8")
    assert read_sample_defaults(path) == SampleOptions(caption_temperature=0.7, top_k=None)  # null: none where allowed
    path.write_text("sample: {top_p: 2.0}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_config.yaml: section 'sample': top_p"):
        read_sample_defaults(path)
    path.write_text("sample: [1, 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid YAML"):
        read_sample_defaults(path)
