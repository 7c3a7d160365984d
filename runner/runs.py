"""The `runs` table: its counters, written once per transaction (`RunCounts`), and its
questions and last words: a run's row, the recent runs, the live one, the
credits a job has recorded. `Store` has these methods; the run's first row (`begin_run`, with the
run's listing) is the store's own."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from runner.answers import utcnow
from runner.commit import Database

RUN_COUNTERS = ("listed", "requests", "sent", "done", "failed", "rejected", "reused", "credits",
                "credits_saved")


class RunCounts:
    """A run's counters, added to in memory and written once per transaction, just before its
    COMMIT (one UPDATE for a group of writes, not one per write)."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, int]] = {}

    def add(self, run_id: int, **deltas: int) -> None:
        mine = self.pending.setdefault(run_id, dict.fromkeys(RUN_COUNTERS, 0))
        for name, n in deltas.items():
            mine[name] += n

    def flush(self, c: sqlite3.Connection) -> None:
        counts, self.pending = self.pending, {}
        sets = ", ".join(f"{name} = {name} + ?" for name in RUN_COUNTERS)
        for run_id, mine in counts.items():
            c.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*mine.values(), run_id))

    def snapshot(self) -> dict[int, dict[str, int]]:
        return {k: dict(v) for k, v in self.pending.items()}

    def restore(self, snapshot: dict[int, dict[str, int]]) -> None:
        self.pending = snapshot

    def clear(self) -> None:
        self.pending = {}


class RunRows:
    """Methods of `Store` over the `runs` table."""

    db: Database

    def finish_run(self, run_id: int, *, status: str, exit_code: int,
                   account_after: int | None = None, account_gap: int | None = None,
                   skipped_rows: int = 0, skipped_first: str | None = None) -> None:
        self.db.write(lambda c: c.execute(
            "UPDATE runs SET finished_at = ?, status = ?, exit_code = ?, "
            "account_after = coalesce(?, account_after), account_gap = ?, skipped_rows = ?, "
            "skipped_first = ? WHERE id = ?",
            (utcnow(), status, exit_code, account_after, account_gap, skipped_rows,
             skipped_first, run_id)))

    def set_account_before(self, run_id: int, value: int | None) -> None:
        self.db.write(lambda c: c.execute("UPDATE runs SET account_before = ? WHERE id = ?",
                                        (value, run_id)))

    def run_row(self, run_id: int) -> dict[str, Any]:
        row = self.db.read(lambda c: c.execute("SELECT * FROM runs WHERE id = ?",
                                             (run_id,)).fetchone())
        return dict(row) if row else {}

    def recent_runs(self, job: str, n: int = 5) -> list[dict[str, Any]]:
        """The job's last n runs, newest first; a run still "running" whose process is gone is
        shown as crashed (the next run records it so)."""
        rows = self.db.read(lambda c: c.execute(
            "SELECT * FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?", (job, n)).fetchall())
        runs = [dict(r) for r in rows]
        live = self.live_run(job)
        for r in runs:
            if r["status"] == "running" and r["id"] != live:
                r["status"] = "crashed"
        return runs

    def live_run(self, job: str) -> int | None:
        """The id of the job's run that is going right now, if its process is alive."""
        row = self.db.read(lambda c: c.execute(
            "SELECT id, pid, status FROM runs WHERE job = ? ORDER BY id DESC LIMIT 1",
            (job,)).fetchone())
        if row is None or row["status"] != "running" or not row["pid"] or not _alive(row["pid"]):
            return None
        return int(row["id"])

    def spent(self, job: str) -> int:
        """Credits this job has recorded, over all its runs."""
        row = self.db.read(lambda c: c.execute(
            "SELECT coalesce(sum(credits), 0) FROM runs WHERE job = ?", (job,)).fetchone())
        return int(row[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True
