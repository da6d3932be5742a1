"""Load test of `python -m tokenpaint.serve`: K concurrent clients x N requests on loopback vs one at a time.

    .venv/bin/python benchmarks/serve_load.py --model demo/mim demo/gpt --clients 16 --requests 200

Per model: starts the server (API only, result cache off so every request is sampled, `--threads` torch threads),
sends the same N one-image requests (distinct seeds, prompts from the demo's, alternating /sdapi/v1/txt2img and
/v1/images) first one at a time from one client, then from K concurrent clients, and prints images/s of both and
their ratio, P50/P95/P99 latency under load, failures (any non-200 or connection error), the mean batch size the
queue formed (from /metrics), and the server's exit status after SIGTERM. The two phases alternate for --rounds
rounds (a slow spell of a shared machine then hits both): the table shows the round of the median ratio and the ratio
of every round. Bounded: N requests per phase and `--time-limit` seconds per phase (a phase cut by the limit says so
and counts what it served).

Then, unless --no-breakdown, where an image's time goes, measured in this process with the server's thread count
once the server has stopped: sampling one image and a full batch (`Pipeline.sample_rows`, the server's call), the
model's forward pass alone at those sizes (masked model: one decoding step, the batch doubled for guidance), and
VQGAN decoding + PNG per image (one at a time, as the server does). Their `ceiling` is the served ratio if HTTP and
waiting cost nothing: (sample 1 + decode) / (sample batch / batch + decode).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from _common import timed

PROMPTS = ["a large red circle on the left", "a small blue square on the right", "a green triangle in the middle",
           "a large yellow square at the top", "左边一个大的红色圆形", "a small purple circle at the bottom",
           "右边一个蓝色的正方形", "an orange triangle on the left"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict, timeout: float) -> int:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def request_for(i: int) -> tuple[str, dict]:
    prompt = PROMPTS[i % len(PROMPTS)]
    if i % 2:
        return "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 1000 + i, "batch_size": 1}
    return "/v1/images", {"prompts": prompt, "seed": 1000 + i, "num_images": 1}


def run_phase(url: str, n: int, clients: int, time_limit: float, timeout: float) -> dict:
    """Send requests 0..n-1 from `clients` threads; -> latencies of the successes, failures, wall time, cut."""
    lock, next_index = threading.Lock(), [0]
    latencies, failures = [], []
    deadline = time.monotonic() + time_limit

    def client():
        while True:
            with lock:
                i = next_index[0]
                if i >= n or time.monotonic() > deadline:
                    return
                next_index[0] += 1
            path, body = request_for(i)
            start = time.perf_counter()
            try:
                status = post(url, path, body, timeout)
            except OSError as e:
                status = repr(e)
            with lock:
                (latencies.append(time.perf_counter() - start) if status == 200 else failures.append(status))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return dict(latencies=latencies, failures=failures, wall=wall, cut=len(latencies) + len(failures) < n)


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))] if values else float("nan")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return float("nan")


def bench_model(model: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tokenpaint.serve", "--model", model, "--port", str(port), "--no-ui",
               "--cache-size", "0", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue-size", str(max(64, 2 * args.clients)), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    kind = json.loads(response.read())["kind"]
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server for {model} did not start")
                time.sleep(0.2)
        run_phase(url, 4, 1, args.time_limit, args.timeout)  # warm-up (first-call allocations)
        rounds, images, batches = [], 0.0, 0.0
        for _ in range(args.rounds):  # the phases alternate: a slow spell of a shared machine hits both
            alone = run_phase(url, args.requests, 1, args.time_limit, args.timeout)
            images_before, batches_before = metric(url, "tokenpaint_images_total"), \
                metric(url, "tokenpaint_batch_images_count")
            loaded = run_phase(url, args.requests, args.clients, args.time_limit, args.timeout)
            images += metric(url, "tokenpaint_images_total") - images_before
            batches += metric(url, "tokenpaint_batch_images_count") - batches_before
            rounds.append((alone, loaded))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_status = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_status = "killed"
    def rate(phase):
        return len(phase["latencies"]) / phase["wall"]

    ratios = [rate(loaded) / rate(alone) for alone, loaded in rounds]
    median = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]  # the round of the median ratio
    alone, loaded = rounds[median]
    lat = [x for _, phase in rounds for x in phase["latencies"]]
    failures = [f for pair in rounds for phase in pair for f in phase["failures"]]
    return dict(model=model, kind=kind, alone=rate(alone), loaded=rate(loaded), ratio=ratios[median], ratios=ratios,
                p50=percentile(lat, 50), p95=percentile(lat, 95), p99=percentile(lat, 99),
                alone_p50=percentile(alone["latencies"], 50), served=len(lat), failures=len(failures),
                failure_examples=failures[:3], mean_batch=images / max(batches, 1),
                cut=sorted({name for pair in rounds for name, phase in zip(("alone", "loaded"), pair) if phase["cut"]}),
                exit_status=exit_status)


def breakdown(model: str, args) -> dict:
    """Sampling 1 vs --max-batch images, the forward pass alone (masked model) and decode + PNG per image, in ms."""
    import torch

    from tokenpaint import Pipeline
    from tokenpaint.serve.images import encode_png

    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(model)
    batch = args.max_batch
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def sample(n: int):
        return pipe.sample_rows(prompts[:n], [1000 + i for i in range(n)], batch_size=n)

    out = dict(one=timed(lambda: sample(1))[0] * 1000, full=timed(lambda: sample(batch))[0] * 1000)
    ids = sample(batch)
    out["decode"] = timed(lambda: [encode_png(image) for image in pipe.decode(ids)])[0] * 1000 / batch
    out["ceiling"] = (out["one"] + out["decode"]) / (out["full"] / batch + out["decode"])
    if pipe.kind == "mim":
        model, steps = pipe.model, pipe.options.steps
        rows = 2 if pipe.options.guidance_scale not in (0.0, 1.0) else 1

        def forward(n: int):
            text = pipe.encode_text(prompts[:n] * rows)
            masked = torch.full((n * rows, model.config.num_image_tokens), model.mask_token_id, dtype=torch.long)
            with torch.inference_mode():
                model(text, masked)

        out["forward_one"], out["forward_full"] = (timed(lambda n=n: forward(n), repeats=5)[0] * 1000 * steps
                                                    for n in (1, batch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["demo/mim", "demo/gpt"], metavar="RUN_DIR")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of both phases; the table shows the round of the median ratio")
    p.add_argument("--requests", type=int, default=200, help="requests per phase (one image each)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="the server's torch threads (default: every core, as the server itself defaults to)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per phase at most")
    p.add_argument("--timeout", type=float, default=60, help="seconds per request before it counts as failed")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-image time breakdown")
    args = p.parse_args(argv)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# serve_load: {args.clients} clients x {args.requests} requests, max-batch {args.max_batch}, "
          f"max-wait {args.max_wait_ms:g} ms, server threads {args.threads}, cores {os.cpu_count()}, load {load}")
    print(f"| model | one at a time (img/s) | {args.clients} clients (img/s) | ratio | P50 | P95 | P99 | failures | "
          "mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for model in args.model:
        r = bench_model(model, args)
        note = f" (cut by --time-limit: {', '.join(r['cut'])}; {r['served']} served)" if r["cut"] else ""
        print(f"| {r['model']} ({r['kind']}) | {r['alone']:.1f} (P50 {r['alone_p50'] * 1000:.0f} ms) | "
              f"{r['loaded']:.1f} | **{r['ratio']:.1f}x** | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['p99']:.2f} s | "
              f"{r['failures']} | {r['mean_batch']:.1f} |{note}", flush=True)
        print(f"#   {r['model']}: ratio per round {', '.join(f'{x:.2f}x' for x in r['ratios'])}; latency percentiles "
              f"and failures over every loaded round ({r['served']} requests)")
        if r["failures"]:
            print(f"#   failures, e.g.: {r['failure_examples']}")
        if r["exit_status"] != 0:
            print(f"#   the server exited with {r['exit_status']} after SIGTERM")
        ok = ok and r["failures"] == 0 and r["exit_status"] == 0
    if not args.no_breakdown:
        b = args.max_batch
        print(f"\n| model | sample 1 image | sample {b} images | forward x steps: 1 / {b} images | decode + PNG per "
              f"image | ceiling |")
        print("|---|---|---|---|---|---|")
        for model in args.model:
            t = breakdown(model, args)
            forward = (f"{t['forward_one']:.0f} / {t['forward_full']:.0f} ms "
                       f"({t['forward_full'] / t['forward_one']:.1f}x)") if "forward_one" in t else "-"
            print(f"| {model} | {t['one']:.0f} ms | {t['full']:.0f} ms ({t['full'] / t['one']:.1f}x) | {forward} | "
                  f"{t['decode']:.1f} ms | {t['ceiling']:.1f}x |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
