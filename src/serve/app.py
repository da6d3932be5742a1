"""The FastAPI app: one model, one queue, both APIs, metrics, and the gradio page at / (unless ui=False)."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import __version__
from .batching import Batcher, ResultCache
from ..pipeline import default_edit_mode
from .errors import RequestError
from .images import decode_image
from .jobs import Edit, check_edit, finish_jobs, make_job, resolve_options, sample_jobs
from .metrics import Metrics
from .schemas import ImagesRequest
from .settings import ServeSettings

log = logging.getLogger("tokenpaint.serve")
API_PREFIXES = ("/sdapi/", "/v1/", "/healthz", "/metrics")


class ServerState:
    """What the endpoints share: the pipeline, the settings, the queue, the cache and the metrics."""

    def __init__(self, pipe, settings: ServeSettings, model_dir=None, run=None):
        self.pipe, self.settings = pipe, settings
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.model_name = self.model_dir.name if self.model_dir is not None else pipe.kind
        self.version = __version__
        self.metrics = Metrics()
        self.cache = ResultCache(settings.cache_size)
        finish = None
        if run is None:  # sampling on the model thread; decoding and PNG encoding on the finishing thread
            run = lambda jobs: sample_jobs(pipe, jobs, settings.max_batch, on_step=self.batcher.report_step)  # noqa: E731
            finish = lambda jobs, ids: finish_jobs(pipe, jobs, ids)  # noqa: E731
        self.batcher = Batcher(run, settings.max_batch, settings.max_wait_ms, settings.queue_size, self.metrics,
                               settings.threads, finish=finish)
        self.metrics.queue_depth = self.batcher.depth
        self._hash: Optional[str] = None

    def model_hash(self) -> str:
        """sha256 of the generator's weights (what the web UI's clients show as the model hash)."""
        if self._hash is None:
            h = hashlib.sha256()
            weights = self.model_dir / "model.safetensors" if self.model_dir is not None else None
            if weights is not None and weights.is_file():
                with open(weights, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(repr(sorted(self.pipe.model.state_dict().keys())).encode())
            self._hash = h.hexdigest()
        return self._hash

    def check_direction(self, direction: str, field: str) -> None:
        """A 422 naming `field` unless the model was trained for `direction` ("t2i" images, "i2t" captions)."""
        try:
            self.pipe.check_direction(direction)
        except ValueError as e:
            raise RequestError(422, f"this server's model cannot do that: {e}", field) from None

    def decode_image(self, data, field: str):
        return decode_image(data, field, self.settings.max_upload_bytes, self.settings.max_upload_pixels)

    async def generate(self, job) -> tuple[list[str], bool]:
        """base64 PNGs of the job's images (from the cache when the same request was answered before), cached?"""
        key = job.cache_key()
        hit = self.cache.get(key)
        self.metrics.cache(hit is not None)
        if hit is not None:
            return hit, True
        try:
            images = await self.batcher.submit(job)
        except RequestError:
            raise
        except Exception as e:  # the batch failed: its requests get a 500, the server goes on
            log.error("a batch of %d image(s) failed", job.size, exc_info=e)
            raise RequestError(500, f"{type(e).__name__}: {e}") from None
        self.cache.put(key, images)
        return images, False


def images_job(state: ServerState, req: ImagesRequest):
    """POST /v1/images -> a Job (an edit job when `image` is given)."""
    pipe = state.pipe
    state.check_direction("t2i", "prompts")
    prompts = [req.prompts] if isinstance(req.prompts, str) else list(req.prompts)
    if not prompts:
        raise RequestError(422, "prompts must hold at least one prompt", "prompts")
    options = resolve_options(pipe, {k: getattr(req, k) for k in ("steps", "guidance_scale", "top_k", "top_p",
                                                                   "temperature", "lora")})
    edit = None
    if req.image is not None:
        if len(prompts) != 1:
            raise RequestError(422, "an edit takes one prompt", "prompts")
        image = state.decode_image(req.image, "image").convert("RGB")
        mask = state.decode_image(req.mask, "mask").convert("L") if req.mask is not None else None
        mode = req.mode or default_edit_mode(pipe.kind, has_mask=mask is not None)
        edit = Edit(image, mask, mode, req.strength, req.keep_rows)
        check_edit(pipe, edit, {k: k for k in ("mode", "mask", "strength", "keep_rows")})
    elif req.mask is not None or req.mode is not None:
        raise RequestError(422, "needs an input image (field 'image')", "mask" if req.mask is not None else "mode")
    return make_job(pipe, state.settings, prompts, req.num_images, req.seed, req.negative_prompt or "", options,
                    edit)


def _auth_dependency(settings: ServeSettings):
    if settings.credentials is None:
        return []
    user, password = settings.credentials
    basic = HTTPBasic(auto_error=False)

    def check(credentials: Optional[HTTPBasicCredentials] = Depends(basic)):
        ok = credentials is not None and secrets.compare_digest(credentials.username.encode(), user.encode()) \
            and secrets.compare_digest(credentials.password.encode(), password.encode())
        if not ok:
            raise RequestError(401, "wrong or missing user name or password (HTTP Basic)", "Authorization",
                               headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


class MetricsMiddleware:
    """Counts API requests by endpoint and status and times them (plain ASGI, so streaming is untouched)."""

    def __init__(self, app, metrics: Metrics, endpoints: set):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = path if path in self.endpoints else "other"
            self.metrics.request(endpoint, status[0], time.perf_counter() - start)


def _field_of(error: dict) -> str:
    if error.get("type") == "json_invalid":  # its loc is a character position
        return "body"
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    return ".".join(loc) or "body"


def create_app(pipe, settings: Optional[ServeSettings] = None, model_dir=None, ui: bool = True, run=None) -> FastAPI:
    """The server for `pipe`. `run(jobs) -> [[base64 PNG, ...] per job]` replaces the model call (tests)."""
    settings = settings or ServeSettings()
    settings.check()
    state = ServerState(pipe, settings, model_dir, run)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        yield
        state.batcher.close()  # uvicorn has finished the requests in flight; the queue is empty by now

    app = FastAPI(title="tokenpaint", version=__version__, lifespan=lifespan)
    app.state.tokenpaint = state
    auth = _auth_dependency(settings)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        field = _field_of(errors[0]) if errors else "body"
        detail = "; ".join(f"{_field_of(err)}: {err.get('msg', '')}" for err in errors)
        return JSONResponse({"error": "InvalidField", "field": field, "detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def failure(request: Request, e: Exception):
        return JSONResponse({"error": "GenerationFailed", "field": None, "detail": f"{type(e).__name__}: {e}"},
                            status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": state.model_name, "kind": pipe.kind, "resolution": pipe.resolution,
                "queue_depth": state.batcher.depth()}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/images", dependencies=auth)
    async def images(req: ImagesRequest):
        job = images_job(state, req)
        result, cached = await state.generate(job)
        return {"images": result, "seeds": job.seeds, "prompts": job.prompts, "options": job.options,
                "model": state.model_name, "kind": pipe.kind, "width": pipe.resolution, "height": pipe.resolution,
                "cached": cached}

    from .sdapi import build_router

    sdapi = build_router(state, auth)
    app.include_router(sdapi)
    endpoints = {r.path for r in [*app.routes, *sdapi.routes] if hasattr(r, "methods") and hasattr(r, "path")}
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, endpoints=endpoints)
    if ui:
        from .ui import mount_ui

        app = mount_ui(app, state)
    return app
