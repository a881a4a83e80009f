"""``with output_lock(folder, what): ...``: one writer per output folder, across processes.

The lock is :mod:`filelock`'s (``fcntl.flock`` on Unix), so it dies with its process: a run killed
by SIGKILL, a restarted container, another PID namespace or a lock file left empty by a full disk
never block a later run, and no stale lock is ever "taken over". The lock file also records the
holder's process id and host, so that a second writer gets a ``ValueError`` naming them. The file is
removed on release (while still held: a process waiting on the old file sees it gone and retries),
and a folder made only for the lock is removed with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Iterator

import filelock

LOCK_FILE = ".lock"


def _holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _record_holder(path: str) -> None:
    """Who holds the lock, for the message a second writer gets; the lock does not depend on it."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, handle)
    except OSError:  # a full disk: the lock is held all the same
        pass


@contextlib.contextmanager
def output_lock(folder: str, what: str = "this folder", hold: bool = True) -> Iterator[None]:
    """Hold ``folder/.lock`` inside the block, or raise ``ValueError`` naming the process that holds
    it. ``hold=False`` holds nothing (the other processes of a distributed run, whose main process
    holds the lock)."""
    if not hold:
        yield
        return
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = _holder(path)
        raise ValueError(
            f"{what} {folder!r} is being written by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(lock file {path}); wait for it to finish") from None
    try:
        _record_holder(path)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # made only for the lock, and nothing was written: leave no trace
