"""The run lock: one run per state database."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from runner.errors import LockedError


@contextlib.contextmanager
def run_lock(db_path: Path) -> Iterator[None]:
    """One run per state database, held by the kernel: it dies with the process, never stale."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            pid = int(holder) if holder.isdigit() else None
            raise LockedError(
                f"another run of {db_path.name} is in progress"
                + (f" (pid {pid})" if pid else ""), pid=pid) from None
        # One fixed-width write over the last holder's pid: a run that reads it never sees it empty.
        os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
        os.ftruncate(fd, 21)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
