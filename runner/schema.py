"""The state database's tables (docs/schema.md describes them column by column)."""

from __future__ import annotations

import sqlite3

import sqlite_utils

from runner.records import PENDING

SCHEMA_VERSION = 1


# Columns added after databases were created: (table, column, declaration). A numbered
# migration will replace this check.
ADDED_COLUMNS = (
    # How far the account's counter moved beyond the credits the run recorded (NULL: unknown).
    ("runs", "account_gap", "INTEGER"),
)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """`ALTER TABLE ... ADD COLUMN` for each added column a database does not have yet."""
    for table, column, decl in ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def create_schema(conn: sqlite3.Connection) -> None:
    """The tables and indexes, created where missing; the schema version recorded once."""
    db = sqlite_utils.Database(conn)
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
    conn.execute("CREATE INDEX IF NOT EXISTS idx_items_missing ON items (job, key) "
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
    _add_missing_columns(conn)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                      (str(SCHEMA_VERSION),))
    create_views(conn)


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
