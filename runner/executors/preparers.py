"""Preparation for the local executor: threads for a short run, worker processes for a long one.

Reading, the check decode, resizing and SHA-256 are most of what an image costs this process, and
much of it is Python around the decoders, under the interpreter lock that the request threads
and the store's writer need too. Once a run has taken up `PROCESSES_AFTER` images, or its
listing shows more than that with at least half of those classified to be sent, its later tasks
go to worker processes instead: they run the same `prepare_items` a Dask worker runs and hand
back only what the run cannot rebuild itself (the bytes to send, the content hash, the size, or
the refusal), while the `Item`s stay here. A short run (a test, a cron job with a few new images)
never pays the workers' start-up. One worker starts first, as one keeps small images far ahead
of the API; more start, up to one per core, when the threads found the images heavy (photos to
resize) or while the request threads wait for prepared images (`hungry`). Until the workers are
up, the threads take at most two tasks each: the rest wait in the listing for the workers.

A worker that dies (the kernel's out-of-memory killer, a decoder's crash) breaks its pool: the
tasks it held are given to a new pool once, and never to a thread of this process (were a
decoder's crash the cause, it would take the run down with it); images whose task breaks a
second pool are failed with the reason, so that one hostile file cannot stop a run or make it
loop. A pool whose first task (a no-op) breaks could not start at all (a script calling
`run_job` without the `if __name__ == "__main__":` guard that starting processes needs): the run
goes on with threads, and says so. Until a new pool's workers are up, new tasks keep going to
the threads. Workers ignore SIGINT and SIGTERM: the run decides what a stop means, and ends
them on its way out.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from runner.job import Job
from runner.prepare import Made, prepare_compact, prepare_items, worker_start, worker_up
from runner.records import Item, Ready, Refused, RequestRecord

log = logging.getLogger("ximrun.prepare")

# Images a run takes up on threads before it starts worker processes: their start-up (a fresh
# interpreter importing Pillow, about a third of a second of CPU each) pays off within a few
# hundred images.
PROCESSES_AFTER = 300
# A process's task: this many batches' worth, more (up to the most) when the run's window holds
# two such tasks per worker, so that each has one queued behind the one it prepares.
PROCESS_TASK_BATCHES, PROCESS_TASK_BATCHES_MOST = 4, 8
# Workers start one at a time: one more (up to one per core) once the request threads have
# waited this long for prepared images, with no pass in between where they did not; all of them
# at once for images that cost the threads more than HEAVY_S of CPU each (photos to resize).
GROW_AFTER_S = 0.1
HEAVY_S = 0.002
LOST = "the process preparing it died"


class Task:
    """A batch's worth of listed images on their way through preparation."""

    __slots__ = ("items", "tries", "pool")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.tries = 0
        self.pool = 0  # the generation of the process pool it went to; 0: threads


class Preparers:
    """Threads first, worker processes once the run is long enough (`processes=True`)."""

    def __init__(self, job: Job, threads: int, *, processes: bool, workers: int,
                 window: int = 0) -> None:
        """`window`: the images the run lets be in preparation or waiting for a batch."""
        self.job = job
        bs = max(1, job.api.batch_size)
        self._process_batches = min(PROCESS_TASK_BATCHES_MOST,
                                    max(PROCESS_TASK_BATCHES, window // (2 * max(1, workers) * bs)))
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="prep")
        self._thread_room = 2 * threads  # tasks on the threads at once, the queued included
        self._thread_cpu = 0.0  # CPU seconds the threads' tasks took, and their images
        self._thread_images = 0
        self._timing = threading.Lock()
        self._on_threads = 0  # tasks given to the threads whose result is not yet taken
        self._use_processes = processes and workers > 0
        self._workers = workers  # the most
        self._active = 1  # the workers the pool may start
        self._hungry_since: float | None = None  # the senders wait for prepared images since
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # of the pool, counted from 1
        self._warm: set[int] = set()  # generations whose workers have started
        self._cold: BaseException | None = None  # why the workers could not start
        self._taken = 0  # images submitted (a task given back is not counted again)
        self.expecting = False  # a long run foreseen: the workers start with the next task

    @property
    def batches_per_task(self) -> int:
        """A task's size, in batches: a process's task costs this process (and the worker) a
        hand-over through pipes and two pickles, so it takes several batches' worth once the
        workers are up."""
        warm = self._pool is not None and self._generation in self._warm
        return self._process_batches if warm else 1

    def expect_long_run(self) -> None:
        """The listing shows a run of more than PROCESSES_AFTER images: the workers start with the
        next task rather than with image PROCESSES_AFTER + 1, which a fresh run of thousands
        takes up only about 0.15 s later (its first chunks are listed ever larger before they
        are handed on); the run's threads prepare that much less while the workers start."""
        self.expecting = True

    def submit(self, task: Task) -> Future[list[Ready | Refused]]:
        if not task.tries:
            self._taken += len(task.items)
        task.tries += 1
        if self._use_processes and self._active < self._workers and self._heavy():
            self._grow(self._workers, "the images are heavy to prepare")
        if self._cold is not None:  # said when found (`_start_pool`)
            self._cold = None
            self._use_processes = False
            self._close_pool()
        if self._use_processes and self._pool is None and (
                self._taken > PROCESSES_AFTER or self.expecting or task.tries > 1):
            self._start_pool()
        if task.tries > 1:
            # A task given back by a broken pool goes to processes only: were its decoder's
            # crash the cause, it would take this process down with it.
            if self._pool is None:
                done: Future[list[Ready | Refused]] = Future()
                done.set_result([Refused(it, f"{LOST}, and no new one could start", read_failed=True)
                                 for it in task.items])
                return done
            return self._in_process(task)
        if self._pool is not None and self._generation in self._warm:
            return self._in_process(task)
        task.pool = 0
        self._on_threads += 1
        return self._threads.submit(self._timed, task.items)

    def _timed(self, items: list[Item]) -> list[Ready | Refused]:
        started = time.thread_time()
        try:
            return prepare_items(self.job, items)
        finally:
            spent = time.thread_time() - started
            with self._timing:
                self._thread_cpu += spent
                self._thread_images += len(items)

    def _heavy(self) -> bool:
        with self._timing:
            n, cpu = self._thread_images, self._thread_cpu
        return n >= 10 and cpu / n > HEAVY_S

    def _grow(self, workers: int, why: str) -> None:
        self._active = workers
        if self._pool is not None:
            _allow(self._pool, workers)
        log.info("%s: up to %d worker process(es)", why, workers)

    def has_room(self) -> bool:
        """Whether a new task may be submitted now. Tasks for the threads wait in the listing
        rather than queue behind two per thread: queued there, they would keep images on the
        threads that the workers, once up, prepare without holding this process's interpreter
        lock (a run of large photos gave the threads its whole window, 320 images, to prepare
        while the workers started)."""
        warm = self._pool is not None and self._generation in self._warm
        return warm or self._on_threads < self._thread_room

    def result(self, task: Task, f: Future[list[Ready | Refused]]) -> list[Ready | Refused] | None:
        """The task's images, prepared; None when its worker died and the task must be
        submitted again (once: to a new pool). Every finished task's result is taken here, or
        the task is `dropped`."""
        if task.pool == 0:
            self._on_threads -= 1
        try:
            return f.result()
        except BrokenProcessPool as exc:
            if task.pool == self._generation:
                self._close_pool()
            if task.tries >= 2:
                log.error("%d image(s) failed: their preparing process died twice (%s)",
                          len(task.items), exc)
                why = f"{LOST} twice (out of memory, or a decoder crashed): {exc}"
                return [Refused(it, why, read_failed=True) for it in task.items]
            return None

    def _start_pool(self) -> None:
        # "spawn": a fresh interpreter, as forking a process that runs threads (the requests',
        # the store's writer) could copy a lock some thread holds. Tasks go on to the threads
        # until the workers are up: their start-up would otherwise stall the run.
        ctx = multiprocessing.get_context("spawn")
        try:
            pool = ProcessPoolExecutor(self._workers, mp_context=ctx, initializer=worker_start,
                                       initargs=(self.job, os.getpid()))
            _allow(pool, self._active)
            up = pool.submit(worker_up)
        except Exception as exc:  # noqa: BLE001 -- e.g. a daemonic process may have no children
            log.warning("preparation goes on in threads: worker processes could not start "
                        "(%s)", exc or type(exc).__name__)
            self._use_processes = False
            return
        self._pool = pool
        self._generation += 1
        generation = self._generation
        log.info("preparation moves to worker processes (%d, up to %d)", self._active,
                 self._workers)

        def started(f: Future[None]) -> None:
            if f.exception() is None:
                self._warm.add(generation)
            elif generation not in self._warm:
                log.warning("preparation goes on in threads: worker processes could not "
                            "start (%s)", f.exception())
                self._cold = f.exception()

        up.add_done_callback(started)

    def dropped(self, task: Task) -> None:
        """A finished task whose result is not taken (cancelled at a stop)."""
        if task.pool == 0:
            self._on_threads -= 1

    def hungry(self, waiting: bool) -> None:
        """The coordinator's word after each pass: whether request threads are idle for want of
        prepared images (`waiting`). Small images keep one worker far ahead of the API (about
        5,000 a second against the 3,200 that 32 requests of 10 at 100 ms take), so a run
        starts one and adds one, up to one per core, only while preparation holds the requests
        back (large photos): each worker's start costs about 0.15 s of CPU and 40 MB."""
        warm = self._pool is not None and self._generation in self._warm
        if not waiting or not warm or self._active >= self._workers:
            self._hungry_since = None
            return
        now = time.monotonic()
        if self._hungry_since is None:
            self._hungry_since = now
        elif now - self._hungry_since >= GROW_AFTER_S:
            self._hungry_since = None
            self._grow(self._active + 1, "preparation holds the requests back")

    def _in_process(self, task: Task) -> Future[list[Ready | Refused]]:
        assert self._pool is not None
        task.pool = self._generation
        try:
            made: Future[list[Made]] = self._pool.submit(prepare_compact, task.items)
        except BrokenProcessPool as exc:  # found broken before the task's answer says so
            made = Future()
            made.set_exception(exc)
        out: Future[list[Ready | Refused]] = Future()
        out.set_running_or_notify_cancel()

        def unpack(f: Future[list[Made]]) -> None:
            try:
                out.set_result(_rebuild(task.items, f.result()))
            except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits for `out`
                out.set_exception(exc)

        made.add_done_callback(unpack)
        return out

    def _close_pool(self) -> None:
        """A worker died: the pool is broken for good; the next task starts a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            if self._generation in self._warm:
                log.warning("a preparing process died; starting new ones")

    def __enter__(self) -> Preparers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _allow(pool: ProcessPoolExecutor, workers: int) -> None:
    """Let the pool start up to `workers` processes. A pool started with "spawn" starts one
    when a task comes and none is idle, up to its `_max_workers`, which is read there and
    nowhere else once the pool exists (CPython 3.11 to 3.13); without that attribute the pool
    keeps the number it was made with."""
    if isinstance(getattr(pool, "_max_workers", None), int):
        pool._max_workers = workers  # noqa: SLF001 -- see above


def _rebuild(items: Sequence[Item], made: Sequence[Any]) -> list[Ready | Refused]:
    out: list[Ready | Refused] = []
    for item, m in zip(items, made, strict=True):
        if len(m) == 2:
            out.append(Refused(item, m[0], read_failed=m[1]))
        elif m[0] is None:
            out.append(Ready(item, RequestRecord(item.key, url=m[1], extra=item.extra), None,
                             m[2], m[3]))
        else:
            out.append(Ready(item, RequestRecord(item.key, data=m[0], extra=item.extra), m[1],
                             m[2], m[3]))
    return out
