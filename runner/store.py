"""The SQLite checkpoint: items, runs, request attempts and credits; the queries that make resume work.

One writer (the run) and any number of readers (status, plan, export): WAL, a busy timeout, and
short transactions. During a run writes are grouped (`Store.writer`): writes that arrive together
(request rows from several senders, answered batches) share one transaction, and the coordinator
reads through a second connection, so no thread queues behind another's commit. Nothing here is
ever marked `done` without an answer.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from runner.records import DONE, FAILED, PENDING, REJECTED, Item, RecordOutcome

SCHEMA_VERSION = 1

# How a listed image relates to what the database already knows (what `plan` counts).
NEW, CHANGED, CHANGED_REQUEST, UNCHANGED, RESUMED, RETRY, KEPT_FAILED = (
    "new", "changed", "changed_request", "unchanged", "resumed", "retry", "kept_failed")
TO_SEND = frozenset({NEW, CHANGED, CHANGED_REQUEST, RESUMED, RETRY})
RETRY_REASON = "retry requested"
T = TypeVar("T")
RUN_COUNTERS = ("listed", "requests", "sent", "done", "failed", "rejected", "reused", "credits",
                "credits_saved")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Listed:
    """A listed item and what the database says must happen to it."""

    item: Item
    kind: str  # one of NEW, CHANGED, ... above


@dataclass(frozen=True)
class Classified:
    """A classified chunk of a listing: how many of each kind, and every image that is not simply
    unchanged (those are only counted)."""

    counts: dict[str, int]
    listed: list[Listed]

    @property
    def to_send(self) -> list[Listed]:
        return [x for x in self.listed if x.kind in TO_SEND]


@dataclass(frozen=True)
class Answer:
    """One image's outcome, ready to be written with its batch."""

    item: Item
    outcome: RecordOutcome
    content_hash: str | None
    followers: tuple[Item, ...] = ()  # identical bytes of this run that wait for this answer


@dataclass
class StoreStats:
    """Where the store's time went: the writer's transactions and the reads (benchmarks use it)."""

    write_s: float = 0.0  # wall time inside write transactions, BEGIN to COMMIT
    write_cpu_s: float = 0.0  # the writer thread's CPU time in them (no interpreter-lock waits)
    transactions: int = 0
    writes: int = 0  # write operations; several share a transaction while the writer runs
    read_s: float = 0.0
    waits: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, seconds]


class Store:
    """A job's view of one state database; the same file may hold several jobs."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(str(self.path))
        # check_same_thread=False: batch outcomes arrive on worker threads; self._lock serialises
        # every use of the one connection.
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None  # while the writer runs
        self._read_lock = threading.Lock()
        self._run_counts: dict[int, dict[str, int]] = {}  # written before each COMMIT
        self._listed_all: str | None = None  # the job whose every row this run listed
        self._json_each = _has_json_each(self.conn)
        self.stats = StoreStats()
        self._stats_lock = threading.Lock()
        self.conn.execute("PRAGMA busy_timeout = 30000")
        if create:
            self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a killed process (only power loss can drop the last commits).
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        if create:
            self._create_schema()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema ---------------------------------------------------------------------------------

    def _create_schema(self) -> None:
        db = sqlite_utils.Database(self.conn)
        with self._lock:
            db["items"].create(
                {
                    "job": str, "key": str, "uri": str, "size": int, "fingerprint": str,
                    "state": str, "reason": str, "credits": int, "result": str,
                    "content_hash": str, "request_sig": str, "prep_sig": str,
                    "reused_from": str, "sends": int, "listed_run": int, "missing": int,
                    "first_seen": str, "updated_at": str, "answered_at": str,
                },
                pk=("job", "key"),
                not_null={"job", "key", "state"},
                defaults={"credits": 0, "sends": 0, "missing": 0, "state": PENDING},
                if_not_exists=True,
            )
            db["items"].create_index(["job", "state"], if_not_exists=True)
            db["items"].create_index(["content_hash", "request_sig"], if_not_exists=True)
            # Only the few missing images: finding those listed again costs nothing otherwise.
            self.conn.execute("CREATE INDEX IF NOT EXISTS idx_items_missing ON items (job, key) "
                              "WHERE missing = 1")
            db["runs"].create(
                {
                    "id": int, "job": str, "pid": int, "started_at": str, "finished_at": str,
                    "status": str, "exit_code": int, "endpoint": str, "budget": int,
                    "listed": int, "sent": int, "done": int, "failed": int, "rejected": int,
                    "reused": int, "requests": int, "credits": int, "credits_saved": int,
                    "account_before": int, "account_after": int,
                },
                pk="id",
                not_null={"job", "started_at", "status"},
                defaults={"listed": 0, "sent": 0, "done": 0, "failed": 0, "rejected": 0,
                          "reused": 0, "requests": 0, "credits": 0, "credits_saved": 0},
                if_not_exists=True,
            )
            db["runs"].create_index(["job", "id"], if_not_exists=True)
            # One row per HTTP request that carried records: written before the request is sent,
            # closed when its batch is recorded. A row still open after its run ended names images
            # that may have been billed without an answer recorded.
            db["attempts"].create(
                {"id": int, "run_id": int, "job": str, "batch": int, "attempt": int,
                 "keys": str, "n": int, "sent_at": str, "closed_at": str},
                pk="id",
                not_null={"run_id", "job", "keys", "sent_at"},
                foreign_keys=[("run_id", "runs", "id")],
                if_not_exists=True,
            )
            db["attempts"].create_index(["job", "closed_at"], if_not_exists=True)
            db["attempts"].create_index(["run_id", "batch"], if_not_exists=True)
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))

    # --- transactions ---------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def _count_run(self, run_id: int, **deltas: int) -> None:
        """Add to a run's counters; written once per transaction, just before its COMMIT (one
        UPDATE for a group of writes, not one per write)."""
        mine = self._run_counts.setdefault(run_id, dict.fromkeys(RUN_COUNTERS, 0))
        for name, n in deltas.items():
            mine[name] += n

    def _flush_run_counts(self, c: sqlite3.Connection) -> None:
        counts, self._run_counts = self._run_counts, {}
        sets = ", ".join(f"{name} = {name} + ?" for name in RUN_COUNTERS)
        for run_id, mine in counts.items():
            c.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*mine.values(), run_id))

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """For a run: writes that arrive together share one transaction (see `_Writer`), and
        reads go through a second connection. A caller of a write still returns only once it is
        committed (a request's row is on disk before the request leaves), but thirty-two senders
        no longer take turns at BEGIN ... COMMIT."""
        reader = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                 check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA busy_timeout = 30000")
        reader.execute("PRAGMA query_only = ON")
        writer = _Writer(self)
        self._writer, self._reader = writer, reader
        try:
            yield
        finally:
            self._writer = None
            writer.stop()
            with self._read_lock:
                self._reader = None
                reader.close()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) in a write transaction (shared with others while the writer runs)."""
        writer = self._writer
        if writer is not None:
            result = writer.submit(fn)
            if result is not _CLOSED:
                return result  # type: ignore[return-value]
        started = time.perf_counter()
        try:
            with self._tx() as c:
                return fn(c)
        finally:
            self.stats.write_s += time.perf_counter() - started
            self.stats.transactions += 1
            self.stats.writes += 1

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) on the read connection while the writer runs, else on the one."""
        started = time.perf_counter()
        try:
            with self._read_lock:
                reader = self._reader
                if reader is not None:
                    return fn(reader)
            with self._lock:
                return fn(self.conn)
        finally:
            self.stats.read_s += time.perf_counter() - started

    # --- runs -----------------------------------------------------------------------------------

    def begin_run(self, job: str, *, pid: int, endpoint: str, budget: int) -> int:
        def begin(c: sqlite3.Connection) -> int:
            # A heap, indexed once when it is asked (mark_missing, the exit code): far cheaper
            # than keeping a B-tree sorted through a million inserts. It lives in a temporary
            # file, not in memory, so a listing of millions of keys does not grow the process.
            self._listed_all = None
            c.execute("DROP TABLE IF EXISTS temp.listed")
            c.execute("CREATE TEMP TABLE listed (key TEXT, fp TEXT)")
            # A run that is still "running" in the database but whose process is gone crashed.
            c.execute("UPDATE runs SET status = 'crashed' WHERE job = ? AND status = 'running'",
                      (job,))
            cur = c.execute(
                "INSERT INTO runs (job, pid, started_at, status, endpoint, budget) "
                "VALUES (?, ?, ?, 'running', ?, ?)", (job, pid, utcnow(), endpoint, budget))
            return int(cur.lastrowid)

        return self._write(begin)

    def finish_run(self, run_id: int, *, status: str, exit_code: int,
                   account_after: int | None = None) -> None:
        self._write(lambda c: c.execute(
            "UPDATE runs SET finished_at = ?, status = ?, exit_code = ?, "
            "account_after = coalesce(?, account_after) WHERE id = ?",
            (utcnow(), status, exit_code, account_after, run_id)))

    def set_account_before(self, run_id: int, value: int | None) -> None:
        self._write(lambda c: c.execute("UPDATE runs SET account_before = ? WHERE id = ?",
                                        (value, run_id)))

    def run_row(self, run_id: int) -> dict[str, Any]:
        row = self._read(lambda c: c.execute("SELECT * FROM runs WHERE id = ?",
                                             (run_id,)).fetchone())
        return dict(row) if row else {}

    def recent_runs(self, job: str, n: int = 5) -> list[dict[str, Any]]:
        rows = self._read(lambda c: c.execute(
            "SELECT * FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?", (job, n)).fetchall())
        return [dict(r) for r in rows]

    # --- listing --------------------------------------------------------------------------------

    def classify(self, job: str, items: Sequence[Item], *, request_sig: str, prep_sig: str,
                 run_id: int | None) -> Classified:
        """Decide for a chunk of listed items what must happen; with a run, record them as listed.

        Without a run (plan) nothing is written. New and changed images become `pending` here, so
        a crash after this point leaves them to be sent by the next run.
        """
        if run_id is None:
            known = self._read(lambda c: _known_rows(c, job, items))
            return _classified(items, _decide(items, known, request_sig, prep_sig))
        return self.classify_soon(job, items, request_sig=request_sig, prep_sig=prep_sig,
                                  run_id=run_id)()

    def classify_soon(self, job: str, items: Sequence[Item], *, request_sig: str, prep_sig: str,
                      run_id: int) -> Callable[[], Classified]:
        """`classify` for a run, queued to the writer: returns at once with a function that
        waits for the committed result. The run lists the next chunk meanwhile: listing holds
        the interpreter lock, SQLite's join mostly does not, so the two share the cores."""
        if not items:
            return lambda: Classified({}, [])
        # The chunk's JSON is built here, by the caller, so that the writer holds the
        # interpreter lock as little as it can while the caller goes on listing.
        rows = (_listing_json([(it.key, it.fingerprint) for it in items])
                if self._json_each else None)

        def fn(c: sqlite3.Connection) -> Classified:
            return self._classify_listed(c, job, items, request_sig=request_sig,
                                         prep_sig=prep_sig, run_id=run_id, rows=rows)

        writer = self._writer
        op = writer.enqueue(fn) if writer is not None else None
        if op is None:
            done = self._write(fn)
            return lambda: done
        return op.wait

    def _classify_listed(self, c: sqlite3.Connection, job: str, items: Sequence[Item], *,
                         request_sig: str, prep_sig: str, run_id: int,
                         rows: str | None) -> Classified:
        """The chunk goes into the run's listing first; SQLite then returns only the images whose
        row says something must happen. A rerun over a million unchanged images builds no Python
        object per image and writes nothing to the database file."""
        base = c.execute("SELECT coalesce(max(rowid), 0) FROM temp.listed").fetchone()[0]
        if rows is not None:
            # One statement for the chunk (its rows parsed by SQLite, the interpreter lock let go
            # once), not one step per row: the listing runs meanwhile without a lock hand-over
            # per row.
            c.execute("INSERT INTO temp.listed (key, fp) SELECT json_extract(value, '$[0]'), "
                      "json_extract(value, '$[1]') FROM json_each(?)", (rows,))
        else:
            c.executemany("INSERT INTO temp.listed (key, fp) VALUES (?, ?)",
                          [(it.key, it.fingerprint) for it in items])
        cur = c.cursor()
        cur.row_factory = None
        found = cur.execute(
            "SELECT l.key, i.fingerprint, i.state, i.reason, i.request_sig, i.prep_sig "
            "FROM temp.listed l LEFT JOIN items i ON i.job = ? AND i.key = l.key "
            "WHERE l.rowid > ? AND NOT coalesce(i.fingerprint = l.fp AND ("
            "(i.state = 'done' AND i.request_sig = ?) OR "
            "(i.state = 'rejected' AND i.prep_sig IS ?)), 0)",
            (job, base, request_sig, prep_sig)).fetchall()
        by_key = {it.key: it for it in items} if found else {}
        acting = [by_key[key] for key, *_ in found]
        known = {key: tuple(rest) for key, *rest in found if rest[1] is not None}
        out = _classified(items, _decide(acting, known, request_sig, prep_sig))
        now = utcnow()
        c.executemany(
            "INSERT INTO items (job, key, uri, size, fingerprint, state, listed_run, "
            "first_seen, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
            "ON CONFLICT (job, key) DO UPDATE SET uri = excluded.uri, size = excluded.size, "
            "fingerprint = excluded.fingerprint, listed_run = excluded.listed_run, "
            # The previous answer stays with its content hash and request signature: if the
            # bytes turn out unchanged (a touched file), find_answer reuses it for free.
            "state = 'pending', reason = NULL, updated_at = excluded.updated_at",
            [(job, x.item.key, x.item.uri, x.item.size, x.item.fingerprint, run_id, now, now)
             for x in out.listed if x.kind in (NEW, CHANGED, CHANGED_REQUEST)])
        self._count_run(run_id, listed=len(items))
        return out

    def _index_listed(self, c: sqlite3.Connection) -> None:
        c.execute("CREATE INDEX IF NOT EXISTS temp.listed_key ON listed (key)")

    def mark_missing(self, job: str, run_id: int, *, unique_listing: bool = False) -> int:
        """After a complete listing: images the sources no longer list are kept, flagged missing.

        `unique_listing`: the listing cannot name a key twice (one root, or only a manifest).
        Every listed key has a row by now, so if the job has as many rows as the listing had
        keys, nothing is missing and the listing holds every row: no index on it is needed."""

        def mark(c: sqlite3.Connection) -> int:
            if unique_listing:
                rows = c.execute("SELECT count(*) FROM items WHERE job = ?", (job,)).fetchone()[0]
                listed = c.execute("SELECT count(*) FROM temp.listed").fetchone()[0]
                if rows == listed:
                    self._listed_all = job
                    c.execute("UPDATE items SET missing = 0 WHERE job = ? AND missing = 1", (job,))
                    return 0
            self._index_listed(c)
            # The job's keys are read from the primary key's index alone (not from the rows,
            # which carry the answers): a million unchanged images cost an index scan.
            cur = c.execute("UPDATE items SET missing = 1 WHERE rowid IN (SELECT rowid FROM items "
                            "WHERE job = ? AND key NOT IN (SELECT key FROM temp.listed)) "
                            "AND missing = 0", (job,))
            c.execute("UPDATE items SET missing = 0 WHERE job = ? AND missing = 1 AND "
                      "EXISTS (SELECT 1 FROM temp.listed l WHERE l.key = items.key)", (job,))
            return cur.rowcount

        return self._write(mark)

    # --- outcomes -------------------------------------------------------------------------------

    def mark_rejected(self, job: str, rejected: Sequence[tuple[Item, str]], *, prep_sig: str,
                      run_id: int) -> None:
        if not rejected:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'rejected', reason = ?, prep_sig = ?, updated_at = ? "
                "WHERE job = ? AND key = ?",
                [(reason, prep_sig, now, job, it.key) for it, reason in rejected])
            self._count_run(run_id, rejected=len(rejected))

        self._write(mark)

    def mark_failed(self, job: str, failed: Sequence[tuple[Item, str]], *, run_id: int) -> None:
        """Images that failed before any request (their bytes could not be read)."""
        if not failed:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany("UPDATE items SET state = 'failed', reason = ?, updated_at = ? "
                          "WHERE job = ? AND key = ?",
                          [(reason, now, job, it.key) for it, reason in failed])
            self._count_run(run_id, failed=len(failed))

        self._write(mark)

    def find_answer(self, content_hash: str, request_sig: str) -> tuple[str, str, str] | None:
        """An answer already paid for these bytes and this request, in any job: (job, key, result)."""
        return self.find_answers([content_hash], request_sig).get(content_hash)

    def find_answers(self, hashes: Sequence[str],
                     request_sig: str) -> dict[str, tuple[str, str, str]]:
        """Answers already paid for these contents and this request, in any job, one query:
        content hash -> (job, key, result).

        The image that paid is preferred; once it changed, a copy that reused its answer still
        holds it; and an image listed again as changed keeps its last answer until it is sent,
        so a touched file whose bytes did not change is not paid for again."""
        if not hashes:
            return {}
        unique = list(dict.fromkeys(hashes))

        def find(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
            cur = c.cursor()
            cur.row_factory = None
            rows: list[tuple[Any, ...]] = []
            for i in range(0, len(unique), 500):
                part = unique[i:i + 500]
                rows += cur.execute(
                    "SELECT content_hash, job, key, result, state != 'done', "
                    "reused_from IS NOT NULL FROM items "
                    f"WHERE content_hash IN ({','.join('?' * len(part))}) AND request_sig = ? "
                    "AND result IS NOT NULL AND state IN ('done', 'pending')",
                    (*part, request_sig)).fetchall()
            return rows

        best: dict[str, tuple[Any, ...]] = {}
        for h, job, key, result, not_done, reused in self._read(find):
            rank = (not_done, reused, job, key)
            if h not in best or rank < best[h][0]:
                best[h] = (rank, (job, key, result))
        return {h: found for h, (_, found) in best.items()}

    def mark_reused(self, job: str, reused: Sequence[tuple[Item, str, str, str]], *,
                    request_sig: str, prep_sig: str, run_id: int, per_image: int) -> None:
        """(item, content_hash, source key, result JSON): done for free with a known answer."""
        if not reused:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, content_hash = ?, "
                "request_sig = ?, prep_sig = ?, reused_from = ?, updated_at = ?, answered_at = ? "
                "WHERE job = ? AND key = ?",
                [(result, h, request_sig, prep_sig, src, now, now, job, it.key)
                 for it, h, src, result in reused])
            self._count_run(run_id, reused=len(reused), done=len(reused),
                            credits_saved=len(reused) * per_image)

        self._write(mark)

    def record_attempt(self, job: str, run_id: int, batch: int, attempt: int,
                       keys: Sequence[str]) -> None:
        """Before a request leaves: these images are in flight (and may be billed). Returns once
        the row is committed."""
        self._timed_wait("record_attempt", self._attempt_row(job, run_id, batch, attempt, keys))

    def _attempt_row(self, job: str, run_id: int, batch: int, attempt: int,
                     keys: Sequence[str]) -> Callable[[sqlite3.Connection], None]:
        row = (run_id, job, batch, attempt, json.dumps(list(keys)), len(keys), utcnow())

        def record(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO attempts (run_id, job, batch, attempt, keys, n, sent_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            self._count_run(run_id, requests=1)

        return record

    def record_batch(self, job: str, run_id: int, batch: int, answers: Sequence[Answer], *,
                     request_sig: str, prep_sig: str, per_image: int) -> int:
        """One transaction per answered batch (or one for several answered together): outcomes,
        credits, followers; returns the batch's credits."""
        now = utcnow()
        credits = 0
        done = failed = sent = reused = 0
        rows_done, rows_failed, rows_sends, rows_followers = [], [], [], []
        for a in answers:
            o = a.outcome
            if not o.final:
                rows_sends.append((o.attempts, now, job, a.item.key))
                continue
            sent += 1
            result = compact_json(o.record) if o.record is not None else None
            if o.ok:
                credits += per_image
                done += 1
                rows_done.append((result, per_image, a.content_hash, request_sig, prep_sig,
                                  o.attempts, now, now, job, a.item.key))
                for f in a.followers:
                    reused += 1
                    rows_done.append((result, 0, a.content_hash, request_sig, prep_sig, 0, now,
                                      now, job, f.key))
                    # Followers carry the key they were answered through.
                    rows_followers.append((a.item.key, job, f.key))
            else:
                failed += 1
                rows_failed.append((o.reason, result, a.content_hash, o.attempts, now, job,
                                    a.item.key))
                for f in a.followers:
                    failed += 1
                    rows_failed.append((f"same bytes as {a.item.key}: {o.reason}", None,
                                        a.content_hash, 0, now, job, f.key))

        def record(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, "
                "credits = credits + ?, content_hash = ?, request_sig = ?, prep_sig = ?, "
                "reused_from = NULL, sends = sends + ?, updated_at = ?, answered_at = ? "
                "WHERE job = ? AND key = ?", rows_done)
            if rows_followers:
                c.executemany("UPDATE items SET reused_from = ? WHERE job = ? AND key = ?",
                              rows_followers)
            if rows_failed:
                c.executemany(
                    "UPDATE items SET state = 'failed', reason = ?, result = ?, content_hash = ?, "
                    "request_sig = NULL, sends = sends + ?, updated_at = ? "
                    "WHERE job = ? AND key = ?", rows_failed)
            if rows_sends:
                c.executemany("UPDATE items SET sends = sends + ?, updated_at = ? "
                              "WHERE job = ? AND key = ?", rows_sends)
            c.execute("UPDATE attempts SET closed_at = ? WHERE run_id = ? AND batch = ? "
                      "AND closed_at IS NULL", (now, run_id, batch))
            self._count_run(run_id, sent=sent, done=done, failed=failed, reused=reused,
                            credits=credits, credits_saved=reused * per_image)

        self._timed_wait("record_batch", record)
        return credits

    def _timed_wait(self, name: str, fn: Callable[[sqlite3.Connection], None]) -> None:
        """A write whose caller waits for the commit: how long it waited is kept in stats."""
        started = time.perf_counter()
        self._write(fn)
        self._count_wait(name, time.perf_counter() - started)

    def _count_wait(self, name: str, seconds: float) -> None:
        with self._stats_lock:  # senders count concurrently
            calls = self.stats.waits.setdefault(name, [0, 0.0])
            calls[0] += 1
            calls[1] += seconds

    # --- questions ------------------------------------------------------------------------------

    def spent(self, job: str) -> int:
        """Credits this job has recorded, over all its runs."""
        row = self._read(lambda c: c.execute(
            "SELECT coalesce(sum(credits), 0) FROM runs WHERE job = ?", (job,)).fetchone())
        return int(row[0])

    def counts(self, job: str) -> dict[str, int]:
        rows = self._read(lambda c: c.execute(
            "SELECT state, count(*), sum(missing), sum(reused_from IS NOT NULL), "
            "sum(credits) FROM items WHERE job = ? GROUP BY state", (job,)).fetchall())
        out = {s: 0 for s in (PENDING, DONE, FAILED, REJECTED)}
        out.update(missing=0, reused=0, credits=0)
        for state, n, missing, reused, credits in rows:
            out[state] = n
            out["missing"] += missing or 0
            out["reused"] += reused or 0
            out["credits"] += credits or 0
        return out

    def missing_count(self, job: str) -> int:
        """Images no longer listed (from the partial index: no scan of the rows)."""
        row = self._read(lambda c: c.execute(
            "SELECT count(*) FROM items WHERE job = ? AND missing = 1", (job,)).fetchone())
        return int(row[0])

    def failed_among_listed(self, job: str, run_id: int) -> int:
        return self._count_listed(job, "failed")

    def pending_among_listed(self, job: str, run_id: int) -> int:
        return self._count_listed(job, "pending")

    def _count_listed(self, job: str, state: str) -> int:
        """Images of this run's listing in a state (the exit code speaks of those only). The
        listing is a temporary table of the writing connection: asked there."""

        def count(c: sqlite3.Connection) -> int:
            if self._listed_all == job:  # mark_missing found every row listed
                row = c.execute("SELECT count(*) FROM items WHERE job = ? AND state = ?",
                                (job, state)).fetchone()
                return int(row[0])
            self._index_listed(c)
            row = c.execute("SELECT count(*) FROM items WHERE job = ? AND state = ? AND "
                            "key IN (SELECT key FROM temp.listed)", (job, state)).fetchone()
            return int(row[0])

        return self._write(count)

    def unanswered(self, job: str, *, running_run: int | None = None) -> list[dict[str, Any]]:
        """Requests sent by runs that ended before recording their answer: possibly billed."""
        rows = self._read(lambda c: c.execute(
            "SELECT a.run_id, a.batch, a.attempt, a.keys, a.sent_at FROM attempts a "
            "WHERE a.job = ? AND a.closed_at IS NULL AND a.run_id IS NOT ? ORDER BY a.id",
            (job, running_run)).fetchall())
        return [{"run": r["run_id"], "batch": r["batch"], "attempt": r["attempt"],
                 "keys": json.loads(r["keys"]), "sent_at": r["sent_at"]} for r in rows]

    def resend_stats(self, job: str) -> dict[str, int]:
        """Images carried by more than one request: the visible bound on double billing."""
        row = self._read(lambda c: c.execute(
            "SELECT count(*), coalesce(sum(sends - 1), 0) FROM items "
            "WHERE job = ? AND sends > 1", (job,)).fetchone())
        return {"images_sent_more_than_once": int(row[0]), "extra_sends": int(row[1])}

    def retry_failed(self, job: str, reason_like: str | None = None) -> int:
        """Failed images go back to pending; the next run sends them again."""
        q = ("UPDATE items SET state = 'pending', reason = ?, updated_at = ? "
             "WHERE job = ? AND state = 'failed'")
        args: list[Any] = [RETRY_REASON, utcnow(), job]
        if reason_like:
            q += " AND reason LIKE ?"
            args.append(f"%{reason_like}%")
        return self._write(lambda c: c.execute(q, args).rowcount)

    def export_rows(self, job: str, state: str | None = None) -> Iterator[dict[str, Any]]:
        q = ("SELECT key, uri, state, reason, credits, reused_from, content_hash, fingerprint, "
             "sends, missing, answered_at, result FROM items WHERE job = ?")
        args: list[Any] = [job]
        if state:
            q += " AND state = ?"
            args.append(state)
        q += " ORDER BY key"
        # A separate cursor on a read-only connection streams without holding the writer's lock.
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            for row in conn.execute(q, args):
                d = dict(row)
                # A pending image's previous answer is kept for reuse, but it is not its answer.
                pending = d["state"] == "pending"
                d["result"] = json.loads(d["result"]) if d["result"] and not pending else None
                d["missing"] = bool(d["missing"])
                yield d
        finally:
            conn.close()



def _has_json_each(conn: sqlite3.Connection) -> bool:
    """SQLite's JSON functions are built in since 3.38 and usually compiled in before."""
    try:
        conn.execute("SELECT count(*) FROM json_each('[1]')").fetchone()
    except sqlite3.OperationalError:
        return False
    return True


def _known_rows(c: sqlite3.Connection, job: str,
                items: Sequence[Item]) -> dict[str, tuple[Any, ...]]:
    """What the database holds for these items: key -> (fingerprint, state, reason, request_sig,
    prep_sig); plain tuples, not sqlite3.Row."""
    keys = [it.key for it in items]
    known: dict[str, tuple[Any, ...]] = {}
    cur = c.cursor()
    cur.row_factory = None
    for i in range(0, len(keys), 500):
        part = keys[i:i + 500]
        q = ("SELECT key, fingerprint, state, reason, request_sig, prep_sig FROM items "
             f"WHERE job = ? AND key IN ({','.join('?' * len(part))})")
        for key, *rest in cur.execute(q, (job, *part)):
            known[key] = tuple(rest)
    return known


def _decide(items: Iterable[Item], known: dict[str, tuple[Any, ...]], request_sig: str,
            prep_sig: str) -> list[Listed]:
    """The kind of each item, from its row (absent: new)."""
    out: list[Listed] = []
    for it in items:
        row = known.get(it.key)
        if row is None:
            out.append(Listed(it, NEW))
            continue
        fingerprint, state, reason, req_sig, row_prep_sig = row
        if fingerprint != it.fingerprint:
            kind = CHANGED
        elif state == DONE:
            kind = UNCHANGED if req_sig == request_sig else CHANGED_REQUEST
        elif state == REJECTED:
            # A rejection belongs to the format policy: a new policy looks again.
            kind = UNCHANGED if row_prep_sig == prep_sig else CHANGED
        elif state == FAILED:
            kind = KEPT_FAILED
        else:
            kind = RETRY if reason == RETRY_REASON else RESUMED
        out.append(Listed(it, kind))
    return out


def _classified(items: Sequence[Item], decided: list[Listed]) -> Classified:
    """Counts for the whole chunk: what was not decided (filtered out by SQL) is unchanged."""
    listed = [x for x in decided if x.kind != UNCHANGED]
    counts: dict[str, int] = {}
    for x in listed:
        counts[x.kind] = counts.get(x.kind, 0) + 1
    unchanged = len(items) - len(listed)
    if unchanged:
        counts[UNCHANGED] = unchanged
    return Classified(counts, listed)


_CLOSED = object()  # what _Writer.submit answers once the writer has stopped


class _Op:
    __slots__ = ("fn", "result", "error", "done")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
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


class _Writer:
    """Group commit for a run. A caller that finds no commit in progress commits its write itself,
    with any queued; otherwise its write is queued, and the writer thread commits everything
    queued in one transaction. Should one write fail, the group is rolled back and committed again
    with a savepoint per write, so that the failing one fails alone. Every caller returns after
    the COMMIT (or raises its own error). Writes queued without waiting (`enqueue`) are the
    thread's too."""

    MAX_GROUP = 256

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._gate = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """fn's result once committed; _CLOSED if the writer has stopped (the caller writes).

        When no commit is in progress the caller commits itself, with whatever else is queued:
        no hand-over to the writer thread and back, which under a busy interpreter lock costs
        more than the commit. Otherwise its write joins the writer's next group."""
        store = self.store
        if store._lock.acquire(blocking=False):
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
                store._lock.release()
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

    def enqueue(self, fn: Callable[[sqlite3.Connection], Any]) -> _Op | None:
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
            with self.store._lock:  # a caller committing by itself finishes first
                group, last = self._drain([first])
                self._commit(group)
            if last:
                return

    def _commit(self, ops: list[_Op]) -> None:
        stats = self.store.stats
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
        self.store.stats.transactions += 1
        try:
            with self.store._tx() as c:
                for op in ops:
                    op.result = op.fn(c)
        except Exception:  # noqa: BLE001 -- rolled back; _apart finds whose failure it was
            for op in ops:
                op.result = None
            return False
        return True

    def _apart(self, ops: list[_Op]) -> None:
        """The writes in one transaction, each in a savepoint, so that a failing one fails alone."""
        self.store.stats.transactions += 1
        try:
            with self.store._tx() as c:
                if len(ops) == 1:  # alone, its failure rolls the transaction back
                    ops[0].result = ops[0].fn(c)
                    return
                for op in ops:
                    c.execute("SAVEPOINT op")
                    counts = {k: dict(v) for k, v in self.store._run_counts.items()}
                    try:
                        op.result = op.fn(c)
                    except Exception as exc:  # noqa: BLE001 -- handed to the caller, who raises it
                        c.execute("ROLLBACK TO op")
                        self.store._run_counts = counts
                        op.error = exc
                    c.execute("RELEASE op")
        except Exception as exc:  # noqa: BLE001 -- BEGIN or COMMIT failed: nothing was written
            for op in ops:
                op.error = op.error or exc


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; a few retries if a reader holds a lock."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        for delay in (0.05, 0.2, 1.0, None):
            try:
                self.store.conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError:
                if delay is None:
                    self.store._lock.release()
                    raise
                time.sleep(delay)
        return self.store.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self.store._flush_run_counts(self.store.conn)
                except BaseException:
                    self.store.conn.execute("ROLLBACK")
                    raise
                self.store.conn.execute("COMMIT")
            else:
                self.store._run_counts = {}
                self.store.conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


def open_readonly(path: Path) -> Store:
    """For status/plan/export while a run writes: no schema changes, no journal-mode switch."""
    return Store(path, create=False)


# An answer as stored: no separator spaces. One encoder for every call (json.dumps with options
# builds a new one each time, which cost more than the encoding of a small record).
compact_json = json.JSONEncoder(separators=(",", ":")).encode

# Keys in any script as UTF-8, not escapes; no separator spaces; tuples of strings need no check
# for cycles.
_listing_json = json.JSONEncoder(ensure_ascii=False, check_circular=False,
                                 separators=(",", ":")).encode


def iter_chunks(items: Iterable[Any], size: int | Callable[[], int]) -> Iterator[list[Any]]:
    """Lists of `size` items (the last one shorter); a callable size is asked for each list."""
    limit = size if callable(size) else lambda: size
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= limit():
            yield chunk
            chunk = []
    if chunk:
        yield chunk
