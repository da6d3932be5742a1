"""The request queue in front of the model, and the LRU result cache.

One worker thread runs the model. It takes the oldest waiting job, waits up to `max_wait_ms` (from that job's
arrival) for more jobs with the same batch key until `max_batch` images are collected, and runs them as one batch.
Jobs with other keys keep their place. With a `finish` step (the server's: VQGAN decoding and PNG encoding), a
second thread finishes a batch while the worker samples the next, so under load a second core is not left idle;
it answers each job as soon as that job's images are done, so that its client's next request can join the next
batch while the rest is decoded (with 16 clients and a batch of 16, the model thread otherwise waits for the whole
batch to be decoded and sent). An exception (in either step) fails only the jobs of its batch not yet answered.
Requests are answered through asyncio futures on the event loop that submitted them. The running batch's decoding
steps are reported to `report_step` (the sampler's on_step), which `progress()` turns into a fraction and an ETA.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from .errors import RequestError


class Batcher:
    """run(jobs) -> one result per job, or with finish: run(jobs) -> value and finish(jobs, value) -> an iterable of
    one result per job, in order, run on its own thread; each job is answered as soon as its result comes."""

    def __init__(self, run: Callable[[list], object], max_batch: int, max_wait_ms: float, queue_size: int,
                 metrics=None, threads: Optional[int] = None,
                 finish: Optional[Callable[[list, object], Iterable]] = None):
        self.run, self.finish, self.max_batch, self.max_wait = run, finish, max_batch, max_wait_ms / 1000.0
        self.queue_size, self.metrics, self.threads = queue_size, metrics, threads
        self.pending: deque = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.running_images = self.running_jobs = 0
        self.finishing_jobs = 0  # jobs sampled and not yet delivered (decoding on the finishing thread)
        self.batch_started = 0.0  # time.monotonic() when the running batch started
        self.step = (0, 0)  # decoding steps done, steps in all, of the running batch
        self.batch_seconds = 1.0  # running mean of a batch's duration, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="tokenpaint-model", daemon=True)
        self.finishing: Optional[ThreadPoolExecutor] = None

    def start(self) -> None:
        if self.finish is not None:
            self.finishing = ThreadPoolExecutor(1, "tokenpaint-finish", initializer=self._set_threads)
        self.thread.start()

    def depth(self) -> int:
        return len(self.pending)

    def active(self) -> int:
        """Jobs sampling or being finished (decoded), not yet answered."""
        return self.running_jobs + self.finishing_jobs

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new jobs, finish the waiting ones, stop the worker (and the finishing thread once it is done)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.finishing is not None:
            self.finishing.shutdown(wait=True)

    def report_step(self, done: int, total: int) -> None:
        """The sampler's on_step for the running batch (called on the worker thread)."""
        self.step = (done, total)

    def progress(self) -> tuple[float, float, int, int]:
        """(fraction of the running batch's decoding steps done, seconds it still needs at its pace so far,
        steps done, steps in all); zeros when no batch runs."""
        (done, total), images = self.step, self.running_images
        if not images or not total:
            return 0.0, 0.0, 0, 0
        fraction = done / total
        elapsed = time.monotonic() - self.batch_started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return fraction, eta, done, total

    def retry_after(self) -> int:
        return max(1, math.ceil(self.batch_seconds * (1 + len(self.pending) / self.max_batch)))

    async def submit(self, job) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.cond:
            if self.closing:
                raise RequestError(503, "the server is shutting down", headers={"Retry-After": "5"})
            if len(self.pending) >= self.queue_size:
                raise RequestError(503, f"the queue is full ({self.queue_size} requests waiting); retry later",
                                   headers={"Retry-After": str(self.retry_after())})
            job.future, job.loop, job.enqueued = future, loop, time.monotonic()
            self.pending.append(job)
            self.cond.notify_all()
        return await future

    # ------------------------------------------------------------------ worker thread
    def _group(self, key) -> tuple[list, int, bool]:
        """The waiting jobs with this key, oldest first, that fit in max_batch (the first one always does)."""
        group, images = [], 0
        for job in self.pending:
            if job.batch_key != key:
                continue
            if group and images + job.size > self.max_batch:
                return group, images, True
            group.append(job)
            images += job.size
        return group, images, images >= self.max_batch

    def _take(self) -> Optional[list]:
        with self.cond:
            while True:
                while self.pending and self.pending[0].future.cancelled():  # the client went away
                    self.pending.popleft()
                if not self.pending:
                    if self.closing:
                        return None
                    self.cond.wait()
                    continue
                first = self.pending[0]
                key, deadline = first.batch_key, first.enqueued + self.max_wait
                while True:
                    group, _, full = self._group(key)
                    remaining = deadline - time.monotonic()
                    if full or remaining <= 0 or self.closing or first.edit is not None:
                        break
                    self.cond.wait(remaining)
                for job in group:
                    self.pending.remove(job)
                return [job for job in group if not job.future.cancelled()] or self._take()

    def _set_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # OpenMP thread counts are per thread: set it in each worker

    def _loop(self) -> None:
        self._set_threads()
        while True:
            group = self._take()
            if group is None:
                return
            images = sum(job.size for job in group)
            self.step, self.batch_started = (0, 0), time.monotonic()
            self.running_images, self.running_jobs = images, len(group)
            start = time.perf_counter()
            try:
                value, error = self.run(group), None
            except Exception as e:  # fails this batch's requests only
                value, error = None, e
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.perf_counter() - start)
            self.running_images, self.running_jobs, self.step = 0, 0, (0, 0)
            if error is None and self.finishing is not None:
                with self.cond:
                    self.finishing_jobs += len(group)
                self.finishing.submit(self._finish, group, images, value)
            else:
                self._deliver(group, images, value, error)

    def _finish(self, group: list, images: int, value) -> None:
        """Each job is answered as soon as its own result is finished: its client can send its next request while
        the rest of the batch is decoded."""
        done, error = 0, None
        try:
            for result in self.finish(group, value):
                with self.cond:
                    self.finishing_jobs -= 1
                _answer(group[done], result, None)
                done += 1
        except Exception as e:
            error = e
        with self.cond:
            self.finishing_jobs -= len(group) - done
        self._deliver(group[done:], images, None, error)  # the batch's metrics; an error answers the rest

    def _deliver(self, group: list, images: int, results, error) -> None:
        if self.metrics is not None:
            self.metrics.batch(images, failed=error is not None)
        for i, job in enumerate(group):
            _answer(job, None if error else results[i], error)


def _answer(job, result, error) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:  # the event loop is gone
        pass


def _settle(future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ResultCache:
    """An LRU map from a request's cache key to its images (base64 strings), bounded in requests and in bytes;
    thread-safe; capacity 0 keeps nothing."""

    def __init__(self, capacity: int, max_bytes: int = 256 << 20):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key, images: list) -> None:
        size = sum(len(image) for image in images)
        if self.capacity <= 0 or size > self.max_bytes:
            return
        with self.lock:
            if key in self.items:
                self.bytes -= sum(len(image) for image in self.items.pop(key))
            self.items[key] = images
            self.bytes += size
            while len(self.items) > self.capacity or self.bytes > self.max_bytes:
                _, evicted = self.items.popitem(last=False)
                self.bytes -= sum(len(image) for image in evicted)
