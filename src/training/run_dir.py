"""The lock of a run directory (standard library only, so that any process can take or test it cheaply)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time


class RunLock:
    """`DIR/train.lock`, held by the one process that writes a run directory: a second training on the same --out
    is refused, naming the holder. The lock is an flock on the file, which the kernel releases when its holder dies,
    so the lock of a killed run is taken over (and said so). Where flock is unavailable, the pid written in the file
    decides: a lock naming a live process on this host refuses, a dead one's is taken over."""

    NAME = "train.lock"

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, self.NAME)
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another host's process cannot be checked from here
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True

    def acquire(self) -> "RunLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        holder = self._holder(fd)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        except (ImportError, OSError):  # no flock here (some network filesystems): trust the pid in the file
            busy = bool(holder) and self._alive(holder)
        if busy:
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            raise RunLockedError(f"{self.directory} is being written by another training ({who}; lock file "
                                 f"{self.path}): wait for it to end, or choose another --out")
        if holder.get("pid") not in (None, os.getpid()):
            print(f"note: took over the lock of an earlier training (pid {holder.get('pid')}) that is no longer "
                  f"running: {self.path}", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # nobody holds it now
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunLockedError(ValueError):
    """Another live process holds the run directory's lock."""
