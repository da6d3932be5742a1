"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: no client library."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.count}"]
        return out


class Metrics:
    """Counters and histograms updated from the event loop and the model worker (hence the lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.latency = defaultdict(lambda: Histogram(LATENCY_BUCKETS))  # endpoint -> seconds
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.batch_failures = 0
        self.cache_hits = self.cache_misses = 0
        self.queue_depth = lambda: 0  # set by the app to the queue's own count

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1
            self.latency[endpoint].observe(seconds)

    def batch(self, images: int, failed: bool) -> None:
        with self.lock:
            self.batch_sizes.observe(images)
            if failed:
                self.batch_failures += 1
            else:
                self.images += images

    def cache(self, hit: bool) -> None:
        with self.lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP tokenpaint_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE tokenpaint_requests_total counter"]
            lines += [f'tokenpaint_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP tokenpaint_request_seconds Request latency in seconds.",
                      "# TYPE tokenpaint_request_seconds histogram"]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("tokenpaint_request_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP tokenpaint_queue_depth Requests waiting for the model.",
                      "# TYPE tokenpaint_queue_depth gauge", f"tokenpaint_queue_depth {self.queue_depth()}",
                      "# HELP tokenpaint_batch_images Images per batch run by the model.",
                      "# TYPE tokenpaint_batch_images histogram", *self.batch_sizes.lines("tokenpaint_batch_images"),
                      "# HELP tokenpaint_images_total Images generated (cache hits not counted).",
                      "# TYPE tokenpaint_images_total counter", f"tokenpaint_images_total {self.images}",
                      "# HELP tokenpaint_batch_failures_total Batches that raised (their requests got a 500).",
                      "# TYPE tokenpaint_batch_failures_total counter",
                      f"tokenpaint_batch_failures_total {self.batch_failures}",
                      "# HELP tokenpaint_cache_hits_total Requests answered from the result cache.",
                      "# TYPE tokenpaint_cache_hits_total counter", f"tokenpaint_cache_hits_total {self.cache_hits}",
                      "# HELP tokenpaint_cache_misses_total Requests the result cache did not hold.",
                      "# TYPE tokenpaint_cache_misses_total counter",
                      f"tokenpaint_cache_misses_total {self.cache_misses}"]
        return "\n".join(lines) + "\n"
