"""Reading a job's state database for people: the status report and the export rows.

Both open the database without changing it, and work while a run writes. They raise, never exit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.commit import check_db_path, readonly_uri, storage_errors
from runner.errors import JobError, StateError
from runner.job import Job
from runner.limits import job_figures
from runner.records import DONE, FAILED, PENDING, REJECTED, STATES
from runner.store import Store, open_readonly

# The export's columns, in order: these, the manifest's columns (from items.extra) between `uri`
# and `state`, then `--field` columns before `result`.
EXPORT_HEAD = ("key", "uri")
EXPORT_TAIL = ("state", "reason", "credits", "sends", "reused_from", "answered_at", "run",
               "content_hash", "fingerprint", "missing")
EXPORT_FIELDS = (*EXPORT_HEAD, *EXPORT_TAIL, "result")
MANIFEST_PREFIX = "manifest."  # a manifest column named like one of the above is renamed so


def _require_db(job: Job) -> None:
    if not job.db_path.exists():
        raise StateError(f"no state database yet at {job.db_path} (nothing has run)")


def _open(job: Job) -> Store:
    """Read-only, never migrated: a database an earlier ximrun wrote is refused (DatabaseError,
    exit 74) with the advice to let `ximrun run` upgrade it; one a newer ximrun wrote, too."""
    _require_db(job)
    return open_readonly(job.db_path, current=True)


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
        resends = resend_stats(store, job.name, running_run=live)
        spent = store.spent(job.name)
        saved = sum(r["credits_saved"] or 0 for r in store.recent_runs(job.name, 10_000))
        limits = job_figures(job, store)
    last = runs[0] if runs else None
    account_diff = None
    if last and last["account_before"] is not None and last["account_after"] is not None:
        account_diff = last["account_after"] - last["account_before"]
    gap = last.get("account_gap") if last else None
    report = {
        "job": job.name,
        "db": shown_path(job.db_path),
        "states": {s: by_state[s] for s in STATES},
        "missing": by_state["missing"],
        "reused": by_state["reused"],
        "credits": {"recorded": spent, "saved_by_reuse": saved,
                    "last_run_recorded": last["credits"] if last else 0,
                    "last_run_account_difference": account_diff,
                    # the counter's move minus the credits recorded (None: unknown)
                    "last_run_account_gap": gap},
        "possibly_billed_without_answer": [
            {"run": u["run"], "batch": u["batch"], "attempt": u["attempt"],
             "sent_at": u["sent_at"], "keys": u["keys"]} for u in open_requests],
        "resends": resends,
        "limits": limits,  # each spending limit of the job file and what is left of it now
        "runs": [{k: r.get(k) for k in ("id", "started_at", "finished_at", "status", "exit_code",
                                    "listed", "sent", "done", "failed", "rejected", "reused",
                                    "requests", "credits", "account_before", "account_after",
                                    "account_gap", "skipped_rows", "skipped_first")}
                 for r in runs],
        # The last run's manifest rows that could not become an image (they have no row).
        "manifest_rows_skipped": {"count": last["skipped_rows"] or 0 if last else 0,
                                  "first": last["skipped_first"] if last else None},
    }
    return report


@dataclass(frozen=True)
class FieldPath:
    """`--field NAME=PATH`: a value pulled out of the API's record into a column of its own."""

    name: str
    path: tuple[str | int, ...]

    @classmethod
    def parse(cls, spec: str) -> FieldPath:
        """"best=_objects.0._identification.best_match.name": a dotted path, integers index
        lists. ValueError, saying why, for one that does not parse."""
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"{spec!r}: expected NAME=PATH, for example "
                             "best=_objects.0._identification.best_match.name")
        parts = path.split(".")
        if any(not p.strip() for p in parts):
            raise ValueError(f"{spec!r}: an empty step in the path {path!r}")
        return cls(name, tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts))

    def pick(self, record: Any) -> Any:
        """The value at the path, None where the path leads nowhere."""
        value = record
        for step in self.path:
            if isinstance(step, int) and isinstance(value, list):
                if not -len(value) <= step < len(value):
                    return None
                value = value[step]
            elif isinstance(value, dict):
                value = value.get(str(step))
            else:
                return None
            if value is None:
                return None
        return value


def parse_since(text: str) -> str:
    """An ISO 8601 date or time (UTC unless it says otherwise) as the database writes its
    timestamps, so that text comparison is time comparison. ValueError if it does not parse."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: not an ISO 8601 date or time (2026-12-01, "
                         "2026-12-01T02:15:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Export:
    """An export's columns (known before the first row: a CSV header) and its rows, streamed
    from a read-only connection in key order."""

    columns: list[str]
    manifest_columns: dict[str, str]  # manifest column -> export column
    fields: tuple[FieldPath, ...]
    rows: Iterator[dict[str, Any]]


def open_export(job: Job, state: str | None = None, *, run: int | None = None,
                since: str | None = None, fields: Sequence[FieldPath] = ()) -> Export:
    """What `ximrun export` writes. `state`, `run` (the run that recorded the image's outcome)
    and `since` (answered at or after, as `parse_since` gives it) filter. Raises StateError when
    nothing has run yet, DatabaseError for a database it cannot read, JobError for a `--field`
    name already taken."""
    _open(job).close()  # refuses a database that is missing, older or newer
    conn = _connect_ro(job.db_path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT j.key FROM items, json_each(items.extra) AS j WHERE items.job = ? "
            "AND json_valid(items.extra) GROUP BY j.key ORDER BY min(items.rowid), min(j.id)",
            (job.name,))]
    finally:
        conn.close()
    fixed = set(EXPORT_FIELDS)
    manifest = {n: (MANIFEST_PREFIX + n if n in fixed else n) for n in names}
    columns = [*EXPORT_HEAD, *manifest.values(), *EXPORT_TAIL]
    for f in fields:
        if f.name in columns or f.name == "result":
            raise JobError(f"--field {f.name}: the export already has a column {f.name!r}")
        columns.append(f.name)
    columns.append("result")
    rows = _export_rows(job, state, run, since, manifest, tuple(fields))
    return Export(columns, manifest, tuple(fields), rows)


def _export_rows(job: Job, state: str | None, run: int | None, since: str | None,
                 manifest: dict[str, str], fields: tuple[FieldPath, ...]
                 ) -> Iterator[dict[str, Any]]:
    empty = dict.fromkeys(manifest.values())
    for row in stored_rows(job.db_path, job.name, state, run=run, since=since):
        extra = row["extra"]
        out = {"key": row["key"], "uri": row["uri"], **empty}
        if extra:
            for k, v in json.loads(extra).items():
                out[manifest.get(k, k)] = v
        for k in EXPORT_TAIL:
            out[k] = row[k]
        result = row["result"]
        for f in fields:
            out[f.name] = f.pick(result)
        out["result"] = result
        yield out


def export_rows(job: Job, state: str | None = None, *, run: int | None = None,
                since: str | None = None, fields: Sequence[FieldPath] = ()
                ) -> Iterator[dict[str, Any]]:
    """One dict per image (`open_export`'s columns), in key order, streamed; `state`, `run` and
    `since` filter. Raises StateError when nothing has run yet."""
    yield from open_export(job, state, run=run, since=since, fields=fields).rows


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

def lost_requests(store: Store, job: str, *,
                  running_run: int | None = None) -> list[dict[str, Any]]:
    """Requests of runs that ended before recording their answer (open `attempts` rows): each
    may have been billed. History: a later run may have answered their images since."""
    rows = store.db.read(lambda c: c.execute(
        "SELECT a.run_id, a.batch, a.attempt, a.keys, a.sent_at FROM attempts a "
        "WHERE a.job = ? AND a.closed_at IS NULL AND a.run_id IS NOT ? ORDER BY a.id",
        (job, running_run)).fetchall())
    return [{"run": r["run_id"], "batch": r["batch"], "attempt": r["attempt"],
             "keys": json.loads(r["keys"]), "sent_at": r["sent_at"]} for r in rows]


def unanswered(store: Store, job: str, *, running_run: int | None = None) -> list[dict[str, Any]]:
    """What is still open: requests of runs that ended without an answer, with only those of
    their images that have no answer yet (still `pending`); a request whose images have all
    been answered since is history (`resend_stats`), not listed here."""
    lost = lost_requests(store, job, running_run=running_run)
    keys = list({k for u in lost for k in u["keys"]})
    answered: set[str] = set()
    for i in range(0, len(keys), 500):
        part = keys[i:i + 500]
        answered.update(k for (k,) in store.db.read(lambda c, part=part: c.execute(
            f"SELECT key FROM items WHERE job = ? AND state != 'pending' AND key IN "
            f"({','.join('?' * len(part))})", (job, *part)).fetchall()))
    out = []
    for u in lost:
        still = [k for k in u["keys"] if k not in answered]
        if still:
            out.append({**u, "keys": still})
    return out


def resend_stats(store: Store, job: str, *, running_run: int | None = None) -> dict[str, int]:
    """History, not a warning: images carried by more than one request (each may have been
    billed more than once: the visible bound on double billing), and requests of ended runs
    whose answer was never recorded."""
    row = store.db.read(lambda c: c.execute(
        "SELECT count(*), coalesce(sum(sends - 1), 0) FROM items "
        "WHERE job = ? AND sends > 1", (job,)).fetchone())
    lost = lost_requests(store, job, running_run=running_run)
    return {"images_sent_more_than_once": int(row[0]), "extra_sends": int(row[1]),
            "requests_without_answer": len(lost),
            "images_in_requests_without_answer": len({k for u in lost for k in u["keys"]})}

def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (an escaped file: URI: `#`, `?` and `%` in the path work, and no
    file is created); DatabaseError, naming the file, for one that cannot be opened."""
    check_db_path(path)
    with storage_errors(path):
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def stored_rows(path: Path, job: str, state: str | None = None, *, run: int | None = None,
                since: str | None = None) -> Iterator[dict[str, Any]]:
    q = ("SELECT key, uri, extra, state, reason, credits, reused_from, content_hash, "
         "fingerprint, sends, missing, answered_at, recorded_run AS run, result FROM items "
         "WHERE job = ?")
    args: list[Any] = [job]
    if state:
        q += " AND state = ?"
        args.append(state)
    if run is not None:
        q += " AND recorded_run = ?"
        args.append(run)
    if since is not None:
        q += " AND answered_at >= ?"
        args.append(since)
    q += " ORDER BY key"
    # A separate cursor on a read-only connection streams without holding the writer's lock.
    conn = _connect_ro(path)
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
