"""The SQLite checkpoint: items, runs, request attempts and credits; the queries that make resume work.

One writer (the run) and any number of readers (status, plan, export): WAL, a busy timeout, and
short transactions, one per answered batch. Nothing here is ever marked `done` without an answer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from runner.records import DONE, FAILED, PENDING, REJECTED, Item, RecordOutcome

SCHEMA_VERSION = 1

# How a listed image relates to what the database already knows (what `plan` counts).
NEW, CHANGED, CHANGED_REQUEST, UNCHANGED, RESUMED, RETRY, KEPT_FAILED = (
    "new", "changed", "changed_request", "unchanged", "resumed", "retry", "kept_failed")
TO_SEND = frozenset({NEW, CHANGED, CHANGED_REQUEST, RESUMED, RETRY})
RETRY_REASON = "retry requested"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Listed:
    """A listed item and what the database says must happen to it."""

    item: Item
    kind: str  # one of NEW, CHANGED, ... above


@dataclass(frozen=True)
class Answer:
    """One image's outcome, ready to be written with its batch."""

    item: Item
    outcome: RecordOutcome
    content_hash: str | None
    followers: tuple[Item, ...] = ()  # identical bytes of this run that wait for this answer


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

    # --- runs -----------------------------------------------------------------------------------

    def begin_run(self, job: str, *, pid: int, endpoint: str, budget: int) -> int:
        with self._lock:
            # A heap, indexed once when it is asked (mark_missing, the exit code): far cheaper
            # than keeping a B-tree sorted through a million inserts. It lives in a temporary
            # file, not in memory, so a listing of millions of keys does not grow the process.
            self.conn.execute("DROP TABLE IF EXISTS temp.listed")
            self.conn.execute("CREATE TEMP TABLE listed (key TEXT)")
        with self._tx() as c:
            # A run that is still "running" in the database but whose process is gone crashed.
            c.execute("UPDATE runs SET status = 'crashed' WHERE job = ? AND status = 'running'",
                      (job,))
            cur = c.execute(
                "INSERT INTO runs (job, pid, started_at, status, endpoint, budget) "
                "VALUES (?, ?, ?, 'running', ?, ?)", (job, pid, utcnow(), endpoint, budget))
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, *, status: str, exit_code: int,
                   account_after: int | None = None) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET finished_at = ?, status = ?, exit_code = ?, "
                      "account_after = coalesce(?, account_after) WHERE id = ?",
                      (utcnow(), status, exit_code, account_after, run_id))

    def set_account_before(self, run_id: int, value: int | None) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET account_before = ? WHERE id = ?", (value, run_id))

    def run_row(self, run_id: int) -> dict[str, Any]:
        with self._lock:
            row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row) if row else {}

    def recent_runs(self, job: str, n: int = 5) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT * FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?",
                                     (job, n)).fetchall()
        return [dict(r) for r in rows]

    # --- listing --------------------------------------------------------------------------------

    def classify(self, job: str, items: Sequence[Item], *, request_sig: str, prep_sig: str,
                 run_id: int | None) -> list[Listed]:
        """Decide for a chunk of listed items what must happen; with a run, record them as listed.

        Without a run (plan) nothing is written. New and changed images become `pending` here, so
        a crash after this point leaves them to be sent by the next run.
        """
        if not items:
            return []
        keys = [it.key for it in items]
        # Plain tuples, not sqlite3.Row: a rerun looks up every listed image here.
        known: dict[str, tuple[Any, ...]] = {}
        with self._lock:
            cur = self.conn.cursor()
            cur.row_factory = None
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                q = ("SELECT key, fingerprint, state, reason, request_sig, prep_sig FROM items "
                     f"WHERE job = ? AND key IN ({','.join('?' * len(part))})")
                for key, *rest in cur.execute(q, (job, *part)):
                    known[key] = tuple(rest)
        out: list[Listed] = []
        for it in items:
            row = known.get(it.key)
            if row is None:
                kind = NEW
                out.append(Listed(it, kind))
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
        if run_id is not None:
            self._record_listed(job, out, run_id)
        return out

    def _record_listed(self, job: str, listed: Sequence[Listed], run_id: int) -> None:
        now = utcnow()
        to_pending = [(job, x.item.key, x.item.uri, x.item.size, x.item.fingerprint, run_id, now,
                       now) for x in listed if x.kind in (NEW, CHANGED, CHANGED_REQUEST)]
        with self._tx() as c:
            c.executemany(
                "INSERT INTO items (job, key, uri, size, fingerprint, state, listed_run, "
                "first_seen, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
                "ON CONFLICT (job, key) DO UPDATE SET uri = excluded.uri, size = excluded.size, "
                "fingerprint = excluded.fingerprint, listed_run = excluded.listed_run, "
                # The previous answer stays with its content hash and request signature: if the
                # bytes turn out unchanged (a touched file), find_answer reuses it for free.
                "state = 'pending', reason = NULL, updated_at = excluded.updated_at", to_pending)
            # What this run listed goes to a temporary table, not to every item's row: a rerun
            # over a million unchanged images then writes nothing to the database file.
            c.executemany("INSERT INTO temp.listed VALUES (?)",
                          [(x.item.key,) for x in listed])
            c.execute("UPDATE runs SET listed = listed + ? WHERE id = ?", (len(listed), run_id))

    def _index_listed(self) -> None:
        with self._lock:
            self.conn.execute("CREATE INDEX IF NOT EXISTS temp.listed_key ON listed (key)")

    def mark_missing(self, job: str, run_id: int) -> int:
        """After a complete listing: images the sources no longer list are kept, flagged missing."""
        self._index_listed()
        with self._tx() as c:
            cur = c.execute("UPDATE items SET missing = 1 WHERE job = ? AND missing = 0 AND "
                            "key NOT IN (SELECT key FROM temp.listed)", (job,))
            c.execute("UPDATE items SET missing = 0 WHERE job = ? AND missing = 1 AND "
                      "key IN (SELECT key FROM temp.listed)", (job,))
            return cur.rowcount

    # --- outcomes -------------------------------------------------------------------------------

    def mark_rejected(self, job: str, rejected: Sequence[tuple[Item, str]], *, prep_sig: str,
                      run_id: int) -> None:
        if not rejected:
            return
        now = utcnow()
        with self._tx() as c:
            c.executemany(
                "UPDATE items SET state = 'rejected', reason = ?, prep_sig = ?, updated_at = ? "
                "WHERE job = ? AND key = ?",
                [(reason, prep_sig, now, job, it.key) for it, reason in rejected])
            c.execute("UPDATE runs SET rejected = rejected + ? WHERE id = ?",
                      (len(rejected), run_id))

    def mark_failed(self, job: str, failed: Sequence[tuple[Item, str]], *, run_id: int) -> None:
        """Images that failed before any request (their bytes could not be read)."""
        if not failed:
            return
        now = utcnow()
        with self._tx() as c:
            c.executemany("UPDATE items SET state = 'failed', reason = ?, updated_at = ? "
                          "WHERE job = ? AND key = ?",
                          [(reason, now, job, it.key) for it, reason in failed])
            c.execute("UPDATE runs SET failed = failed + ? WHERE id = ?", (len(failed), run_id))

    def find_answer(self, content_hash: str, request_sig: str) -> tuple[str, str, str] | None:
        """An answer already paid for these bytes and this request, in any job: (job, key, result).

        The image that paid is preferred; once it changed, a copy that reused its answer still
        holds it; and an image listed again as changed keeps its last answer until it is sent,
        so a touched file whose bytes did not change is not paid for again."""
        with self._lock:
            row = self.conn.execute(
                "SELECT job, key, result FROM items WHERE content_hash = ? AND request_sig = ? "
                "AND result IS NOT NULL AND state IN ('done', 'pending') "
                "ORDER BY state != 'done', reused_from IS NOT NULL LIMIT 1",
                (content_hash, request_sig)).fetchone()
        return (row["job"], row["key"], row["result"]) if row else None

    def mark_reused(self, job: str, reused: Sequence[tuple[Item, str, str, str]], *,
                    request_sig: str, prep_sig: str, run_id: int, per_image: int) -> None:
        """(item, content_hash, source key, result JSON): done for free with a known answer."""
        if not reused:
            return
        now = utcnow()
        with self._tx() as c:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, content_hash = ?, "
                "request_sig = ?, prep_sig = ?, reused_from = ?, updated_at = ?, answered_at = ? "
                "WHERE job = ? AND key = ?",
                [(result, h, request_sig, prep_sig, src, now, now, job, it.key)
                 for it, h, src, result in reused])
            c.execute("UPDATE runs SET reused = reused + ?, done = done + ?, "
                      "credits_saved = credits_saved + ? WHERE id = ?",
                      (len(reused), len(reused), len(reused) * per_image, run_id))

    def record_attempt(self, job: str, run_id: int, batch: int, attempt: int,
                       keys: Sequence[str]) -> None:
        """Before a request leaves: these images are in flight (and may be billed)."""
        with self._tx() as c:
            c.execute("INSERT INTO attempts (run_id, job, batch, attempt, keys, n, sent_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (run_id, job, batch, attempt, json.dumps(list(keys)), len(keys), utcnow()))
            c.execute("UPDATE runs SET requests = requests + 1 WHERE id = ?", (run_id,))

    def record_batch(self, job: str, run_id: int, batch: int, answers: Sequence[Answer], *,
                     request_sig: str, prep_sig: str, per_image: int) -> int:
        """One transaction per answered batch: outcomes, credits, followers; returns credits."""
        now = utcnow()
        credits = 0
        done = failed = sent = reused = 0
        rows_done, rows_failed, rows_sends = [], [], []
        for a in answers:
            o = a.outcome
            if not o.final:
                rows_sends.append((o.attempts, now, job, a.item.key))
                continue
            sent += 1
            result = json.dumps(o.record, separators=(",", ":")) if o.record is not None else None
            if o.ok:
                credits += per_image
                done += 1
                rows_done.append((result, per_image, a.content_hash, request_sig, prep_sig,
                                  o.attempts, now, now, job, a.item.key))
                for f in a.followers:
                    reused += 1
                    rows_done.append((result, 0, a.content_hash, request_sig, prep_sig, 0, now,
                                      now, job, f.key))
            else:
                failed += 1
                rows_failed.append((o.reason, result, a.content_hash, o.attempts, now, job,
                                    a.item.key))
                for f in a.followers:
                    failed += 1
                    rows_failed.append((f"same bytes as {a.item.key}: {o.reason}", None,
                                        a.content_hash, 0, now, job, f.key))
        with self._tx() as c:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, "
                "credits = credits + ?, content_hash = ?, request_sig = ?, prep_sig = ?, "
                "reused_from = NULL, sends = sends + ?, updated_at = ?, answered_at = ? "
                "WHERE job = ? AND key = ?", rows_done)
            # Followers carry the key they were answered through.
            for a in answers:
                if a.outcome.final and a.outcome.ok and a.followers:
                    c.executemany("UPDATE items SET reused_from = ? WHERE job = ? AND key = ?",
                                  [(a.item.key, job, f.key) for f in a.followers])
            c.executemany(
                "UPDATE items SET state = 'failed', reason = ?, result = ?, content_hash = ?, "
                "request_sig = NULL, sends = sends + ?, updated_at = ? WHERE job = ? AND key = ?",
                rows_failed)
            c.executemany("UPDATE items SET sends = sends + ?, updated_at = ? "
                          "WHERE job = ? AND key = ?", rows_sends)
            c.execute("UPDATE attempts SET closed_at = ? WHERE run_id = ? AND batch = ? "
                      "AND closed_at IS NULL", (now, run_id, batch))
            c.execute("UPDATE runs SET sent = sent + ?, done = done + ?, failed = failed + ?, "
                      "reused = reused + ?, credits = credits + ?, credits_saved = credits_saved + ?"
                      " WHERE id = ?",
                      (sent, done, failed, reused, credits, reused * per_image, run_id))
        return credits

    # --- questions ------------------------------------------------------------------------------

    def spent(self, job: str) -> int:
        """Credits this job has recorded, over all its runs."""
        with self._lock:
            row = self.conn.execute("SELECT coalesce(sum(credits), 0) FROM runs WHERE job = ?",
                                    (job,)).fetchone()
        return int(row[0])

    def counts(self, job: str) -> dict[str, int]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT state, count(*), sum(missing), sum(reused_from IS NOT NULL), "
                "sum(credits) FROM items WHERE job = ? GROUP BY state", (job,)).fetchall()
        out = {s: 0 for s in (PENDING, DONE, FAILED, REJECTED)}
        out.update(missing=0, reused=0, credits=0)
        for state, n, missing, reused, credits in rows:
            out[state] = n
            out["missing"] += missing or 0
            out["reused"] += reused or 0
            out["credits"] += credits or 0
        return out

    def failed_among_listed(self, job: str, run_id: int) -> int:
        return self._count_listed(job, "failed")

    def pending_among_listed(self, job: str, run_id: int) -> int:
        return self._count_listed(job, "pending")

    def _count_listed(self, job: str, state: str) -> int:
        """Images of this run's listing in a state (the exit code speaks of those only)."""
        self._index_listed()
        with self._lock:
            row = self.conn.execute("SELECT count(*) FROM items WHERE job = ? AND state = ? AND "
                                    "key IN (SELECT key FROM temp.listed)",
                                    (job, state)).fetchone()
        return int(row[0])

    def unanswered(self, job: str, *, running_run: int | None = None) -> list[dict[str, Any]]:
        """Requests sent by runs that ended before recording their answer: possibly billed."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT a.run_id, a.batch, a.attempt, a.keys, a.sent_at FROM attempts a "
                "WHERE a.job = ? AND a.closed_at IS NULL AND a.run_id IS NOT ? ORDER BY a.id",
                (job, running_run)).fetchall()
        return [{"run": r["run_id"], "batch": r["batch"], "attempt": r["attempt"],
                 "keys": json.loads(r["keys"]), "sent_at": r["sent_at"]} for r in rows]

    def resend_stats(self, job: str) -> dict[str, int]:
        """Images carried by more than one request: the visible bound on double billing."""
        with self._lock:
            row = self.conn.execute(
                "SELECT count(*), coalesce(sum(sends - 1), 0) FROM items "
                "WHERE job = ? AND sends > 1", (job,)).fetchone()
        return {"images_sent_more_than_once": int(row[0]), "extra_sends": int(row[1])}

    def retry_failed(self, job: str, reason_like: str | None = None) -> int:
        """Failed images go back to pending; the next run sends them again."""
        q = ("UPDATE items SET state = 'pending', reason = ?, updated_at = ? "
             "WHERE job = ? AND state = 'failed'")
        args: list[Any] = [RETRY_REASON, utcnow(), job]
        if reason_like:
            q += " AND reason LIKE ?"
            args.append(f"%{reason_like}%")
        with self._tx() as c:
            return c.execute(q, args).rowcount

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
                self.store.conn.execute("COMMIT")
            else:
                self.store.conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


def open_readonly(path: Path) -> Store:
    """For status/plan/export while a run writes: no schema changes, no journal-mode switch."""
    return Store(path, create=False)


def iter_chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
