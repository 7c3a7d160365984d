"""Writing an export (`ximrun export`): JSON lines, CSV or Parquet, to stdout, a local file or any
fsspec URL, streamed a batch of rows at a time and never left half-written under its name.

The rows and their columns are report.py's (`open_export`); this module only encodes and
writes them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from runner.errors import ExportError, brief
from runner.job import SourceConfig
from runner.report import Export
from runner.storage import fs_for, is_local, local_path

FORMATS = ("jsonl", "csv", "parquet")
# OWASP's CSV injection advice: a cell a spreadsheet would read as a formula gets a leading
# single quote, so it is shown as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PARQUET_BATCH = 2048  # rows per row group (bench/bench_export.py: 8192 took 60 MB more)
INT_COLUMNS = frozenset({"credits", "sends", "run"})
BOOL_COLUMNS = frozenset({"missing"})

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def neutralise(cell: str) -> str:
    """A CSV cell as text a spreadsheet does not evaluate."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def _text(value: Any) -> str | None:
    """A value as one text cell: strings as they are, other JSON values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return _compact(value)


def write_export(export: Export, fmt: str, output: str | None, source: SourceConfig,
                 stdout: IO[str] | None = None) -> int:
    """Write every row; returns how many. `output`: None for stdout (not for parquet), a local
    path (written under a temporary name in the same folder, then renamed over it) or an fsspec
    URL (written to a temporary object, then moved to its name). ExportError for a folder that
    does not exist, parquet without pyarrow or without -o."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        _require_pyarrow()
    if output is None:
        if fmt == "parquet":
            raise ExportError("--format parquet writes a file: give -o FILE (or a URL)")
        assert stdout is not None
        return _write_text(export, fmt, stdout)
    with _atomic(output, source) as fh:
        if fmt == "parquet":
            return _write_parquet(export, fh)
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=False)
        try:
            return _write_text(export, fmt, text)
        finally:
            text.flush()
            text.detach()


def _write_text(export: Export, fmt: str, fh: IO[str]) -> int:
    n = 0
    if fmt == "jsonl":
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        for row in export.rows:
            fh.write(dumps(row))
            fh.write("\n")
            n += 1
        return n
    w = csv.writer(fh)
    w.writerow([neutralise(c) for c in export.columns])
    for row in export.rows:
        cells = []
        for value in row.values():
            if isinstance(value, str):
                cells.append(neutralise(value))
            elif value is None:
                cells.append("")
            elif isinstance(value, dict | list):
                cells.append(_compact(value))
            else:
                cells.append(value)
        w.writerow(cells)
        n += 1
    return n


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ExportError("--format parquet needs pyarrow, the optional `parquet` extra: "
                          "pip install 'ximrun[parquet]'") from None


def _write_parquet(export: Export, fh: IO[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(c: str) -> Any:
        return pa.int64() if c in INT_COLUMNS else pa.bool_() if c in BOOL_COLUMNS else pa.string()

    columns = export.columns
    schema = pa.schema([(c, kind(c)) for c in columns])
    convert: list[Callable[[Any], Any]] = [
        (lambda v: v) if c in INT_COLUMNS or c in BOOL_COLUMNS else _text for c in columns]
    n = 0
    # Small row groups keep the memory flat (a batch of parsed records is what costs); the
    # records' text gets no min/max statistics, which the file's footer would hold per group.
    with pq.ParquetWriter(fh, schema, compression="zstd",
                          write_statistics=[c for c in columns if c != "result"]) as writer:
        for batch in _batches(export.rows, PARQUET_BATCH):
            data = [[conv(row[c]) for row in batch] for c, conv in zip(columns, convert,
                                                                       strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(col, type=schema.field(i).type) for i, col in enumerate(data)],
                schema=schema))
            n += len(batch)
    return n


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _atomic(output: str, source: SourceConfig) -> Iterator[IO[bytes]]:
    """A binary file that appears under `output` only once it is complete."""
    tag = f".ximrun-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    if is_local(output):
        final = Path(local_path(output)).expanduser()
        if final.is_dir():
            raise ExportError(f"-o {output}: is a folder")
        if not final.parent.is_dir():
            raise ExportError(f"-o {output}: no such folder: {final.parent}")
        temp = final.with_name(final.name + tag)
        try:
            fh = open(temp, "wb")
        except OSError as exc:
            raise ExportError(f"-o {output}: cannot be written ({brief(exc)})") from None
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return
    try:
        fs, path = fs_for(output, source)
        temp_path = path + tag
        fh = fs.open(temp_path, "wb")
    except Exception as exc:  # any backend error: the target cannot be written
        raise ExportError(f"-o {output}: cannot be written ({brief(exc)})") from None
    try:
        yield fh
    except BaseException:
        with contextlib.suppress(Exception):
            getattr(fh, "discard", fh.close)()  # nothing uploaded if it can be helped
        with contextlib.suppress(Exception):
            fs.rm(temp_path)
        raise
    try:
        fh.close()
        # Written once, complete, under a temporary name; then moved (a copy and a delete on
        # object storage), so the final name never holds a partial file.
        fs.mv(temp_path, path)
    except Exception as exc:  # the upload or the move failed
        with contextlib.suppress(Exception):
            fs.rm(temp_path)
        raise ExportError(f"-o {output}: cannot be written ({brief(exc)})") from None
