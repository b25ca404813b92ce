"""A data dir's occupancy: who holds it (the lock) and whether a service answers on it (the probe).

Neutral ground: the service takes the lock; the offline commands (backup, restore, migrate,
broker-config) step aside for a running service or take it themselves.

One service per data dir: an exclusive lock on ``DATA/lock`` for the process's lifetime.

Two services on one data dir would both write the store and overwrite each other's
``service.json``. The lock is ``flock``: the kernel releases it when the process dies, so a stale
lock after ``kill -9`` never blocks a restart. The file says who holds it (pid, address), for the
refusal's message.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .errors import ServiceUnavailable, StoreError
from .paths import ADMIN_SOCKET

LOCK_FILE = "lock"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot use the data dir {self.path.parent}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info.get('pid')}, {info.get('address') or 'starting'}"
            except ValueError:
                who = "another process"
            raise ServiceUnavailable(
                f"another henge service is running on this data dir ({who}): stop it first, or use another --data"
            ) from None
        self._fd = fd
        self.record(None)

    def try_acquire(self) -> bool:
        """Take the lock unless a service holds it (False): for offline commands that run alongside
        a service or step aside for it. ``release`` is a no-op when it was not taken."""
        try:
            self.acquire()
        except ServiceUnavailable:
            return False
        return True

    def record(self, address: str | None) -> None:
        """Say who holds the lock (the process, and once listening, its address)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "address": address}).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def service_running(data_dir: Path) -> bool:
    """Whether a service answers on the data dir's admin socket."""
    import socket

    path = data_dir / ADMIN_SOCKET
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
