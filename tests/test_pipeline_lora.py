"""Pipeline.load_lora / fuse_lora / unload_lora and generate.py --lora on tiny run directories."""
import sys
from pathlib import Path

import pytest
import torch

from test_pipeline import CAPTIONS, build_run, tiny_vqgan
from tokenpaint import Pipeline
from tokenpaint.data import TextTokenizer
from tokenpaint.transformer import load_generator
from tokenpaint.transformer.lora import LoRAAdapter, base_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate  # noqa: E402  (the script at the repo root)

PROMPTS = ["a red circle on a white background", "a blue square on a white background"]


def write_adapter(run, out, seed, targets=("attn", "mlp"), text_ids=()):
    """An adapter for the generator in `run` with random B (as if trained), saved in `out`."""
    model = load_generator(run)
    adapter = LoRAAdapter.create(model, rank=4, targets=list(targets), text_ids=text_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g))
        if adapter.text_delta is not None:
            adapter.text_delta.copy_(torch.randn(adapter.text_delta.shape, generator=g) * 3)
    adapter.save(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = TextTokenizer.train(CAPTIONS, root / "spm" / "tok", vocab_size=400)
    vqgan = tiny_vqgan()
    run = build_run(root, "mim", tokenizer, vqgan, sample={"steps": 3, "guidance_scale": 2.0})
    red = tokenizer.encode(["red"], length=8)[0, 0].item()
    return {"root": root, "run": run, "gpt": build_run(root, "gpt", tokenizer, vqgan),
            "a": write_adapter(run, root / "a", 0, text_ids=[red]), "b": write_adapter(run, root / "b", 1, ["mlp"]),
            "fresh": LoRAAdapter.create(load_generator(run), rank=2, targets=["attn"]).save(root / "fresh")}


def ids(pipe):
    return pipe.generate_ids(PROMPTS, num_images=2, seed=3)


def test_load_fuse_unload(setup):
    pipe = Pipeline.from_pretrained(setup["run"])
    base_state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base = ids(pipe)
    assert pipe.load_lora(setup["fresh"]) == "fresh"
    assert torch.equal(ids(pipe), base)  # B = 0: no change
    pipe.unload_lora()
    assert pipe.load_lora(setup["a"], scale=1.0) == "a" and pipe.loras == {"a": 1.0}
    with torch.no_grad():
        text = pipe.encode_text(PROMPTS)
        image = torch.zeros(2, 16, dtype=torch.long)
        hooked = pipe.model(text, image)[0]
        adapted = ids(pipe)
        assert not torch.equal(adapted, base)
        pipe.fuse_lora()
        assert torch.allclose(pipe.model(text, image)[0], hooked, atol=1e-4, rtol=1e-4)
    assert pipe.loras == {"a": 1.0}
    pipe.unload_lora()
    assert pipe.loras == {}
    for key, value in pipe.model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    assert torch.equal(ids(pipe), base)


def test_several_adapters_mix_and_names_must_differ(setup):
    pipe = Pipeline.from_pretrained(setup["run"])
    pipe.load_lora(setup["a"], scale=0.5)
    pipe.load_lora(setup["b"], scale=0.3)
    assert pipe.loras == {"a": 0.5, "b": 0.3}
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(setup["a"])
    pipe.load_lora(setup["a"], name="a2", scale=0.1)
    assert set(pipe.loras) == {"a", "b", "a2"}


def test_wrong_base_and_bf16_base(setup):
    gpt = Pipeline.from_pretrained(setup["gpt"])
    with pytest.raises(ValueError, match=f"{base_hash(load_generator(setup['run']))} vs {base_hash(gpt.model)}"):
        gpt.load_lora(setup["a"])
    with pytest.raises(ValueError, match="no LoRA adapter is loaded"):
        gpt.fuse_lora()
    # a pipeline cast to bfloat16 still knows the hash of the saved weights
    bf16 = Pipeline.from_pretrained(setup["run"], dtype="bfloat16")
    assert bf16.load_lora(setup["a"]) == "a"
    assert ids(bf16).shape == (4, 4, 4)


def test_generate_cli_lora(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = generate.main(["--model", str(setup["run"]), "--prompt", PROMPTS[0], "--out-dir", str(out),
                        "--lora", f"{setup['a']}:0.9", "--lora", str(setup["b"])])
    assert rc == 0 and (out / "0_0.png").is_file()
    for spec, message in ((f"{setup['a']}:x", "must be a number"), (str(tmp_path / "nope"), "no LoRA adapter at"),
                          (str(setup["a"]), "trained on base weights")):  # the gpt is not its base
        argv = ["--model", str(setup["gpt"]), "--prompt", "x", "--out-dir", str(out), "--lora", spec]
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
