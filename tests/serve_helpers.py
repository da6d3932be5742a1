"""A real tokenpaint server on a free 127.0.0.1 port (uvicorn in a thread), a tiny run directory, and a client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

from PIL import Image

from test_pipeline import CAPTIONS, build_run, tiny_vqgan


def make_runs(root):
    from tokenpaint.data import TextTokenizer

    tokenizer = TextTokenizer.train(CAPTIONS, root / "spm" / "tok", vocab_size=400)
    vqgan = tiny_vqgan()
    return {"mim": build_run(root, "mim", tokenizer, vqgan, sample={"steps": 4, "guidance_scale": 2.0, "top_k": None}),
            "gpt": build_run(root, "gpt", tokenizer, vqgan, sample={"guidance_scale": 2.0, "top_k": 16})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def call(self, method, path, body=None, auth=None, raw=None, timeout=60):
        return call(self.url, method, path, body, auth, raw, timeout)


def call(url, method, path, body=None, auth=None, raw=None, timeout=60):
    """-> (status, headers with lower-case names, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, headers, payload = e.code, e.headers, e.read()
    headers = {k.lower(): v for k, v in headers.items()}
    text = payload.decode("utf-8")
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def from_b64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))
