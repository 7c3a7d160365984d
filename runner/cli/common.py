"""What every command shares: the `ximrun` group, logging to stderr, loading a job, and turning the
library's errors into a message and an exit code."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from typing import Any

import click

from runner import __version__
from runner.errors import ExitCode, JobError, RunnerError, SourceError
from runner.job import Job, load_job

LOG_EVERY_S = 30.0  # the default of `run --stats`: a progress line this often off a terminal

log = logging.getLogger("ximrun")
# Set by a SIGINT or SIGTERM that came while the command started (runner/launch.py).
early_stop: threading.Event | None = None


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    if verbose == 1:
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("ximrun")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def fail(message: str, code: int) -> None:
    click.echo(f"ximrun: {message}", err=True)
    sys.exit(code)


def load(path: str, *, require_token: bool = True) -> Job:
    try:
        return load_job(path, require_token=require_token)
    except JobError as exc:
        fail(f"job file refused: {exc}", ExitCode.USAGE)
        raise  # unreachable


# Every option can come from the environment: XIMRUN_<COMMAND>_<OPTION> (`XIMRUN_RUN_STATS=60`).
ENVVAR_PREFIX = "XIMRUN"


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": ENVVAR_PREFIX})
@click.version_option(__version__, prog_name="ximrun")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run batch image jobs against a Ximilar-style API; resumable, never paying twice."""
    if ctx.invoked_subcommand != "run":
        default_signals()


def default_signals() -> None:
    """Commands other than `run` stop at once on SIGINT or SIGTERM, as they did before start-up
    caught the signals; one that came during start-up ends the command now."""
    if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if early_stop is not None and early_stop.is_set():
        click.echo("ximrun: interrupted", err=True)
        sys.exit(ExitCode.ABORTED)


def library_errors(f: Any) -> Any:
    """The library raises; a command turns what it raised into its message and exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except RunnerError as exc:
            fail(message(exc), exc.exit_code)

    return wrapper


def message(exc: RunnerError) -> str:
    if isinstance(exc, JobError):
        return f"job refused: {exc}"
    if isinstance(exc, SourceError):
        return f"source refused: {exc}"
    return str(exc)


def limits_text(limits: dict[str, Any]) -> str:
    """Each spending limit and what is left of it, on one line."""
    parts = []
    for name, e in limits.items():
        if name == "duration":
            parts.append(f"max_duration {e['limit']:g}s")
        elif name == "account":
            left = "?" if e.get("left") is None else e["left"]
            parts.append(f"account {left} above the floor {e['limit']}")
        else:
            parts.append(f"{name} {e['left']} left of {e['limit']}")
    return ", ".join(parts)
