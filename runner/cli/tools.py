"""`ximrun check`, `sandbox` and `demo`: the format policy, the emulator, and a first run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from runner.cli.common import fail, load, main, setup_logging
from runner.cli.run import run as run_command
from runner.errors import ExitCode, JobError, RunnerError
from runner.job import ImagePolicy, Job, SandboxSettings, SourceConfig, validate_sandbox

log = logging.getLogger("ximrun")



def _check_names(files: tuple[str, ...], job: Job | None) -> Any:
    """The files to check: each name as given, a folder (local or any fsspec URL) as the files
    the job's listing would find in it (recursive, include/exclude, hidden entries skipped)."""
    import fsspec

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
    from runner.errors import ReadError
    from runner.images import check_bytes
    from runner.records import Item
    from runner.storage import read_bytes

    setup_logging(0, False)
    job = load(job_file, require_token=False) if job_file else None
    policy = job.images if job else ImagePolicy()
    source = job.source if job else SourceConfig()
    any_rejected = False
    for name in _check_names(files, job):
        try:
            # The run's own reading rules: regular files only, never past images.max_bytes.
            data = read_bytes(Item(name, name, None, ""), source, limit=policy.max_bytes)
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
        fail(str(exc), ExitCode.USAGE)
    serve(cfg, host, port)



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
        fail(f"demo refused: {exc}", ExitCode.USAGE)
        return
    if written:
        click.echo(f"ximrun demo: wrote the demo job and sample images ({written} file(s)) "
                   f"to {folder}")
    else:
        click.echo(f"ximrun demo: {folder} holds the demo already; running it again")
    try:
        ctx.invoke(run_command, job_file=str(job_file))
        code: Any = ExitCode.OK
    except SystemExit as exc:
        code = exc.code
    q_job, q_folder = shlex.quote(str(job_file)), shlex.quote(folder)
    click.echo(f"ximrun demo: run it again: ximrun run {q_job}   (or: ximrun demo {q_folder})\n"
               f"             inspect it:   ximrun status {q_job}   (also: plan, export)")
    sys.exit(code)
