"""Preparation for the local executor: threads for a short run, worker processes for a long one.

Reading, the check decode, resizing and SHA-256 are most of what an image costs this process, and
much of it is Python around the decoders, under the interpreter lock that the request threads
and the store's writer need too. Once a run has taken up `PROCESSES_AFTER` images, or its
listing shows more than that with at least half of those classified to be sent, its later tasks
go to worker processes instead, one per core: they run the same `prepare_items` a Dask
worker runs and hand back only what the run cannot rebuild itself (the bytes to send, the content
hash, the size, or the refusal), while the `Item`s stay here. A short run (a test, a cron job with
a few new images) never pays the workers' start-up.

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
        self._use_processes = processes and workers > 0
        self._workers = workers
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
        return self._threads.submit(prepare_items, self.job, task.items)

    def result(self, task: Task, f: Future[list[Ready | Refused]]) -> list[Ready | Refused] | None:
        """The task's images, prepared; None when its worker died and the task must be
        submitted again (once: to a new pool)."""
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
                                       initargs=(self.job,))
            up = pool.submit(worker_up)
        except Exception as exc:  # noqa: BLE001 -- e.g. a daemonic process may have no children
            log.warning("preparation goes on in threads: worker processes could not start "
                        "(%s)", exc or type(exc).__name__)
            self._use_processes = False
            return
        self._pool = pool
        self._generation += 1
        generation = self._generation
        log.info("preparation moves to %d worker process(es)", self._workers)

        def started(f: Future[None]) -> None:
            if f.exception() is None:
                self._warm.add(generation)
            elif generation not in self._warm:
                log.warning("preparation goes on in threads: worker processes could not "
                            "start (%s)", f.exception())
                self._cold = f.exception()

        up.add_done_callback(started)

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
