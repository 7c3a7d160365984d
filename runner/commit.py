"""One SQLite connection, its transactions and grouped commits; it knows no tables.

One writer (the run) and any number of readers (status, plan, export): WAL, a busy timeout, and
short transactions. During a run (`Database.grouped`) writes that arrive together (request rows
from several senders, answered batches) share one transaction, and reads go through a second
connection, so that no thread queues behind another's commit. A caller of a write still returns
only once it is committed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from runner.errors import DatabaseError, brief

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]
BUSY_TIMEOUT_S = 30


class Deferred(Protocol):
    """Writes kept in memory and written once per transaction, just before its COMMIT (the
    store's run counters: one UPDATE for a group of writes, not one per write)."""

    def flush(self, c: sqlite3.Connection) -> None: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...

    def clear(self) -> None: ...


@dataclass
class CommitStats:
    """Where the time went: the transactions and the reads (the benchmarks print it)."""

    write_s: float = 0.0  # wall time inside write transactions, BEGIN to COMMIT
    write_cpu_s: float = 0.0  # the writer thread's CPU time in them (no interpreter-lock waits)
    transactions: int = 0
    writes: int = 0  # write operations; several share a transaction while grouped
    read_s: float = 0.0
    waits: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, seconds]


# --- storage errors: one line naming the file and what to do ----------------------------------


def readonly_uri(path: Path | str) -> str:
    """An SQLite URI that opens `path` read-only; `#`, `?`, `%` and spaces in the path escaped
    (a bare f"file:{path}" would cut the name there and create a stray empty file)."""
    return Path(os.path.abspath(path)).as_uri() + "?mode=ro"


def check_db_path(path: Path | str) -> None:
    """Refuse a state database path that is a folder, a device or a FIFO before anything opens
    it (SQLite would open /dev/null and lose every write). A missing file is fine."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise database_error(exc, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise DatabaseError(f"state database {path}: it is a folder, not a file; point "
                            "[state] db at a file (for example state/<name>.db)")
    if not stat.S_ISREG(st.st_mode):
        raise DatabaseError(f"state database {path}: it is not a regular file (a device, FIFO "
                            "or socket); point [state] db at a file")


def database_error(exc: BaseException, path: Path | str) -> DatabaseError:
    """What an SQLite or OS error on the state database means, and what to do, on one line."""
    text = str(exc).lower()
    code = exc.errno if isinstance(exc, OSError) else None
    if "full" in text or code == errno.ENOSPC:
        what = ("the disk holding it is full: free some space, then run again (what was "
                "committed is kept)")
    elif "readonly" in text or "read-only" in text or code in (errno.EROFS, errno.EACCES,
                                                                errno.EPERM):
        what = ("it (or its folder) cannot be written here: run where both are writable, or "
                "point [state] db elsewhere")
    elif "not a database" in text or "no such table" in text or "no such column" in text:
        what = ("it is not a ximrun state database (not SQLite, or overwritten): point [state] "
                "db at another file, or restore it from a backup")
    elif "malformed" in text or "corrupt" in text:
        what = ("it is corrupt: restore it from a backup, or salvage it with the sqlite3 "
                "shell's .recover into a new file, then run again")
    elif "locked" in text or "busy" in text:
        what = "another process keeps it locked: wait for it to finish, then run again"
    elif "unable to open" in text or "cannot open" in text or isinstance(exc, OSError):
        what = ("it cannot be opened: check that it is a file, and that it and its folder "
                "exist and can be read and written")
    elif "i/o error" in text:
        what = "the disk failed to read or write it (I/O error): check the disk, then run again"
    else:
        what = "it cannot be used"
    return DatabaseError(f"state database {path}: {what} ({brief(exc, 100)})")


@contextlib.contextmanager
def storage_errors(path: Path | str) -> Iterator[None]:
    """SQLite's storage errors (and the OS's) become DatabaseError naming the file; errors of
    ximrun's own SQL (IntegrityError, ProgrammingError) pass through unchanged."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
        raise database_error(exc, path) from None


_mapped = storage_errors


class Database:
    """A connection to one SQLite file, shared by threads; `lock` serialises every use of it.

    `create=False` opens the file read-only (status, export, plan): nothing can change it.
    Storage errors raise DatabaseError (exit 74) naming the file and what to do."""

    def __init__(self, path: Path | str, *, create: bool = True,
                 deferred: Deferred | None = None) -> None:
        self.path = Path(path)
        memory = str(path) == ":memory:"
        if not memory:
            check_db_path(self.path)
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise database_error(exc, self.path) from None
        elif not self.path.exists():
            raise FileNotFoundError(str(self.path))
        # check_same_thread=False: batch outcomes arrive on worker threads; self.lock serialises
        # every use of the one connection.
        with _mapped(self.path):
            target = str(self.path) if create or memory else readonly_uri(self.path)
            self.conn = sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                        check_same_thread=False, uri=not (create or memory))
        self.deferred = deferred
        try:
            self._setup(create)
        except BaseException:
            self.conn.close()
            raise

    def _setup(self, create: bool) -> None:
        self.conn.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self.stats = CommitStats()
        self._stats_lock = threading.Lock()
        self._group: _GroupCommit | None = None
        self._reader: sqlite3.Connection | None = None  # while grouped
        self._read_lock = threading.Lock()
        with _mapped(self.path):
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            if create:
                self.conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a killed process (only power loss can drop the last
            # commits).
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            # Reading the schema now: a file that is not a database fails here, not mid-run.
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

    def mapped(self) -> contextlib.AbstractContextManager[None]:
        """Storage errors inside become DatabaseError naming this file."""
        return _mapped(self.path)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def transaction(self) -> _Transaction:
        return _Transaction(self)

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """For a run: writes that arrive together share one transaction (see `_GroupCommit`), and
        reads go through a second connection. A caller of a write still returns only once it is
        committed (a request's row is on disk before the request leaves), but thirty-two senders
        no longer take turns at BEGIN ... COMMIT."""
        with _mapped(self.path):
            reader = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                     isolation_level=None, check_same_thread=False)
            reader.row_factory = sqlite3.Row
            reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            reader.execute("PRAGMA query_only = ON")
        group = _GroupCommit(self)
        self._group, self._reader = group, reader
        try:
            yield
        finally:
            self._group = None
            group.stop()
            with self._read_lock:
                self._reader = None
                reader.close()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) in a write transaction (shared with others while grouped)."""
        with _mapped(self.path):
            return self._write(fn)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        group = self._group
        if group is not None:
            result = group.submit(fn)
            if result is not _CLOSED:
                return result  # type: ignore[no-any-return]
        started = time.perf_counter()
        try:
            with self.transaction() as c:
                return fn(c)
        finally:
            self.stats.write_s += time.perf_counter() - started
            self.stats.transactions += 1
            self.stats.writes += 1

    def write_soon(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        """Queue a write and return at once with a function that waits for its committed result;
        without grouping, the write is done now."""
        group = self._group
        op = group.enqueue(fn) if group is not None else None
        if op is None:
            done = self.write(fn)
            return lambda: done

        def wait() -> T:
            with _mapped(self.path):
                return op.wait()  # type: ignore[no-any-return]

        return wait

    def write_waited(self, name: str, fn: WriteFn) -> Any:
        """A write whose caller waits for the commit: how long it waited is kept in stats;
        returns fn's result."""
        started = time.perf_counter()
        result = self.write(fn)
        seconds = time.perf_counter() - started
        with self._stats_lock:  # senders count concurrently
            calls = self.stats.waits.setdefault(name, [0, 0.0])
            calls[0] += 1
            calls[1] += seconds
        return result

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) on the read connection while grouped, else on the one."""
        started = time.perf_counter()
        try:
            with _mapped(self.path):
                with self._read_lock:
                    reader = self._reader
                    if reader is not None:
                        return fn(reader)
                with self.lock:
                    return fn(self.conn)
        finally:
            self.stats.read_s += time.perf_counter() - started


_CLOSED = object()  # what _GroupCommit.submit answers once it has stopped


class _Op:
    __slots__ = ("fn", "result", "error", "done")

    def __init__(self, fn: WriteFn) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self) -> Any:
        """fn's result once committed; fn's error (or the commit's) raised here."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _GroupCommit:
    """Group commit for a run. A caller that finds no commit in progress commits its write itself,
    with any queued; otherwise its write is queued, and the writer thread commits everything
    queued in one transaction. Should one write fail, the group is rolled back and committed again
    with a savepoint per write, so that the failing one fails alone. Every caller returns after
    the COMMIT (or raises its own error). Writes queued without waiting (`enqueue`) are the
    thread's too."""

    MAX_GROUP = 256

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._gate = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: WriteFn) -> Any:
        """fn's result once committed; _CLOSED if the writer has stopped (the caller writes).

        When no commit is in progress the caller commits itself, with whatever else is queued:
        no hand-over to the writer thread and back, which under a busy interpreter lock costs
        more than the commit. Otherwise its write joins the writer's next group."""
        if self.db.lock.acquire(blocking=False):
            try:
                with self._gate:
                    if self._closed:
                        return _CLOSED
                op = _Op(fn)
                ops, stop = self._drain([op])
                self._commit(ops)
                if stop:
                    self._queue.put(None)  # the writer's stop signal, taken along: handed back
            finally:
                self.db.lock.release()
            return op.wait()
        queued = self.enqueue(fn)
        return _CLOSED if queued is None else queued.wait()

    def _drain(self, ops: list[_Op]) -> tuple[list[_Op], bool]:
        """ops plus every write waiting in the queue; whether the stop signal was among them."""
        stop = False
        while len(ops) < self.MAX_GROUP:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if op is None:
                stop = True
            else:
                ops.append(op)
        return ops, stop

    def enqueue(self, fn: WriteFn) -> _Op | None:
        """Queue a write and return at once; None if the writer has stopped."""
        op = _Op(fn)
        with self._gate:
            if self._closed:
                return None
            self._queue.put(op)
        return op

    def stop(self) -> None:
        """Commit what is queued, then end the thread; later writes run in their caller."""
        with self._gate:
            self._closed = True
            self._queue.put(None)  # after every accepted write: the gate orders them
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            with self.db.lock:  # a caller committing by itself finishes first
                group, last = self._drain([first])
                self._commit(group)
            if last:
                return

    def _commit(self, ops: list[_Op]) -> None:
        stats = self.db.stats
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            if len(ops) == 1 or not self._together(ops):
                self._apart(ops)
        finally:
            stats.write_cpu_s += time.thread_time() - cpu
            stats.write_s += time.perf_counter() - started
            stats.writes += len(ops)
            for op in ops:
                op.done.set()

    def _together(self, ops: list[_Op]) -> bool:
        """All writes in one transaction, with no savepoint each (two statements fewer per write,
        each a wait for the interpreter lock); False if one failed: then nothing was written."""
        self.db.stats.transactions += 1
        try:
            with self.db.transaction() as c:
                for op in ops:
                    op.result = op.fn(c)
        except Exception:  # noqa: BLE001 -- rolled back; _apart finds whose failure it was
            for op in ops:
                op.result = None
            return False
        return True

    def _apart(self, ops: list[_Op]) -> None:
        """The writes in one transaction, each in a savepoint, so that a failing one fails alone."""
        self.db.stats.transactions += 1
        deferred = self.db.deferred
        try:
            with self.db.transaction() as c:
                if len(ops) == 1:  # alone, its failure rolls the transaction back
                    ops[0].result = ops[0].fn(c)
                    return
                for op in ops:
                    c.execute("SAVEPOINT op")
                    kept = deferred.snapshot() if deferred is not None else None
                    try:
                        op.result = op.fn(c)
                    except Exception as exc:  # noqa: BLE001 -- handed to the caller, who raises it
                        if not c.in_transaction:
                            # SQLite ended the whole transaction (a full disk, say): nothing of
                            # the group was written, and every write gets this error.
                            raise
                        c.execute("ROLLBACK TO op")
                        if deferred is not None:
                            deferred.restore(kept)
                        op.error = exc
                    c.execute("RELEASE op")
        except Exception as exc:  # noqa: BLE001 -- BEGIN or COMMIT failed: nothing was written
            for op in ops:
                op.error = op.error or exc


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the database's lock; a few retries if a reader holds a
    lock. The deferred writes go in just before COMMIT and are dropped on ROLLBACK."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.lock.acquire()
        for delay in (0.05, 0.2, 1.0, None):
            try:
                self.db.conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError:
                if delay is None:
                    self.db.lock.release()
                    raise
                time.sleep(delay)
        return self.db.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn, deferred = self.db.conn, self.db.deferred
        try:
            if exc_type is None:
                try:
                    if deferred is not None:
                        deferred.flush(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (a full disk) may leave the transaction open: rolled back,
                    # so that the connection can begin the next one.
                    if deferred is not None:
                        deferred.clear()
                    _rollback(conn)
                    raise
            else:
                if deferred is not None:
                    deferred.clear()
                _rollback(conn)
        finally:
            self.db.lock.release()


def _rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK if a transaction is still open: SQLite rolls back by itself after some errors
    (SQLITE_FULL, SQLITE_IOERR), and a second ROLLBACK would hide the first error."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
