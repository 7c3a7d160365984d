"""The run lock: one run per state database, held by the operating system for the process.

POSIX: `fcntl.flock` on `<db>.lock`. Windows: `msvcrt.locking` on one byte past the holder's pid
(a Windows lock is mandatory, so a lock over the pid would hide it from the run it refuses).
Either way the lock dies with the process: it is never stale.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from runner.errors import LockedError

if sys.platform == "win32":
    import msvcrt

    _LOCKED_BYTE = 64  # past the pid record; locking past the end of a file is allowed

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        pass  # closing the descriptor releases the lock


@contextlib.contextmanager
def run_lock(db_path: Path) -> Iterator[None]:
    """One run per state database, held by the kernel: it dies with the process, never stale."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    locked = False
    try:
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode(errors="replace").strip()
            pid = int(holder) if holder.isdigit() else None
            raise LockedError(
                f"another run of {db_path.name} is in progress"
                + (f" (pid {pid})" if pid else ""), pid=pid) from None
        locked = True
        # One fixed-width write over the last holder's pid: a run that reads it never sees it empty.
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid():<20}\n".encode())
        os.ftruncate(fd, 21)
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                _unlock(fd)
        os.close(fd)  # closing the descriptor releases the lock too
