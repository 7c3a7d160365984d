"""The `ximrun` command line: parse arguments, call the library, print, map errors to exit codes."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.errors import ExitCode, JobError, RunnerError, SourceError
from runner.job import ImagePolicy, Job, SandboxSettings, load_job, validate_sandbox
from runner.records import STATES

LOG_EVERY_S = 30.0  # the default of `run --stats`: a progress line this often off a terminal

log = logging.getLogger("ximrun")
# Set by a SIGINT or SIGTERM that came while the command started (runner/launch.py).
_early_stop: threading.Event | None = None


def _setup_logging(verbose: int, quiet: bool) -> None:
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


def _fail(message: str, code: int) -> None:
    click.echo(f"ximrun: {message}", err=True)
    sys.exit(code)


def _load(path: str, *, require_token: bool = True) -> Job:
    try:
        return load_job(path, require_token=require_token)
    except JobError as exc:
        _fail(f"job file refused: {exc}", ExitCode.USAGE)
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
        _default_signals()


def _default_signals() -> None:
    """Commands other than `run` stop at once on SIGINT or SIGTERM, as they did before start-up
    caught the signals; one that came during start-up ends the command now."""
    if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _early_stop is not None and _early_stop.is_set():
        click.echo("ximrun: interrupted", err=True)
        sys.exit(ExitCode.ABORTED)


# --- run / plan --------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar on a terminal; under cron, a plain line every `every` seconds instead.

    The total is not known while the listing streams: until it ends the bar counts without a
    total (no percentage, no ETA that would go backwards as the total grows), then it becomes
    the real bar. Off a terminal one line says when the listing ended and what it found."""

    def __init__(self, enabled: bool, every: float = LOG_EVERY_S) -> None:
        self.bar = None
        self.every = every
        self.last_line = time.monotonic()
        self.started = time.monotonic()
        self.enabled = enabled
        self.listing_logged = False
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", file=sys.stderr, dynamic_ncols=True,
                            desc="ximrun: listing")

    def __call__(self, s: Any) -> None:
        if not self.enabled:
            return
        settled = s.done + s.failed + s.rejected
        todo = s.new + s.changed + s.changed_request + s.resumed + s.retried
        if self.bar is not None:
            if s.listing_done and self.bar.total != todo:
                self.bar.total = todo
                self.bar.set_description("ximrun", refresh=False)
            self.bar.n = settled
            postfix = {"listed": s.listed} if not s.listing_done else {}
            self.bar.set_postfix(**postfix, done=s.done, failed=s.failed, rejected=s.rejected,
                                 credits=s.credits, refresh=False)
            self.bar.refresh()
            return
        if s.listing_done and not self.listing_logged:
            self.listing_logged = True
            log.info("listing done: %d listed (new %d, changed %d, unchanged %d, resumed %d, "
                     "failed before %d): %d to do", s.listed, s.new,
                     s.changed + s.changed_request, s.unchanged, s.resumed + s.retried,
                     s.kept_failed, todo)
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            rate = settled / max(now - self.started, 1e-9)
            total = str(todo) if s.listing_done else f"{todo} so far (listing: {s.listed})"
            log.info("progress: %d/%s settled (done %d, failed %d, rejected %d), %.1f img/s, "
                     "credits %d", settled, total, s.done, s.failed, s.rejected, rate, s.credits,
                     extra={"event": "progress", "settled": settled, "todo": todo,
                            "listing_done": s.listing_done, "done": s.done,
                            "failed": s.failed, "rejected": s.rejected,
                            "images_per_s": round(rate, 2), "credits": s.credits})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        out.append(f"  skipped {s.skipped_rows} manifest row(s); see the log above")
    if s.limits and not s.stopped_by:
        out.append("  limits: " + _limits_text(s.limits))
    if s.message:
        out.append(f"  {s.message}")
    click.echo("\n".join(out))


def _limits_text(limits: dict[str, Any]) -> str:
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
    _setup_logging(verbose, quiet)
    try:
        from runner.logs import configure

        configure(log_file, log_format)
    except OSError as exc:
        _fail(f"cannot open the log file: {exc}", ExitCode.USAGE)
    if dry_run:
        _default_signals()
        _plan(job_file, as_json)
        return
    # Before the slow imports: a stop that comes meanwhile is a clean exit 4, not a traceback.
    stop = _early_stop or threading.Event()
    _install_signals(stop)
    if stop.is_set():
        click.echo("ximrun: a stop signal came while starting: nothing will be sent", err=True)
    job = _load(job_file)
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

    progress = _Progress(enabled=not quiet, every=stats_every)
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
        _fail(_message(exc), exc.exit_code)
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


def _library_errors(f: Any) -> Any:
    """The library raises; a command turns what it raised into its message and exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except RunnerError as exc:
            _fail(_message(exc), exc.exit_code)

    return wrapper


def _message(exc: RunnerError) -> str:
    if isinstance(exc, JobError):
        return f"job refused: {exc}"
    if isinstance(exc, SourceError):
        return f"source refused: {exc}"
    return str(exc)


def _plan(job_file: str, as_json: bool) -> None:
    job = _load(job_file, require_token=False)
    from runner.plan import plan_job

    try:
        s = plan_job(job)
    except RunnerError as exc:
        _fail(_message(exc), exc.exit_code)
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
        + (f"; budget {s.budget}" if s.budget is not None else ""))
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
    _setup_logging(verbose, quiet)
    _plan(job_file, as_json)


# --- status / export / retry -------------------------------------------------------------------

@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@_library_errors
def status(job_file: str, as_json: bool) -> None:
    """Counts per state, credits spent, recent runs; works while a run is going."""
    from runner.report import status_report

    job = _load(job_file, require_token=False)
    r = status_report(job)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    st = r["states"]
    c = r["credits"]
    lines = [f"{r['job']}  ({r['db']})"]
    for s in STATES:
        extra = f"   (reused {r['reused']})" if s == "done" and r["reused"] else ""
        lines.append(f"  {s:<9}{st[s]:>8}{extra}")
    lines.append(f"  {'missing':<9}{r['missing']:>8}   (no longer listed by the sources)")
    credit_line = f"  credits recorded {c['recorded']}, saved by reuse {c['saved_by_reuse']}"
    if r.get("limits"):
        lines.append("  limits: " + _limits_text(r["limits"]))
    if c["last_run_account_difference"] is not None:
        credit_line += (f"; last run: recorded {c['last_run_recorded']}, account counter "
                        f"moved {c['last_run_account_difference']}")
        if c["last_run_account_gap"]:
            credit_line += (f" ({c['last_run_account_gap']:+d} against what was recorded: "
                            "see the run's warning)")
    lines.append(credit_line)
    unanswered = r["possibly_billed_without_answer"]
    if unanswered:
        keys = sorted({k for u in unanswered for k in u["keys"]})
        lines.append(f"  possibly billed without an answer recorded: {len(keys)} image(s) in "
                     f"{len(unanswered)} request(s) of ended runs, not answered since (the next "
                     "run sends them):")
        lines.extend(f"    {k}" for k in keys[:20])
        if len(keys) > 20:
            lines.append(f"    ... and {len(keys) - 20} more (status --json lists all)")
    rs = r["resends"]
    if rs["images_sent_more_than_once"] or rs["requests_without_answer"]:
        # History, not a warning: what may have been billed twice, over the job's life.
        lines.append(f"  history: {rs['images_sent_more_than_once']} image(s) sent more than "
                     f"once ({rs['extra_sends']} extra send(s), each possibly billed); "
                     f"{rs['requests_without_answer']} request(s) of ended runs never had "
                     "their answer recorded")
    if r["runs"]:
        lines.append("recent runs:")
        for run_ in r["runs"]:
            lines.append(
                f"  #{run_['id']:<4} {run_['started_at']}  {run_['status']:<22} exit "
                f"{'-' if run_['exit_code'] is None else run_['exit_code']:<3} "
                f"sent {run_['sent']}, done {run_['done']}, failed {run_['failed']}, "
                f"rejected {run_['rejected']}, credits {run_['credits']}")
    click.echo("\n".join(lines))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of stdout.")
@click.option("--state", type=click.Choice(list(STATES)), help="Only images in this state.")
@_library_errors
def export(job_file: str, fmt: str, output: str | None, state: str | None) -> None:
    """One row per image: key, state, reason, credits, and the API's result."""
    from runner.report import EXPORT_FIELDS, export_rows

    job = _load(job_file, require_token=False)
    rows = export_rows(job, state)
    fh = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if fmt == "jsonl":
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            w = csv.DictWriter(fh, fieldnames=EXPORT_FIELDS)
            w.writeheader()
            for row in rows:
                row["result"] = json.dumps(row["result"]) if row["result"] is not None else ""
                w.writerow(row)
    finally:
        if output:
            fh.close()


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--reason", help="Only failed images whose reason contains this text.")
@_library_errors
def retry(job_file: str, reason: str | None) -> None:
    """Put failed images back to pending; the next `run` sends them again."""
    from runner.report import retry_failed

    job = _load(job_file, require_token=False)
    n = retry_failed(job, reason)
    click.echo(f"ximrun: {n} failed image(s) back to pending; `ximrun run` sends them again")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              default="report.html", show_default=True, help="The HTML file to write.")
@click.option("--sample", type=click.IntRange(min=0), default=300, show_default=True,
              help="How many done images to show (a fixed spread over the job).")
@click.option("--state", type=click.Choice(list(STATES)),
              help="Only this state's images (default: failed, rejected and a done sample).")
@_library_errors
def report(job_file: str, output: str, sample: int, state: str | None) -> None:
    """One self-contained HTML page: totals, runs, failures by reason, done images with answers."""
    from runner.html_report import write_report

    job = _load(job_file, require_token=False)
    stats = write_report(job, output, sample=sample, state=state)
    click.echo(f"ximrun: report written to {output} ({stats.bytes / 1e6:.1f} MB, "
               f"{stats.images_shown} image(s) shown, {stats.thumbnails} thumbnail(s)) in "
               f"{stats.seconds:.1f}s", err=True)


# --- check / sandbox ---------------------------------------------------------------------------

def _check_names(files: tuple[str, ...], job: Job | None) -> Any:
    """The files to check: each name as given, a folder (local or any fsspec URL) as the files
    the job's listing would find in it (recursive, include/exclude, hidden entries skipped)."""
    import fsspec

    from runner.job import SourceConfig
    from runner.sources import list_items

    for name in files:
        try:
            fs, path = fsspec.core.url_to_fs(name, **(dict(job.source.storage_options)
                                                      if job and "://" in name else {}))
            folder = fs.isdir(path)
        except Exception:  # noqa: BLE001 -- not listable: read it as a file, and say why not
            folder = False
        if not folder:
            yield name
            continue
        root = name if "://" in name else os.path.abspath(name)
        src = SourceConfig(paths=(root,))
        if job is not None:
            src = dataclasses.replace(src, recursive=job.source.recursive,
                                      include=job.source.include, exclude=job.source.exclude,
                                      storage_options=job.source.storage_options)
        found = False
        try:
            for item in list_items(src):
                found = True
                yield item.uri
        except RunnerError as exc:
            log.warning("%s: %s", name, exc)
            yield name
            continue
        if not found:
            log.warning("%s: no file to check in this folder", name)


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--job", "job_file", type=click.Path(dir_okay=False),
              help="Use this job's [images] policy (max_side, transcode), and for a folder its "
                   "[source] recursive, include and exclude.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def check(files: tuple[str, ...], job_file: str | None, as_json: bool) -> None:
    """Say what the format policy does with each file: accept, convert, or reject and why.
    A folder is checked file by file, as a job's listing finds them.

    Exits 1 if any file would be rejected.
    """
    import fsspec

    from runner.images import check_bytes

    _setup_logging(0, False)
    job = _load(job_file, require_token=False) if job_file else None
    policy = job.images if job else ImagePolicy()
    any_rejected = False
    for name in _check_names(files, job):
        try:
            with fsspec.open(name, "rb") as fh:
                data = fh.read()
        except (OSError, ValueError) as exc:
            verdict_d = {"file": name, "action": "reject", "format": None,
                         "reason": f"unreadable: {exc.__class__.__name__}: {exc}"}
        else:
            v = check_bytes(data, policy)
            verdict_d = {"file": name, "action": v.action, "format": v.format, "reason": v.reason}
        any_rejected |= verdict_d["action"] == "reject"
        if as_json:
            click.echo(json.dumps(verdict_d))
        else:
            reason = f"  {verdict_d['reason']}" if verdict_d["reason"] else ""
            click.echo(f"{verdict_d['action']:<8}{verdict_d['format'] or '-':<6}{name}{reason}")
    sys.exit(ExitCode.FAILURES if any_rejected else ExitCode.OK)


SANDBOX_HELP = {
    "latency_ms": "Time from each request to its answer, the emulator's own work included.",
    "jitter_ms": "Extra random delay, up to this much.",
    "p429": "Probability of a 429 with Retry-After.",
    "retry_after_s": "The Retry-After of those 429s.",
    "p500": "Probability of a 500 (nothing processed).",
    "p502": "Probability of a proxy's 502 with an HTML body.",
    "pdrop": "Probability that a processed, billed request's answer is lost (connection dropped).",
    "prefuse": "Share of image contents refused per record (400), always the same ones.",
    "precord_retry": "Probability of a retryable per-record 500/503.",
    "rate_limit_rps": "Requests per second before 429s (0: no limit).",
    "credits": "The account's credit limit.",
    "credits_per_record": "What one answered record costs.",
    "max_records": "Records per request at most.",
    "max_image_bytes": "Larger images get a per-record 413 (0: no limit).",
    "token": "The only token accepted (default: any).",
    "seed": "Seed of the random faults, so a run can be replayed.",
}


def _sandbox_options(f: Any) -> Any:
    """One --flag per SandboxSettings field, so the CLI and the [sandbox] table never drift."""
    for fld in reversed(dataclasses.fields(SandboxSettings)):
        opt = "--" + fld.name.replace("_", "-")
        kind = {"float": float, "int": int}.get(str(fld.type), str)
        f = click.option(opt, fld.name, type=kind, default=fld.default, show_default=True,
                         help=SANDBOX_HELP.get(fld.name))(f)
    return f


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", "-p", type=int, default=8765, show_default=True)
@_sandbox_options
def sandbox(host: str, port: int, **settings: Any) -> None:
    """Serve the local API emulator (for demos, tests and trying jobs offline)."""
    from runner.sandbox import serve

    if settings.get("token") in ("", "None"):
        settings["token"] = None
    cfg = SandboxSettings(**settings)
    try:
        validate_sandbox(cfg)
    except JobError as exc:
        _fail(str(exc), ExitCode.USAGE)
    serve(cfg, host, port)


# --- demo --------------------------------------------------------------------------------------

@main.command()
@click.argument("folder", required=False, default="ximrun-demo",
                type=click.Path(file_okay=False))
@click.pass_context
def demo(ctx: click.Context, folder: str) -> None:
    """Write the demo job and sample images into FOLDER (default: ./ximrun-demo), then run it.

    The job uses the embedded API emulator: no source checkout, token or network. A FOLDER that
    is not empty must hold an earlier demo (exit 2 otherwise); running that again sends nothing.
    Exit codes are those of `run`.
    """
    import shlex

    from runner.demo import write_demo

    try:
        job_file, written = write_demo(Path(folder))
    except OSError as exc:
        _fail(f"demo refused: {exc}", ExitCode.USAGE)
        return
    if written:
        click.echo(f"ximrun demo: wrote the demo job and sample images ({written} file(s)) "
                   f"to {folder}")
    else:
        click.echo(f"ximrun demo: {folder} holds the demo already; running it again")
    try:
        ctx.invoke(run, job_file=str(job_file))
        code: Any = ExitCode.OK
    except SystemExit as exc:
        code = exc.code
    q_job, q_folder = shlex.quote(str(job_file)), shlex.quote(folder)
    click.echo(f"ximrun demo: run it again: ximrun run {q_job}   (or: ximrun demo {q_folder})\n"
               f"             inspect it:   ximrun status {q_job}   (also: plan, export)")
    sys.exit(code)


def _envvars(group: click.Group) -> None:
    """Each option's variable is named after its long flag (`run --json`: XIMRUN_RUN_JSON, where
    click's automatic name would follow the parameter, XIMRUN_RUN_AS_JSON); `--help` shows it."""
    for name, cmd in group.commands.items():
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.is_eager:
                flag = next((o for o in param.opts if o.startswith("--")), None)
                if flag:
                    param.envvar = (f"{ENVVAR_PREFIX}_{name}_{flag[2:]}".upper()
                                    .replace("-", "_"))
                param.show_envvar = True


_envvars(main)


def entry(early_stop: threading.Event | None = None) -> None:
    """The console script: every RunnerError that escaped becomes a message, never a traceback.
    `early_stop` is set by a signal that came before the commands could handle it."""
    global _early_stop
    _early_stop = early_stop
    try:
        main(auto_envvar_prefix=ENVVAR_PREFIX)
    except RunnerError as exc:
        _fail(str(exc), exc.exit_code)


if __name__ == "__main__":
    entry()
