"""`ximrun status`, `export`, `retry` and `report`: what a job's state database holds."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from runner.cli.common import library_errors, limits_text, load, main
from runner.records import STATES


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@library_errors
def status(job_file: str, as_json: bool) -> None:
    """Counts per state, credits spent, recent runs; works while a run is going."""
    from runner.report import status_report

    job = load(job_file, require_token=False)
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
        lines.append("  limits: " + limits_text(r["limits"]))
    if c["last_run_account_difference"] is not None:
        credit_line += (f"; last run: recorded {c['last_run_recorded']}, account counter "
                        f"moved {c['last_run_account_difference']}")
        if c["last_run_account_gap"]:
            credit_line += (f" ({c['last_run_account_gap']:+d} against what was recorded: "
                            "see the run's warning)")
    lines.append(credit_line)
    skipped = r["manifest_rows_skipped"]
    if skipped["count"]:
        lines.append(f"  manifest rows skipped by the last run: {skipped['count']}, first at "
                     f"{skipped['first']} (they have no row)")
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


def _field_paths(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    from runner.report import FieldPath

    try:
        return tuple(FieldPath.parse(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from runner.report import parse_since

    try:
        return None if value is None else parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl",
              show_default=True, help="parquet needs the `parquet` extra (pyarrow) and -o.")
@click.option("-o", "--output", help="Write to this file or fsspec URL (s3://bucket/x.parquet) "
              "instead of stdout; it appears only once complete.")
@click.option("--state", type=click.Choice(list(STATES)), help="Only images in this state.")
@click.option("--run", "run_id", type=click.IntRange(min=1),
              help="Only images whose outcome run N recorded.")
@click.option("--since", callback=_since,
              help="Only images answered at or after this time (ISO 8601, UTC by default).")
@click.option("--field", "fields", multiple=True, callback=_field_paths, metavar="NAME=PATH",
              help="A column NAME with the value at PATH in the API's record "
              "(dotted, integers index lists); repeatable.")
@library_errors
def export(job_file: str, fmt: str, output: str | None, state: str | None,
           run_id: int | None, since: str | None, fields: tuple[Any, ...]) -> None:
    """One row per image: key, source, manifest columns, state, credits, the API's record."""
    from runner.export import write_export
    from runner.report import open_export

    job = load(job_file, require_token=False)
    exported = open_export(job, state, run=run_id, since=since, fields=fields)
    write_export(exported, fmt, output, job.source, stdout=sys.stdout)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--reason", help="Only failed images whose reason contains this text.")
@library_errors
def retry(job_file: str, reason: str | None) -> None:
    """Put failed images back to pending; the next `run` sends them again."""
    from runner.report import retry_failed

    job = load(job_file, require_token=False)
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
@library_errors
def report(job_file: str, output: str, sample: int, state: str | None) -> None:
    """One self-contained HTML page: totals, runs, failures by reason, done images with answers."""
    from runner.html_report import write_report

    job = load(job_file, require_token=False)
    stats = write_report(job, output, sample=sample, state=state)
    click.echo(f"ximrun: report written to {output} ({stats.bytes / 1e6:.1f} MB, "
               f"{stats.images_shown} image(s) shown, {stats.thumbnails} thumbnail(s)) in "
               f"{stats.seconds:.1f}s", err=True)
