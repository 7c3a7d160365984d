"""The `attempts` table: a row per HTTP request, committed before the request leaves and closed
with its answer; `items.sends` is counted in the same transaction as each row. `Store` has these
methods (as it has `runs.py`'s); the answers that close the rows are the store's own."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence

from runner.answers import utcnow
from runner.commit import Database
from runner.runs import RunCounts

# A request's row: (batch, attempt, the keys it carries).
AttemptRow = tuple[int, int, Sequence[str]]


class AttemptRows:
    """Methods of `Store` over the `attempts` table."""

    db: Database
    _counts: RunCounts

    def record_attempts(self, job: str, run_id: int, rows: Sequence[AttemptRow]) -> None:
        """Before requests leave: their images are in flight (and may be billed). One
        transaction for them all (the first requests of a Dask task's batches, say). Returns
        once committed."""
        if rows:
            self.db.write_waited("record_attempt", self._attempt_rows(job, run_id, rows))

    def _attempt_rows(self, job: str, run_id: int, rows: Sequence[AttemptRow]
                      ) -> Callable[[sqlite3.Connection], None]:
        now = utcnow()
        inserts = [(run_id, job, batch, attempt, json.dumps(list(keys)), len(keys), now)
                   for batch, attempt, keys in rows]
        # `sends` is counted here, in the same transaction as the row: items.sends is the number
        # of attempts rows naming the image, whatever happens to the process afterwards.
        # One statement per request (a batch is at most 10 keys): the row is committed while
        # the request waits for it, so each statement more is a wait more.
        sends = [list(dict.fromkeys(keys)) for _, _, keys in rows]

        def record(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO attempts (run_id, job, batch, attempt, keys, n, sent_at) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", inserts)
            for unique in sends:
                if unique:
                    c.execute("UPDATE items SET sends = sends + 1 WHERE job = ? AND key IN "
                              f"({','.join('?' * len(unique))})", (job, *unique))
            self._counts.add(run_id, requests=len(inserts))

        return record

    def forget_attempt(self, run_id: int, batch: int, attempt: int) -> int:
        """A request that never connected: its attempts row goes, and it is no request of the
        run. Returns once committed, with the rows removed (0 when there was none)."""
        def forget(c: sqlite3.Connection) -> int:
            where = "WHERE run_id = ? AND batch = ? AND attempt = ? AND closed_at IS NULL"
            args = (run_id, batch, attempt)
            rows = c.execute(f"SELECT job, keys FROM attempts {where}", args).fetchall()
            for job, keys in rows:  # the sends its row counted go with it
                c.executemany("UPDATE items SET sends = sends - 1 WHERE job = ? AND key = ? "
                              "AND sends > 0", [(job, k) for k in json.loads(keys)])
            if rows:
                c.execute(f"DELETE FROM attempts {where}", args)
                self._counts.add(run_id, requests=-len(rows))
            return len(rows)

        return int(self.db.write_waited("forget_attempt", forget))
