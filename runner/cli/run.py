"""`ximrun run` and `ximrun plan`: options, signals, the summary, metrics and logs at the end."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import click

from runner.cli import common
from runner.cli.common import (
    LOG_EVERY_S,
    default_signals,
    fail,
    limits_text,
    load,
    main,
    message,
    setup_logging,
)
from runner.cli.progress import Progress
from runner.errors import ExitCode, JobError, RunnerError
from runner.job import Job

log = logging.getLogger("ximrun")


def _shown_endpoint(url: str) -> str:
    """The endpoint without anything secret: no user or password, no query or fragment."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<endpoint>"
    if not parts.scheme:
        return url  # "sandbox"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# The run's database and row, for a second Ctrl-C to record the run as `aborted`.
_abort_target: dict[str, Any] = {"db": None, "run_id": None}
ABORT_RECORD_S = 1.0  # how long a second Ctrl-C may spend recording the abort, at most


def _record_abort() -> None:
    """Best effort and bounded in time: the runs row says `aborted`, exit 130. On another thread
    with its own connection, so that a lock held by the process (or a busy writer) cannot hold
    up the exit; if the row cannot be written in time it stays `running`, and the next run or
    `status` shows it `crashed`."""
    db, run_id = _abort_target["db"], _abort_target["run_id"]
    if db is None or not run_id:
        return

    def update() -> None:
        import sqlite3
        from datetime import UTC, datetime

        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            conn = sqlite3.connect(str(db), timeout=ABORT_RECORD_S / 2)
            try:
                with conn:
                    conn.execute("UPDATE runs SET status = 'aborted', exit_code = ?, "
                                 "finished_at = ? WHERE id = ? AND status = 'running'",
                                 (int(ExitCode.ABORTED), now, run_id))
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 -- best effort: the exit must not wait or fail
            pass

    t = threading.Thread(target=update, name="abort", daemon=True)
    t.start()
    t.join(ABORT_RECORD_S)


def _install_signals(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: stop taking batches, finish those in flight. Second: leave at once
    (exit 130, the run recorded as `aborted` if that can be done within ABORT_RECORD_S)."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            _record_abort()
            os._exit(ExitCode.ABORTED)  # the crash guarantees apply: committed batches are safe
        stop.set()
        click.echo(f"\nximrun: {signal.Signals(signum).name} received: finishing the requests in "
                   "flight, then stopping (again to quit at once)", err=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _print_summary(s: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(s.as_dict(), indent=2, sort_keys=True))
        return
    out = [f"ximrun: {s.job}: {s.status} in {s.elapsed_s:.1f}s (exit {s.exit_code})"]
    out.append(f"  listed {s.listed}: new {s.new}, changed {s.changed + s.changed_request}, "
               f"unchanged {s.unchanged}, resumed {s.resumed + s.retried}, "
               f"failed before {s.kept_failed}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected_reasons.items()))
    out.append(f"  sent {s.sent} in {s.requests} request(s): done {s.done} "
               f"(reused {s.reused}), failed {s.failed}, rejected {s.rejected}"
               + (f" ({reasons})" if reasons else ""))
    line = f"  credits {s.credits} recorded"
    if s.credits_saved:
        line += f", {s.credits_saved} saved by reuse"
    if s.budget is not None:
        line += f", budget {s.budget}"
    if s.account_before is not None and s.account_after is not None:
        line += (f"; account counter {s.account_before} -> {s.account_after} "
                 f"(difference {s.account_after - s.account_before}"
                 + (f", {s.account_gap:+d} against the credits recorded"
                    if s.account_gap else "") + ")")
    out.append(line)
    if s.pending:
        why = (f" ({s.unavailable} after failures of the service)"
               if s.unavailable else "")
        out.append(f"  pending {s.pending}{why}: the next run continues")
    if s.missing:
        out.append(f"  missing {s.missing}: known images no longer listed by the sources")
    if s.skipped_rows:
        out.append(f"  manifest rows skipped: {s.skipped_rows}, first at {s.skipped_first}")
    if s.limits and not s.stopped_by:
        out.append("  limits: " + limits_text(s.limits))
    if s.message:
        out.append(f"  {s.message}")
    click.echo("\n".join(out))


class _Limit(click.ParamType):
    """A credit limit: an integer >= 0 (0: spend nothing), or `none` (no limit)."""

    name = "N|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from runner.limits import NO_LIMIT

        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "none":
            return NO_LIMIT
        try:
            n = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a whole number of credits or 'none'", param, ctx)
        if n < 0:
            self.fail(f"{value!r} is below 0 (0 means spend nothing; 'none' means no limit)",
                      param, ctx)
        return n


class _Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        from runner.job import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration("--max-duration", str(value))
        except JobError as exc:
            self.fail(str(exc).removeprefix("--max-duration: "), param, ctx)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Stop after N images (exit 3).")
@click.option("--budget", type=_Limit(),
              help="Override the job's credit budget (its total): N credits, 0 to spend nothing, "
                   "`none` for no budget.")
@click.option("--max-credits", type=_Limit(),
              help="Credits this run may spend (overrides [credits] per_run; `none`: no limit).")
@click.option("--max-duration", type=_Duration(),
              help="Stop taking new batches after this long (90s, 45m, 2h, 1h30m); exit 3.")
@click.option("--dry-run", is_flag=True, help="Same as `ximrun plan`: nothing is sent.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--dask", "dask_address", help="Run on this Dask scheduler (tcp://host:8786).")
@click.option("-q", "--quiet", is_flag=True,
              help="For cron: nothing at all when the run exits 0; warnings and errors, and the "
                   "summary only when it exits non-zero.")
@click.option("-v", "--verbose", count=True, help="More log lines (-vv: debug).")
@click.option("--metrics-file", type=click.Path(dir_okay=False),
              help="Write the run's metrics here at its end, for node_exporter's textfile "
                   "collector (overrides [monitoring] metrics_file).")
@click.option("--log-file", type=click.Path(dir_okay=False),
              help="Also append the log here (info lines at least, even with -q).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True,
              help="Of the log file, or of stderr without one: json is one object per line.")
@click.option("--stats", "stats_every", type=click.FloatRange(min=0, min_open=True),
              default=LOG_EVERY_S, show_default=True,
              help="Seconds between progress lines when stderr is not a terminal.")
def run(job_file: str, limit: int | None, budget: int | None, max_credits: int | None,
        max_duration: float | None, dry_run: bool, as_json: bool, dask_address: str | None,
        quiet: bool, verbose: int, metrics_file: str | None, log_file: str | None,
        log_format: str, stats_every: float) -> None:
    """List, check and send new or changed images; record every answer. Resumes by design."""
    setup_logging(verbose, quiet)
    try:
        from runner.logs import configure

        configure(log_file, log_format)
    except OSError as exc:
        fail(f"cannot open the log file: {exc}", ExitCode.USAGE)
    if dry_run:
        default_signals()
        _plan(job_file, as_json)
        return
    # Before the slow imports: a stop that comes meanwhile is a clean exit 4, not a traceback.
    stop = common.early_stop or threading.Event()
    _install_signals(stop)
    if stop.is_set():
        click.echo("ximrun: a stop signal came while starting: nothing will be sent", err=True)
    job = load(job_file)
    if dask_address:
        job = dataclasses.replace(
            job, executor=dataclasses.replace(job.executor, kind="dask", address=dask_address))
    metrics_path = metrics_file or job.monitoring.metrics_file
    started = time.time()
    # An exception that escapes ends Python with 1: the metrics say so too.
    result: dict[str, Any] = {"summary": None, "code": 1}
    try:
        _run(job, limit=limit, budget=budget, max_credits=max_credits, max_duration=max_duration,
             stop=stop, quiet=quiet, as_json=as_json, stats_every=stats_every, result=result)
    except SystemExit as exc:
        result["code"] = exc.code if isinstance(exc.code, int) else ExitCode.USAGE
        raise
    finally:
        # Whatever the ending: the metrics of the run, then the log's last line.
        _end_of_run(job, metrics_path, started, result)


def _run(job: Job, *, limit: int | None, budget: int | None, max_credits: int | None,
         max_duration: float | None, stop: threading.Event, quiet: bool, as_json: bool,
         stats_every: float, result: dict[str, Any]) -> None:
    """The run and its summary; `result` gets the summary and the exit code as they are known."""
    from runner.executors import run_job
    from runner.summary import RunOptions

    progress = Progress(enabled=not quiet, every=stats_every)
    _abort_target["db"] = job.db_path
    if progress.bar is None:
        from runner.report import shown_path

        log.info("run started: job %s, db %s, endpoint %s, executor %s", job.name,
                 shown_path(job.db_path), _shown_endpoint(job.api.endpoint), job.executor.kind)

    def on_progress(s: Any) -> None:
        _abort_target["run_id"] = s.run_id
        progress(s)

    try:
        from runner.limits import NO_LIMIT

        options = RunOptions(limit=limit, budget=budget,
                             max_credits=None if max_credits == NO_LIMIT else max_credits,
                             max_duration=max_duration)
        if max_credits == NO_LIMIT:
            job = dataclasses.replace(job, credits=dataclasses.replace(job.credits, per_run=None))
        summary = run_job(job, options, stop=stop, progress=on_progress)
    except RunnerError as exc:
        result["code"] = exc.exit_code
        fail(message(exc), exc.exit_code)
        return
    finally:
        progress.close()
    result["summary"], result["code"] = summary, summary.exit_code
    if not (quiet and summary.exit_code == ExitCode.OK):
        _print_summary(summary, as_json)
    sys.exit(summary.exit_code)


def _end_of_run(job: Job, metrics_path: str | None, started: float,
                result: dict[str, Any]) -> None:
    from runner import logs

    summary = result["summary"]
    code = int(result["code"])
    logging.getLogger(logs.SUMMARY_LOGGER).info(
        "%s: run ended with exit code %d", job.name, code,
        extra={"event": "run_ended", "job": job.name, "exit_code": code,
               "summary": summary.as_dict() if summary is not None else None})
    if metrics_path:
        from runner.metrics import write_run_metrics

        try:
            write_run_metrics(metrics_path, job, started=started, ended=time.time(),
                              exit_code=int(result["code"]), summary=summary)
        except OSError as exc:
            log.error("cannot write the metrics file %s: %s", metrics_path, exc)
    logs.close()


def _plan(job_file: str, as_json: bool) -> None:
    job = load(job_file, require_token=False)
    from runner.plan import plan_job

    try:
        s = plan_job(job)
    except RunnerError as exc:
        fail(message(exc), exc.exit_code)
        return
    if as_json:
        click.echo(json.dumps(s.as_dict(), indent=2, sort_keys=True))
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.rejected_reasons.items()))
    click.echo(
        f"ximrun plan: {s.job} ({s.listed} listed; new and changed images were read and hashed)\n"
        f"  new {s.new}, changed {s.changed}, request changed {s.changed_request}, "
        f"unchanged {s.unchanged}, pending from before {s.resumed + s.retried}, "
        f"failed before {s.kept_failed}\n"
        f"  would send {s.sent}; reuse {s.reused} known answer(s); reject {s.rejected}"
        + (f" ({reasons})" if reasons else "")
        + (f"; unreadable {s.failed}" if s.failed else "") + "\n"
        f"  credits a run would cost: {s.credits}"
        + (f" (saved by reuse: {s.credits_saved})" if s.credits_saved else "")
        + (f"; budget {s.budget}" if s.budget is not None else "")
        + (f"\n  manifest rows skipped: {s.skipped_rows}, first at {s.skipped_first}"
           if s.skipped_rows else ""))
    for name, e in s.limits.items():
        if name == "duration":
            click.echo(f"  limit max_duration {e['limit']:g}s: when it ends, no new batch")
            continue
        if name == "account":
            click.echo(f"  limit min_account_credits {e['limit']}: checked against the account "
                       "when the run starts")
            continue
        where = (f"would stop the run after {e['images_before_stop']} image(s)"
                 if e.get("stops_run") else "would not stop the run")
        used = f", used {e['used']}" if "used" in e else ""
        click.echo(f"  limit {name} {e['limit']}{used}, left {e['left']}: {where}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("-v", "--verbose", count=True)
def plan(job_file: str, as_json: bool, quiet: bool, verbose: int) -> None:
    """Same listing and checks as `run`, nothing sent: counts and the credits a run would cost."""
    setup_logging(verbose, quiet)
    _plan(job_file, as_json)
