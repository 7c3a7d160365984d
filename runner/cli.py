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

LOG_EVERY_S = float(os.environ.get("XIMRUN_LOG_EVERY_S", "30"))

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    """A tqdm bar on a terminal; under cron, a plain line every LOG_EVERY_S seconds instead."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.last_line = time.monotonic()
        self.started = time.monotonic()
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="img", file=sys.stderr, dynamic_ncols=True,
                            desc="ximrun")

    def __call__(self, s: Any) -> None:
        if not self.enabled:
            return
        settled = s.done + s.failed + s.rejected
        todo = s.new + s.changed + s.changed_request + s.resumed + s.retried
        if self.bar is not None:
            if self.bar.total != todo:
                self.bar.total = todo
            self.bar.n = settled
            self.bar.set_postfix(done=s.done, failed=s.failed, rejected=s.rejected,
                                 credits=s.credits, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            rate = settled / max(now - self.started, 1e-9)
            log.info("progress: %d/%d settled (done %d, failed %d, rejected %d), %.1f img/s, "
                     "credits %d", settled, todo, s.done, s.failed, s.rejected, rate, s.credits)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _install_signals(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: stop taking batches, finish those in flight. Second: leave at once."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
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
    if s.budget:
        line += f", budget {s.budget}"
    if s.account_before is not None and s.account_after is not None:
        line += (f"; account counter {s.account_before} -> {s.account_after} "
                 f"(difference {s.account_after - s.account_before})")
    out.append(line)
    if s.pending:
        out.append(f"  pending {s.pending}: the next run continues")
    if s.missing:
        out.append(f"  missing {s.missing}: known images no longer listed by the sources")
    if s.skipped_rows:
        out.append(f"  skipped {s.skipped_rows} manifest row(s); see the log above")
    if s.message:
        out.append(f"  {s.message}")
    click.echo("\n".join(out))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Stop after N images (exit 3).")
@click.option("--budget", type=click.IntRange(min=0), help="Override the job's credit budget.")
@click.option("--dry-run", is_flag=True, help="Same as `ximrun plan`: nothing is sent.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--dask", "dask_address", help="Run on this Dask scheduler (tcp://host:8786).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the summary.")
@click.option("-v", "--verbose", count=True, help="More log lines (-vv: debug).")
def run(job_file: str, limit: int | None, budget: int | None, dry_run: bool, as_json: bool,
        dask_address: str | None, quiet: bool, verbose: int) -> None:
    """List, check and send new or changed images; record every answer. Resumes by design."""
    _setup_logging(verbose, quiet)
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
    from runner.executors import run_job
    from runner.summary import RunOptions

    progress = _Progress(enabled=not quiet)
    try:
        summary = run_job(job, RunOptions(limit=limit, budget=budget), stop=stop,
                          progress=progress)
    except RunnerError as exc:
        _fail(_message(exc), exc.exit_code)
        return
    finally:
        progress.close()
    _print_summary(summary, as_json)
    sys.exit(summary.exit_code)


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
        + (f"; budget {s.budget}" if s.budget else ""))


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
    if c["last_run_account_difference"] is not None:
        credit_line += (f"; last run: recorded {c['last_run_recorded']}, account counter "
                        f"moved {c['last_run_account_difference']}")
    lines.append(credit_line)
    rs = r["resends"]
    if rs["images_sent_more_than_once"]:
        lines.append(f"  sent more than once: {rs['images_sent_more_than_once']} image(s), "
                     f"{rs['extra_sends']} extra send(s) (retries of requests whose answer was "
                     "lost may have been billed)")
    unanswered = r["possibly_billed_without_answer"]
    if unanswered:
        keys = sorted({k for u in unanswered for k in u["keys"]})
        lines.append(f"  possibly billed without an answer recorded: {len(keys)} image(s) in "
                     f"{len(unanswered)} request(s) of interrupted runs:")
        lines.extend(f"    {k}" for k in keys[:20])
        if len(keys) > 20:
            lines.append(f"    ... and {len(keys) - 20} more (status --json lists all)")
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


# --- check / sandbox ---------------------------------------------------------------------------

@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--job", "job_file", type=click.Path(dir_okay=False),
              help="Use this job's [images] policy (max_side, transcode).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def check(files: tuple[str, ...], job_file: str | None, as_json: bool) -> None:
    """Say what the format policy does with each file: accept, convert, or reject and why.

    Exits 1 if any file would be rejected.
    """
    from runner.errors import ReadError
    from runner.images import check_bytes
    from runner.job import SourceConfig
    from runner.records import Item
    from runner.storage import read_bytes

    policy = _load(job_file, require_token=False).images if job_file else ImagePolicy()
    any_rejected = False
    for name in files:
        try:
            # The run's own reading rules: regular files only, never past images.max_bytes.
            data = read_bytes(Item(name, name, None, ""), SourceConfig(), limit=policy.max_bytes)
        except ReadError as exc:
            verdict_d = {"file": name, "action": "reject", "format": None,
                         "reason": f"unreadable: {exc}"}
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
    "token": "The only token accepted (default: any). Better from the environment variable "
             "XIMRUN_SANDBOX_TOKEN: a command line shows in ps.",
    "seed": "Seed of the random faults, so a run can be replayed.",
}


def _sandbox_options(f: Any) -> Any:
    """One --flag per SandboxSettings field, so the CLI and the [sandbox] table never drift."""
    for fld in reversed(dataclasses.fields(SandboxSettings)):
        opt = "--" + fld.name.replace("_", "-")
        kind = {"float": float, "int": int}.get(str(fld.type), str)
        # The token is a secret: a command line is visible to every user in `ps`.
        env = {"envvar": "XIMRUN_SANDBOX_TOKEN", "show_envvar": True} if fld.name == "token" \
            else {}
        f = click.option(opt, fld.name, type=kind, default=fld.default, show_default=True,
                         help=SANDBOX_HELP.get(fld.name), **env)(f)
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


def entry(early_stop: threading.Event | None = None) -> None:
    """The console script: every RunnerError that escaped becomes a message, never a traceback.
    `early_stop` is set by a signal that came before the commands could handle it."""
    global _early_stop
    _early_stop = early_stop
    try:
        main()
    except RunnerError as exc:
        _fail(str(exc), exc.exit_code)


if __name__ == "__main__":
    entry()
