"""Reading a job's state database for people: the status report and the export rows.

Both open the database without changing it, and work while a run writes. They raise, never exit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.commit import check_db_path, readonly_uri, storage_errors
from runner.errors import StateError
from runner.job import Job
from runner.records import DONE, FAILED, PENDING, REJECTED, STATES
from runner.store import Store, open_readonly

EXPORT_FIELDS = ("key", "state", "reason", "credits", "reused_from", "content_hash",
                 "fingerprint", "sends", "missing", "answered_at", "result")


def _require_db(job: Job) -> None:
    if not job.db_path.exists():
        raise StateError(f"no state database yet at {job.db_path} (nothing has run)")


def _open(job: Job) -> Store:
    _require_db(job)
    return open_readonly(job.db_path)


def shown_path(path: Path) -> str:
    """Relative to the working directory when below it: shorter, and the same on every machine."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def status_report(job: Job) -> dict[str, Any]:
    """The figures `ximrun status` shows, as a dict (what `status --json` prints). Raises
    StateError when nothing has run yet."""
    with _open(job) as store:
        by_state = counts(store, job.name)
        runs = store.recent_runs(job.name, 5)
        live = store.live_run(job.name)
        # The requests of a run still going are in flight, not lost: they are not listed.
        open_requests = unanswered(store, job.name, running_run=live)
        resends = resend_stats(store, job.name)
        spent = store.spent(job.name)
        saved = sum(r["credits_saved"] or 0 for r in store.recent_runs(job.name, 10_000))
    last = runs[0] if runs else None
    account_diff = None
    if last and last["account_before"] is not None and last["account_after"] is not None:
        account_diff = last["account_after"] - last["account_before"]
    report = {
        "job": job.name,
        "db": shown_path(job.db_path),
        "states": {s: by_state[s] for s in STATES},
        "missing": by_state["missing"],
        "reused": by_state["reused"],
        "credits": {"recorded": spent, "saved_by_reuse": saved,
                    "last_run_recorded": last["credits"] if last else 0,
                    "last_run_account_difference": account_diff},
        "possibly_billed_without_answer": [
            {"run": u["run"], "batch": u["batch"], "attempt": u["attempt"],
             "sent_at": u["sent_at"], "keys": u["keys"]} for u in open_requests],
        "resends": resends,
        "runs": [{k: r[k] for k in ("id", "started_at", "finished_at", "status", "exit_code",
                                    "listed", "sent", "done", "failed", "rejected", "reused",
                                    "requests", "credits", "account_before", "account_after")}
                 for r in runs],
    }
    return report


def export_rows(job: Job, state: str | None = None) -> Iterator[dict[str, Any]]:
    """One dict per image (EXPORT_FIELDS), in key order, streamed; `state` filters. Raises
    StateError when nothing has run yet."""
    _require_db(job)
    for row in stored_rows(job.db_path, job.name, state):
        yield {k: row[k] for k in EXPORT_FIELDS}


def counts(store: Store, job: str) -> dict[str, int]:
    rows = store.db.read(lambda c: c.execute(
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

def unanswered(store: Store, job: str, *, running_run: int | None = None) -> list[dict[str, Any]]:
    """Requests sent by runs that ended before recording their answer: possibly billed."""
    rows = store.db.read(lambda c: c.execute(
        "SELECT a.run_id, a.batch, a.attempt, a.keys, a.sent_at FROM attempts a "
        "WHERE a.job = ? AND a.closed_at IS NULL AND a.run_id IS NOT ? ORDER BY a.id",
        (job, running_run)).fetchall())
    return [{"run": r["run_id"], "batch": r["batch"], "attempt": r["attempt"],
             "keys": json.loads(r["keys"]), "sent_at": r["sent_at"]} for r in rows]

def resend_stats(store: Store, job: str) -> dict[str, int]:
    """Images carried by more than one request: the visible bound on double billing."""
    row = store.db.read(lambda c: c.execute(
        "SELECT count(*), coalesce(sum(sends - 1), 0) FROM items "
        "WHERE job = ? AND sends > 1", (job,)).fetchone())
    return {"images_sent_more_than_once": int(row[0]), "extra_sends": int(row[1])}

def stored_rows(path: Path, job: str, state: str | None = None) -> Iterator[dict[str, Any]]:
    q = ("SELECT key, uri, state, reason, credits, reused_from, content_hash, fingerprint, "
         "sends, missing, answered_at, result FROM items WHERE job = ?")
    args: list[Any] = [job]
    if state:
        q += " AND state = ?"
        args.append(state)
    q += " ORDER BY key"
    # A separate cursor on a read-only connection streams without holding the writer's lock.
    check_db_path(path)
    with storage_errors(path):
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        with storage_errors(path):
            rows = conn.execute(q, args)
        for row in _mapped_rows(rows, path):
            d = dict(row)
            # A pending image's previous answer is kept for reuse, but it is not its answer.
            pending = d["state"] == "pending"
            d["result"] = json.loads(d["result"]) if d["result"] and not pending else None
            d["missing"] = bool(d["missing"])
            yield d
    finally:
        conn.close()


def _mapped_rows(rows: Iterator[Any], path: Path) -> Iterator[Any]:
    """The rows, a storage error met on the way (a corrupt page) raised as DatabaseError."""
    while True:
        with storage_errors(path):
            row = next(rows, None)
        if row is None:
            return
        yield row


def retry_failed(job: Job, reason_like: str | None = None) -> int:
    """Put the job's failed images (those whose reason contains `reason_like`, if given) back to
    pending; the next run sends them again. Returns how many. Raises StateError when nothing has
    run yet."""
    _require_db(job)
    with Store(job.db_path) as store:
        return store.retry_failed(job.name, reason_like)
