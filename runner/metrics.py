"""The run's metrics for monitoring: node_exporter's textfile-collector format, written atomically.

`ximrun run --metrics-file PATH` (or `[monitoring] metrics_file`) writes this at the end of every
run, whatever its exit code, so that a cron job's health is one alert rule away: the last run's
start, end, duration and exit code, the job's images by state, what this run sent, reused and
recorded, the job's credits in total, the images possibly billed without an answer, and the
account's counter when the API reports it. Names follow Prometheus' conventions (`ximrun_`
prefix, `_total` for counters, `_seconds` for times, a `job` label).

The file is written to a temporary file in the same folder, then renamed over the target, so the
collector never reads half a file. `write_metrics` raises OSError when it cannot write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runner.records import STATES

# (name, type, help); the values come from metric_values().
METRICS: tuple[tuple[str, str, str], ...] = (
    ("ximrun_last_run_start_timestamp_seconds", "gauge",
     "When the last run started, in seconds since the epoch."),
    ("ximrun_last_run_end_timestamp_seconds", "gauge",
     "When the last run ended, in seconds since the epoch."),
    ("ximrun_last_run_duration_seconds", "gauge", "How long the last run took."),
    ("ximrun_last_run_exit_code", "gauge",
     "The last run's exit code (0 ok, 1 failures, 3 stopped by budget or limit, 4 interrupted, "
     "5 token refused, 75 locked; see the contract)."),
    ("ximrun_images", "gauge", "The job's images by state, after the last run."),
    ("ximrun_images_missing", "gauge", "Known images the sources no longer list."),
    ("ximrun_last_run_images_listed", "gauge", "Images the last run listed."),
    ("ximrun_last_run_images_sent", "gauge", "Images the last run's requests settled."),
    ("ximrun_last_run_images_reused", "gauge", "Images the last run answered without sending."),
    ("ximrun_last_run_images_failed", "gauge", "Images that became failed in the last run."),
    ("ximrun_last_run_images_rejected", "gauge", "Images the format policy refused in the last run."),
    ("ximrun_last_run_requests", "gauge", "HTTP requests the last run sent."),
    ("ximrun_last_run_credits", "gauge", "Credits the last run recorded."),
    ("ximrun_credits_recorded_total", "counter", "Credits the job recorded over its life."),
    ("ximrun_credits_saved_total", "counter", "Credits the job saved by reusing answers."),
    ("ximrun_images_possibly_billed_without_answer", "gauge",
     "Images in requests of ended runs that may have been billed without an answer recorded."),
    ("ximrun_account_credits_counter", "gauge",
     "The account's credits_counter after the last run, when the API reports it."),
    ("ximrun_account_credits_remaining", "gauge",
     "The account's credits_limit minus credits_counter after the last run, when the API "
     "reports both."),
)


def metric_values(job: str, *, started: float, ended: float, exit_code: int,
                  summary: Any | None, status: dict[str, Any] | None
                  ) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every metric known: those of the summary only if the run got
    that far, those of the database only if it could be read."""
    base = {"job": job}
    out: list[tuple[str, dict[str, str], float]] = [
        ("ximrun_last_run_start_timestamp_seconds", base, started),
        ("ximrun_last_run_end_timestamp_seconds", base, ended),
        ("ximrun_last_run_duration_seconds", base, max(ended - started, 0.0)),
        ("ximrun_last_run_exit_code", base, int(exit_code)),
    ]
    if status is not None:
        for state in STATES:
            out.append(("ximrun_images", {**base, "state": state}, status["states"][state]))
        out.append(("ximrun_images_missing", base, status["missing"]))
    if summary is not None:
        for name, attr in (("listed", "listed"), ("sent", "sent"), ("reused", "reused"),
                           ("failed", "failed"), ("rejected", "rejected")):
            out.append((f"ximrun_last_run_images_{name}", base, getattr(summary, attr)))
        out.append(("ximrun_last_run_requests", base, summary.requests))
        out.append(("ximrun_last_run_credits", base, summary.credits))
    if status is not None:
        credits = status["credits"]
        out.append(("ximrun_credits_recorded_total", base, credits["recorded"]))
        out.append(("ximrun_credits_saved_total", base, credits["saved_by_reuse"]))
        keys = {k for u in status["possibly_billed_without_answer"] for k in u["keys"]}
        out.append(("ximrun_images_possibly_billed_without_answer", base, len(keys)))
    account = getattr(summary, "account_after", None) if summary is not None else None
    if account is not None:
        out.append(("ximrun_account_credits_counter", base, account))
        limit = getattr(summary, "account_limit", None)
        if limit is not None:
            out.append(("ximrun_account_credits_remaining", base, limit - account))
    return out


def render(values: Iterable[tuple[str, dict[str, str], float]]) -> str:
    """The text exposition format: HELP and TYPE once per metric, then its samples."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in values:
        by_name.setdefault(name, []).append((labels, value))
    lines: list[str] = []
    for name, kind, help_text in METRICS:
        samples = by_name.get(name)
        if not samples:
            continue
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def write_metrics(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` atomically: a temporary file in the same folder, then rename
    (node_exporter skips the temporary file: its name does not end in `.prom`)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # the collector may run as another user
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_run_metrics(path: str | os.PathLike[str], job: Any, *, started: float, ended: float,
                      exit_code: int, summary: Any | None) -> None:
    """The metrics of a run that ended (summary None when it ended before it had one): the
    database's figures are read afresh, and left out when it cannot be read."""
    status: dict[str, Any] | None = None
    if job.db_path.exists():
        try:
            from runner.report import status_report

            status = status_report(job)
        except Exception:  # noqa: BLE001 -- a database that cannot be read: the run's own figures
            status = None
    text = render(metric_values(job.name, started=started, ended=ended, exit_code=exit_code,
                                summary=summary, status=status))
    write_metrics(path, text)
