"""`python -m tokenpaint.serve --model RUN_DIR` (also `tokenpaint-serve`): the HTTP API and the web page.

    python -m tokenpaint.serve --model demo/mim                 # http://127.0.0.1:7860/ (page), /docs (API)
    python -m tokenpaint.serve --model runs/t2i --listen --port 8000 --api-auth me:secret --no-ui
    python -m tokenpaint.serve --model runs/t2i --lora runs/my_lora:0.8     # POST /v1/images {"lora": {"my_lora": 0.5}}

Binds 127.0.0.1 unless --listen is given (then every interface, as the Stable Diffusion web UI does). SIGTERM or
Ctrl-C stops accepting connections, finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..pipeline import INFERENCE_DTYPES, check_run_dir
from .settings import ServeSettings

DEFAULTS = ServeSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenpaint.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="transformer run directory (train.py transformer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="bind every interface (0.0.0.0) instead of --host")
    p.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, metavar="N",
                   help=f"images sampled together at most (default {DEFAULTS.max_batch})")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms, metavar="M",
                   help=f"how long a request waits for others to batch with (default {DEFAULTS.max_wait_ms:g})")
    p.add_argument("--queue-size", type=int, default=DEFAULTS.queue_size, metavar="Q",
                   help=f"requests waiting before new ones get 503 + Retry-After (default {DEFAULTS.queue_size})")
    p.add_argument("--max-images-per-request", type=int, default=DEFAULTS.max_images_per_request, metavar="K",
                   help=f"more is a 400 (default {DEFAULTS.max_images_per_request})")
    p.add_argument("--cache-size", type=int, default=DEFAULTS.cache_size, metavar="C",
                   help=f"requests kept in the LRU result cache, 0 = off (default {DEFAULTS.cache_size})")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--api-auth", metavar="USER:PASS", help="HTTP Basic auth on the API and the page")
    p.add_argument("--no-ui", action="store_true", help="serve the API only, without the web page at /")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="load a LoRA adapter (a `train.py transformer --lora` run) at SCALE (default 0.8), applied to "
                        "every request; a request's `lora` field ({name: scale}, name = the directory's name) changes "
                        "the scales for that request (0 = off). Repeat to load several")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(INFERENCE_DTYPES), default="float32",
                   help="cast the generator once, or int8 weights (faster decoding on CPU, docs/PERFORMANCE.md)")
    return p


def _ignore_signal(signum, frame) -> None:
    """uvicorn re-raises the signal it shut down on into the previous handler: this one, so the exit status is 0."""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                             max_images_per_request=args.max_images_per_request, cache_size=args.cache_size,
                             api_auth=args.api_auth, threads=args.threads)
    try:
        settings.check()
    except ValueError as e:
        parser.error(str(e))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        model = check_run_dir(args.model)
    except FileNotFoundError as e:
        parser.error(f"--model: {e}")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        parser.error("serving needs the serve extra: pip install 'tokenpaint[serve]'")
    if not args.no_ui:
        try:
            import gradio  # noqa: F401
        except ImportError:
            parser.error("the web page needs the ui extra: pip install 'tokenpaint[ui]' (or pass --no-ui)")

    import torch

    from ..pipeline import Pipeline
    from ..transformer.lora import parse_lora_spec
    from .app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipe = Pipeline.from_pretrained(model, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--model: {e}")
    for spec in args.lora:
        try:
            pipe.load_lora(*parse_lora_spec(spec))
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--lora {spec}: {e}")
    app = create_app(pipe, settings, model_dir=model, ui=not args.no_ui)
    host = "0.0.0.0" if args.listen else args.host
    shown = "<this machine's address>" if args.listen else host
    print(f"tokenpaint: serving {model} ({pipe.kind}, {pipe.resolution}x{pipe.resolution}) at "
          f"http://{shown}:{args.port}/" + ("" if args.no_ui else " (page)") + f", API docs at /docs", flush=True)
    signal.signal(signal.SIGTERM, _ignore_signal)
    signal.signal(signal.SIGINT, _ignore_signal)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=60))
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
