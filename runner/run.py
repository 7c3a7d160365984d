"""The run: listing, routing, reuse, the budget and recording, shared by every executor.

Listing -> preparation -> batches -> API -> checkpoint. The executors (executors/) decide where
preparation and requests happen; every decision about an image is made here, through `Run`'s
methods. Every answered batch is committed in one transaction before the next decision that
depends on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from runner.answers import BatchAnswer, reused_record
from runner.attempts import AttemptRow
from runner.classify import Classified, Listed
from runner.client import ApiClient, AttemptFn, GateFn
from runner.errors import AuthError, ExitCode, SourceError
from runner.job import Job
from runner.limits import DURATION, MONEY, NO_LIMIT, Limits
from runner.prepare import prep_signature, prepare_smaller
from runner.records import (
    Item,
    Ready,
    RecordOutcome,
    Refused,
    url_without_secrets,
)
from runner.sources import check_sources, iter_chunks, list_items
from runner.store import AnsweredBatch, Store
from runner.summary import KIND_COUNTERS, ProgressFn, RunOptions, Summary
from runner.verdict import settle
from runner.wire import account_figure

log = logging.getLogger("ximrun.run")

# The listing is classified a chunk (one transaction) at a time: small at first, so that the first
# batch leaves soon; doubling up to LIST_CHUNK while nothing is sent (a rerun: fewer hand-overs);
# small while requests are in flight, as a chunk's transaction holds up their attempt rows.
LIST_CHUNK_SENDING = 100
LIST_CHUNK = 5000
CLASSIFY_AHEAD = 2  # chunks listed while earlier ones are being classified

# An executor's loop: moves the work of a run, returns (why it stopped early or None, whether
# the whole listing was seen).
DriveFn = Callable[["Run"], tuple[str | None, bool]]


def submit_prepared(job: Job, client: ApiClient, batch: Sequence[Ready],
                    on_attempt: AttemptFn, on_unsent: AttemptFn | None = None,
                    on_lost: AttemptFn | None = None, may_send: GateFn | None = None
                    ) -> list[RecordOutcome]:
    """Send one batch; a record the API found too large goes once more, downscaled, if max_side
    allows. `on_attempt` runs before every request, `on_unsent` after one that never connected,
    `on_lost` after one that may have been billed and lost its answer; `may_send` may withhold
    a request (a spending limit, the time window). Raises AuthError."""
    outcomes = client.submit_batch([r.record for r in batch], on_attempt=on_attempt,
                                   on_unsent=on_unsent, on_lost=on_lost, may_send=may_send)
    if job.images.max_side <= 0 or not any(o.too_large for o in outcomes):
        return outcomes
    by_key = {r.item.key: r for r in batch}
    again = [smaller for o in outcomes if o.too_large and o.id in by_key
             if (smaller := prepare_smaller(job, by_key[o.id])) is not None]
    if not again:
        return outcomes
    second = {o.id: o for o in client.submit_batch(again, on_attempt=on_attempt,
                                                   on_unsent=on_unsent, on_lost=on_lost,
                                                   may_send=may_send)}
    return [second.get(o.id, o) for o in outcomes]


class Run:
    """One run of a job: listing, routing (refused, reused, waiting on a copy, batched), the
    budget, and recording every answer. Executors move the work and call these methods; the
    decisions are all here, so that the local and the Dask executor cannot disagree.

    Thread safety: `route`, `affordable`, `next_batch` and `stop_reason` are the coordinator's;
    `send`, `record_attempt` and `record_answers` may run on any thread.
    """

    def __init__(self, job: Job, store: Store, client: ApiClient, options: RunOptions,
                 stop: threading.Event, progress: ProgressFn | None) -> None:
        self.job = job
        self.store = store
        self.client = client
        self.options = options
        self.stop = stop
        self.progress = progress
        budget = options.budget if options.budget is not None else job.credits.budget
        self.budget = None if budget == NO_LIMIT else budget
        self.summary = Summary(job=job.name, budget=self.budget)
        self.request_sig = job.request_signature()
        self.prep_sig = prep_signature(job)
        self.per_image = job.credits.per_image
        self.reuse = job.credits.reuse
        self._lock = threading.Lock()  # summary counters, reservations, in-run duplicates
        self._hash_lock = threading.Lock()  # waiting followers vs. their leader's commit
        self.waiting: dict[str, list[Item]] = {}  # content hash in a batch or in flight -> copies
        self.limits = Limits(job, options, store, lambda: self.client.account_details(),
                             job.credits.per_image)
        self._lost: dict[int, set[int]] = {}  # batch -> its requests whose answer was lost
        self.batch_no = 0
        self.run_id = 0
        self.auth_error: AuthError | None = None
        self.sending = 0  # batches handed to the request threads and not finished
        self.service_error: str | None = None  # the last failure of the service, not a record's
        self._classifying: deque[Callable[[], Classified]] = deque()  # chunks queued, not counted
        # The listing so far: images listed, classified, and classified to be sent.
        self._seen = self._classified = self._to_send = 0

    # listing and classification

    def listed(self) -> Iterator[Listed]:
        """The images to act on, as the listing streams; every chunk is recorded as listed (and
        counted) first."""
        def skipped(why: str) -> None:  # sources.py has logged the row and why
            self.summary.skipped(why, self.job.source.manifest)

        # Chunks are classified (by the store's writer) while the next ones are listed. Each one
        # queued is recorded as listed in the runs row: `settle_listing` counts those a stop left
        # unread, so that the summary and the row agree.
        queued = self._classifying
        listed = list_items(self.job.source, on_skip=skipped)
        size = LIST_CHUNK_SENDING

        def chunk_size() -> int:
            return LIST_CHUNK_SENDING if self.sending else size

        for chunk in iter_chunks(listed, chunk_size):
            if not self.sending:
                size = min(LIST_CHUNK, size * 2)
            self._seen += len(chunk)
            queued.append(self.store.classify_soon(self.job.name, chunk,
                                                   request_sig=self.request_sig,
                                                   prep_sig=self.prep_sig, run_id=self.run_id))
            if len(queued) > CLASSIFY_AHEAD:
                yield from self._counted(queued.popleft()())
        while queued:
            yield from self._counted(queued.popleft()())
        self.summary.listing_done = True
        self.report()

    def settle_listing(self) -> None:
        """Chunks classified ahead of a stop are recorded as listed (and their images pending):
        counted into the summary too, their images left for the next run."""
        while self._classifying:
            with contextlib.suppress(Exception):  # an error of the writer is raised elsewhere
                self._counted(self._classifying.popleft()())

    def _counted(self, classified: Classified) -> list[Listed]:
        s = self.summary
        with self._lock:
            for kind, n in classified.counts.items():
                s.listed += n
                name = KIND_COUNTERS[kind]
                setattr(s, name, getattr(s, name) + n)
        self.report()
        to_send = classified.to_send
        self._classified += sum(classified.counts.values())
        self._to_send += len(to_send)
        return to_send

    def looks_longer_than(self, n: int) -> bool:
        """Whether the listing already shows more than n images, at least half of those classified
        so far to be sent: likely a run of more than n images, known before they are taken up
        (the first chunks are classified while the next are listed)."""
        return self._seen > n and self._classified > 0 and 2 * self._to_send >= self._classified

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.summary)

    # the coordinator

    def execute(self, drive: DriveFn) -> Summary:
        """Begin the run, let `drive` move the work (an executor's loop), then settle the exit
        code and finish the run's row. Raises SourceError for a root that cannot be listed."""
        s = self.summary
        started = time.monotonic()
        self.run_id = self.store.begin_run(self.job.name, pid=os.getpid(),
                                           endpoint=url_without_secrets(self.job.api.endpoint),
                                           budget=self.budget)
        s.run_id = self.run_id
        self.report()  # the caller learns the run's id at once (a second Ctrl-C records it)
        stopped_by: str | None = None
        listing_complete = False
        try:
            s.account_before = account_figure(self.client.account_details())
            self.store.set_account_before(self.run_id, s.account_before)
            self.limits.start(self.run_id)
            check_sources(self.job.source)
            stopped_by, listing_complete = drive(self)
        except AuthError as exc:
            self.auth_error = exc
        except SourceError:
            # A refused source ends the run (exit 2): it must not stay "running" in the database.
            s.status, s.exit_code = "source_refused", ExitCode.USAGE
            self.store.finish_run(self.run_id, status=s.status, exit_code=s.exit_code)
            raise
        finally:
            s.elapsed_s = round(time.monotonic() - started, 3)
            self.settle_listing()
        settle(self, stopped_by, listing_complete)
        self.report()
        return s

    def stop_reason(self, stopped_by: str | None) -> str | None:
        """Nothing more is sent after a refused token ("auth"), a signal ("interrupted") or once
        the circuit breaker opened ("unavailable")."""
        if self.auth_error is not None:
            return "auth"
        if self.stop.is_set() and stopped_by is None:
            return "interrupted"
        if stopped_by is None and self.client.breaker.is_open():
            return "unavailable"
        if stopped_by == "budget":  # an executor's word for "a limit allows no batch"
            return self.limits.short or self.limits.stopped or "budget"
        if stopped_by is None and self.limits.stopped is not None:
            return self.limits.stopped  # a request after a lost answer would pass a limit
        if stopped_by is None and self.limits.expired():
            return DURATION
        return stopped_by

    def wind_up(self, listing: Iterator[Listed], stopped_by: str | None, limited: bool,
                 exhausted: bool) -> tuple[str | None, bool]:
        """After the last batch: (why the run stopped early or None, whether it saw everything)."""
        if stopped_by == "auth":
            raise self.auth_error  # type: ignore[misc]
        if stopped_by == "budget":
            stopped_by = self.stop_reason(stopped_by)
        elif stopped_by is None and self.limits.stopped is not None:
            stopped_by = self.limits.stopped  # the last batches' resends were withheld
        if stopped_by is None and limited and next(listing, None) is not None:
            stopped_by = "limit"
        if stopped_by in (*MONEY, "limit"):
            # Record the rest of the listing as pending, so that status and the next plan are true.
            for _ in listing:
                pass
            exhausted = True
        return stopped_by, exhausted and stopped_by != "interrupted"

    def next_batch(self) -> int:
        self.batch_no += 1
        return self.batch_no

    def affordable(self, n: int) -> int:
        """How many of n images every spending limit allows now (limits.py); reserves their
        credits. None once the time window ended."""
        if self.limits.expired():
            return 0
        return self.limits.affordable(n)

    def may_send(self) -> str | None:
        """Before each request of a batch: None, or the limit it would pass (then it is not
        sent, and its images stay pending)."""
        return self.limits.may_resend()

    def lost_answer(self, batch_no: int, attempt: int, ids: Sequence[str]) -> None:
        """A request that may have been billed lost its answer: it counts against every limit
        for good, and its attempts row stays open."""
        self.limits.lose(len(ids))
        with self._lock:
            self._lost.setdefault(batch_no, set()).add(attempt)

    def route(self, results: list[Ready | Refused], batch: list[Ready]) -> None:
        s = self.summary
        rejected: list[tuple[Item, str]] = []
        unreadable: list[tuple[Item, str]] = []
        reused: list[tuple[Item, str, str, str]] = []
        ready: list[Ready] = []
        for r in results:
            if isinstance(r, Refused):
                (unreadable if r.read_failed else rejected).append((r.item, r.reason))
            elif r.content_hash is None or not self.reuse:
                batch.append(r)
            else:
                ready.append(r)
        if ready:
            with self._hash_lock:
                # One query for the lot; copies already waiting on a batch are left out of it.
                known = self.store.find_answers(
                    [r.content_hash for r in ready if r.content_hash not in self.waiting],
                    self.request_sig)
                for r in ready:
                    h = r.content_hash
                    assert h is not None
                    copies = self.waiting.get(h)
                    if copies is not None:
                        copies.append(r.item)
                    elif h in known:
                        found = known[h]
                        reused.append((r.item, h, found.key,
                                       reused_record(found.result, r.item, found.extra)))
                    else:
                        self.waiting[h] = []
                        batch.append(r)
        name = self.job.name
        self.store.mark_rejected(name, rejected, prep_sig=self.prep_sig, run_id=self.run_id)
        self.store.mark_failed(name, unreadable, run_id=self.run_id)
        self.store.mark_reused(name, reused, request_sig=self.request_sig, prep_sig=self.prep_sig,
                               run_id=self.run_id, per_image=self.per_image)
        if rejected or unreadable or reused:
            with self._lock:
                s.rejected += len(rejected)
                for _, reason in rejected:
                    key = reason.split(":")[0] if not reason.startswith("unsupported") else reason
                    s.rejected_reasons[key] = s.rejected_reasons.get(key, 0) + 1
                s.failed += len(unreadable)
                s.reused += len(reused)
                s.done += len(reused)
                s.credits_saved += len(reused) * self.per_image
            self.report()

    # the sender (runs on the request threads)

    def send(self, batch_no: int, batch: list[Ready]) -> int:
        requests = 0  # numbered per batch, across the downscaled resend too

        def on_attempt(ids: Any, attempt: int) -> None:
            nonlocal requests
            requests += 1
            self.record_attempt(batch_no, requests, ids)

        def on_unsent(ids: Any, attempt: int) -> None:
            nonlocal requests
            self.forget_attempt(batch_no, requests)  # always the last one: a batch is sequential
            requests -= 1

        def on_lost(ids: Any, attempt: int) -> None:
            self.lost_answer(batch_no, requests, ids)

        try:
            outcomes = submit_prepared(self.job, self.client, batch, on_attempt, on_unsent,
                                       on_lost, lambda ids, attempt: self.may_send())
        except AuthError as exc:
            self.unreserve(len(batch))
            if exc.refused_request and requests:
                self.forget_attempt(batch_no, requests)
            raise
        return self.record_answers(batch_no, batch, outcomes)

    def refuse_token(self, exc: AuthError) -> None:
        """The API refused the token: nothing more is sent, the requests in flight stop retrying."""
        self.auth_error = exc
        self.stop.set()

    def mark_lost(self, items: Sequence[Item], reason: str) -> None:
        """Images whose preparation was lost with its worker: failed, with the reason."""
        self.store.mark_failed(self.job.name, [(it, reason) for it in items], run_id=self.run_id)
        with self._lock:
            self.summary.failed += len(items)
        self.report()

    def record_attempt(self, batch_no: int, attempt: int, ids: Sequence[str]) -> None:
        """Before a request leaves: the accountability row for the money it may cost."""
        self.record_attempts([(batch_no, attempt, ids)])

    def record_attempts(self, rows: Sequence[AttemptRow]) -> None:
        """Several requests' rows, (batch, attempt, ids), committed together."""
        self.store.record_attempts(self.job.name, self.run_id, rows)
        with self._lock:
            self.summary.requests += len(rows)

    def forget_attempt(self, batch_no: int, attempt: int) -> None:
        """The request never reached the service (it never connected), or was refused with
        401/403 and so not billed: its row goes, and it is no request of this run. Its row was
        written before it left, as every request's is."""
        gone = self.store.forget_attempt(self.run_id, batch_no, attempt)
        with self._lock:
            self.summary.requests -= gone

    def unreserve(self, n: int) -> None:
        self.limits.unreserve(n * self.per_image)

    def record_answers(self, batch_no: int, batch: Sequence[Ready],
                       outcomes: Sequence[RecordOutcome]) -> int:
        """Commit a sent batch's outcomes (see record_answered); returns its credits."""
        return self.record_answered([(batch_no, batch, outcomes)])[0]

    def record_answered(self, sent: Sequence[tuple[int, Sequence[Ready], Sequence[RecordOutcome]]]
                        ) -> list[int]:
        """Commit sent batches' outcomes and their waiting copies in one transaction; release
        their reservations. Returns each batch's credits.

        The commit runs outside the hash lock, so that batches answered together share one
        transaction. A content's entry in `waiting` stays until its answer is committed: a copy
        routed meanwhile joins it (and is settled here, after the commit) rather than looking in
        the database too early and paying for the same bytes again."""
        if not sent:
            return []
        job = self.job
        per_batch: list[list[BatchAnswer]] = []
        with self._hash_lock:
            for _, batch, outcomes in sent:
                by_id = {o.id: o for o in outcomes}
                mine = []
                for r in batch:
                    o = by_id.get(r.item.key) or RecordOutcome(
                        r.item.key, ok=False, reason="no outcome for this record")
                    followers: tuple[Item, ...] = ()
                    if r.content_hash is not None and self.reuse and o.final:
                        followers = tuple(self.waiting.get(r.content_hash, ()))
                    mine.append(BatchAnswer(r.item, o, r.content_hash, followers))
                per_batch.append(mine)
        answers = [a for mine in per_batch for a in mine]
        with self._lock:
            batches: list[AnsweredBatch] = [(n, mine, self._lost.pop(n, set()))
                                            for (n, _, _), mine in zip(sent, per_batch, strict=True)]
        credits = self.store.record_batches(job.name, self.run_id, batches,
                                            request_sig=self.request_sig,
                                            prep_sig=self.prep_sig, per_image=self.per_image)
        for (_, batch, _), paid in zip(sent, credits, strict=True):
            self.limits.settle(len(batch) * self.per_image, paid)
        late_reused, late_failed = self._release_waiting(answers)
        self.store.mark_reused(job.name, late_reused, request_sig=self.request_sig,
                               prep_sig=self.prep_sig, run_id=self.run_id,
                               per_image=self.per_image)
        self.store.mark_failed(job.name, late_failed, run_id=self.run_id)
        with self._lock:
            s = self.summary
            s.credits += sum(credits)
            for a in answers:
                if not a.outcome.final:
                    if a.outcome.unavailable:
                        s.unavailable += 1
                        if a.outcome.attempts > 0:
                            s.sent += 1
                        self.service_error = a.outcome.reason
                    continue
                s.sent += 1
                n_follow = len(a.followers)
                if a.outcome.ok:
                    s.done += 1 + n_follow
                    s.reused += n_follow
                    s.credits_saved += n_follow * self.per_image
                else:
                    s.failed += 1 + n_follow
            s.done += len(late_reused)
            s.reused += len(late_reused)
            s.credits_saved += len(late_reused) * self.per_image
            s.failed += len(late_failed)
        self.report()
        return credits

    def _release_waiting(self, answers: Sequence[BatchAnswer]
                         ) -> tuple[list[tuple[Item, str, str, str]], list[tuple[Item, str]]]:
        """After the commit: the contents leave `waiting`; copies that joined after the answers
        were taken share the leader's outcome (reused, or failed alike). Copies of an image left
        pending stay pending."""
        late_reused: list[tuple[Item, str, str, str]] = []
        late_failed: list[tuple[Item, str]] = []
        with self._hash_lock:
            for a in answers:
                h = a.content_hash
                if h is None or not self.reuse:
                    continue
                copies = self.waiting.pop(h, None)
                if not copies or not a.outcome.final:
                    continue
                late = copies[len(a.followers):]
                o = a.outcome
                if o.ok and late:
                    late_reused += [(it, h, a.item.key,
                                     reused_record(o.answer, it, a.item.extra))
                                    for it in late]
                else:
                    late_failed += [(it, f"same bytes as {a.item.key}: {o.reason}")
                                    for it in late]
        return late_reused, late_failed
