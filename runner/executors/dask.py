"""The Dask executor: runs a job on a Dask cluster: workers read, prepare and send chunks of
images (dask_tasks.py); this process stays the single owner of the state database (it lists,
routes copies, reserves budget, records outcomes and every request's row).

A chunk's prepared bytes stay on the worker that prepared them (a Dask future); only that
worker's address, keys, content hashes and refusals come back here, and a batch is sent by a task
that runs where its bytes are. Each worker sends at most its share of `concurrency`, so batches go
out to the workers holding them evenly (`_Queue`), not in the order their chunks came back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from runner.errors import AuthError, JobError
from runner.job import ExecutorConfig
from runner.records import Item, Ready, RecordOutcome
from runner.run import Run
from runner.summary import Summary

try:
    import distributed
except ImportError:
    raise JobError('executor.kind = "dask" needs the optional package `distributed`: '
                   "pip install 'ximrun[dask]'") from None

from runner.executors import dask_tasks  # noqa: E402 -- once `distributed` is known to be there
from runner.executors.dask_tasks import (  # noqa: E402
    RESEND,
    Sent,
    WorkerJob,
    attempts_topic,
    describe_chunk,
    packed,
    pick,
    prepare_chunk,
    send_batches,
    unpacked,
)

log = logging.getLogger("ximrun.dask")

# One preparation task takes this many batches' worth of images, and one send task up to this
# many batches (no more than a worker's share of the requests in flight): every task costs the
# coordinator a submission, state messages and, for those it reads, a fetch of the result.
CHUNK_BATCHES = 16
SEND_BATCHES = 8
# Images taken up and not yet sent, per thread of the cluster: bytes waiting on the workers.
WINDOW_BATCHES = 16
CONNECT_TIMEOUT_S = 15
WORKERS_TIMEOUT_S = 60
# Tasks that finish work already taken up run before new preparation.
PRIORITY_SEND, PRIORITY_DESCRIBE = 2, 1



# --- the cluster -------------------------------------------------------------------------------

@contextlib.contextmanager
def open_cluster(executor: ExecutorConfig, concurrency: int) -> Iterator[distributed.Client]:
    """A client of the scheduler at `address`, or of a local cluster sized to this machine."""
    if executor.address:
        try:
            client = distributed.Client(executor.address, timeout=f"{CONNECT_TIMEOUT_S}s",
                                        set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise JobError(f"executor.address: no Dask scheduler answers at "
                           f"{executor.address} ({exc})") from None
        with client:
            try:
                client.wait_for_workers(max(1, executor.workers), timeout=WORKERS_TIMEOUT_S)
            except TimeoutError:
                raise JobError(f"executor.address: fewer than {max(1, executor.workers)} "
                               f"worker(s) joined {executor.address} within "
                               f"{WORKERS_TIMEOUT_S} s") from None
            yield client
        return
    n = executor.workers or os.cpu_count() or 1
    # One thread per request the worker may have in flight, one more for preparation.
    threads = max(1, concurrency // n) + 1
    with distributed.LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                                  dashboard_address=None, preload=[__name__]) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


def dask_setup(worker: Any) -> None:
    """Preloaded into the workers of a local cluster. A terminal's Ctrl-C reaches the whole
    process group; only the run decides what it means (finish the requests in flight, stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- the coordinator ---------------------------------------------------------------------------

@dataclass
class _DaskBatch:
    readies: list[Ready]  # without their bytes: those are in `parts`, on the workers
    parts: tuple[Any, ...]  # futures of the Prepared dicts that hold the bytes
    holder: str | None  # the worker that holds them (None: several, or not known)


@dataclass
class _SendTask:
    batches: list[tuple[int, list[Ready]]]  # each batch's number and images, in task order
    parts: tuple[Any, ...]
    holder: str | None


class _Queue:
    """Batches waiting to be sent, by the worker that holds their bytes (a send task runs
    there). Each worker's client sends at most its share of `concurrency` at once: were a
    worker given more than it can send while another has none to send, the requests in
    flight would fall below `concurrency`. So batches go out to the worker with the fewest
    in flight, and none beyond `room` (its share, plus a task waiting behind it)."""

    def __init__(self) -> None:
        self._by: dict[str | None, deque[_DaskBatch]] = {}
        self.images = 0  # in all the batches queued

    def __bool__(self) -> bool:
        return self.images > 0  # no batch is empty

    def append(self, b: _DaskBatch) -> None:
        self._by.setdefault(b.holder, deque()).append(b)
        self.images += len(b.readies)

    def appendleft(self, b: _DaskBatch) -> None:
        self._by.setdefault(b.holder, deque()).appendleft(b)
        self.images += len(b.readies)

    def popleft(self, holder: str | None) -> _DaskBatch:
        b = self._by[holder].popleft()
        self.images -= len(b.readies)
        return b

    def head(self, holder: str | None) -> _DaskBatch | None:
        q = self._by.get(holder)
        return q[0] if q else None

    def next_holder(self, load: dict[str | None, int], room: int) -> tuple[bool, str | None]:
        """(whether any batch may go now, the worker whose batches go next): the one with the
        fewest batches in flight, below `room`; batches of several workers' chunks (holder
        None) whenever no worker's may go."""
        open_ = [h for h, q in self._by.items()
                 if q and h is not None and load.get(h, 0) < room]
        if open_:
            return True, min(open_, key=lambda h: load.get(h, 0))
        return bool(self._by.get(None)), None


class DaskExecutor:
    """The run's decisions stay in this process (`Run`); preparation and requests go to a Dask
    cluster."""

    def execute(self, run: Run) -> Summary:
        job = run.job
        with open_cluster(job.executor, job.api.concurrency) as dask:
            workers = len(dask.nthreads())
            # Each worker's client caps its own requests, so the cluster stays at `concurrency`.
            w = WorkerJob(job, run.client.endpoint_url, max(1, job.api.concurrency // workers),
                          uuid.uuid4().hex, guarded=run.limits.active,
                          ack_timeout_s=dask_tasks.ACK_TIMEOUT_S)
            log.info("running on %d Dask worker(s), %d request(s) in flight each",
                     workers, w.concurrency)
            # The time window starts with the run (Limits.start): the workers learn it then.
            with _Desk(run, dask, attempts_topic(w)):
                return run.execute(lambda r: _Coordinator(
                    r, dask, replace(w, deadline=r.limits.wall_deadline)).drive())


class _Desk:
    """The coordinator's side of `_asked`: a request's row recorded or forgotten on a worker's
    word, in the order the words come, then acknowledged. A word that cannot be acted on (the
    state database failed) gets no acknowledgement: the worker withholds the request."""

    def __init__(self, run: Run, dask: distributed.Client, topic: str) -> None:
        self.run, self.dask, self.topic = run, dask, topic
        self._words: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ximrun-attempt-desk",
                                        daemon=True)
        self.error: BaseException | None = None  # the state database's: the run raises it

    def __enter__(self) -> _Desk:
        self._thread.start()
        # Called on the Dask client's event loop: handed over, never waited on there.
        self.dask.subscribe_topic(self.topic, lambda event: self._words.put(event[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # the scheduler may be gone
            self.dask.unsubscribe_topic(self.topic)
        self._words.put(None)
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _serve(self) -> None:
        run = self.run
        while (word := self._words.get()) is not None:
            try:
                if word["op"] == "record":
                    run.record_attempts([(word["batch"], word["attempt"], word["ids"])])
                else:
                    run.forget_attempt(word["batch"], word["attempt"])
            except Exception as exc:  # noqa: BLE001 -- the request is withheld; the run stops
                if self.error is None:
                    self.error = exc
                    run.stop.set()
                continue
            try:
                distributed.Event(f"ximrun-ack-{word['ack']}", client=self.dask).set()
            except Exception as exc:  # noqa: BLE001 -- the worker waits, then withholds it
                log.warning("could not tell a worker its request's row is written: %s", exc)


class _Coordinator:
    """The loop of one run on the cluster: what the local executor's loop does, with tasks."""

    def __init__(self, run: Run, dask: distributed.Client, worker_job: WorkerJob) -> None:
        self.run = run
        self.dask = dask
        self.worker_job = worker_job

    def drive(self) -> tuple[str | None, bool]:
        """Returns (why it stopped early or None, whether the whole listing was seen)."""
        dask, w = self.dask, self.worker_job
        bs = self.run.job.api.batch_size
        nthreads = dask.nthreads()
        chunk_size = bs * CHUNK_BATCHES
        window = sum(nthreads.values()) * bs * WINDOW_BATCHES  # images taken up, not yet sent
        concurrency, workers = self.run.job.api.concurrency, len(nthreads)
        # A send task takes up to a worker's share of the requests in flight; a task waiting
        # per worker keeps them busy.
        per_task = max(1, min(SEND_BATCHES, concurrency // workers))
        send_window = concurrency + workers * per_task if concurrency >= workers else concurrency
        room = w.concurrency + per_task  # batches in flight on one worker at the most
        load: dict[str | None, int] = {}  # batches in flight, by the worker holding them
        # Chunks are prepared on the workers in turn (a preference: another may take one), so
        # that each holds its share of the batches to send.
        addresses = list(nthreads)
        chunks = 0
        listing = self.run.listed()
        intake_done = exhausted = limited = False
        stopped_by: str | None = None
        taken = 0
        limit = self.run.options.limit
        # Results are fetched on the client's event loop as tasks finish, not one by one here.
        finished = distributed.as_completed(loop=dask.loop, with_results=True,
                                            raise_errors=False)
        describing: dict[distributed.Future, tuple[distributed.Future, list[Item]]] = {}
        batches = _Queue()
        # a chunk's last partial batch: (its chunk, the worker holding it, the image)
        leftovers: list[tuple[distributed.Future, str | None, Ready]] = []
        sending: dict[distributed.Future, _SendTask] = {}

        def queued() -> int:
            return len(describing) * chunk_size + len(leftovers) + batches.images

        while True:
            stopped_by = self.run.stop_reason(stopped_by)
            # 1. take up listed images, a chunk per task, while the window has room
            while stopped_by is None and not intake_done and queued() < window:
                room = chunk_size if limit is None else min(chunk_size, limit - taken)
                if room <= 0:
                    intake_done = limited = True
                    break
                items = [x.item for x in itertools.islice(listing, room)]
                if len(items) < room:
                    intake_done = exhausted = True
                if not items:
                    break
                taken += len(items)
                prepared = dask.submit(prepare_chunk, w, packed(items), pure=False,
                                       workers=[addresses[chunks % len(addresses)]],
                                       allow_other_workers=True)
                chunks += 1
                described = dask.submit(describe_chunk, prepared, pure=False,
                                        priority=PRIORITY_DESCRIBE)
                finished.add(described)
                describing[described] = (prepared, items)
            # 2. settle what finished: route described chunks, record answered batches
            self._take_finished(finished, describing, sending, batches, leftovers, load,
                                route=stopped_by is None)
            stopped_by = self.run.stop_reason(stopped_by)
            # 3. full batches out; the last partial ones once nothing else comes
            if stopped_by is None:
                last = intake_done and not describing
                while len(leftovers) >= bs or (leftovers and last):
                    batches.append(self._mixed_batch(leftovers[:bs]))
                    del leftovers[:bs]
            in_flight = sum(len(t.batches) for t in sending.values())
            while batches and stopped_by is None and in_flight < send_window:
                may, holder = batches.next_holder(load, room)
                if not may:  # every worker with batches to send has its fill in flight
                    break
                # Batches whose bytes are in the same chunk go out in one task, each afforded.
                first = batches.head(holder)
                assert first is not None
                parts, group = first.parts, []
                while ((b := batches.head(holder)) is not None and b.parts is parts
                       and len(group) < per_task and in_flight + len(group) < send_window):
                    n = self.run.affordable(len(b.readies))
                    if n == 0:
                        break
                    batches.popleft(holder)
                    if n < len(b.readies):
                        batches.appendleft(_DaskBatch(b.readies[n:], b.parts, holder))
                    group.append(b.readies[:n])
                if not group:
                    if not sending:
                        stopped_by = "budget"
                    break
                self._dispatch(group, parts, holder, sending, finished)
                load[holder] = load.get(holder, 0) + len(group)
                in_flight += len(group)
            # 4. finished?
            if stopped_by is not None and not sending:
                break
            if intake_done and not describing and not batches and not leftovers and not sending:
                break
        for f in describing:
            f.cancel()
        return self.run.wind_up(listing, stopped_by, limited, exhausted)

    def _take_finished(self, finished: distributed.as_completed,
                       describing: dict[distributed.Future, tuple[distributed.Future, list[Item]]],
                       sending: dict[distributed.Future, _SendTask], batches: _Queue,
                       leftovers: list[tuple[distributed.Future, str | None, Ready]],
                       load: dict[str | None, int], *, route: bool) -> None:
        """Wait a little for finished tasks, then take in every one that has finished."""
        with finished.thread_condition:  # notified under this lock: no wake-up is missed
            if not finished.has_ready():
                finished.thread_condition.wait(timeout=0.5)
        bs = self.run.job.api.batch_size
        for f, result in finished.next_batch(block=False):
            # AuthError, KilledWorker, ...
            described = f.exception() if f.status == "error" else unpacked(result)
            if f in sending:
                task = sending.pop(f)
                load[task.holder] -= len(task.batches)
                answered = []
                for i, (batch_no, readies) in enumerate(task.batches):
                    sent = described if isinstance(described, BaseException) else described[i]
                    outcomes = self._take_requests(sent, batch_no, readies)
                    if outcomes is not None:
                        answered.append((batch_no, readies, outcomes))
                # The task's batches in one transaction; a lost answer's resend is afforded
                # again like a new batch.
                self.run.record_answered(answered)
                for _, readies, outcomes in answered:
                    resend = {o.id for o in outcomes
                              if not o.final and o.reason == f"not sent: {RESEND}"}
                    if resend:
                        batches.appendleft(_DaskBatch(
                            [r for r in readies if r.item.key in resend], task.parts,
                            task.holder))
            elif f in describing:
                prepared, items = describing.pop(f)
                if isinstance(described, BaseException):  # its workers died over and over
                    log.error("%d image(s) could not be prepared on the cluster: %s",
                              len(items), described)
                    self.run.mark_lost(items, f"worker lost while preparing: {described}")
                    continue
                if not route:
                    continue
                holder, description = described
                readies: list[Ready] = []
                self.run.route(description, readies)
                whole = len(readies) - len(readies) % bs
                parts = (prepared,)  # one tuple: batches of a chunk go out together
                for i in range(0, whole, bs):
                    batches.append(_DaskBatch(readies[i:i + bs], parts, holder))
                leftovers.extend((prepared, holder, r) for r in readies[whole:])

    def _mixed_batch(self, members: list[tuple[distributed.Future, str | None, Ready]]
                     ) -> _DaskBatch:
        """A batch from several chunks' leftovers: only its own images move between workers."""
        by_chunk: dict[distributed.Future, list[str]] = {}
        holders = set()
        for prepared, holder, r in members:
            by_chunk.setdefault(prepared, []).append(r.item.key)
            holders.add(holder)
        if len(by_chunk) == 1:
            parts: tuple[Any, ...] = tuple(by_chunk)
        else:
            parts = tuple(self.dask.submit(pick, prepared, keys, pure=False,
                                           priority=PRIORITY_SEND)
                          for prepared, keys in by_chunk.items())
        # Bytes from one worker: sent from there; from several, wherever Dask sends the task.
        return _DaskBatch([r for _, _, r in members], parts,
                          holders.pop() if len(holders) == 1 else None)

    def _dispatch(self, group: list[list[Ready]], parts: tuple[Any, ...], holder: str | None,
                  sending: dict[distributed.Future, _SendTask],
                  finished: distributed.as_completed) -> None:
        """One task for the group; every batch of it is recorded in flight before it exists
        (the worker cannot write here), all in one transaction."""
        task = _SendTask([(self.run.next_batch(), readies) for readies in group], parts, holder)
        self.run.record_attempts([(batch_no, 1, [r.item.key for r in readies])
                                  for batch_no, readies in task.batches])
        f = self.dask.submit(send_batches, self.worker_job,
                             packed([(batch_no, [r.item.key for r in readies])
                                      for batch_no, readies in task.batches]),
                             *parts, pure=False, priority=PRIORITY_SEND)
        finished.add(f)
        sending[f] = task

    def _take_requests(self, sent: Sent | BaseException, batch_no: int,
                       readies: list[Ready]) -> list[RecordOutcome] | None:
        """A batch that came back: its requests' rows settled; returns its outcomes to record,
        or None when the token was refused (nothing to record)."""
        if not isinstance(sent, BaseException):
            for attempt in sent.forget:
                self.run.forget_attempt(batch_no, attempt)
            if isinstance(sent.error, AuthError):
                self.run.unreserve(len(readies))
                self.run.refuse_token(sent.error)
                return None
            if sent.error is not None:
                sent = sent.error
        if isinstance(sent, BaseException):  # its workers died over and over (KilledWorker)
            log.error("batch %d: no answer from the cluster: %s", batch_no, sent)
            why = f"worker lost while sending (may have been billed): {sent}"
            # Its rows stay open: maybe billed.
            sent = Sent([RecordOutcome(r.item.key, ok=False, reason=why) for r in readies])
        # The workers' clients have breakers of their own; this one stops new batches here.
        final = any(o.final for o in sent.outcomes)
        given_up = [o.reason for o in sent.outcomes if o.unavailable]
        if final or given_up:
            self.run.client.breaker.batch_done(final, given_up[0] if given_up else None)
        for attempt, ids in sent.lost:
            self.run.lost_answer(batch_no, attempt, ids)
        return sent.outcomes
