"""HTTP serving for a tokenpaint run directory: `python -m tokenpaint.serve --model RUN_DIR`.

Needs the `serve` extra (fastapi, uvicorn); the web page needs the `ui` extra (gradio). Modules:
  cli.py       flags, checks, loading, uvicorn start-up and SIGTERM draining
  app.py       the FastAPI app: auth, errors, /v1/images, /healthz, /metrics, the UI mount
  sdapi.py     the Stable Diffusion web UI endpoints (/sdapi/v1/*) mapped onto jobs
  schemas.py   request bodies (pydantic) of both APIs
  jobs.py      a request as rows of (prompt, negative prompt, seed) + sampler options; runs a batch of jobs
  batching.py  the queue: groups jobs with the same sampler options into one batch; the LRU result cache
  images.py    base64 image decoding (size checked before decoding) and PNG encoding
  metrics.py   Prometheus text metrics
  ui.py        the gradio page (txt2img and edit tabs)
"""

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name):
    if name == "create_app":  # lazy: `import tokenpaint.serve` works without fastapi installed
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'tokenpaint.serve' has no attribute {name!r}")
