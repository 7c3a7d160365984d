"""The `ximrun` command line: parse arguments, call the library, print, map errors to exit codes."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.errors import AuthError, JobError, LockedError, RunnerError, SourceError
from runner.job import ImagePolicy, Job, SandboxSettings, load_job, validate_sandbox
from runner.records import STATES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED, EXIT_AUTH = 0, 1, 2, 3, 4, 5
EXIT_LOCKED = 75
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
        _fail(f"job file refused: {exc}", EXIT_USAGE)
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
        sys.exit(130)


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
            os._exit(130)  # the crash guarantees apply: committed batches are safe
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
    from runner.pipeline import RunOptions, run_job

    progress = _Progress(enabled=not quiet)
    try:
        summary = run_job(job, RunOptions(limit=limit, budget=budget), stop=stop,
                          progress=progress)
    except LockedError as exc:
        _fail(str(exc), EXIT_LOCKED)
        return
    except AuthError as exc:
        _fail(str(exc), EXIT_AUTH)
        return
    except JobError as exc:
        _fail(f"job refused: {exc}", EXIT_USAGE)
        return
    except SourceError as exc:
        _fail(f"source refused: {exc}", EXIT_USAGE)
        return
    finally:
        progress.close()
    _print_summary(summary, as_json)
    sys.exit(summary.exit_code)


def _plan(job_file: str, as_json: bool) -> None:
    job = _load(job_file, require_token=False)
    from runner.pipeline import plan_job

    try:
        s = plan_job(job)
    except SourceError as exc:
        _fail(f"source refused: {exc}", EXIT_USAGE)
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

def _open_store(job: Job) -> Any:
    from runner.store import open_readonly

    if not job.db_path.exists():
        _fail(f"no state database yet at {job.db_path} (nothing has run)", EXIT_FAILED)
    return open_readonly(job.db_path)


def _shown_path(path: Path) -> str:
    """Relative to the working directory when below it: shorter, and the same on every machine."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _live_run(latest: list[dict[str, Any]]) -> int | None:
    """The id of the job's run that is going right now, if its process is alive."""
    if not latest or latest[0]["status"] != "running" or not latest[0]["pid"]:
        return None
    try:
        os.kill(latest[0]["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return int(latest[0]["id"])


def status_report(job: Job) -> dict[str, Any]:
    """The figures `ximrun status` shows; also usable from Python."""
    store = _open_store(job)
    with store:
        counts = store.counts(job.name)
        runs = store.recent_runs(job.name, 5)
        live = _live_run(store.recent_runs(job.name, 1))
        # The requests of a run still going are in flight, not lost: they are not listed.
        unanswered = store.unanswered(job.name, running_run=live)
        resends = store.resend_stats(job.name)
        spent = store.spent(job.name)
        saved = sum(r["credits_saved"] or 0 for r in store.recent_runs(job.name, 10_000))
    last = runs[0] if runs else None
    account_diff = None
    if last and last["account_before"] is not None and last["account_after"] is not None:
        account_diff = last["account_after"] - last["account_before"]
    report = {
        "job": job.name,
        "db": _shown_path(job.db_path),
        "states": {s: counts[s] for s in STATES},
        "missing": counts["missing"],
        "reused": counts["reused"],
        "credits": {"recorded": spent, "saved_by_reuse": saved,
                    "last_run_recorded": last["credits"] if last else 0,
                    "last_run_account_difference": account_diff},
        "possibly_billed_without_answer": [
            {"run": u["run"], "batch": u["batch"], "attempt": u["attempt"],
             "sent_at": u["sent_at"], "keys": u["keys"]} for u in unanswered],
        "resends": resends,
        "runs": [{k: r[k] for k in ("id", "started_at", "finished_at", "status", "exit_code",
                                    "listed", "sent", "done", "failed", "rejected", "reused",
                                    "requests", "credits", "account_before", "account_after")}
                 for r in runs],
    }
    for r in report["runs"]:
        if r["status"] == "running" and r["id"] != live:
            r["status"] = "crashed"  # its process is gone; the next run records it so too
    return report


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def status(job_file: str, as_json: bool) -> None:
    """Counts per state, credits spent, recent runs; works while a run is going."""
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


EXPORT_FIELDS = ("key", "state", "reason", "credits", "reused_from", "content_hash",
                 "fingerprint", "sends", "missing", "answered_at", "result")


def _export_rows(job: Job, state: str | None) -> Iterator[dict[str, Any]]:
    store = _open_store(job)
    with store:
        for row in store.export_rows(job.name, state):
            yield {k: row[k] for k in EXPORT_FIELDS}


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of stdout.")
@click.option("--state", type=click.Choice(list(STATES)), help="Only images in this state.")
def export(job_file: str, fmt: str, output: str | None, state: str | None) -> None:
    """One row per image: key, state, reason, credits, and the API's result."""
    job = _load(job_file, require_token=False)
    rows = _export_rows(job, state)
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
def retry(job_file: str, reason: str | None) -> None:
    """Put failed images back to pending; the next `run` sends them again."""
    from runner.store import Store

    job = _load(job_file, require_token=False)
    if not job.db_path.exists():
        _fail(f"no state database yet at {job.db_path} (nothing has run)", EXIT_FAILED)
    with Store(job.db_path) as store:
        n = store.retry_failed(job.name, reason)
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
    import fsspec

    from runner.images import check_bytes

    policy = _load(job_file, require_token=False).images if job_file else ImagePolicy()
    any_rejected = False
    for name in files:
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
    sys.exit(EXIT_FAILED if any_rejected else EXIT_OK)


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
        _fail(str(exc), EXIT_USAGE)
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
        _fail(f"demo refused: {exc}", EXIT_USAGE)
        return
    if written:
        click.echo(f"ximrun demo: wrote the demo job and sample images ({written} file(s)) "
                   f"to {folder}")
    else:
        click.echo(f"ximrun demo: {folder} holds the demo already; running it again")
    try:
        ctx.invoke(run, job_file=str(job_file))
        code: Any = EXIT_OK
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
        _fail(str(exc), EXIT_USAGE)


if __name__ == "__main__":
    entry()
