"""One writer per output: an exclusive ``flock`` on ``<out>.lock`` beside the output, held for the whole run.

The lock file holds the holder's pid and host. The kernel drops the lock when its holder dies (even by
``kill -9``), so a lock is never stale; a finished run removes the file. Forked children (decoding workers)
close their copy of the lock at once, so none of them keeps the output locked after its run died.
"""

from __future__ import annotations

import fcntl
import os
import socket
import weakref
from pathlib import Path

from blipkit.errors import OutputLocked


def lock_path(out: str | os.PathLike) -> Path:
    """``captions.jsonl`` -> ``captions.jsonl.lock``, ``index/`` -> ``index.lock``, in the same folder."""
    path = Path(os.path.abspath(out))
    return path.with_name(path.name + ".lock")


_held: weakref.WeakSet[OutputLock] = weakref.WeakSet()


def _drop_in_child() -> None:
    for lock in list(_held):  # closing a copy leaves the parent's lock in place (no LOCK_UN)
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None


os.register_at_fork(after_in_child=_drop_in_child)


class OutputLock:
    """The exclusive right to write ``out``; ``acquire`` raises ``OutputLocked`` naming the current holder."""

    def __init__(self, out: str | os.PathLike):
        self.out = out
        self.path = lock_path(out)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
                os.close(fd)
                raise OutputLocked(
                    f"{self.out} is being written by another blipkit run ({holder}): "
                    "wait for it to finish, or write to another output"
                ) from None
            try:  # a holder that just finished removed the file we locked: lock the one there now
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        _held.add(self)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: the next run locks a new file
        finally:
            os.close(self._fd)
            self._fd = None
            _held.discard(self)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
