"""The one exception family of ximrun, and the exit codes the command line maps it to.

Library functions raise these and never exit the process; only `cli/` turns them into messages
and `ExitCode`s (docs/contract.md, "Exit codes of run").
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code of `ximrun`, in one place (the contract's table)."""

    OK = 0  # every listed image is done or rejected
    FAILURES = 1  # finished, but some images failed after their retries
    USAGE = 2  # usage, job-file or source error; nothing was sent
    STOPPED = 3  # stopped early by the budget or --limit; the next run continues
    INTERRUPTED = 4  # SIGINT/SIGTERM after a clean checkpoint; the next run continues
    AUTH = 5  # the API refused the token; nothing more was sent
    UNAVAILABLE = 69  # the API was unavailable (the circuit breaker opened, or retries ran out on
    # service failures): the images it failed are still pending, the next run continues
    DATABASE = 74  # the state database cannot be used: not a database, newer, unwritable, full
    LOCKED = 75  # another run of the same state database is in progress
    ABORTED = 130  # a second Ctrl-C, or a signal while a command other than run started


class RunnerError(Exception):
    """Base of every error ximrun raises on purpose."""

    exit_code = ExitCode.USAGE


class JobError(RunnerError):
    """The job file or the command line is wrong; nothing was listed or sent."""


class SourceError(RunnerError):
    """A source root or manifest cannot be listed at all."""


class AuthError(RunnerError):
    """The API refused the token (401/403); nothing more may be sent."""

    exit_code = ExitCode.AUTH
    # True when raised for a request that was sent and refused (not billed); False when raised
    # before sending, because an earlier request was refused.
    refused_request = False


class LockedError(RunnerError):
    """Another run holds the state database."""

    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class StateError(RunnerError):
    """The state database is not there (nothing has run yet) or cannot be used."""

    exit_code = ExitCode.FAILURES


class DatabaseError(StateError):
    """The state database cannot be used: a folder, not a database, corrupt, read-only, a full
    disk, written by a newer ximrun, or in need of an upgrade that a read-only command may not
    make. The message names the file and what to do; the database was not changed."""

    exit_code = ExitCode.DATABASE


class ExportError(RunnerError):
    """`ximrun export` cannot write where it was asked (a missing folder, a missing extra)."""


class ReadError(RunnerError):
    """One image's bytes could not be read (deleted since listing, access denied, ...)."""


def brief(what: BaseException | str, limit: int = 200) -> str:
    """An error (or any text) on one line, at most `limit` characters, for a reason or a log."""
    text = " ".join(str(what).split())
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
