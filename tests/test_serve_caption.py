"""POST /sdapi/v1/interrogate: the web UI's image -> prompt, answered by a captioning GPT; models trained for one
direction answer the other direction's endpoints with a 422 naming what they were trained for."""
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import LiveServer, b64_png, make_runs  # noqa: E402
from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.serve import ServeSettings, create_app  # noqa: E402
from tokenpaint.transformer import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    gpt_run = make_runs(tmp_path_factory.mktemp("serve_caption"))["gpt"]
    t2i = Pipeline.from_pretrained(gpt_run)
    config = GPTConfig(**{**t2i.model.config.to_dict(), "directions": ["t2i", "i2t"]})
    torch.manual_seed(3)
    both = Pipeline(GPT(config).eval(), t2i.tokenizer, t2i.vqgan)
    captioner = Pipeline(GPT(GPTConfig(**{**config.to_dict(), "directions": ["i2t"]})).eval(), t2i.tokenizer,
                         t2i.vqgan)
    live = {name: LiveServer(create_app(pipe, ServeSettings(max_wait_ms=5), ui=False))
            for name, pipe in (("t2i", t2i), ("both", both), ("captioner", captioner))}
    yield live, {"t2i": t2i, "both": both, "captioner": captioner}
    for server in live.values():
        server.stop()


def test_interrogate_answers_the_pipelines_greedy_caption(servers):
    live, pipes = servers
    image = Image.new("RGB", (16, 16), (200, 40, 40))
    for name in ("both", "captioner"):
        status, _, out = live[name].call("POST", "/sdapi/v1/interrogate", {"image": b64_png(image), "model": "clip"})
        assert status == 200 and out == {"caption": pipes[name].caption([image])[0]}


def test_each_model_refuses_the_direction_it_was_not_trained_for(servers):
    live, _ = servers
    image = b64_png(Image.new("RGB", (16, 16), (40, 40, 200)))
    status, _, out = live["t2i"].call("POST", "/sdapi/v1/interrogate", {"image": image})
    assert status == 422 and out["field"] == "image" and "cannot do image-to-text" in out["detail"]
    status, _, out = live["captioner"].call("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle"})
    assert status == 422 and out["field"] == "prompt" and "cannot do text-to-image" in out["detail"]
    status, _, out = live["captioner"].call("POST", "/v1/images", {"prompts": "a red circle"})
    assert status == 422 and out["field"] == "prompts"
    status, _, out = live["both"].call("POST", "/sdapi/v1/interrogate", {"image": "not base64!"})
    assert status == 422 and out["field"] == "image"
    status, _, out = live["both"].call("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle"})
    assert status == 200 and len(out["images"]) == 1
