"""The one exception family of ximrun; only cli.py turns these into exit codes and messages."""


class RunnerError(Exception):
    """Base of every error ximrun raises on purpose."""


class JobError(RunnerError):
    """The job file or the command line is wrong; nothing was listed or sent (exit 2)."""


class SourceError(RunnerError):
    """A source root or manifest cannot be listed at all."""


class AuthError(RunnerError):
    """The API refused the token (401/403); nothing more may be sent (exit 5)."""


class LockedError(RunnerError):
    """Another run holds the state database (exit 75)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ApiError(RunnerError):
    """A request failed for good (retries ran out or the API refused it)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ReadError(RunnerError):
    """One image's bytes could not be read (deleted since listing, access denied, ...)."""
