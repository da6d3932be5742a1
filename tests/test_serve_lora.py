"""tokenpaint.serve with LoRA adapters: --lora at start-up, per-request scales (/v1/images `lora`, the web UI's
<lora:NAME:SCALE> prompt tags), the same images as the Pipeline at those scales, errors naming the field."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import LiveServer, from_b64, make_runs  # noqa: E402
from test_pipeline_lora import write_adapter  # noqa: E402
from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.serve import ServeSettings, create_app  # noqa: E402
from tokenpaint.serve.cli import main  # noqa: E402

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    run = make_runs(root)["mim"]
    adapter = write_adapter(run, root / "style", seed=0)
    pipe = Pipeline.from_pretrained(run)
    pipe.load_lora(adapter, scale=0.8)
    server = LiveServer(create_app(pipe, ServeSettings(max_wait_ms=5), model_dir=run, ui=False))
    yield {"run": run, "adapter": adapter, "server": server}
    server.stop()


def reference(run, adapter, scale):
    """What the Pipeline draws for PROMPT, seed 7, with the adapter at `scale` (None: no adapter)."""
    pipe = Pipeline.from_pretrained(run)
    if scale is not None:
        pipe.load_lora(adapter, scale=scale)
    return pipe([PROMPT], seed=7)[0]


def pixels(image):
    return image.convert("RGB").tobytes()


def test_requests_use_the_servers_adapter_and_their_own_scales(setup):
    server, run, adapter = setup["server"], setup["run"], setup["adapter"]
    expected = {scale: pixels(reference(run, adapter, scale)) for scale in (0.8, 0.3, None)}
    assert expected[0.8] != expected[None]
    for body, scale in (({}, 0.8), ({"lora": {"style": 0.3}}, 0.3), ({"lora": {"style": 0}}, None)):
        status, _, out = server.call("POST", "/v1/images", {"prompts": PROMPT, "seed": 7, **body})
        assert status == 200, out
        assert pixels(from_b64(out["images"][0])) == expected[scale], body
    status, _, out = server.call("POST", "/sdapi/v1/txt2img", {"prompt": f"{PROMPT} <lora:style:0.3>", "seed": 7})
    assert status == 200 and pixels(from_b64(out["images"][0])) == expected[0.3]
    info = json.loads(out["info"])
    assert info["prompt"] == f"{PROMPT} <lora:style:0.3>" and info["all_prompts"] == [PROMPT]  # as the web UI


def test_unknown_adapter_names_the_field(setup):
    server = setup["server"]
    for path, body, field in (("/v1/images", {"prompts": "x", "lora": {"nope": 1.0}}, "lora"),
                              ("/sdapi/v1/txt2img", {"prompt": "x <lora:nope:0.5>"}, "prompt"),
                              ("/sdapi/v1/txt2img", {"prompt": "x <lora:style:lots>"}, "prompt")):
        status, _, out = server.call("POST", path, body)
        assert (status, out["field"]) == (422, field), out


def test_cli_refuses_a_bad_lora(setup, tmp_path, capsys):
    other = make_runs(tmp_path)["gpt"]
    for spec, message in ((str(tmp_path / "missing"), "no LoRA adapter at"),
                          (f"{setup['adapter']}:x", "must be a number")):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(setup["run"]), "--no-ui", "--lora", spec])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(other), "--no-ui", "--lora", str(setup["adapter"])])
    assert "trained on base weights" in capsys.readouterr().err


def test_an_adapter_with_new_words_serves_them(tmp_path):
    import torch

    from tokenpaint.transformer import load_generator
    from tokenpaint.transformer.lora import LoRAAdapter

    run = make_runs(tmp_path)["mim"]
    base = Pipeline.from_pretrained(run)
    adapter = LoRAAdapter.create(load_generator(run), 2, targets=["attn"], new_words={"zorbly": base.tokenizer.vocab_size})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        adapter.new_rows.copy_(torch.randn(adapter.new_rows.shape, generator=g) * 3)
        for p in adapter.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g))
    adapter.save(tmp_path / "zorbly")
    pipe = Pipeline.from_pretrained(run)
    pipe.load_lora(tmp_path / "zorbly")
    prompt = "a zorbly circle"
    assert base.tokenizer.vocab_size in pipe.encode_text([prompt])[0].tolist()
    expected = pixels(pipe([prompt], seed=7)[0])
    assert expected != pixels(base([prompt], seed=7)[0])
    server = LiveServer(create_app(pipe, ServeSettings(max_wait_ms=5), model_dir=run, ui=False))
    try:
        status, _, out = server.call("POST", "/v1/images", {"prompts": prompt, "seed": 7})
        assert status == 200 and pixels(from_b64(out["images"][0])) == expected
    finally:
        server.stop()
