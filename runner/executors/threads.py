"""The local executor: preparation on a thread per core (worker processes for a long run,
preparers.py), requests on `concurrency` threads; the calling thread coordinates (takes up listed
images, routes them, reserves budget, dispatches).
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from runner.errors import AuthError
from runner.executors.preparers import PROCESSES_AFTER, Preparers, Task
from runner.job import Job
from runner.records import Item, Ready, Refused
from runner.run import Run
from runner.storage import is_local
from runner.summary import Summary

ROUTE_BATCHES = 4


class ThreadExecutor:
    """Runs a job in this process."""

    def execute(self, run: Run) -> Summary:
        return run.execute(drive)


def drive(run: Run) -> tuple[str | None, bool]:
    """Returns (why it stopped early or None, whether the whole listing was seen)."""
    job = run.job
    bs = job.api.batch_size
    # Preparation takes a batch's worth of images per task: one hand-over (and one remote
    # fetch of them all) instead of one per image. A thread per core: decoders release the
    # GIL, and more threads than that only fight over it for the Python around them. Objects
    # in remote storage are waited for, not computed: four times as many tasks then, so
    # that enough fetches are in flight to keep up with the API.
    cores = max(2, os.cpu_count() or 2)
    remote = _remote(job)
    prep_workers = cores * (4 if remote else 1)
    prep_window = max(2 * cores * bs, bs * job.api.concurrency)
    # The client lets `concurrency` requests be in flight. A few more sender threads than
    # that let a request's thread commit its answers while another thread's request already
    # uses its slot: committing never holds a slot of the API's concurrency.
    senders = job.api.concurrency + max(1, job.api.concurrency // 4)
    send_window = senders + 1  # one batch waiting per sender keeps them all busy
    listing = run.listed()
    intake_done = exhausted = limited = False
    stopped_by: str | None = None  # "interrupted", "auth" or "budget": nothing more is sent
    taken = 0
    batch: list[Ready] = []
    prepared: list[Ready | Refused] = []  # finished, not yet routed
    prep_inflight: dict[Future[list[Ready | Refused]], Task] = {}
    preparing = 0  # images in prep_inflight
    send_inflight: set[Future[int]] = set()
    # Finished futures arrive here: one wake-up per completion, not a scan of hundreds of
    # futures (concurrent.futures.wait locks every one of them on every call).
    finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    limit = run.options.limit
    last_beat = time.monotonic()

    # Worker processes for local files only: remote objects are waited for, not computed, and
    # a fetch's bytes would cross between processes once more.
    preparers = Preparers(job, prep_workers, processes=not remote, workers=cores,
                          window=prep_window)
    with preparers, ThreadPoolExecutor(senders, thread_name_prefix="send") as send_pool:
        while True:
            stopped_by = run.stop_reason(stopped_by)
            # 1. take up listed images while the preparation window has room; prepared images
            # waiting for a batch count too, or a slow API would let every image's bytes pile
            # up in memory
            while (stopped_by is None and not intake_done and preparers.has_room()
                   and preparing + len(prepared) + len(batch) < prep_window):
                task: list[Item] = []
                size = bs * preparers.batches_per_task
                while len(task) < size:
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
                    if (not preparers.expecting and (limit is None or limit > PROCESSES_AFTER)
                            and run.looks_longer_than(PROCESSES_AFTER)):
                        preparers.expect_long_run()
                    t = Task(task)
                    f = preparers.submit(t)
                    prep_inflight[f] = t
                    preparing += len(task)
                    f.add_done_callback(finished.put)
            # 2. route prepared images: refused, reused, waiting on a copy, or into a batch;
            # several batches' worth at a time while the senders are all busy (one database
            # question for all of them), at once when a sender waits for a batch
            if stopped_by is not None:
                prepared.clear()
            elif prepared and (len(prepared) >= ROUTE_BATCHES * bs or not prep_inflight
                               or (len(batch) < bs and len(send_inflight) < send_window)):
                run.route(prepared, batch)
                prepared = []
            # 3. dispatch batches that are full, or the last one once nothing else comes
            while batch and stopped_by is None and len(send_inflight) < send_window:
                last = intake_done and not prep_inflight and not prepared
                if len(batch) < bs and not last:
                    break
                n = run.affordable(min(bs, len(batch)))
                if n == 0:
                    if not send_inflight:
                        stopped_by = "budget"
                    break
                take, batch[:n] = batch[:n], []
                f = send_pool.submit(run.send, run.next_batch(), take)
                send_inflight.add(f)
                run.sending = len(send_inflight)
                f.add_done_callback(finished.put)
            # the request threads idle for want of prepared images: the workers may grow
            preparers.hungry(stopped_by is None and not intake_done
                             and len(send_inflight) < send_window and len(batch) < bs)
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
                run.stop.wait(0.05)
            if time.monotonic() - last_beat >= 0.5:
                # A heartbeat: the progress (and cron's log lines) go on while requests hang.
                last_beat = time.monotonic()
                run.report()
            for f in done:
                if f in prep_inflight:
                    t = prep_inflight.pop(f)
                    if f.cancelled():
                        preparers.dropped(t)
                        preparing -= len(t.items)
                        continue
                    got = preparers.result(t, f)
                    if got is None and stopped_by is not None:
                        preparing -= len(t.items)  # nothing more is sent: left pending
                        continue
                    if got is None:  # its worker died: once more, in a new pool
                        f = preparers.submit(t)
                        prep_inflight[f] = t
                        f.add_done_callback(finished.put)
                        continue
                    preparing -= len(t.items)
                    prepared.extend(got)
                elif f in send_inflight:
                    send_inflight.discard(f)
                    run.sending = len(send_inflight)
                    try:
                        f.result()
                    except AuthError as exc:
                        run.refuse_token(exc)  # the other requests in flight stop retrying
        for f in prep_inflight:
            f.cancel()
    return run.wind_up(listing, stopped_by, limited, exhausted)


def _remote(job: Job) -> bool:
    """Whether images may come from remote storage (a URL root, or a manifest's rows)."""
    src = job.source
    return bool(src.manifest) or not all(is_local(p) for p in src.paths)


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
