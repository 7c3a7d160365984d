"""What a Dask cluster's workers run for the Dask executor (dask.py): preparing a chunk of images
(its bytes stay on the worker as a Dask future), describing it to the coordinator, and sending
batches of it. A batch's first request has its `attempts` row committed by the coordinator before
the task exists; every later request's is committed on the worker's word before it leaves
(`_asked`: an event to the coordinator, an acknowledgement back), or the request is withheld.
What crosses between the coordinator and the workers goes as one pickle each way (`packed`).
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import distributed

from runner.client import ApiClient
from runner.job import Job
from runner.limits import DURATION
from runner.prepare import prepare_items
from runner.records import Item, Ready, RecordOutcome, Refused
from runner.run import submit_prepared

log = logging.getLogger("ximrun.dask")

RESEND = "a lost answer: the coordinator affords the resend"
NOT_RECORDED = "the coordinator did not record the request in time"
ACK_TIMEOUT_S = 30.0  # a worker's wait for the coordinator's word on a request's row
_WITHHELD = f"not sent: {NOT_RECORDED}"  # the outcome's reason (ApiClient._send)
Prepared = dict[str, Ready | Refused]  # a chunk's preparation, by key: it stays on its worker


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
    ack_timeout_s: float = ACK_TIMEOUT_S  # the wait for the coordinator's word on a row

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
    """A batch's outcomes (or the error that ended it: AuthError, ...) and what the coordinator
    must still do with its requests' rows, every one of which it committed before the request
    left: forget those of requests that never left or were refused unbilled; keep open those
    whose answer was lost."""

    outcomes: list[RecordOutcome]
    error: Exception | None = None
    forget: tuple[int, ...] = ()  # attempt numbers
    lost: tuple[tuple[int, list[str]], ...] = ()  # (attempt number, the ids it carried)


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


# What crosses between the coordinator and the workers goes as one pickle (`packed`): Dask
# walks a task's arguments for futures and a result's parts for their sizes and serializers, item
# by item, on the coordinator's event loop; a bytes object it takes whole.


def packed(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpacked(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 -- between this run's own processes, as Dask's are


def prepare_chunk(w: WorkerJob, items: bytes) -> Prepared:
    """Read and prepare a chunk of images (`packed` Items); the result stays on this worker for
    send_batches."""
    listed: list[Item] = unpacked(items)
    return {it.key: r for it, r in zip(listed, prepare_items(w.job, listed), strict=True)}


def describe_chunk(prepared: Prepared) -> bytes:
    """What the coordinator routes by (`packed`): the address of the worker that holds the
    chunk (the send tasks of its batches run there), and keys, content hashes, refusals; no
    image bytes."""
    return packed((distributed.get_worker().address,
                   [replace(r, record=replace(r.record, data=None)) if isinstance(r, Ready)
                    else r for r in prepared.values()]))


def pick(prepared: Prepared, keys: Sequence[str]) -> Prepared:
    """The few images of a chunk that join a batch mixed from several chunks."""
    return {k: prepared[k] for k in keys}


@dataclass(frozen=True)
class _Here:
    """Where a send task runs: its job and its Dask worker (whose client, made with the first
    retry, carries the coordinator's word)."""

    job: WorkerJob
    worker: Any


def _send_one(here: _Here, batch_no: int, batch: list[Ready]) -> Sent:
    """Send one batch (with retries); an error (AuthError, ...) ends it in its `Sent`, so that
    the other batches of the task keep their answers. The coordinator committed the first
    request's row before the task existed; every later request's (a retry, a bisected half, a
    downscaled resend) is committed by the coordinator on the worker's word before it leaves
    (`_asked`), and withheld when no word comes back."""
    w = here.job
    committed = {1}  # attempt numbers whose rows the coordinator has
    attempted: set[int] = set()
    lost: list[tuple[int, list[str]]] = []

    def may_send(ids: Sequence[str], attempt: int) -> str | None:
        if w.deadline is not None and time.time() >= w.deadline:
            return DURATION
        if w.guarded and lost:
            return RESEND
        if attempt not in committed:
            if not _asked(here, "record", batch_no, attempt, ids):
                return NOT_RECORDED
            committed.add(attempt)
        return None

    def on_attempt(ids: Sequence[str], attempt: int) -> None:
        attempted.add(attempt)

    def unsent(ids: Sequence[str], attempt: int) -> None:
        # It never connected: no request. Its number goes to the next one, so its row goes now.
        attempted.discard(attempt)
        if _asked(here, "forget", batch_no, attempt, ids):
            committed.discard(attempt)

    def on_lost(ids: Sequence[str], attempt: int) -> None:
        lost.append((attempt, list(ids)))

    try:
        outcomes = submit_prepared(w.job, _worker_client(w), batch, on_attempt, unsent, on_lost,
                                   may_send)
        error = None
    except Exception as exc:  # noqa: BLE001 -- the coordinator decides per batch
        outcomes, error = [], exc
    # Rows of requests that never left (withheld after their row was committed); a request the
    # API refused with 401/403 was not billed.
    forget = committed - attempted
    if getattr(error, "refused_request", False) and attempted:
        forget.add(max(attempted))
    # A record kept as the text it came in crosses back as that text alone: half the bytes for
    # the coordinator's event loop to take in, and the store needs nothing else. A request
    # withheld for want of the coordinator's word leaves its images pending as a service that
    # failed them would: with the reason kept, counted, and the run's exit code saying so.
    outcomes = [replace(o, record=None, unavailable=o.unavailable or o.reason == _WITHHELD)
                if o.text is not None or o.reason == _WITHHELD else o for o in outcomes]
    return Sent(outcomes, error, tuple(sorted(forget)), tuple(lost))


def _asked(here: _Here, op: str, batch_no: int, attempt: int, ids: Sequence[str]) -> bool:
    """The coordinator's `op` ("record" or "forget") on a request's row, done and acknowledged;
    False when no acknowledgement came in time (the coordinator gone, say). A row recorded too
    late for its request is forgotten again: the worker says so after the timeout."""
    token = uuid.uuid4().hex
    try:
        here.worker.log_event(attempts_topic(here.job), {
            "op": op, "batch": batch_no, "attempt": attempt, "ids": list(ids), "ack": token})
        ack = distributed.Event(f"ximrun-ack-{token}", client=here.worker.client)
        done = bool(ack.wait(timeout=here.job.ack_timeout_s))
        ack.clear()  # an event set and waited for is removed from the scheduler
    except Exception as exc:  # noqa: BLE001 -- the scheduler gone, the worker closing
        log.warning("batch %d: no word from the coordinator about request %d (%s)", batch_no,
                    attempt, exc)
        return False
    if not done and op == "record":
        _asked(here, "forget", batch_no, attempt, ids)
    return done


def attempts_topic(w: WorkerJob) -> str:
    return f"ximrun-attempts-{w.run_key}"


def send_batches(w: WorkerJob, batches: bytes, *parts: Prepared) -> bytes:
    """Send several batches at once from the prepared images they name (`packed` pairs of a
    batch number and its keys): one task, one result for the coordinator to fetch, instead of
    one per batch. Each batch has its own requests and retries; the worker's client caps how
    many are in flight. Returns each batch's `Sent`, `packed`."""
    found: Prepared = {}
    for part in parts:
        found.update(part)
    # The coordinator sends only Ready images.
    readies = [(batch_no, [cast(Ready, found[k]) for k in keys])
               for batch_no, keys in unpacked(batches)]
    # The worker is known to the task's own thread only, not to the threads sending below.
    here = _Here(w, distributed.get_worker())
    if len(readies) == 1:
        return packed_results([_send_one(here, *readies[0])])
    with ThreadPoolExecutor(len(readies), thread_name_prefix="ximrun-send") as pool:
        return packed_results(list(pool.map(lambda b: _send_one(here, *b), readies)))


def packed_results(results: list[Sent]) -> bytes:
    """An error that cannot be pickled crosses as its type and message (a task's result must)."""
    try:
        return packed(results)
    except Exception:  # noqa: BLE001 -- some third-party error type; its words are what matter
        return packed([r if r.error is None or _picklable(r.error)
                        else replace(r, error=RuntimeError(f"{type(r.error).__name__}: "
                                                           f"{r.error}"))
                        for r in results])


def _picklable(value: object) -> bool:
    try:
        pickle.loads(packed(value))  # noqa: S301 -- made here, a line above
    except Exception:  # noqa: BLE001 -- whatever pickling raises
        return False
    return True
