"""Executors: how the work of a run moves, and `run_job`, which sets a run up and hands it to one.

Each executor drives one public `Run` (run.py); they are chosen by `[executor] kind` and imported
only when chosen (Dask is an optional extra).

An executor has one method, `execute(run) -> Summary`, which calls `run.execute(drive)` with
its own loop. To add one: a module here with such a class, and a line in EXECUTORS.
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

from runner.client import ApiClient
from runner.commit import check_db_path, database_error
from runner.errors import JobError
from runner.job import Job
from runner.lock import run_lock
from runner.run import Run
from runner.store import Store
from runner.summary import ProgressFn, RunOptions, Summary

# kind -> (module, class)
EXECUTORS = {
    "local": ("runner.executors.threads", "ThreadExecutor"),
    "dask": ("runner.executors.dask", "DaskExecutor"),
}


class Executor(Protocol):
    def execute(self, run: Run) -> Summary: ...


def get_executor(kind: str) -> Executor:
    """The executor for `[executor] kind`; JobError for an unknown kind or a missing extra."""
    try:
        module, name = EXECUTORS[kind]
    except KeyError:
        raise JobError(f"executor.kind: {kind!r} is not one of {', '.join(EXECUTORS)}") from None
    executor: Executor = getattr(importlib.import_module(module), name)()
    return executor


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


def run_job(job: Job, options: RunOptions | None = None, *, stop: threading.Event | None = None,
            progress: ProgressFn | None = None, store: Store | None = None,
            client: ApiClient | None = None) -> Summary:
    """Run a job to completion (or to its budget, limit or a stop); resumable by design.

    `store` and `client` may be given (a benchmark's instrumented ones, say); the caller then
    owns them. Raises LockedError, AuthError, JobError or SourceError; never exits.
    """
    options = options or RunOptions()
    stop = stop or threading.Event()
    executor = get_executor(job.executor.kind)  # JobError without the optional `distributed`
    with contextlib.ExitStack() as stack:
        check_db_path(job.db_path)  # a folder or /dev/null: refused before its lock is made
        try:
            stack.enter_context(run_lock(job.db_path))
        except OSError as exc:  # the folder cannot hold the lock file: read-only, full, ...
            raise database_error(exc, job.db_path) from None
        if store is None:
            store = stack.enter_context(Store(job.db_path))
        if client is None:
            endpoint_url, token = stack.enter_context(api_endpoint(job))
            # The embedded emulator is in this process: never through a proxy.
            client = ApiClient(endpoint_url, token, job.api, stop=stop, direct=job.uses_sandbox)
            stack.callback(client.close)
            job = replace(job, token=token)  # workers use the same token (the sandbox's, too)
        with store.grouped():
            return executor.execute(Run(job, store, client, options, stop, progress))
