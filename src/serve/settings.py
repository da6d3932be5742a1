"""The server's limits and knobs, one dataclass shared by the CLI, the app, the queue and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeSettings:
    max_batch: int = 8  # images decoded together at most
    max_wait_ms: float = 20.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests waiting (not yet running) before new ones get a 503
    max_images_per_request: int = 16  # more is a 400
    cache_size: int = 256  # requests whose images the LRU result cache keeps (0 = no cache)
    api_auth: Optional[str] = None  # "USER:PASS" -> HTTP Basic auth on the API and the page
    max_upload_bytes: int = 16 * 2**20  # an uploaded image's encoded size
    max_upload_pixels: int = 4096 * 4096  # an uploaded image's width x height, read from its header
    threads: Optional[int] = None  # torch threads of the worker that runs the model

    def check(self) -> None:
        """Raise ValueError naming the first bad setting (as its command-line flag)."""
        for flag, value, minimum in (("--max-batch", self.max_batch, 1), ("--max-wait-ms", self.max_wait_ms, 0),
                                     ("--queue-size", self.queue_size, 1), ("--cache-size", self.cache_size, 0),
                                     ("--max-images-per-request", self.max_images_per_request, 1)):
            if value < minimum:
                raise ValueError(f"{flag} must be >= {minimum}, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.api_auth is not None:
            user, sep, password = self.api_auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("--api-auth must be USER:PASS")

    @property
    def credentials(self) -> Optional[tuple[str, str]]:
        if self.api_auth is None:
            return None
        user, _, password = self.api_auth.partition(":")
        return user, password
