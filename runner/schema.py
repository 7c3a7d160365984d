"""The state database's tables and their migrations (docs/schema.md describes them column by
column).

The schema is a list of numbered steps, `MIGRATIONS`, applied in order to a database whose
`meta.schema_version` is lower, each step in its own transaction together with the new version
and its `_migrations` row: a crash between two steps leaves a database at the earlier version,
which the next open continues. A database whose version is higher than this code knows (written
by a newer ximrun) is refused, untouched (`DatabaseError`, exit 74). A step is never edited once
released: a change of the schema is a new step at the end of the list.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.commit import database_error, readonly_uri, storage_errors
from runner.errors import DatabaseError

# Version 1: the tables as ximrun 0.1 created them, kept verbatim (sqlite-utils wrote them).
_V1 = """
CREATE TABLE IF NOT EXISTS "items" (
   "job" TEXT NOT NULL,
   "key" TEXT NOT NULL,
   "uri" TEXT,
   "size" INTEGER,
   "fingerprint" TEXT,
   "state" TEXT NOT NULL DEFAULT 'pending',
   "reason" TEXT,
   "credits" INTEGER DEFAULT 0,
   "result" TEXT,
   "content_hash" TEXT,
   "request_sig" TEXT,
   "prep_sig" TEXT,
   "reused_from" TEXT,
   "sends" INTEGER DEFAULT 0,
   "listed_run" INTEGER,
   "missing" INTEGER DEFAULT 0,
   "first_seen" TEXT,
   "updated_at" TEXT,
   "answered_at" TEXT,
   PRIMARY KEY ("job", "key")
);
CREATE INDEX IF NOT EXISTS "idx_items_job_state" ON "items" ("job", "state");
CREATE INDEX IF NOT EXISTS "idx_items_content_hash_request_sig"
    ON "items" ("content_hash", "request_sig");
CREATE INDEX IF NOT EXISTS idx_items_missing ON items (job, key) WHERE missing = 1;
CREATE TABLE IF NOT EXISTS "runs" (
   "id" INTEGER PRIMARY KEY,
   "job" TEXT NOT NULL,
   "pid" INTEGER,
   "started_at" TEXT NOT NULL,
   "finished_at" TEXT,
   "status" TEXT NOT NULL,
   "exit_code" INTEGER,
   "endpoint" TEXT,
   "budget" INTEGER,
   "listed" INTEGER DEFAULT 0,
   "sent" INTEGER DEFAULT 0,
   "done" INTEGER DEFAULT 0,
   "failed" INTEGER DEFAULT 0,
   "rejected" INTEGER DEFAULT 0,
   "reused" INTEGER DEFAULT 0,
   "requests" INTEGER DEFAULT 0,
   "credits" INTEGER DEFAULT 0,
   "credits_saved" INTEGER DEFAULT 0,
   "account_before" INTEGER,
   "account_after" INTEGER
);
CREATE INDEX IF NOT EXISTS "idx_runs_job_id" ON "runs" ("job", "id");
CREATE TABLE IF NOT EXISTS "attempts" (
   "id" INTEGER PRIMARY KEY,
   "run_id" INTEGER NOT NULL REFERENCES "runs"("id"),
   "job" TEXT NOT NULL,
   "batch" INTEGER,
   "attempt" INTEGER,
   "keys" TEXT NOT NULL,
   "n" INTEGER,
   "sent_at" TEXT NOT NULL,
   "closed_at" TEXT
);
CREATE INDEX IF NOT EXISTS "idx_attempts_job_closed_at" ON "attempts" ("job", "closed_at");
CREATE INDEX IF NOT EXISTS "idx_attempts_run_id_batch" ON "attempts" ("run_id", "batch");
CREATE TABLE IF NOT EXISTS "meta" (
   "key" TEXT PRIMARY KEY,
   "value" TEXT
);
"""


def _v1(c: sqlite3.Connection) -> None:
    for statement in _V1.split(";"):
        if statement.strip():
            c.execute(statement)


def _v2(c: sqlite3.Connection) -> None:
    """Catalog imports: the manifest's columns per image, the run that recorded an image's
    outcome, the manifest rows a run skipped; and reused answers that carried the paying
    image's identity get their own."""
    c.execute("ALTER TABLE items ADD COLUMN extra TEXT")
    c.execute("ALTER TABLE items ADD COLUMN recorded_run INTEGER")
    c.execute("ALTER TABLE runs ADD COLUMN skipped_rows INTEGER DEFAULT 0")
    c.execute("ALTER TABLE runs ADD COLUMN skipped_first TEXT")
    # Version 1 stored a reused answer as the paying image's record: its `_id` and its manifest
    # columns. The manifest columns were not stored then, so they are told apart as the
    # service's analysis never looks: a top-level key without a leading `_` holding a string, a
    # number, a boolean or null (a CSV cell is always a string).
    rows = c.execute("SELECT rowid, key, result FROM items WHERE reused_from IS NOT NULL "
                     "AND result IS NOT NULL").fetchall()
    fixed = []
    for rowid, key, result in rows:
        try:
            record = json.loads(result)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("_id") == key:
            continue
        own = {"_id": key, **{k: v for k, v in record.items()
                              if k != "_id" and (k.startswith("_") or not _scalar(v))}}
        fixed.append((json.dumps(own, separators=(",", ":")), rowid))
    c.executemany("UPDATE items SET result = ? WHERE rowid = ?", fixed)


def _v3(c: sqlite3.Connection) -> None:
    """How far the account's counter moved beyond the credits a run recorded (NULL: unknown)."""
    have = {row[1] for row in c.execute("PRAGMA table_info(runs)")}
    if "account_gap" not in have:  # databases of a development build added it unnumbered
        c.execute("ALTER TABLE runs ADD COLUMN account_gap INTEGER")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


# (version, what it does, the step). Append only.
MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "items, runs, attempts, meta", _v1),
    (2, "items.extra, items.recorded_run, runs.skipped_rows/skipped_first; reused answers "
        "with their own _id", _v2),
    (3, "runs.account_gap", _v3),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(c: sqlite3.Connection) -> int:
    """The database's version: 0 for an empty file (nothing created yet)."""
    has_meta = c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                         ).fetchone()
    if not has_meta:
        has_items = c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'items'").fetchone()
        return 1 if has_items else 0
    row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row else 1
    except (TypeError, ValueError):
        raise DatabaseError(f"schema_version {row[0]!r} is not a number") from None


def check_version(c: sqlite3.Connection, where: str) -> int:
    """The database's version; DatabaseError if a newer ximrun wrote it."""
    try:
        version = schema_version(c)
    except sqlite3.DatabaseError as exc:
        raise database_error(exc, where) from None
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"state database {where}: written by a newer ximrun (schema version {version}; "
            f"this ximrun knows "
            f"up to {SCHEMA_VERSION}); upgrade ximrun. The database was not changed.")
    return version


def migrate(c: sqlite3.Connection, where: str) -> list[int]:
    """Apply the steps the database lacks, in order, each in one transaction; returns the
    versions applied. `c` is in autocommit mode (isolation_level None)."""
    applied: list[int] = []
    if check_version(c, where) >= SCHEMA_VERSION:
        return applied  # up to date: not even the write lock is taken
    for version, name, step in MIGRATIONS:
        c.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            current = check_version(c, where)
            if current >= version:
                c.execute("ROLLBACK")
                continue
            step(c)
            c.execute("CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, "
                      "name TEXT NOT NULL, applied_at TEXT NOT NULL)")
            if version > 1 and not c.execute("SELECT 1 FROM _migrations WHERE version = 1"
                                             ).fetchone():
                # A database from before migrations were recorded: its version 1 was there.
                c.execute("INSERT INTO _migrations VALUES (1, ?, 'before migrations')",
                          (MIGRATIONS[0][1],))
            c.execute("INSERT INTO _migrations VALUES (?, ?, ?)", (version, name, _now()))
            c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                      "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def create_schema(conn: sqlite3.Connection) -> None:
    """The tables, created or brought up to date, then the views (kept apart: they are
    created where missing after every migration)."""
    migrate(conn, "state database")
    create_views(conn)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- views: one SELECT for the common questions (README, "Browsing the state database") -------
# Kept apart from the tables and their migrations: each view is created where missing, reads only
# stable columns, and can be dropped at will (DROP VIEW name); the next run creates it again.

# A failure's reason without the image's own URI or key in it, so that alike failures group
# together (also what `ximrun report` groups by).
REASON_GROUP_SQL = (
    "CASE WHEN reason IS NULL THEN '(no reason recorded)' "
    "WHEN reason LIKE 'not_found:%' THEN 'not_found' "
    "WHEN reason LIKE 'access_denied:%' THEN 'access_denied' "
    "WHEN reason LIKE 'read_error:%' THEN 'read_error' "
    "WHEN reason LIKE 'same bytes as %' THEN 'same bytes as an image that failed' "
    "ELSE reason END")

VIEWS = {
    # The answer of every done image, with the fields most services return pulled out.
    "answers": """
        SELECT job, key, uri, answered_at, credits, reused_from IS NOT NULL AS reused,
               reused_from, content_hash,
               json_extract(result, '$._width') AS width,
               json_extract(result, '$._height') AS height,
               json_array_length(result, '$._objects') AS objects,
               json_extract(result, '$._objects[0].name') AS object,
               json_extract(result, '$._objects[0].bound_box') AS bound_box,
               json_extract(result, '$._objects[0]._identification.best_match.name')
                   AS best_match,
               coalesce(json_extract(result, '$.best_label.name'),
                        json_extract(result, '$.best_label')) AS best_label,
               json_extract(result, '$._tags') AS tags,
               result
        FROM items WHERE state = 'done'""",
    # Failed and rejected images counted by reason, with one example key.
    "failures_by_reason": f"""
        SELECT job, state, {REASON_GROUP_SQL} AS reason, count(*) AS images,
               min(key) AS example_key, max(updated_at) AS last_at
        FROM items WHERE state IN ('failed', 'rejected')
        GROUP BY job, state, 3""",
    # Every run with its credits, the job's running total and the account's counter's move.
    "credits_per_run": """
        SELECT job, id AS run, started_at, finished_at,
               round((julianday(finished_at) - julianday(started_at)) * 86400, 3) AS seconds,
               status, exit_code, listed, sent, done, failed, rejected, reused, requests,
               credits, credits_saved,
               sum(credits) OVER (PARTITION BY job ORDER BY id) AS credits_to_date,
               account_after - account_before AS account_moved
        FROM runs""",
    # One row per image of a request whose answer was not recorded (yet): after a crash, the
    # images possibly billed without an answer; during a run, also the requests in flight.
    "unanswered_requests": """
        SELECT a.job, a.run_id AS run, a.batch, a.attempt, a.sent_at, k.value AS key
        FROM attempts a, json_each(a.keys) AS k
        WHERE a.closed_at IS NULL""",
}


def create_views(conn: sqlite3.Connection) -> None:
    """The views of VIEWS, created where missing (an existing one is left as it is)."""
    for name, select in VIEWS.items():
        conn.execute(f"CREATE VIEW IF NOT EXISTS {name} AS {select.strip()}")


def precheck(path: Path) -> None:
    """DatabaseError for a file a newer ximrun wrote, or no database at all, read without
    changing anything (opening it to write would switch its journal mode first)."""
    with storage_errors(path):
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=30)
    try:
        check_version(conn, str(path))
    finally:
        conn.close()
