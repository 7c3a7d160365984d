"""Spending limits: the job's budget, per run, per calendar day and month, the account's floor,
and the run's time window. One `Limits` per run decides; `Run.affordable` and `Run.may_send` ask
it, whichever executor moves the work.

A limit is a promise about money, so each counts what the account may have been charged:

- the credits recorded for answers (the `runs` counters; for a day or a month, the answers
  recorded in it);
- `per_image` per record of every request that may have been billed and whose answer was never
  recorded: its `attempts` row stays open (in flight when a run died, the answer lost, timed out
  after sending). Such a request counts for good; the request that later answers the same
  image is another request, with its own charge;
- the reservations of the batches this run has in flight (`per_image` per record).

A batch is sent only if every limit leaves room for it (it is shrunk, or not sent), and a
request after a lost answer only if every limit still holds with that loss counted.

`now()` is the clock of the calendar limits and the time window: tests replace it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from runner.job import parse_duration

if TYPE_CHECKING:
    from runner.job import Job
    from runner.store import Store
    from runner.summary import RunOptions

log = logging.getLogger("ximrun.limits")

NO_LIMIT = -1  # RunOptions.budget: `--budget none`
ACCOUNT_REFRESH_S = 30.0  # the account's figure is asked again at most this often ...
ACCOUNT_REFRESH_BATCHES = 50  # ... or after this many batches, whichever comes first
# The reasons a run stops early for a limit; the run's status is `stopped_by_<reason>`.
MONEY = ("budget", "per_run", "per_day", "per_month", "account")
DURATION = "duration"
REASONS = (*MONEY, DURATION)


def now() -> datetime:
    """The current time, aware (UTC). Tests monkeypatch this."""
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    """As the database writes timestamps: UTC, milliseconds, a Z; they sort as text."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def window(kind: str, t: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar day or month holding `t` in `tz`: [start, end) as aware datetimes."""
    local = t.astimezone(tz)
    if kind == "per_day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=1, hours=3)).replace(hour=0)  # safe across DST changes
    else:
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=32)).replace(day=1)
    # Re-attach the zone so that a DST change inside the window gives the right offsets.
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    nxt = nxt.replace(tzinfo=None).replace(tzinfo=tz)
    return start, nxt


@dataclass
class _Window:
    start: datetime
    end: datetime
    before: int = 0  # credits of other runs recorded or possibly billed in the window
    mine: int = 0  # this run's recorded and lost credits since the window began


class Limits:
    """One run's limits. Thread-safe; every figure in credits."""

    def __init__(self, job: Job, options: RunOptions, store: Store,
                 account: Callable[[], dict[str, Any] | None], per_image: int) -> None:
        c = job.credits
        self.job = job
        self.store = store
        self.account = account
        self.per_image = per_image
        budget = c.budget if options.budget is None else options.budget
        self.budget = None if budget == NO_LIMIT else budget
        self.per_run = options.max_credits if options.max_credits is not None else c.per_run
        self.per_day = c.per_day
        self.per_month = c.per_month
        self.tz = ZoneInfo(c.timezone)
        self.min_account = c.min_account_credits
        if options.max_duration is not None:
            self.max_duration_s: float | None = options.max_duration
        elif job.run.max_duration is not None:
            self.max_duration_s = parse_duration("run.max_duration", job.run.max_duration)
        else:
            self.max_duration_s = None
        self.deadline: float | None = None  # time.monotonic() after which no batch is taken
        self.wall_deadline: float | None = None  # the same as time.time(), for Dask workers
        self._lock = threading.Lock()
        self._roll_lock = threading.Lock()
        self.run_id = 0
        self.total_before = 0  # the job's recorded + possibly billed credits, other runs
        self.spent = 0  # this run: recorded
        self.lost = 0  # this run: requests whose answer was lost
        self.reserved = 0  # this run: batches in flight
        self.windows: dict[str, _Window] = {}
        self.account_room: int | None = None  # remaining - min_account at the last reading
        self.account_mark = 0  # this run's spent + lost at that reading
        self.account_read_at = 0.0
        self.account_batches = 0
        self.account_said_no_limit = False
        self.stopped: str | None = None  # a request in flight was withheld for this limit
        self.short: str | None = None  # the limit that allowed no batch at the last asking

    @property
    def active(self) -> bool:
        """Whether any money limit applies (then a lost answer is resent only if they hold)."""
        return any(v is not None for v in (self.budget, self.per_run, self.per_day,
                                           self.per_month, self.min_account))

    # --- start ---------------------------------------------------------------------------------

    def start(self, run_id: int) -> None:
        """At the run's start: the database's figures, the account's, the time window."""
        self.run_id = run_id
        if self.max_duration_s is not None:
            self.deadline = time.monotonic() + self.max_duration_s
            self.wall_deadline = time.time() + self.max_duration_s
        self.total_before = self.store.spent(self.job.name) + self._lost_before(None, None)
        t = now()
        for kind in ("per_day", "per_month"):
            if getattr(self, kind) is not None:
                self.windows[kind] = self._open_window(kind, t)
        if self.min_account is not None:
            self._read_account()

    def _open_window(self, kind: str, t: datetime) -> _Window:
        start, end = window(kind, t, self.tz)
        w = _Window(start, end)
        w.before = (self._recorded_in(iso(start), iso(end))
                    + self._lost_before(iso(start), iso(end)))
        return w

    def _lost_before(self, start: str | None, end: str | None) -> int:
        """per_image x records of other runs' requests that may have been billed, no answer
        recorded (open attempts rows), sent in [start, end) if given."""
        q = ("SELECT coalesce(sum(n), 0) FROM attempts WHERE job = ? AND closed_at IS NULL "
             "AND run_id != ?")
        args: list[Any] = [self.job.name, self.run_id]
        if start is not None:
            q += " AND sent_at >= ? AND sent_at < ?"
            args += [start, end]
        row = self.store.db.read(lambda c: c.execute(q, args).fetchone())
        return int(row[0]) * self.per_image

    def _recorded_in(self, start: str, end: str) -> int:
        return recorded_in(self.store, self.job.name, start, end, self.per_image,
                           exclude_run=self.run_id)

    def _read_account(self) -> None:
        # What this run had recorded before asking: whatever is recorded from now on counts
        # against the figure read, even if the account already counted it (the safe side).
        with self._lock:
            mark = self.spent + self.lost
        details = self.account()
        self.account_read_at = time.monotonic()
        self.account_batches = 0
        limit = (details or {}).get("credits_limit")
        counter = (details or {}).get("credits_counter")
        if not isinstance(limit, int | float) or not isinstance(counter, int | float):
            if not self.account_said_no_limit:
                self.account_said_no_limit = True
                log.warning("credits.min_account_credits cannot apply: the API gives no "
                            "credits_limit and credits_counter")
            self.account_room = None
            return
        assert self.min_account is not None
        with self._lock:
            self.account_room = int(limit) - int(counter) - self.min_account
            self.account_mark = mark

    # --- what is left ----------------------------------------------------------------------------

    def _roll(self) -> None:
        """A new day or month began: its own allowance applies from then on (what this run
        records from then on counts in it, with the reservations still in flight)."""
        if not self.windows:
            return
        t = now()
        with self._roll_lock:
            for kind, w in list(self.windows.items()):
                if t >= w.end:
                    self.windows[kind] = self._open_window(kind, t)

    def rooms(self) -> dict[str, int]:
        """Credits each money limit still allows, counting the reservations in flight."""
        mine = self.spent + self.lost + self.reserved
        out: dict[str, int] = {}
        if self.budget is not None:
            out["budget"] = self.budget - self.total_before - mine
        if self.per_run is not None:
            out["per_run"] = self.per_run - mine
        for kind, w in self.windows.items():
            out[kind] = getattr(self, kind) - w.before - w.mine - self.reserved
        if self.account_room is not None:
            out["account"] = self.account_room - (mine - self.account_mark)
        return out

    def _refresh(self) -> None:
        self._roll()
        if self.min_account is not None and not self.account_said_no_limit and (
                time.monotonic() - self.account_read_at >= ACCOUNT_REFRESH_S
                or self.account_batches >= ACCOUNT_REFRESH_BATCHES):
            self._read_account()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    # --- decisions -------------------------------------------------------------------------------

    def affordable(self, n: int) -> int:
        """How many of n images every limit allows now; reserves them. `short` names the limit
        when it allows none (the run stops once nothing is in flight)."""
        self._refresh()
        with self._lock:
            rooms = self.rooms()
            for name, room in rooms.items():
                cap = self._cap(name)
                if cap == 0 or room <= 0:
                    n = 0
                elif self.per_image > 0:
                    n = min(n, room // self.per_image)
                if n == 0:
                    break
            self.short = name if n == 0 else None
            self.account_batches += n > 0
            self.reserved += n * self.per_image
            return n

    def _cap(self, name: str) -> int | None:
        return {"budget": self.budget, "per_run": self.per_run, "per_day": self.per_day,
                "per_month": self.per_month}.get(name)

    def may_resend(self) -> str | None:
        """Before a request of a batch in flight: None if every limit holds (the batch's
        reservation covers the request), else the limit that would be passed."""
        if self.expired():
            return DURATION
        self._roll()
        with self._lock:
            for name, room in self.rooms().items():
                if room < 0:
                    self.stopped = self.stopped or name
                    return name
        return None

    def unreserve(self, credits: int) -> None:
        with self._lock:
            self.reserved -= credits

    def settle(self, reserved: int, credits: int) -> None:
        """A batch was recorded: its reservation goes, its recorded credits stay."""
        self._roll()
        with self._lock:
            self.reserved -= reserved
            self.spent += credits
            for w in self.windows.values():
                w.mine += credits

    def lose(self, records: int) -> None:
        """A request's answer was lost: it may have been billed, for good."""
        credits = records * self.per_image
        self._roll()
        with self._lock:
            self.lost += credits
            for w in self.windows.values():
                w.mine += credits

    # --- reports ---------------------------------------------------------------------------------

    def left(self) -> dict[str, dict[str, Any]]:
        """Each limit: its value and what is left of it (credits), for the summary."""
        with self._lock:
            rooms = self.rooms()
        out: dict[str, dict[str, Any]] = {}
        for name, room in rooms.items():
            entry: dict[str, Any] = {"limit": self._cap(name), "left": max(0, room)}
            if name == "account":
                entry["limit"] = self.min_account
                entry["left"] = max(0, room)
            out[name] = entry
        if self.max_duration_s is not None:
            out[DURATION] = {"limit": self.max_duration_s,
                             "left": None if self.deadline is None
                             else round(max(0.0, self.deadline - time.monotonic()), 1)}
        return out


def recorded_in(store: Store, job: str, start: str, end: str, per_image: int, *,
                exclude_run: int | None = None) -> int:
    """Credits recorded in [start, end): runs that began in it count whole; a run that began
    before it counts the answers it recorded from `start` on (items.answered_at)."""

    def query(c: Any) -> int:
        rows = c.execute(
            "SELECT r.id, r.started_at, r.credits, coalesce(r.finished_at, (SELECT "
            "min(r2.started_at) FROM runs r2 WHERE r2.job = r.job AND r2.id > r.id)) AS ended "
            "FROM runs r WHERE r.job = ? AND r.id IS NOT ? AND r.credits > 0 "
            "AND r.started_at < ?", (job, exclude_run, end)).fetchall()
        total = 0
        for _, started, credits, ended in rows:
            if started >= start:
                total += credits
            elif ended is None or ended >= start:
                n = c.execute(
                    "SELECT count(*) FROM items WHERE job = ? AND state = 'done' AND credits > 0 "
                    "AND reused_from IS NULL AND answered_at >= ? AND answered_at < ? "
                    "AND answered_at <= coalesce(?, answered_at)",
                    (job, start, end, ended)).fetchone()[0]
                total += min(credits, n * per_image)
        return total

    return int(store.db.read(query))


def job_figures(job: Job, store: Store, *, per_image: int | None = None) -> dict[str, Any]:
    """For `status` and `plan`: each money limit of the job file, and what is left of it now
    (no run going: every open attempts row counts as possibly billed)."""
    c = job.credits
    pi = c.per_image if per_image is None else per_image
    name = job.name

    def lost(start: str | None = None, end: str | None = None) -> int:
        q = "SELECT coalesce(sum(n), 0) FROM attempts WHERE job = ? AND closed_at IS NULL"
        args: list[Any] = [name]
        if start is not None:
            q += " AND sent_at >= ? AND sent_at < ?"
            args += [start, end]
        return int(store.db.read(lambda cn: cn.execute(q, args).fetchone())[0]) * pi

    out: dict[str, Any] = {}
    if c.budget is not None:
        used = store.spent(name) + lost()
        out["budget"] = {"limit": c.budget, "used": used, "left": max(0, c.budget - used)}
    if c.per_run is not None:
        out["per_run"] = {"limit": c.per_run, "left": c.per_run}
    t = now()
    tz = ZoneInfo(c.timezone)
    for kind in ("per_day", "per_month"):
        cap = getattr(c, kind)
        if cap is None:
            continue
        start, end = window(kind, t, tz)
        s, e = iso(start), iso(end)
        used = recorded_in(store, name, s, e, pi) + lost(s, e)
        out[kind] = {"limit": cap, "used": used, "left": max(0, cap - used),
                     "window": f"{start.isoformat()} .. {end.isoformat()}"}
    if c.min_account_credits is not None:
        out["account"] = {"limit": c.min_account_credits, "left": None,
                          "note": "read from the account at the run's start"}
    if job.run.max_duration is not None:
        out[DURATION] = {"limit": parse_duration("run.max_duration", job.run.max_duration)}
    return out


def stop_message(reason: str, left: dict[str, dict[str, Any]]) -> str:
    """The summary's line: which limit stopped the run, and what is left of each."""
    what = {"budget": "the job's budget", "per_run": "the credit limit of this run",
            "per_day": "the day's credit limit", "per_month": "the month's credit limit",
            "account": "the account's floor (min_account_credits)",
            DURATION: "the time window (max_duration)"}[reason]
    parts = []
    for name, entry in left.items():
        if name == DURATION:
            parts.append(f"max_duration {entry['limit']:g}s")
        else:
            parts.append(f"{name} {entry['left']} of {entry['limit']}" if name != "account"
                         else f"account {entry['left']} above the floor {entry['limit']}")
    return (f"stopped by {what}: no more batches were sent" if reason != DURATION else
            f"stopped by {what}: no new batches after it, the requests in flight were recorded"
            ) + ("; credits left: " + ", ".join(parts) if parts else "")
