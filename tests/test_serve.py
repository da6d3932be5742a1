"""tokenpaint.serve on a real 127.0.0.1 port with tiny models: both API schemas, batching, cache, errors, auth."""

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import LiveServer, b64_png, from_b64, make_runs  # noqa: E402
from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.serve import ServeSettings, create_app  # noqa: E402
from tokenpaint.serve.jobs import run_jobs  # noqa: E402

SIDE = 16  # the tiny models' images: 4x4 tokens of a f4 VQGAN


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    runs = make_runs(tmp_path_factory.mktemp("serve"))
    return {kind: (Pipeline.from_pretrained(run), run) for kind, run in runs.items()}


def serve(pipes, kind="mim", run=None, **settings):
    pipe, model_dir = pipes[kind]
    return LiveServer(create_app(pipe, ServeSettings(**settings), model_dir=model_dir, ui=False, run=run))


@pytest.fixture(scope="module")
def mim(pipes):
    server = serve(pipes, "mim", max_wait_ms=5, max_images_per_request=6)
    yield server
    server.stop()


def png(text):
    return base64.b64decode(text)


def test_sdapi_txt2img_schema_and_seeds(mim, pipes):
    body = {"prompt": "a red circle on a white background", "seed": 11, "batch_size": 2, "n_iter": 2,
            "cfg_scale": 3.0, "sampler_name": "Euler a", "width": SIDE, "height": SIDE, "restore_faces": False,
            "override_settings": {}}  # unknown fields are ignored
    status, _, out = mim.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 3.0 and info["width"] == SIDE
    assert info["all_prompts"] == [body["prompt"]] * 4 and info["batch_size"] == 2
    assert out["parameters"]["prompt"] == body["prompt"] and out["parameters"]["seed"] == 11
    assert len(out["images"]) == 4 and all(from_b64(i).size == (SIDE, SIDE) for i in out["images"])
    pipe = pipes["mim"][0]  # image i is the library's image with seed + i
    expected = [b64_png(im) for im in pipe([body["prompt"]], num_images=4, seed=11, guidance_scale=3.0)]
    assert [png(i) for i in out["images"]] == [png(i) for i in expected]


def test_sdapi_random_seed_is_reported(mim):
    status, _, out = mim.call("POST", "/sdapi/v1/txt2img", {"prompt": "a blue star", "seed": -1})
    info = json.loads(out["info"])
    assert status == 200 and info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]


def test_sdapi_startup_endpoints(mim):
    _, _, models = mim.call("GET", "/sdapi/v1/sd-models")
    assert models[0]["model_name"] == "mim" and len(models[0]["sha256"]) == 64
    assert models[0]["title"].startswith("mim [") and models[0]["hash"] == models[0]["sha256"][:10]
    _, _, samplers = mim.call("GET", "/sdapi/v1/samplers")
    assert samplers[0]["name"] == "MaskGIT" and "aliases" in samplers[0] and "options" in samplers[0]
    _, _, options = mim.call("GET", "/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == models[0]["title"]
    _, _, progress = mim.call("GET", "/sdapi/v1/progress")
    assert progress["progress"] == 0.0 and "job_count" in progress["state"]
    _, _, scripts = mim.call("GET", "/sdapi/v1/scripts")
    assert scripts == {"txt2img": [], "img2img": []}
    assert mim.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "x"})[0] == 200


def test_sdapi_img2img_inpaint_matches_pipeline_and_invert(mim, pipes):
    pipe = pipes["mim"][0]
    image = Image.new("RGB", (SIDE, SIDE), (200, 30, 30))
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (0, 0, SIDE, SIDE // 2))  # regenerate the top half
    body = {"prompt": "a green square", "seed": 5, "init_images": ["data:image/png;base64," + b64_png(image)],
            "mask": b64_png(mask), "denoising_strength": 0.5, "include_init_images": False}
    status, _, out = mim.call("POST", "/sdapi/v1/img2img", body)
    assert status == 200, out
    assert out["parameters"]["init_images"] is None  # not echoed back, as the web UI does
    expected = pipe.edit("a green square", image, mask=mask, mode="inpaint", seed=5)
    assert png(out["images"][0]) == png(b64_png(expected[0]))
    inverted = Image.eval(mask, lambda v: 255 - v)
    status, _, out = mim.call("POST", "/sdapi/v1/img2img", dict(body, inpainting_mask_invert=1))
    expected = pipe.edit("a green square", image, mask=inverted, mode="inpaint", seed=5)
    assert status == 200 and png(out["images"][0]) == png(b64_png(expected[0]))
    status, _, out = mim.call("POST", "/sdapi/v1/img2img", {**body, "mask": None, "seed": 6})  # no mask: img2img
    expected = pipe.edit("a green square", image, mode="img2img", strength=0.5, seed=6)
    assert status == 200 and png(out["images"][0]) == png(b64_png(expected[0]))


def test_gpt_img2img_continues_and_v1_images(pipes):
    server = serve(pipes, "gpt")
    try:
        pipe = pipes["gpt"][0]
        image = Image.new("RGB", (SIDE, SIDE), (20, 20, 220))
        status, _, out = server.call("POST", "/sdapi/v1/img2img", {"prompt": "a red circle", "seed": 2,
                                                                   "init_images": [b64_png(image)],
                                                                   "denoising_strength": 0.5})
        assert status == 200, out
        expected = pipe.edit("a red circle", image, mode="continue", keep_rows=2, seed=2)
        assert png(out["images"][0]) == png(b64_png(expected[0]))
        _, _, samplers = server.call("GET", "/sdapi/v1/samplers")
        assert samplers[0]["name"] == "Top-k"
        body = {"prompts": ["a red circle", "a blue star"], "num_images": 2, "seed": 4, "top_k": 8,
                "temperature": 0.9, "negative_prompt": "a green square"}
        status, _, out = server.call("POST", "/v1/images", body)
        assert status == 200 and out["seeds"] == [4, 5, 6, 7] and out["kind"] == "gpt"
        expected = pipe(body["prompts"], num_images=2, seed=4, top_k=8, temperature=0.9,
                        negative_prompt="a green square")
        assert [png(i) for i in out["images"]] == [png(b64_png(im)) for im in expected]
    finally:
        server.stop()


def test_v1_images_edit_and_cache(mim, pipes):
    pipe = pipes["mim"][0]
    image = Image.new("RGB", (SIDE, SIDE), (30, 200, 30))
    body = {"prompts": "a yellow star", "image": b64_png(image), "mode": "outpaint", "seed": 9, "num_images": 2}
    status, _, first = mim.call("POST", "/v1/images", body)
    assert status == 200 and first["cached"] is False
    expected = pipe.edit("a yellow star", image, mode="outpaint", seed=9, num_images=2)
    assert [png(i) for i in first["images"]] == [png(b64_png(im)) for im in expected]
    _, _, metrics_before = mim.call("GET", "/metrics")
    status, _, second = mim.call("POST", "/v1/images", body)
    assert status == 200 and second["cached"] is True and second["images"] == first["images"]
    _, _, metrics_after = mim.call("GET", "/metrics")
    made = [int(line.split()[-1]) for m in (metrics_before, metrics_after) for line in m.splitlines()
            if line.startswith("tokenpaint_images_total")]
    assert made[0] == made[1]  # answered without sampling
    assert "tokenpaint_cache_hits_total" in metrics_after
    status, _, third = mim.call("POST", "/v1/images", dict(body, seed=10))  # another seed is another request
    assert status == 200 and third["cached"] is False


def test_batched_requests_equal_requests_served_alone(pipes):
    prompts = ["a red circle on a white background", "a blue star on a white background", "一只红色的猫",
               "a green square on a white background"]
    bodies = [{"prompts": p, "num_images": 2, "seed": 3 * i, "negative_prompt": "a yellow star" if i % 2 else None}
              for i, p in enumerate(prompts)]
    sizes = []

    def run(jobs):  # records the batch sizes the queue formed
        sizes.append(sum(job.size for job in jobs))
        return run_jobs(pipes["mim"][0], jobs, 8)

    server = serve(pipes, "mim", run=run, max_batch=8, max_wait_ms=2000, cache_size=0)
    try:
        results = [None] * len(bodies)

        def send(i):
            results[i] = server.call("POST", "/v1/images", bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sizes == [8], sizes  # four requests, one batch
        alone = [server.call("POST", "/v1/images", body) for body in bodies]  # one batch each
        assert sizes == [8, 2, 2, 2, 2]
    finally:
        server.stop()
    for (s1, _, batched), (s2, _, single) in zip(results, alone):
        assert s1 == s2 == 200
        assert [png(i) for i in batched["images"]] == [png(i) for i in single["images"]]


def test_errors_name_the_field(mim):
    cases = [
        ("/v1/images", {"prompts": "a red circle", "steps": 0}, 422, "steps"),
        ("/v1/images", {"prompts": "a red circle", "top_p": 1.5}, 422, "top_p"),
        ("/v1/images", {"prompts": []}, 422, "prompts"),
        ("/v1/images", {"num_images": 2}, 422, "prompts"),
        ("/v1/images", {"prompts": "x", "mode": "inpaint"}, 422, "mode"),
        ("/v1/images", {"prompts": "x", "num_images": 7}, 400, "num_images"),
        ("/v1/images", {"prompts": "x", "num_images": 2, "seed": 2**64 - 1}, 422, "seed"),
        ("/v1/images", {"prompts": "x", "seed": -5}, 422, "seed"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "lots"}, 422, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1}, 422, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512}, 422, "width"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 4, "n_iter": 2}, 400, "batch_size"),
        ("/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images.0"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]}, 422,
         "init_images.0"),
    ]
    for path, body, status, field in cases:
        got, _, out = mim.call("POST", path, body)
        assert (got, out["field"]) == (status, field), (path, body, out)
        assert out["detail"]
    got, _, out = mim.call("POST", "/sdapi/v1/txt2img", raw=b"{not json")
    assert got == 422 and out["field"].startswith("body")
    _, _, out = mim.call("POST", "/sdapi/v1/txt2img", {"prompt": "x", "width": 512})
    assert f"{SIDE}x{SIDE}" in out["detail"]


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's first bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_size_is_checked_before_decoding(pipes):
    server = serve(pipes, "mim", max_upload_pixels=64 * 64, max_upload_bytes=4096)
    try:
        for side in (1000, 100_000):  # over our limit; over PIL's own limit as well
            bomb = base64.b64encode(png_header_only(side, side)).decode()
            start = time.perf_counter()
            status, _, out = server.call("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb]})
            assert status == 400 and out["field"] == "init_images.0", out
            assert "pixel limit" in out["detail"] or "over the cap" in out["detail"]
            assert time.perf_counter() - start < 5  # rejected from the header, never decoded
        big = base64.b64encode(b"\0" * 8192).decode()
        status, _, out = server.call("POST", "/v1/images", {"prompts": "x", "image": b64_png(
            Image.new("RGB", (SIDE, SIDE))), "mask": big})
        assert status == 400 and out["field"] == "mask" and "4096 byte" in out["detail"]
    finally:
        server.stop()


def test_failing_batch_fails_only_its_requests_and_full_queue_is_503(pipes):
    release = threading.Event()
    pipe = pipes["mim"][0]

    def run(jobs):
        if any("boom" in p for job in jobs for p in job.prompts):
            raise RuntimeError("the model broke on this batch")
        if any("slow" in p for job in jobs for p in job.prompts):
            release.wait(30)
        return run_jobs(pipe, jobs, 8)

    server = serve(pipes, "mim", run=run, max_wait_ms=0, queue_size=1, cache_size=0)
    try:
        status, _, out = server.call("POST", "/v1/images", {"prompts": "boom"})
        assert status == 500 and "the model broke on this batch" in out["detail"]
        results = {}
        slow = threading.Thread(target=lambda: results.update(slow=server.call("POST", "/v1/images",
                                                                               {"prompts": "slow"})))
        slow.start()
        while server.call("GET", "/sdapi/v1/progress")[2]["state"]["job_count"] < 1:  # the slow batch runs
            time.sleep(0.01)
        waiting = threading.Thread(target=lambda: results.update(waiting=server.call(
            "POST", "/v1/images", {"prompts": "a red circle", "steps": 2})))
        waiting.start()
        while server.call("GET", "/healthz")[2]["queue_depth"] < 1:
            time.sleep(0.01)
        status, headers, out = server.call("POST", "/v1/images", {"prompts": "one too many"})
        assert status == 503 and int(headers["retry-after"]) >= 1 and out["error"] == "QueueFull"
        release.set()
        slow.join()
        waiting.join()
        assert results["slow"][0] == 200 and results["waiting"][0] == 200  # the server went on
        _, _, metrics = server.call("GET", "/metrics")
        assert "tokenpaint_batch_failures_total 1" in metrics
        assert 'tokenpaint_requests_total{endpoint="/v1/images",status="503"} 1' in metrics
        assert 'tokenpaint_requests_total{endpoint="/v1/images",status="500"} 1' in metrics
        assert "tokenpaint_request_seconds_bucket" in metrics and "tokenpaint_batch_images_count 3" in metrics
    finally:
        release.set()
        server.stop()


def test_progress_reports_the_running_batch(pipes):
    pipe = pipes["mim"][0]  # 4 decoding steps, one head call each
    calls, reached, release = [0], threading.Event(), threading.Event()

    def hold_third_step(module, args):
        calls[0] += 1
        if calls[0] == 3:  # two of the four steps are done
            reached.set()
            release.wait(30)

    server = serve(pipes, "mim", max_wait_ms=0, cache_size=0)
    handle = pipe.model.head.register_forward_pre_hook(hold_third_step)
    try:
        idle = server.call("GET", "/sdapi/v1/progress")[2]
        assert idle["progress"] == 0.0 and idle["eta_relative"] == 0.0 and idle["state"]["job_count"] == 0
        result = {}
        body = {"prompt": "a red circle", "seed": 3, "batch_size": 2}
        client = threading.Thread(target=lambda: result.update(out=server.call("POST", "/sdapi/v1/txt2img", body)))
        client.start()
        assert reached.wait(30)
        time.sleep(0.05)
        _, _, running = server.call("GET", "/sdapi/v1/progress")
        assert running["progress"] == 0.5 and running["eta_relative"] > 0  # as long again as it took so far
        state = running["state"]
        assert (state["sampling_step"], state["sampling_steps"], state["job_count"], state["job"]) == (2, 4, 1, "busy")
        assert len(state["job_timestamp"]) == 14 and running["current_image"] is None
        release.set()
        client.join(60)
        assert result["out"][0] == 200
        done = server.call("GET", "/sdapi/v1/progress")[2]
        assert done["progress"] == 0.0 and done["state"]["job_count"] == 0 and done["state"]["sampling_steps"] == 0
    finally:
        release.set()
        handle.remove()
        server.stop()


def test_api_auth(pipes):
    server = serve(pipes, "mim", api_auth="alice:s3cret")
    try:
        body = {"prompt": "a red circle"}
        status, headers, out = server.call("POST", "/sdapi/v1/txt2img", body)
        assert status == 401 and headers.get("www-authenticate") == "Basic" and out["error"] == "Unauthorized"
        assert server.call("POST", "/sdapi/v1/txt2img", body, auth="alice:wrong")[0] == 401
        assert server.call("GET", "/sdapi/v1/sd-models", auth="bob:s3cret")[0] == 401
        assert server.call("POST", "/v1/images", {"prompts": "x"})[0] == 401
        assert server.call("GET", "/metrics")[0] == 401
        assert server.call("POST", "/sdapi/v1/txt2img", body, auth="alice:s3cret")[0] == 200
        assert server.call("GET", "/healthz")[0] == 200  # for load balancers
    finally:
        server.stop()


def test_page_editor_value_becomes_a_mask():
    from tokenpaint.serve.ui import editor_mask

    background = Image.new("RGB", (SIDE, SIDE), (10, 20, 30))
    layer = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 4, 8))  # painted strokes
    image, mask = editor_mask({"background": background, "layers": [layer], "composite": background})
    assert image.size == (SIDE, SIDE) and mask.mode == "L"
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((10, 10)) == 0
    assert editor_mask({"background": background, "layers": [], "composite": background})[1] is None
    assert editor_mask(None) == (None, None)


def test_a_batch_is_finished_while_the_next_one_samples():
    import asyncio

    from tokenpaint.serve.batching import Batcher
    from tokenpaint.serve.jobs import Job

    second_sampled = threading.Event()

    def run(jobs):  # the model thread
        if jobs[0].prompts[0] == "b":
            second_sampled.set()
        return [job.prompts[0] for job in jobs]

    def finish(jobs, value):  # the finishing thread
        if value == ["a"]:
            assert second_sampled.wait(10)  # "b" was sampled while "a" was still being finished
        if value == ["boom"]:
            raise RuntimeError("decoding failed")
        return [[v.upper()] for v in value]

    batcher = Batcher(run, max_batch=1, max_wait_ms=0, queue_size=8, finish=finish)
    batcher.start()

    async def requests():
        jobs = [Job([prompt], [0], [""], {}) for prompt in ("a", "b", "boom", "c")]
        return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)

    try:
        a, b, boom, c = asyncio.run(requests())
    finally:
        batcher.close()
    assert (a, b, c) == (["A"], ["B"], ["C"]) and isinstance(boom, RuntimeError)  # a failure fails its batch only


def test_each_job_is_answered_as_soon_as_it_is_finished():
    import asyncio

    from tokenpaint.serve.batching import Batcher
    from tokenpaint.serve.jobs import Job

    first_answered = threading.Event()

    def finish(jobs, value):  # a generator, as the server's finish_jobs: one result per job, in order
        yield [value[0].upper()]
        assert first_answered.wait(10)  # job "a" got its answer while "b" and "c" were still being finished
        yield [value[1].upper()]
        raise RuntimeError("decoding c failed")

    batcher = Batcher(lambda jobs: [job.prompts[0] for job in jobs], max_batch=3, max_wait_ms=1000, queue_size=8,
                      finish=finish)
    batcher.start()

    async def requests():
        futures = [asyncio.ensure_future(batcher.submit(Job([p], [0], [""], {}))) for p in ("a", "b", "c")]
        a = await futures[0]
        first_answered.set()
        return [a] + list(await asyncio.gather(*futures[1:], return_exceptions=True))

    try:
        a, b, c = asyncio.run(requests())
    finally:
        batcher.close()
    assert (a, b) == (["A"], ["B"]) and isinstance(c, RuntimeError)  # the failure fails the jobs not yet answered


def test_result_cache_is_lru_and_bounded_in_bytes():
    from tokenpaint.serve.batching import ResultCache

    cache = ResultCache(capacity=2, max_bytes=10)
    cache.put("a", ["xxxx"])
    cache.put("b", ["yyyy"])
    assert cache.get("a") == ["xxxx"]  # "a" is now the most recent
    cache.put("c", ["zz"])  # over 2 requests: "b" goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    cache.put("d", ["wwwwwwwww"])  # 9 bytes: only "d" fits in 10
    assert cache.get("a") is None and cache.get("c") is None and cache.get("d") == ["wwwwwwwww"]
    cache.put("huge", ["0123456789abc"])  # bigger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("d") and cache.bytes == 9
