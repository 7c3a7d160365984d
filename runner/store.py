"""The domain SQL of the state database: items, runs, request attempts and credits; the queries
that make resume work. Transactions and grouped commits are `commit.py`'s; the tables are
described in docs/schema.md. Nothing here is ever marked `done` without an answer.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from runner.answers import (
    Answer,
    BatchAnswer,
    compact_json,
    extra_json,
    listed_row,
    listing_json,
    reused_record,
    utcnow,
)
from runner.attempts import AttemptRows
from runner.classify import (
    CHANGED,
    CHANGED_REQUEST,
    NEW,
    RETRY_REASON,
    Classified,
    classified,
    decide,
)
from runner.commit import CommitStats, Database
from runner.errors import DatabaseError
from runner.records import Item, text_safe
from runner.runs import RunCounts, RunRows
from runner.schema import SCHEMA_VERSION, check_version, create_views, migrate, precheck

# An answered batch: its number, its answers, the attempts rows to leave open (lost answers).
AnsweredBatch = tuple[int, Sequence[BatchAnswer], Collection[int]]


class Store(RunRows, AttemptRows):
    """A job's view of one state database; the same file may hold several jobs."""

    def __init__(self, path: Path | str, *, create: bool = True,
                 current: bool = False) -> None:
        """create: create the database or bring it up to date (the migrations of schema.py).
        Without it nothing is changed; `current` then refuses a database that needs a migration
        (DatabaseError). A database written by a newer ximrun is always refused, untouched."""
        self._counts = RunCounts()
        if create and str(path) != ":memory:" and Path(path).exists():
            precheck(Path(path))  # a newer or foreign file is refused before anything is set
        self.db = Database(path, create=create, deferred=self._counts)
        self.path = self.db.path
        self._listed_all: str | None = None  # the job whose every row this run listed
        try:
            with self.db.mapped():
                self._json_each = _has_json_each(self.db.conn)
                with self.db.lock:
                    if create:
                        migrate(self.db.conn, str(self.path))
                        create_views(self.db.conn)
                    self.version = check_version(self.db.conn, str(self.path))
        except BaseException:
            self.db.close()
            raise
        if current and self.version < SCHEMA_VERSION:
            self.db.close()
            raise DatabaseError(
                f"{self.path}: written by an earlier ximrun (schema version {self.version}, "
                f"now {SCHEMA_VERSION}); `ximrun run` upgrades it first (the answers are kept)")

    @property
    def stats(self) -> CommitStats:
        return self.db.stats

    def close(self) -> None:
        self.db.close()

    def grouped(self):  # noqa: ANN201 -- a context manager: see Database.grouped
        """During a run: writes that arrive together share one transaction."""
        return self.db.grouped()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs -----------------------------------------------------------------------------------

    def begin_run(self, job: str, *, pid: int, endpoint: str, budget: int) -> int:
        def begin(c: sqlite3.Connection) -> int:
            # A heap, indexed once when it is asked (mark_missing, the exit code): far cheaper
            # than keeping a B-tree sorted through a million inserts. It lives in a temporary
            # file, not in memory, so a listing of millions of keys does not grow the process.
            self._listed_all = None
            c.execute("DROP TABLE IF EXISTS temp.listed")
            # extra: a manifest row's columns (NULL for other images), compared in the join.
            c.execute("CREATE TEMP TABLE listed (key TEXT, fp TEXT, extra TEXT)")
            # The run lock is held: no other run of this database is alive (see `_crashed`).
            c.execute("UPDATE runs SET status = 'crashed' WHERE job = ? AND status = 'running'",
                      (job,))
            cur = c.execute(
                "INSERT INTO runs (job, pid, started_at, status, endpoint, budget) "
                "VALUES (?, ?, ?, 'running', ?, ?)", (job, pid, utcnow(), endpoint, budget))
            return int(cur.lastrowid)

        return self.db.write(begin)

    # --- listing --------------------------------------------------------------------------------

    def classify(self, job: str, items: Sequence[Item], *, request_sig: str, prep_sig: str,
                 run_id: int | None) -> Classified:
        """Decide for a chunk of listed items what must happen; with a run, record them as listed.

        Without a run (plan) nothing is written. New and changed images become `pending` here, so
        a crash after this point leaves them to be sent by the next run.
        """
        if run_id is None:
            known = self.db.read(lambda c: _known_rows(c, job, items))
            return classified(items, decide(items, known, request_sig, prep_sig))
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
        rows = (listing_json([listed_row(it) for it in items]) if self._json_each else None)

        def fn(c: sqlite3.Connection) -> Classified:
            return self._classify_listed(c, job, items, request_sig=request_sig,
                                         prep_sig=prep_sig, run_id=run_id, rows=rows)

        return self.db.write_soon(fn)

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
            c.execute("INSERT INTO temp.listed (key, fp, extra) SELECT "
                      "json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
                      "json_extract(value, '$[2]') FROM json_each(?)", (rows,))
        else:
            c.executemany("INSERT INTO temp.listed (key, fp, extra) VALUES (?, ?, ?)",
                          [(*listed_row(it), None)[:3] for it in items])
        cur = c.cursor()
        cur.row_factory = None
        found = cur.execute(
            "SELECT l.key, i.fingerprint, i.state, i.reason, i.request_sig, i.prep_sig "
            "FROM temp.listed l LEFT JOIN items i ON i.job = ? AND i.key = l.key "
            # A manifest row whose columns changed is returned too (its photo may be unchanged):
            # its stored columns are brought up to date below.
            "WHERE l.rowid > ? AND NOT coalesce(i.fingerprint = l.fp "
            "AND (l.extra IS NULL OR i.extra IS l.extra) AND ("
            "(i.state = 'done' AND i.request_sig = ?) OR "
            "(i.state = 'rejected' AND i.prep_sig IS ?)), 0)",
            (job, base, request_sig, prep_sig)).fetchall()
        by_key = {it.key: it for it in items} if found else {}
        acting = [by_key[key] for key, *_ in found]
        known = {key: tuple(rest) for key, *rest in found if rest[1] is not None}
        out = classified(items, decide(acting, known, request_sig, prep_sig))
        now = utcnow()
        c.executemany(
            "INSERT INTO items (job, key, uri, size, fingerprint, state, listed_run, "
            "first_seen, updated_at, extra) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) "
            "ON CONFLICT (job, key) DO UPDATE SET uri = excluded.uri, size = excluded.size, "
            "fingerprint = excluded.fingerprint, listed_run = excluded.listed_run, "
            # The previous answer stays with its content hash and request signature: if the
            # bytes turn out unchanged (a touched file), find_answer reuses it for free.
            "state = 'pending', reason = NULL, updated_at = excluded.updated_at, "
            "extra = excluded.extra",
            # uri as text SQLite can hold; the key already is (sources.py, manifest.py).
            [(job, x.item.key, text_safe(x.item.uri), x.item.size, x.item.fingerprint, run_id,
              now, now, extra_json(x.item.extra))
             for x in out.listed if x.kind in (NEW, CHANGED, CHANGED_REQUEST)])
        changed = [it for it in acting if it.extra]
        if changed:
            # A manifest's columns may change without the photo changing: kept up to date for
            # export. Only rows the join returned: an unchanged catalog writes nothing.
            c.executemany("UPDATE items SET extra = ?1 WHERE job = ?2 AND key = ?3 "
                          "AND extra IS NOT ?1",
                          [(extra_json(it.extra), job, it.key) for it in changed])
        self._counts.add(run_id, listed=len(items))
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

        return self.db.write(mark)

    # --- outcomes -------------------------------------------------------------------------------

    def mark_rejected(self, job: str, rejected: Sequence[tuple[Item, str]], *, prep_sig: str,
                      run_id: int) -> None:
        if not rejected:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'rejected', reason = ?, prep_sig = ?, updated_at = ?, "
                "recorded_run = ? WHERE job = ? AND key = ?",
                [(text_safe(reason), prep_sig, now, run_id, job, it.key) for it, reason in rejected])
            self._counts.add(run_id, rejected=len(rejected))

        self.db.write(mark)

    def mark_failed(self, job: str, failed: Sequence[tuple[Item, str]], *, run_id: int) -> None:
        """Images that failed before any request (their bytes could not be read)."""
        if not failed:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany("UPDATE items SET state = 'failed', reason = ?, updated_at = ?, "
                          "recorded_run = ? WHERE job = ? AND key = ?",
                          [(text_safe(reason), now, run_id, job, it.key) for it, reason in failed])
            self._counts.add(run_id, failed=len(failed))

        self.db.write(mark)

    def find_answer(self, content_hash: str, request_sig: str) -> Answer | None:
        """An answer already paid for these bytes and this request, in any job."""
        return self.find_answers([content_hash], request_sig).get(content_hash)

    def find_answers(self, hashes: Sequence[str], request_sig: str) -> dict[str, Answer]:
        """Answers already paid for these contents and this request, in any job, one query:
        content hash -> Answer (job, key, result, the manifest columns it was sent with).

        The image that paid is preferred; once it changed, a copy that reused its answer still
        holds it; and an image listed again as changed keeps its last answer until it is sent,
        so a touched file whose bytes did not change is not paid for again."""
        if not hashes:
            return {}
        unique = list(dict.fromkeys(hashes))
        extra = "extra" if self.version >= 2 else "NULL"  # plan reads an older database too

        def find(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
            cur = c.cursor()
            cur.row_factory = None
            rows: list[tuple[Any, ...]] = []
            for i in range(0, len(unique), 500):
                part = unique[i:i + 500]
                rows += cur.execute(
                    "SELECT content_hash, job, key, result, state != 'done', "
                    f"reused_from IS NOT NULL, {extra} FROM items "
                    f"WHERE content_hash IN ({','.join('?' * len(part))}) AND request_sig = ? "
                    "AND result IS NOT NULL AND state IN ('done', 'pending')",
                    (*part, request_sig)).fetchall()
            return rows

        best: dict[str, tuple[Any, Answer]] = {}
        for h, job, key, result, not_done, reused, extra in self.db.read(find):
            rank = (not_done, reused, job, key)
            if h not in best or rank < best[h][0]:
                best[h] = (rank, Answer(job, key, result,
                                        json.loads(extra) if extra is not None else None))
        return {h: found for h, (_, found) in best.items()}

    def mark_reused(self, job: str, reused: Sequence[tuple[Item, str, str, str]], *,
                    request_sig: str, prep_sig: str, run_id: int, per_image: int) -> None:
        """(item, content_hash, source key, this item's own record as JSON, see
        `reused_record`): done for free with a known answer."""
        if not reused:
            return
        now = utcnow()

        def mark(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, content_hash = ?, "
                "request_sig = ?, prep_sig = ?, reused_from = ?, updated_at = ?, answered_at = ?, "
                "recorded_run = ? WHERE job = ? AND key = ?",
                [(result, h, request_sig, prep_sig, src, now, now, run_id, job, it.key)
                 for it, h, src, result in reused])
            self._counts.add(run_id, reused=len(reused), done=len(reused),
                            credits_saved=len(reused) * per_image)

        self.db.write(mark)

    def record_batches(self, job: str, run_id: int, batches: Sequence[AnsweredBatch], *,
                       request_sig: str, prep_sig: str, per_image: int) -> list[int]:
        """Answered batches in one transaction (shared with others answered meanwhile): their
        outcomes, credits and followers, their attempts rows closed; returns each batch's
        credits. The attempts rows numbered in a batch's `keep_open` (requests that may have
        been billed and lost their answer) stay open."""
        now = utcnow()
        credits = []
        done = failed = sent = reused = 0
        rows_done, rows_failed, rows_reason, rows_followers = [], [], [], []
        for _, answers, _ in batches:
            paid = 0
            for a in answers:
                o = a.outcome
                if not o.final:
                    # Pending still: a stop came first, or the service failed (then its last
                    # error is kept as the reason, and the images count as sent if a request
                    # left).
                    if o.unavailable and o.attempts > 0:
                        sent += 1
                    if o.unavailable:
                        rows_reason.append((o.reason, now, job, a.item.key))
                    continue
                sent += 1
                result = (o.text if o.text is not None
                          else compact_json(o.record) if o.record is not None else None)
                if o.ok:
                    paid += per_image
                    done += 1
                    rows_done.append((result, per_image, a.content_hash, request_sig, prep_sig,
                                      now, now, run_id, job, a.item.key))
                    for f in a.followers:
                        reused += 1
                        done += 1  # as mark_reused counts a copy answered later: done and reused
                        # A copy gets its own record: its _id and manifest columns, the analysis.
                        own = reused_record(o.answer, f, a.item.extra)
                        rows_done.append((own, 0, a.content_hash, request_sig, prep_sig, now,
                                          now, run_id, job, f.key))
                        # Followers carry the key they were answered through.
                        rows_followers.append((a.item.key, job, f.key))
                else:
                    failed += 1
                    # The API's text may hold a lone surrogate (a JSON "\ud800"): stored escaped.
                    reason = text_safe(o.reason) if o.reason is not None else None
                    rows_failed.append((reason, result, a.content_hash, now, run_id, job,
                                        a.item.key))
                    for f in a.followers:
                        failed += 1
                        rows_failed.append((f"same bytes as {a.item.key}: {reason}", None,
                                            a.content_hash, now, run_id, job, f.key))
            credits.append(paid)

        def record(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE items SET state = 'done', reason = NULL, result = ?, "
                "credits = credits + ?, content_hash = ?, request_sig = ?, prep_sig = ?, "
                "reused_from = NULL, updated_at = ?, answered_at = ?, recorded_run = ? "
                "WHERE job = ? AND key = ?", rows_done)
            if rows_followers:
                c.executemany("UPDATE items SET reused_from = ? WHERE job = ? AND key = ?",
                              rows_followers)
            if rows_failed:
                c.executemany(
                    "UPDATE items SET state = 'failed', reason = ?, result = ?, content_hash = ?, "
                    "request_sig = NULL, updated_at = ?, recorded_run = ? "
                    "WHERE job = ? AND key = ?", rows_failed)
            if rows_reason:
                c.executemany("UPDATE items SET reason = ?, updated_at = ? WHERE job = ? AND key = ?",
                              rows_reason)
            for batch, _, keep_open in batches:
                lost = sorted(keep_open)
                c.execute("UPDATE attempts SET closed_at = ? WHERE run_id = ? AND batch = ? "
                          f"AND closed_at IS NULL AND attempt NOT IN ({','.join('?' * len(lost))})",
                          (now, run_id, batch, *lost))
            self._counts.add(run_id, sent=sent, done=done, failed=failed, reused=reused,
                            credits=sum(credits), credits_saved=reused * per_image)

        self.db.write_waited("record_batch", record)
        return credits

    # --- questions ------------------------------------------------------------------------------

    def missing_count(self, job: str) -> int:
        """Images no longer listed (from the partial index: no scan of the rows)."""
        row = self.db.read(lambda c: c.execute(
            "SELECT count(*) FROM items WHERE job = ? AND missing = 1", (job,)).fetchone())
        return int(row[0])

    def count_listed(self, job: str, state: str) -> int:
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

        return self.db.write(count)

    def retry_failed(self, job: str, reason_like: str | None = None) -> int:
        """Failed images go back to pending; the next run sends them again."""
        q = ("UPDATE items SET state = 'pending', reason = ?, updated_at = ? "
             "WHERE job = ? AND state = 'failed'")
        args: list[Any] = [RETRY_REASON, utcnow(), job]
        if reason_like:
            q += " AND reason LIKE ?"
            args.append(f"%{reason_like}%")
        return self.db.write(lambda c: c.execute(q, args).rowcount)



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


def open_readonly(path: Path, *, current: bool = False) -> Store:
    """For status/plan/export while a run writes: no schema changes, no journal-mode switch.
    `current`: refuse a database that an earlier ximrun wrote (it needs `ximrun run` first)."""
    return Store(path, create=False, current=current)
