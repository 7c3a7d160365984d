"""runner.lock: one run per state database, on POSIX (flock) and, emulated, on Windows (msvcrt)."""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

import runner.lock
from runner.errors import LockedError
from runner.lock import run_lock


def test_a_second_lock_on_the_same_database_is_refused_naming_the_holder(tmp_path):
    db = tmp_path / "state" / "j.db"
    with run_lock(db):
        with pytest.raises(LockedError) as info, run_lock(db):
            pass
        assert info.value.pid == os.getpid()
        assert f"(pid {os.getpid()})" in str(info.value)
        other = tmp_path / "state" / "other.db"
        with run_lock(other):  # another database: its own lock
            pass
    with run_lock(db):  # released on leaving
        pass
    assert (db.parent / "j.db.lock").read_text().strip() == str(os.getpid())


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking's contract: byte ranges from the file position, OSError when taken."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self) -> None:
        super().__init__("msvcrt")
        self.held: dict[tuple[int, int, int], int] = {}

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        if mode == self.LK_NBLCK:
            if self.held.get(key, fd) != fd:
                raise OSError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        elif mode == self.LK_UNLCK:
            if self.held.pop(key, None) != fd:
                raise OSError(errno.EACCES, "Permission denied")
        else:
            raise AssertionError(f"unexpected mode {mode}")


def test_the_windows_branch_locks_a_byte_past_the_pid_and_unlocks(tmp_path, monkeypatch):
    fake = FakeMsvcrt()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    spec = importlib.util.spec_from_file_location("lock_on_windows", runner.lock.__file__)
    win = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(win)
    assert "fcntl" not in vars(win) and win.msvcrt is fake

    db = tmp_path / "j.db"
    with win.run_lock(db):
        assert len(fake.held) == 1 and next(iter(fake.held))[2] == win._LOCKED_BYTE
        with pytest.raises(LockedError) as info, win.run_lock(db):
            pass
        assert info.value.pid == os.getpid()
        assert len(fake.held) == 1  # the refused run took nothing
    assert fake.held == {}
    with win.run_lock(db):
        pass
    assert fake.held == {}


POSIX_ONLY = ("fcntl", "termios", "resource", "pwd", "grp", "msvcrt", "winreg")


def test_no_module_of_the_package_imports_a_platform_module_at_top_level():
    """So `run` and `plan` import on Windows and POSIX alike; lock.py imports them indented."""
    package = Path(runner.lock.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = line.replace(",", " ").split()
            if line.startswith(("import ", "from ")) and any(m in words for m in POSIX_ONLY):
                found.append(f"{path.relative_to(package)}:{n}: {line}")
    assert found == []
