"""The Dask executor: runs a job on a Dask cluster: workers read, prepare and send chunks of images; this process stays
the single owner of the state database (it lists, routes copies, reserves budget, records outcomes).

A chunk's prepared bytes stay on the worker that prepared them (a Dask future); only keys, content
hashes and refusals come back here, and a batch is sent by a task that runs where its bytes are.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import pickle
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, cast

from runner.client import ApiClient
from runner.errors import AuthError, JobError
from runner.job import ExecutorConfig, Job
from runner.limits import DURATION
from runner.prepare import prepare_items
from runner.records import Item, Ready, RecordOutcome, Refused
from runner.run import Run, submit_prepared
from runner.summary import Summary

try:
    import distributed
except ImportError:
    raise JobError('executor.kind = "dask" needs the optional package `distributed`: '
                   "pip install 'ximrun[dask]'") from None

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

RESEND = "a lost answer: the coordinator affords the resend"
Prepared = dict[str, Ready | Refused]  # a chunk's preparation, by key: it stays on its worker


# --- what runs on the workers ------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerJob:
    """What every task needs: the job (its token included), where to send, and each worker's
    share of `concurrency`; `run_key` gives each worker one client per run."""

    job: Job
    endpoint_url: str
    concurrency: int
    run_key: str
    # Spending limits are the coordinator's (Run.affordable): with any of them, a request after
    # a lost answer is not resent here but handed back, to be afforded again.
    guarded: bool = False
    deadline: float | None = None  # time.time() after which no request is started (max_duration)

    def __repr__(self) -> str:  # Dask prints a failed task's arguments: keep it short, no token
        return f"WorkerJob({self.job.name!r}, {self.endpoint_url!r})"

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Every task carries this: pickled once per run, not once per task."""
        return _unpickle_worker_job, (self._pickled,)

    @functools.cached_property
    def _pickled(self) -> bytes:
        return pickle.dumps(tuple(getattr(self, f.name) for f in fields(self)))


_worker_jobs: dict[bytes, WorkerJob] = {}  # per worker process: each run's, unpickled once


def _unpickle_worker_job(pickled: bytes) -> WorkerJob:
    w = _worker_jobs.get(pickled)
    if w is None:
        w = _worker_jobs[pickled] = WorkerJob(*pickle.loads(pickled))  # noqa: S301 -- Dask's own
        for old in list(_worker_jobs)[:-_KEEP_CLIENTS]:
            del _worker_jobs[old]
    return w


@dataclass(frozen=True)
class Sent:
    """A batch's outcomes and the ids every HTTP request carried, in order."""

    outcomes: list[RecordOutcome]
    requests: list[tuple[list[str], bool]]  # each request's ids, and whether it connected
    lost: tuple[int, ...] = ()  # indexes in `requests` of those whose answer was lost


_clients: dict[str, ApiClient] = {}  # per worker process: pooled connections and one AIMD limit
_clients_lock = threading.Lock()  # a worker runs its tasks on several threads
_KEEP_CLIENTS = 4  # clients of runs that ended are closed once this many newer ones exist


def _worker_client(w: WorkerJob) -> ApiClient:
    with _clients_lock:
        client = _clients.get(w.run_key)
        if client is None:
            assert w.job.token is not None  # run_job puts the token actually used into the job
            api = replace(w.job.api, concurrency=w.concurrency)
            client = _clients[w.run_key] = ApiClient(w.endpoint_url, w.job.token, api,
                                                     direct=w.job.uses_sandbox)
            for key in list(_clients)[:-_KEEP_CLIENTS]:
                _clients.pop(key).close()
        return client


# What crosses between the coordinator and the workers goes as one pickle (`_packed`): Dask
# walks a task's arguments for futures and a result's parts for their sizes and serializers, item
# by item, on the coordinator's event loop; a bytes object it takes whole.


def _packed(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _unpacked(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 -- between this run's own processes, as Dask's are


def prepare_chunk(w: WorkerJob, items: bytes) -> Prepared:
    """Read and prepare a chunk of images (`_packed` Items); the result stays on this worker for
    send_batches."""
    listed: list[Item] = _unpacked(items)
    return {it.key: r for it, r in zip(listed, prepare_items(w.job, listed), strict=True)}


def describe_chunk(prepared: Prepared) -> bytes:
    """What the coordinator routes by (`_packed`): keys, content hashes, refusals; no image
    bytes."""
    return _packed([replace(r, record=replace(r.record, data=None)) if isinstance(r, Ready)
                    else r for r in prepared.values()])


def pick(prepared: Prepared, keys: Sequence[str]) -> Prepared:
    """The few images of a chunk that join a batch mixed from several chunks."""
    return {k: prepared[k] for k in keys}


def _send_one(w: WorkerJob, batch: list[Ready]) -> Sent | Exception:
    """Send one batch (with retries); its error (AuthError, ...) is returned, not raised, so
    that the other batches of the task keep their answers."""
    requests: list[tuple[list[str], bool]] = []
    lost: list[int] = []

    def unsent(ids: Sequence[str], attempt: int) -> None:
        requests[-1] = (requests[-1][0], False)

    def on_lost(ids: Sequence[str], attempt: int) -> None:
        lost.append(len(requests) - 1)

    def may_send(ids: Sequence[str], attempt: int) -> str | None:
        if w.deadline is not None and time.time() >= w.deadline:
            return DURATION
        return RESEND if w.guarded and lost else None

    try:
        outcomes = submit_prepared(w.job, _worker_client(w), batch,
                                   lambda ids, attempt: requests.append((list(ids), True)),
                                   unsent, on_lost, may_send)
    except Exception as exc:  # noqa: BLE001 -- the coordinator decides per batch
        return exc
    # A record kept as the text it came in crosses back as that text alone: half the bytes for
    # the coordinator's event loop to take in, and the store needs nothing else.
    outcomes = [replace(o, record=None) if o.text is not None else o for o in outcomes]
    return Sent(outcomes, requests, tuple(lost))


def send_batches(w: WorkerJob, batches: bytes, *parts: Prepared) -> bytes:
    """Send several batches at once from the prepared images they name (`_packed` lists of
    keys): one task, one result for the coordinator to fetch, instead of one per batch. Each
    batch has its own requests and retries; the worker's client caps how many are in flight.
    Returns each batch's `Sent` or error, `_packed`."""
    found: Prepared = {}
    for part in parts:
        found.update(part)
    # The coordinator sends only Ready images.
    readies = [[cast(Ready, found[k]) for k in keys] for keys in _unpacked(batches)]
    if len(readies) == 1:
        return _packed_results([_send_one(w, readies[0])])
    with ThreadPoolExecutor(len(readies), thread_name_prefix="ximrun-send") as pool:
        return _packed_results(list(pool.map(lambda batch: _send_one(w, batch), readies)))


def _packed_results(results: list[Sent | Exception]) -> bytes:
    """An error that cannot be pickled crosses as its type and message (a task's result must)."""
    try:
        return _packed(results)
    except Exception:  # noqa: BLE001 -- some third-party error type; its words are what matter
        return _packed([r if isinstance(r, Sent) or _picklable(r)
                        else RuntimeError(f"{type(r).__name__}: {r}") for r in results])


def _picklable(value: object) -> bool:
    try:
        pickle.loads(_packed(value))  # noqa: S301 -- made here, a line above
    except Exception:  # noqa: BLE001 -- whatever pickling raises
        return False
    return True


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


@dataclass
class _SendTask:
    batches: list[tuple[int, list[Ready]]]  # each batch's number and images, in task order
    parts: tuple[Any, ...]


class DaskExecutor:
    """The run's decisions stay in this process (`Run`); preparation and requests go to a Dask
    cluster."""

    def execute(self, run: Run) -> Summary:
        job = run.job
        with open_cluster(job.executor, job.api.concurrency) as dask:
            workers = len(dask.nthreads())
            # Each worker's client caps its own requests, so the cluster stays at `concurrency`.
            w = WorkerJob(job, run.client.endpoint_url, max(1, job.api.concurrency // workers),
                          uuid.uuid4().hex, guarded=run.limits.active)
            log.info("running on %d Dask worker(s), %d request(s) in flight each",
                     workers, w.concurrency)
            # The time window starts with the run (Limits.start): the workers learn it then.
            return run.execute(lambda r: _Coordinator(
                r, dask, replace(w, deadline=r.limits.wall_deadline)).drive())


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
        listing = self.run.listed()
        intake_done = exhausted = limited = False
        stopped_by: str | None = None
        taken = 0
        limit = self.run.options.limit
        # Results are fetched on the client's event loop as tasks finish, not one by one here.
        finished = distributed.as_completed(loop=dask.loop, with_results=True,
                                            raise_errors=False)
        describing: dict[distributed.Future, tuple[distributed.Future, list[Item]]] = {}
        batches: deque[_DaskBatch] = deque()
        leftovers: list[tuple[distributed.Future, Ready]] = []  # a chunk's last partial batch
        sending: dict[distributed.Future, _SendTask] = {}

        def queued() -> int:
            return (len(describing) * chunk_size + len(leftovers)
                    + sum(len(b.readies) for b in batches))

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
                prepared = dask.submit(prepare_chunk, w, _packed(items), pure=False)
                described = dask.submit(describe_chunk, prepared, pure=False,
                                        priority=PRIORITY_DESCRIBE)
                finished.add(described)
                describing[described] = (prepared, items)
            # 2. settle what finished: route described chunks, record answered batches
            self._take_finished(finished, describing, sending, batches, leftovers,
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
                # Batches whose bytes are in the same chunk go out in one task, each afforded.
                parts, group = batches[0].parts, []
                while (batches and batches[0].parts is parts and len(group) < per_task
                       and in_flight + len(group) < send_window):
                    n = self.run.affordable(len(batches[0].readies))
                    if n == 0:
                        break
                    b = batches.popleft()
                    if n < len(b.readies):
                        batches.appendleft(_DaskBatch(b.readies[n:], b.parts))
                    group.append(b.readies[:n])
                if not group:
                    if not sending:
                        stopped_by = "budget"
                    break
                self._dispatch(group, parts, sending, finished)
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
                sending: dict[distributed.Future, _SendTask],
                batches: deque[_DaskBatch], leftovers: list[tuple[distributed.Future, Ready]], *,
                route: bool) -> None:
        """Wait a little for finished tasks, then take in every one that has finished."""
        with finished.thread_condition:  # notified under this lock: no wake-up is missed
            if not finished.has_ready():
                finished.thread_condition.wait(timeout=0.5)
        bs = self.run.job.api.batch_size
        for f, result in finished.next_batch(block=False):
            # AuthError, KilledWorker, ...
            described = f.exception() if f.status == "error" else _unpacked(result)
            if f in sending:
                task = sending.pop(f)
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
                            [r for r in readies if r.item.key in resend], task.parts))
            elif f in describing:
                prepared, items = describing.pop(f)
                if isinstance(described, BaseException):  # its workers died over and over
                    log.error("%d image(s) could not be prepared on the cluster: %s",
                              len(items), described)
                    self.run.mark_lost(items, f"worker lost while preparing: {described}")
                    continue
                if not route:
                    continue
                readies: list[Ready] = []
                self.run.route(described, readies)
                whole = len(readies) - len(readies) % bs
                parts = (prepared,)  # one tuple: batches of a chunk go out together
                batches.extend(_DaskBatch(readies[i:i + bs], parts) for i in range(0, whole, bs))
                leftovers.extend((prepared, r) for r in readies[whole:])

    def _mixed_batch(self, members: list[tuple[distributed.Future, Ready]]) -> _DaskBatch:
        """A batch from several chunks' leftovers: only its own images move between workers."""
        by_chunk: dict[distributed.Future, list[str]] = {}
        for prepared, r in members:
            by_chunk.setdefault(prepared, []).append(r.item.key)
        if len(by_chunk) == 1:
            parts: tuple[Any, ...] = tuple(by_chunk)
        else:
            parts = tuple(self.dask.submit(pick, prepared, keys, pure=False,
                                           priority=PRIORITY_SEND)
                          for prepared, keys in by_chunk.items())
        return _DaskBatch([r for _, r in members], parts)

    def _dispatch(self, group: list[list[Ready]], parts: tuple[Any, ...],
                  sending: dict[distributed.Future, _SendTask],
                  finished: distributed.as_completed) -> None:
        """One task for the group; every batch of it is recorded in flight before it exists
        (the worker cannot write here), all in one transaction."""
        task = _SendTask([(self.run.next_batch(), readies) for readies in group], parts)
        self.run.record_attempts([(batch_no, 1, [r.item.key for r in readies])
                                  for batch_no, readies in task.batches])
        f = self.dask.submit(send_batches, self.worker_job,
                             _packed([[r.item.key for r in readies] for readies in group]),
                             *parts, pure=False, priority=PRIORITY_SEND)
        finished.add(f)
        sending[f] = task

    def _take_requests(self, sent: Sent | BaseException, batch_no: int,
                       readies: list[Ready]) -> list[RecordOutcome] | None:
        """A batch that came back: its requests recorded; returns its outcomes to record, or
        None when the token was refused (nothing to record)."""
        if isinstance(sent, AuthError):
            self.run.unreserve(len(readies))
            if sent.first_unbilled:
                # Only the first request was recorded here; it was refused, or never left
                # because the worker's client had already been refused: not billed.
                self.run.forget_attempt(batch_no, 1)
            self.run.refuse_token(sent)
            return None
        if isinstance(sent, BaseException):  # its workers died over and over (KilledWorker)
            log.error("batch %d: no answer from the cluster: %s", batch_no, sent)
            why = f"worker lost while sending (may have been billed): {sent}"
            sent = Sent([RecordOutcome(r.item.key, ok=False, reason=why) for r in readies],
                        [([r.item.key for r in readies], True)])  # its row stays: maybe billed
        # The workers' clients have breakers of their own; this one stops new batches here.
        final = any(o.final for o in sent.outcomes)
        given_up = [o.reason for o in sent.outcomes if o.unavailable]
        if final or given_up:
            self.run.client.breaker.batch_done(final, given_up[0] if given_up else None)
        # The first request was recorded before the task was submitted; retries after it here.
        # One that never connected, or never left (a stop, the worker's breaker), is no request.
        if not sent.requests or not sent.requests[0][1]:
            self.run.forget_attempt(batch_no, 1)
        numbers = [1] if sent.requests and sent.requests[0][1] else [0]
        retries = []
        for ids, connected in sent.requests[1:]:
            if connected:
                retries.append((batch_no, len(retries) + 2, ids))
            numbers.append(len(retries) + 1 if connected else 0)
        if retries:
            self.run.record_attempts(retries)
        for i in sent.lost:
            self.run.lost_answer(batch_no, numbers[i], sent.requests[i][0])
        return sent.outcomes
