"""Wires the stages into a run: listing -> preparation -> batches -> API -> checkpoint.

Preparation (read + sniff + decode/resize) runs on a small thread pool, requests on another with
`concurrency` workers; the calling thread coordinates: it classifies the listing against the
database, fills batches, reserves budget and dispatches. Every answered batch is committed in one
transaction before the next decision that depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from runner import sources
from runner.client import ApiClient, AttemptFn
from runner.errors import AuthError, ReadError, SourceError
from runner.job import ImagePolicy, Job, is_url
from runner.lock import run_lock
from runner.records import Item, PreparedImage, RecordOutcome, RequestRecord
from runner.store import (
    CHANGED,
    CHANGED_REQUEST,
    KEPT_FAILED,
    NEW,
    RESUMED,
    RETRY,
    UNCHANGED,
    Answer,
    Classified,
    Listed,
    Store,
    compact_json,
    iter_chunks,
)

log = logging.getLogger("ximrun.pipeline")

# Listed items are classified against the database a chunk at a time (one transaction each).
# The first chunk is small, so that the first batch leaves soon; while nothing is being sent,
# each chunk doubles, up to LIST_CHUNK (a rerun with nothing to send: fewer hand-overs between
# the listing and the writer); while requests are in flight, chunks stay small, as a chunk's
# transaction holds up their attempt rows.
LIST_CHUNK_SENDING = 100
LIST_CHUNK = 5000
PLAN_CHUNK = 500  # plan reads, it does not write: its chunks only pace its progress
CLASSIFY_AHEAD = 2  # chunks listed while earlier ones are being classified
SNIFF_BYTES = 64 * 1024  # enough of a file to recognise its format from the header
FETCH_BYTES = 16 * 2**20  # remote bytes a preparation task fetches at once, at most (but one)
FETCH_UNKNOWN_SIZE = 2**20  # what an object of unknown size counts for


@dataclass(frozen=True)
class RunOptions:
    limit: int | None = None  # stop after this many images were taken up
    budget: int | None = None  # overrides the job's [credits] budget


@dataclass
class Summary:
    """What a run (or a plan) did; the CLI prints it, --json dumps it."""

    job: str
    run_id: int | None = None
    status: str = "running"
    exit_code: int = 0
    message: str | None = None
    listed: int = 0
    new: int = 0
    changed: int = 0
    changed_request: int = 0
    unchanged: int = 0
    resumed: int = 0
    retried: int = 0
    kept_failed: int = 0
    skipped_rows: int = 0
    sent: int = 0
    done: int = 0
    failed: int = 0
    rejected: int = 0
    reused: int = 0
    requests: int = 0
    credits: int = 0
    credits_saved: int = 0
    pending: int = 0
    missing: int = 0
    budget: int = 0
    account_before: int | None = None
    account_after: int | None = None
    elapsed_s: float = 0.0
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[Summary], None]
# Which Summary counter each classification of a listed image adds to.
KIND_COUNTERS = {NEW: "new", CHANGED: "changed", CHANGED_REQUEST: "changed_request",
                 UNCHANGED: "unchanged", RESUMED: "resumed", RETRY: "retried",
                 KEPT_FAILED: "kept_failed"}


# --- preparation (runs on the preparation threads) ---------------------------------------------

@dataclass(frozen=True)
class Ready:
    item: Item
    record: RequestRecord
    content_hash: str | None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Refused:
    item: Item
    reason: str
    read_failed: bool  # True: the bytes could not be read (failed); False: the policy (rejected)


def prepare_items(job: Job, items: Sequence[Item]) -> list[Ready | Refused]:
    """Read, check and convert images, in order; never raises for a bad image or a vanished
    object. Objects in remote storage are fetched several at a time."""
    policy = job.images
    out: list[Ready | Refused | None] = [None] * len(items)
    to_read: list[int] = []
    for i, item in enumerate(items):
        if policy.send == "url":
            try:
                out[i] = _by_url(job, item)
            except ReadError as exc:
                out[i] = Refused(item, str(exc), read_failed=True)
        if out[i] is None:
            to_read.append(i)
    for group in _fetch_groups(items, to_read):
        data = sources.read_many([items[i] for i in group], job.source)
        for i, got in zip(group, data, strict=True):
            if isinstance(got, ReadError):
                out[i] = Refused(items[i], str(got), read_failed=True)
            else:
                out[i] = _from_bytes(items[i], got, policy)
    return out  # type: ignore[return-value]


def _fetch_groups(items: Sequence[Item], indexes: Sequence[int]) -> Iterator[list[int]]:
    """The images read together: a local file alone (read, prepared, let go, then the next);
    remote objects together up to FETCH_BYTES, so that a task of large photos does not hold
    them all at once."""
    group: list[int] = []
    total = 0
    for i in indexes:
        item = items[i]
        if sources.is_local(item):
            yield [i]
            continue
        size = item.size if item.size is not None else FETCH_UNKNOWN_SIZE
        if group and total + size > FETCH_BYTES:
            yield group
            group, total = [], 0
        group.append(i)
        total += size
    if group:
        yield group


def _by_url(job: Job, item: Item) -> Ready | Refused | None:
    """send = "url": a URL for the API to fetch, or None when the bytes must be sent after all
    (no presigned URL, or the image needs converting)."""
    from runner import images

    policy = job.images
    url = sources.presign(item, job.source)
    if url is None:
        return None
    head = sources.read_bytes(item, job.source, max_bytes=SNIFF_BYTES)
    if not head:
        return Refused(item, "empty", read_failed=False)
    verdict = images.decide(images.sniff_format(head), policy)
    if verdict.action == "reject":
        return Refused(item, verdict.reason or "rejected", read_failed=False)
    if verdict.action == "accept" and policy.max_side == 0:
        # The API fetches the bytes itself; without them there is no content hash.
        return Ready(item, RequestRecord(item.key, url=url, extra=item.extra), None)
    return None


def _from_bytes(item: Item, data: bytes, policy: ImagePolicy) -> Ready | Refused:
    # Pillow and its plugins load with the first image prepared: a rerun with nothing to send
    # starts without them.
    from runner import images

    result = images.prepare_image(data, policy)
    if not isinstance(result, PreparedImage):
        return Refused(item, result.reason or "rejected", read_failed=False)
    digest = hashlib.sha256(result.data).hexdigest()
    return Ready(item, RequestRecord(item.key, data=result.data, extra=item.extra), digest,
                 result.width, result.height)


def prep_signature(job: Job) -> str:
    p = job.images
    body = f"{p.max_side}|{','.join(sorted(p.transcode))}|{p.send}|{p.max_pixels}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


# --- sending (runs on the request threads, or on a Dask worker) --------------------------------

def submit_prepared(job: Job, client: ApiClient, batch: Sequence[Ready],
                    on_attempt: AttemptFn) -> list[RecordOutcome]:
    """Send one batch; a record the API found too large goes once more, downscaled, if max_side
    allows. `on_attempt` runs before every request; raises AuthError."""
    outcomes = client.submit_batch([r.record for r in batch], on_attempt=on_attempt)
    if job.images.max_side <= 0 or not any(o.too_large for o in outcomes):
        return outcomes
    by_key = {r.item.key: r for r in batch}
    again: list[RequestRecord] = []
    for o in outcomes:
        r = by_key.get(o.id)
        if not o.too_large or r is None:
            continue
        side = max(r.width or 0, r.height or 0) or job.images.max_side
        policy = replace(job.images, max_side=max(64, side // 2))
        try:
            data = sources.read_bytes(r.item, job.source)
        except ReadError:
            continue
        from runner import images

        smaller = images.prepare_image(data, policy)
        if isinstance(smaller, PreparedImage):
            again.append(RequestRecord(r.item.key, data=smaller.data, extra=r.item.extra))
    if not again:
        return outcomes
    second = {o.id: o for o in client.submit_batch(again, on_attempt=on_attempt)}
    return [second.get(o.id, o) for o in outcomes]


@contextlib.contextmanager
def api_endpoint(job: Job) -> Iterator[tuple[str, str]]:
    """The URL and token to use: the job's, or an embedded emulator's for endpoint = "sandbox"."""
    if not job.uses_sandbox:
        assert job.token is not None  # the job loader refuses a job without one
        yield job.api.endpoint, job.token
        return
    from runner.sandbox import Sandbox

    token = secrets.token_hex(16)
    with Sandbox(replace(job.sandbox, token=token)) as sb:
        yield sb.endpoint_url(), token


# --- the run -----------------------------------------------------------------------------------

class _Run:
    def __init__(self, job: Job, store: Store, client: ApiClient, options: RunOptions,
                 stop: threading.Event, progress: ProgressFn | None) -> None:
        self.job = job
        self.store = store
        self.client = client
        self.options = options
        self.stop = stop
        self.progress = progress
        self.budget = options.budget if options.budget is not None else job.credits.budget
        self.summary = Summary(job=job.name, budget=self.budget)
        self.request_sig = job.request_signature()
        self.prep_sig = prep_signature(job)
        self.per_image = job.credits.per_image
        self.reuse = job.credits.reuse
        self._lock = threading.Lock()  # summary counters, reservations, in-run duplicates
        self._hash_lock = threading.Lock()  # waiting followers vs. their leader's commit
        self.waiting: dict[str, list[Item]] = {}  # content hash in a batch or in flight -> copies
        self.reserved = 0
        self.spent = 0
        self.batch_no = 0
        self.run_id = 0
        self.auth_error: AuthError | None = None
        self.sending = 0  # batches handed to the request threads and not finished

    # listing and classification

    def _listed(self) -> Iterator[Listed]:
        def skipped(why: str) -> None:  # sources.py has logged the row and why
            self.summary.skipped_rows += 1

        # Chunks are classified (by the store's writer) while the next ones are listed.
        queued: deque[Callable[[], Classified]] = deque()
        listed = sources.list_items(self.job.source, on_skip=skipped)
        size = LIST_CHUNK_SENDING

        def chunk_size() -> int:
            return LIST_CHUNK_SENDING if self.sending else size

        for chunk in iter_chunks(listed, chunk_size):
            if not self.sending:
                size = min(LIST_CHUNK, size * 2)
            queued.append(self.store.classify_soon(self.job.name, chunk,
                                                   request_sig=self.request_sig,
                                                   prep_sig=self.prep_sig, run_id=self.run_id))
            if len(queued) > CLASSIFY_AHEAD:
                yield from self._counted(queued.popleft()())
        while queued:
            yield from self._counted(queued.popleft()())

    def _counted(self, classified: Classified) -> list[Listed]:
        s = self.summary
        with self._lock:
            for kind, n in classified.counts.items():
                s.listed += n
                name = KIND_COUNTERS[kind]
                setattr(s, name, getattr(s, name) + n)
        self._report()
        return classified.to_send

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.summary)

    # the coordinator

    def execute(self) -> Summary:
        s = self.summary
        started = time.monotonic()
        self.run_id = self.store.begin_run(self.job.name, pid=os.getpid(),
                                           endpoint=self.job.api.endpoint, budget=self.budget)
        s.run_id = self.run_id
        self.spent = self.store.spent(self.job.name)
        stopped_by: str | None = None
        listing_complete = False
        try:
            s.account_before = _credits_counter(self.client.account_details())
            self.store.set_account_before(self.run_id, s.account_before)
            sources.check_sources(self.job.source)
            stopped_by, listing_complete = self._coordinate()
        except AuthError as exc:
            self.auth_error = exc
        except SourceError:
            # A refused source ends the run (exit 2): it must not stay "running" in the database.
            s.status, s.exit_code = "source_refused", 2
            self.store.finish_run(self.run_id, status=s.status, exit_code=s.exit_code)
            raise
        finally:
            s.elapsed_s = round(time.monotonic() - started, 3)
        if self.auth_error is not None:
            s.status, s.exit_code, s.message = "auth_refused", 5, str(self.auth_error)
        else:
            with contextlib.suppress(AuthError):
                s.account_after = _credits_counter(self.client.account_details())
            if listing_complete:
                src = self.job.source
                self.store.mark_missing(self.job.name, self.run_id,
                                        unique_listing=len(src.paths) + bool(src.manifest) == 1)
            s.pending = self.store.pending_among_listed(self.job.name, self.run_id)
            failed = self.store.failed_among_listed(self.job.name, self.run_id)
            if stopped_by == "interrupted":
                s.status, s.exit_code = "interrupted", 4
            elif stopped_by in ("budget", "limit") and s.pending:
                s.status, s.exit_code = f"stopped_by_{stopped_by}", 3
            elif failed:
                s.status, s.exit_code = "finished_with_failures", 1
                s.message = f"{failed} image(s) failed; see `ximrun status` or `ximrun export`"
            else:
                s.status, s.exit_code = "finished", 0
        s.missing = self.store.missing_count(self.job.name)
        self.store.finish_run(self.run_id, status=s.status, exit_code=s.exit_code,
                              account_after=s.account_after)
        self._report()
        return s

    def _coordinate(self) -> tuple[str | None, bool]:
        """Returns (why it stopped early or None, whether the whole listing was seen)."""
        job = self.job
        bs = job.api.batch_size
        # Preparation takes a batch's worth of images per task: one hand-over (and one remote
        # fetch of them all) instead of one per image. A thread per core: decoders release the
        # GIL, and more threads than that only fight over it for the Python around them. Objects
        # in remote storage are waited for, not computed: four times as many tasks then, so
        # that enough fetches are in flight to keep up with the API.
        cores = max(2, os.cpu_count() or 2)
        prep_workers = cores * (4 if _remote(job) else 1)
        prep_window = max(2 * cores * bs, bs * job.api.concurrency)
        # The client lets `concurrency` requests be in flight. A few more sender threads than
        # that let a request's thread commit its answers while another thread's request already
        # uses its slot: committing never holds a slot of the API's concurrency.
        senders = job.api.concurrency + max(1, job.api.concurrency // 4)
        send_window = senders + 1  # one batch waiting per sender keeps them all busy
        listing = self._listed()
        intake_done = exhausted = limited = False
        stopped_by: str | None = None  # "interrupted", "auth" or "budget": nothing more is sent
        taken = 0
        batch: list[Ready] = []
        prepared: list[Ready | Refused] = []  # finished, not yet routed
        prep_inflight: dict[Future[list[Ready | Refused]], int] = {}  # -> images in the task
        preparing = 0  # images in prep_inflight
        send_inflight: set[Future[int]] = set()
        # Finished futures arrive here: one wake-up per completion, not a scan of hundreds of
        # futures (concurrent.futures.wait locks every one of them on every call).
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
        limit = self.options.limit
        last_beat = time.monotonic()

        with ThreadPoolExecutor(prep_workers, thread_name_prefix="prep") as prep_pool, \
                ThreadPoolExecutor(senders, thread_name_prefix="send") as send_pool:
            while True:
                stopped_by = self._stop_reason(stopped_by)
                # 1. take up listed images while the preparation window has room; prepared images
                # waiting for a batch count too, or a slow API would let every image's bytes pile
                # up in memory
                while (stopped_by is None and not intake_done
                       and preparing + len(prepared) + len(batch) < prep_window):
                    task: list[Item] = []
                    while len(task) < bs:
                        if limit is not None and taken >= limit:
                            intake_done = limited = True
                            break
                        nxt = next(listing, None)
                        if nxt is None:
                            intake_done = exhausted = True
                            break
                        taken += 1
                        task.append(nxt.item)
                    if task:
                        f = prep_pool.submit(prepare_items, job, task)
                        prep_inflight[f] = len(task)
                        preparing += len(task)
                        f.add_done_callback(finished.put)
                # 2. route prepared images: refused, reused, waiting on a copy, or into a batch;
                # a batch's worth at a time (one database question for all of them)
                if stopped_by is not None:
                    prepared.clear()
                elif prepared and (len(prepared) >= bs or not prep_inflight):
                    self._route(prepared, batch)
                    prepared = []
                # 3. dispatch batches that are full, or the last one once nothing else comes
                while batch and stopped_by is None and len(send_inflight) < send_window:
                    last = intake_done and not prep_inflight and not prepared
                    if len(batch) < bs and not last:
                        break
                    n = self._affordable(min(bs, len(batch)))
                    if n == 0:
                        if not send_inflight:
                            stopped_by = "budget"
                        break
                    take, batch[:n] = batch[:n], []
                    f = send_pool.submit(self._send, self._next_batch(), take)
                    send_inflight.add(f)
                    self.sending = len(send_inflight)
                    f.add_done_callback(finished.put)
                # 4. finished?
                if stopped_by is not None and not send_inflight:
                    break
                if (intake_done and not prep_inflight and not prepared and not batch
                        and not send_inflight):
                    break
                if prep_inflight or send_inflight:
                    done = _take_finished(finished, timeout=0.5)
                else:
                    done = []
                    self.stop.wait(0.05)
                if time.monotonic() - last_beat >= 0.5:
                    # A heartbeat: the progress (and cron's log lines) go on while requests hang.
                    last_beat = time.monotonic()
                    self._report()
                for f in done:
                    if f in prep_inflight:
                        preparing -= prep_inflight.pop(f)
                        if not f.cancelled():
                            prepared.extend(f.result())
                    elif f in send_inflight:
                        send_inflight.discard(f)
                        self.sending = len(send_inflight)
                        try:
                            f.result()
                        except AuthError as exc:
                            self.auth_error = exc
                            self.stop.set()  # the other requests in flight stop retrying
            for f in prep_inflight:
                f.cancel()
        return self._wind_up(listing, stopped_by, limited, exhausted)

    def _stop_reason(self, stopped_by: str | None) -> str | None:
        """Nothing more is sent after a refused token ("auth") or a signal ("interrupted")."""
        if self.auth_error is not None:
            return "auth"
        if self.stop.is_set() and stopped_by is None:
            return "interrupted"
        return stopped_by

    def _wind_up(self, listing: Iterator[Listed], stopped_by: str | None, limited: bool,
                 exhausted: bool) -> tuple[str | None, bool]:
        """After the last batch: (why the run stopped early or None, whether it saw everything)."""
        if stopped_by == "auth":
            raise self.auth_error  # type: ignore[misc]
        if stopped_by is None and limited and next(listing, None) is not None:
            stopped_by = "limit"
        if stopped_by in ("budget", "limit"):
            # Record the rest of the listing as pending, so that status and the next plan are true.
            for _ in listing:
                pass
            exhausted = True
        return stopped_by, exhausted and stopped_by != "interrupted"

    def _next_batch(self) -> int:
        self.batch_no += 1
        return self.batch_no

    def _affordable(self, n: int) -> int:
        """How many of n images the budget allows now; reserves their credits."""
        with self._lock:
            if self.budget > 0 and self.per_image > 0:
                room = self.budget - self.spent - self.reserved
                n = max(0, min(n, room // self.per_image))
            self.reserved += n * self.per_image
        return n

    def _route(self, results: list[Ready | Refused], batch: list[Ready]) -> None:
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
                        _, src, result = known[h]
                        reused.append((r.item, h, src, result))
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
            self._report()

    # the sender (runs on the request threads)

    def _send(self, batch_no: int, batch: list[Ready]) -> int:
        requests = 0  # numbered per batch, across the downscaled resend too

        def on_attempt(ids: Any, attempt: int) -> None:
            nonlocal requests
            requests += 1
            self._record_attempt(batch_no, requests, ids)

        try:
            outcomes = submit_prepared(self.job, self.client, batch, on_attempt)
        except AuthError:
            self._unreserve(len(batch))
            raise
        return self._record_answers(batch_no, batch, outcomes)

    def _record_attempt(self, batch_no: int, attempt: int, ids: Sequence[str]) -> None:
        """Before a request leaves: the accountability row for the money it may cost."""
        self.store.record_attempt(self.job.name, self.run_id, batch_no, attempt, list(ids))
        with self._lock:
            self.summary.requests += 1

    def _unreserve(self, n: int) -> None:
        with self._lock:
            self.reserved -= n * self.per_image

    def _record_answers(self, batch_no: int, batch: Sequence[Ready],
                        outcomes: Sequence[RecordOutcome]) -> int:
        """Commit a sent batch's outcomes and its waiting copies; release its reservation.

        The commit runs outside the hash lock, so that batches answered together share one
        transaction. A content's entry in `waiting` stays until its answer is committed: a copy
        routed meanwhile joins it (and is settled here, after the commit) rather than looking in
        the database too early and paying for the same bytes again."""
        job = self.job
        reserved = len(batch) * self.per_image
        by_id = {o.id: o for o in outcomes}
        answers = []
        with self._hash_lock:
            for r in batch:
                o = by_id.get(r.item.key) or RecordOutcome(r.item.key, ok=False,
                                                           reason="no outcome for this record")
                followers: tuple[Item, ...] = ()
                if r.content_hash is not None and self.reuse and o.final:
                    followers = tuple(self.waiting.get(r.content_hash, ()))
                answers.append(Answer(r.item, o, r.content_hash, followers))
        credits = self.store.record_batch(job.name, self.run_id, batch_no, answers,
                                          request_sig=self.request_sig, prep_sig=self.prep_sig,
                                          per_image=self.per_image)
        late_reused, late_failed = self._release_waiting(answers)
        self.store.mark_reused(job.name, late_reused, request_sig=self.request_sig,
                               prep_sig=self.prep_sig, run_id=self.run_id,
                               per_image=self.per_image)
        self.store.mark_failed(job.name, late_failed, run_id=self.run_id)
        with self._lock:
            self.reserved -= reserved
            self.spent += credits
            s = self.summary
            s.credits += credits
            for a in answers:
                if not a.outcome.final:
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
        self._report()
        return credits

    def _release_waiting(self, answers: Sequence[Answer]
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
                    result = compact_json(o.record)
                    late_reused += [(it, h, a.item.key, result) for it in late]
                else:
                    late_failed += [(it, f"same bytes as {a.item.key}: {o.reason}")
                                    for it in late]
        return late_reused, late_failed


def _remote(job: Job) -> bool:
    """Whether images may come from remote storage (a URL root, or a manifest's rows)."""
    src = job.source
    return bool(src.manifest) or any(is_url(p) and not p.startswith("file://")
                                     for p in src.paths)


def _take_finished(finished: queue.SimpleQueue[Future[Any]], timeout: float) -> list[Future[Any]]:
    """Every future finished so far, waiting up to `timeout` for the first."""
    try:
        done = [finished.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _credits_counter(details: dict[str, Any] | None) -> int | None:
    if not details:
        return None
    value = details.get("credits_counter")
    return int(value) if isinstance(value, int | float) else None


def run_job(job: Job, options: RunOptions | None = None, *, stop: threading.Event | None = None,
            progress: ProgressFn | None = None) -> Summary:
    """Run a job to completion (or to its budget, limit or a stop); resumable by design."""
    options = options or RunOptions()
    stop = stop or threading.Event()
    run_class = _Run
    if job.executor.kind == "dask":
        from runner.dask_executor import DaskRun  # JobError without the optional `distributed`

        run_class = DaskRun
    with run_lock(job.db_path), Store(job.db_path) as store, \
            api_endpoint(job) as (endpoint_url, token):
        # The embedded emulator is in this process: never through a proxy.
        client = ApiClient(endpoint_url, token, job.api, stop=stop, direct=job.uses_sandbox)
        if run_class is not _Run:
            job = replace(job, token=token)  # workers use the same token (the sandbox's, too)
        try:
            with store.writer():
                return run_class(job, store, client, options, stop, progress).execute()
        finally:
            client.close()


# --- plan --------------------------------------------------------------------------------------

def plan_job(job: Job, progress: ProgressFn | None = None) -> Summary:
    """What `run` would do, nothing sent and nothing written: it reads and hashes new images."""
    s = Summary(job=job.name, status="plan", budget=job.credits.budget)
    started = time.monotonic()
    sources.check_sources(job.source)
    db = job.db_path
    store = Store(db, create=False) if db.exists() else Store(":memory:")
    request_sig, prep_sig = job.request_signature(), prep_signature(job)
    seen: set[str] = set()

    def skipped(why: str) -> None:  # sources.py has logged the row and why
        s.skipped_rows += 1

    def settle(r: Ready | Refused) -> None:
        if isinstance(r, Refused):
            if r.read_failed:
                s.failed += 1
            else:
                s.rejected += 1
                s.rejected_reasons[r.reason] = s.rejected_reasons.get(r.reason, 0) + 1
            return
        h = r.content_hash
        if h is not None and job.credits.reuse and (
                h in seen or store.find_answer(h, request_sig) is not None):
            s.reused += 1
            s.credits_saved += job.credits.per_image
            return
        if h is not None:
            seen.add(h)
        s.sent += 1

    workers = max(2, os.cpu_count() or 2)
    task = job.api.batch_size
    with store, ThreadPoolExecutor(workers, thread_name_prefix="plan") as pool:
        inflight: set[Future[list[Ready | Refused]]] = set()
        for chunk in iter_chunks(sources.list_items(job.source, on_skip=skipped), PLAN_CHUNK):
            classified = store.classify(job.name, chunk, request_sig=request_sig,
                                        prep_sig=prep_sig, run_id=None)
            s.listed += len(chunk)
            for kind, n in classified.counts.items():
                name = KIND_COUNTERS[kind]
                setattr(s, name, getattr(s, name) + n)
            to_send = [x.item for x in classified.to_send]
            for i in range(0, len(to_send), task):
                inflight.add(pool.submit(prepare_items, job, to_send[i:i + task]))
                if len(inflight) >= 4 * workers:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in done:
                        for r in f.result():
                            settle(r)
            if progress:
                progress(s)
        for f in inflight:
            for r in f.result():
                settle(r)
    s.credits = s.sent * job.credits.per_image
    s.elapsed_s = round(time.monotonic() - started, 3)
    return s
