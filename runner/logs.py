"""Where the `ximrun` logger's lines go for operators: `--log-file PATH` and `--log-format
text|json`.

The command line installs its stderr handler first (runner/cli/common.py); `configure` then adds the
log file (with at least the info lines, even under `-q`) or, without a file, switches stderr to
the chosen format. JSON lines carry `time`, `level`, `logger`, `message` and every structured
field a call passed in `extra=` (the progress line's counts, the run's summary, ...).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

LOGGER = "ximrun"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_DATEFMT = "%Y-%m-%d %H:%M:%S"
# The logger of the run's end: one line with the summary's fields, meant for the log file (the
# summary is printed on stdout already, so stderr leaves it out).
SUMMARY_LOGGER = "ximrun.summary"

# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC, milliseconds), level, logger, message, the
    record's structured fields, and the exception's text if any."""

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{ms:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _NotSummary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != SUMMARY_LOGGER


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT)


def configure(log_file: str | os.PathLike[str] | None = None, log_format: str = "text") -> None:
    """Add the log file, or set stderr's format, on the `ximrun` logger set up by the command
    line. The file is opened for appending (logrotate's copytruncate works; so does a rename,
    from the next run on). Raises OSError when the file cannot be opened."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    root = logging.getLogger(LOGGER)
    level = root.level or logging.INFO
    for h in root.handlers:
        if getattr(h, "_ximrun_file", False):
            root.removeHandler(h)
            h.close()
            continue
        # The handlers installed before keep the level the logger had (-q, -v).
        if h.level == logging.NOTSET:
            h.setLevel(level)
        if not any(isinstance(f, _NotSummary) for f in h.filters):
            h.addFilter(_NotSummary())
        if log_file is None:
            h.setFormatter(formatter(log_format))
    if log_file is not None:
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        fh._ximrun_file = True  # type: ignore[attr-defined]
        file_level = min(level, logging.INFO)
        fh.setLevel(file_level)
        fh.setFormatter(formatter(log_format))
        root.addHandler(fh)
        root.setLevel(min(level, file_level))


def close() -> None:
    """Close the log file (the end of a command run in-process, as in tests)."""
    root = logging.getLogger(LOGGER)
    for h in list(root.handlers):
        if getattr(h, "_ximrun_file", False):
            root.removeHandler(h)
            h.close()
