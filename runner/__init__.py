"""ximrun: batch jobs against a Ximilar-style image API, checkpointed in SQLite.

The public Python API (docs/python-api.md); the command line is a thin layer over it. Library
functions raise `RunnerError`s, they never exit the process. Names are imported when first used,
so that `import runner` (and the console script's start) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "DatabaseError",
    "ExitCode",
    "ExportError",
    "Job",
    "JobError",
    "LockedError",
    "ReadError",
    "RunOptions",
    "RunnerError",
    "SourceError",
    "StateError",
    "Summary",
    "__version__",
    "export_rows",
    "open_export",
    "load_job",
    "parse_job",
    "plan_job",
    "retry_failed",
    "run_job",
    "status_report",
    "write_report",
]

_WHERE = {
    "AuthError": "runner.errors",
    "DatabaseError": "runner.errors",
    "ExportError": "runner.errors",
    "ExitCode": "runner.errors",
    "JobError": "runner.errors",
    "LockedError": "runner.errors",
    "ReadError": "runner.errors",
    "RunnerError": "runner.errors",
    "SourceError": "runner.errors",
    "StateError": "runner.errors",
    "Job": "runner.job",
    "load_job": "runner.job",
    "parse_job": "runner.job",
    "RunOptions": "runner.summary",
    "Summary": "runner.summary",
    "run_job": "runner.executors",
    "plan_job": "runner.plan",
    "status_report": "runner.report",
    "export_rows": "runner.report",
    "open_export": "runner.report",
    "retry_failed": "runner.report",
    "write_report": "runner.html_report",
}

if TYPE_CHECKING:
    from runner.errors import (
        AuthError,
        DatabaseError,
        ExitCode,
        ExportError,
        JobError,
        LockedError,
        ReadError,
        RunnerError,
        SourceError,
        StateError,
    )
    from runner.executors import run_job
    from runner.html_report import write_report
    from runner.job import Job, load_job, parse_job
    from runner.plan import plan_job
    from runner.report import export_rows, open_export, retry_failed, status_report
    from runner.summary import RunOptions, Summary


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
