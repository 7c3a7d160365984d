"""Manifests: the rows of a CSV or JSONL list become Items, streamed one row at a time.

A row names its image by `path` or `url` (relative to the manifest), may give an `id` (the key),
and its other columns travel inside the request record. A row that cannot be used is reported
and skipped; duplicate ids refuse the manifest before anything is sent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runner.errors import SourceError, brief
from runner.job import SourceConfig, is_url
from runner.records import Item, json_text_safe, text_safe
from runner.storage import HTTP, LOCAL, fingerprint_of, fs_for, listing_reason, protocol

log = logging.getLogger("ximrun.sources")

SkipFn = Callable[[str], None]
# The fingerprint of a manifest row whose source is not there: unchanged while it stays away.
MISSING_FINGERPRINT = "missing"
# Remote stats of manifest rows run this many at a time, in windows that keep the rows' order.
_STAT_THREADS = 16
_STAT_WINDOW = 256
_MAX_DUPLICATES_NAMED = 10
# A manifest line longer than this is skipped unread past it: one hostile line (a file with no
# newline at all) must not be held in memory whole.
MAX_LINE_BYTES = 16 * 2**20
_TOO_LONG = "\x00line too long\n"  # what stands for such a line in the text stream


@dataclass(frozen=True)
class _Target:
    uri: str
    key: str
    has_id: bool
    extra: Mapping[str, Any]
    problem: str | None = None  # a row with an id but nothing to read


_RESERVED = ("path", "url", "id")


def list_manifest(source: SourceConfig, on_skip: SkipFn | None = None) -> Iterator[Item]:
    """Each usable row's Item, in row order; a row that cannot be used goes to `on_skip` as
    "<manifest>:<line>: <why>" and to the log."""
    manifest = source.manifest
    assert manifest is not None

    def skip(line: int, why: str) -> None:
        message = f"{manifest}:{line}: {why}"
        log.warning("skipped manifest row %s", message)
        if on_skip is not None:
            on_skip(message)

    for line, result in _stat_targets(_manifest_targets(source), source):
        if isinstance(result, Item):
            yield result
        else:
            skip(line, result)


def _stat_targets(rows: Iterable[tuple[int, _Target | str]],
                  source: SourceConfig) -> Iterator[tuple[int, Item | str]]:
    """Each row's Item, or why not; remote stats overlap, a window at a time, in row order."""
    with ThreadPoolExecutor(_STAT_THREADS, thread_name_prefix="ximrun-stat") as pool:
        window: list[tuple[int, Item | str | Future[Item | str]]] = []
        for line, target in rows:
            if not isinstance(target, _Target):
                window.append((line, target))
            elif protocol(target.uri) in LOCAL:
                window.append((line, _stat_target(target, source)))
            else:
                window.append((line, pool.submit(_stat_target, target, source)))
            if len(window) >= _STAT_WINDOW:
                yield from _resolved(window)
                window = []
        yield from _resolved(window)


def _resolved(window: list[tuple[int, Item | str | Future[Item | str]]]
            ) -> Iterator[tuple[int, Item | str]]:
    for line, result in window:
        yield line, result.result() if isinstance(result, Future) else result


def _stat_target(t: _Target, source: SourceConfig) -> Item | str:
    """The row's Item; one whose source is missing or cannot be stat-ed still gets one, with
    its `problem` (it becomes a failed image with that reason, never read or sent)."""
    if t.problem is not None:
        return _unreadable(t, t.problem)
    found = _stat_found(t, source)
    return _unreadable(t, found) if isinstance(found, str) else found


def _unreadable(t: _Target, problem: str) -> Item:
    return Item(key=t.key, uri=t.uri, size=None, fingerprint=MISSING_FINGERPRINT, extra=t.extra,
                problem=problem)


def _stat_found(t: _Target, source: SourceConfig) -> Item | str:
    scheme = protocol(t.uri)
    if scheme in HTTP:
        # Stat-ing every URL would make listing as slow as downloading; the URL is the version.
        return Item(key=t.key, uri=t.uri, size=None, fingerprint=f"url:{t.uri}", extra=t.extra)
    try:
        if scheme in LOCAL:
            if not source.follow_symlinks and os.path.islink(t.uri):
                return f"not_a_file: {text_safe(t.uri)} is a symlink (source.follow_symlinks = false)"
            st = os.stat(t.uri)
            if stat.S_ISDIR(st.st_mode):
                return f"not_a_file: {text_safe(t.uri)}"
            if not stat.S_ISREG(st.st_mode):
                return f"not_a_file: {text_safe(t.uri)} (a device, FIFO or socket)"
            return Item(key=t.key, uri=t.uri, size=st.st_size,
                        fingerprint=f"{st.st_size}:{st.st_mtime_ns}", extra=t.extra)
        fs, path = fs_for(t.uri, source)
        info = fs.info(path)
    except FileNotFoundError:
        return f"missing: {text_safe(t.uri)}"
    except PermissionError:
        return f"access_denied: {text_safe(t.uri)}"
    except Exception as exc:  # one unreadable row must not stop the listing
        return text_safe(f"read_error: {t.uri}: {brief(exc)}")
    if info.get("type") != "file":
        return f"not_a_file: {t.uri}"
    return Item(key=t.key, uri=t.uri, size=info.get("size"), fingerprint=fingerprint_of(info),
                extra=t.extra)


def _manifest_targets(source: SourceConfig) -> Iterator[tuple[int, _Target | str]]:
    """(line, target) for each usable row, (line, why) for each malformed one."""
    manifest = source.manifest
    assert manifest is not None
    base = _manifest_base(manifest)
    for line, fields in _manifest_rows(manifest, source):
        if isinstance(fields, str):
            yield line, fields
        else:
            yield line, _row_target(fields, base)


def _manifest_base(manifest: str) -> str:
    if protocol(manifest) in LOCAL:
        path = manifest[len("file://"):] if manifest.startswith("file://") else manifest
        return os.path.dirname(os.path.abspath(path))
    return manifest.split("?", 1)[0].rsplit("/", 1)[0]


def _row_target(fields: Mapping[str, Any], base: str) -> _Target | str:
    named = {k.strip().lower(): v for k, v in fields.items() if k.strip().lower() in _RESERVED}
    where = next((v.strip() for v in (named.get("path"), named.get("url"))
                  if isinstance(v, str) and v.strip()), None)
    raw_id = named.get("id")
    ident = "" if raw_id is None else str(raw_id).strip()
    # Columns as text SQLite can hold (a JSON "\ud800" escaped), as the key is.
    extra = json_text_safe({k: v for k, v in fields.items()
                            if k.strip() and k.strip().lower() not in _RESERVED})
    if where is None:
        if not ident:
            return "no id and no path or url value"
        # An id names a product: it gets a row, failed, so that the catalog sees it.
        return _Target(uri="", key=text_safe(ident), has_id=True, extra=extra,
                       problem="missing: no path or url value")
    uri = _resolve(where, base)
    # The key as text SQLite can hold: a lone surrogate (a JSON "\ud800") is escaped.
    return _Target(uri=uri, key=text_safe(ident or uri), has_id=bool(ident), extra=extra)


def _resolve(where: str, base: str) -> str:
    if where.startswith("file://"):
        return os.path.normpath(where[len("file://"):])
    if is_url(where):
        return where
    if os.path.isabs(where):
        return os.path.normpath(where)
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, where))}"
    return os.path.normpath(os.path.join(base, where))


def _manifest_rows(manifest: str, source: SourceConfig) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, columns) per row, (line, why) per malformed row; SourceError if unreadable."""
    name = manifest.split("?", 1)[0].lower()
    if name.endswith(".csv"):
        parse = _csv_rows
    elif name.endswith((".jsonl", ".ndjson")):
        parse = _jsonl_rows
    else:
        raise SourceError(f"{manifest}: a manifest ends in .csv, .jsonl or .ndjson")
    try:
        fs, path = fs_for(manifest, source)
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise SourceError(f"{manifest}: no such manifest") from None
    except Exception as exc:  # any backend error here means the manifest cannot be read at all
        raise SourceError(f"{manifest}: cannot be read: {listing_reason(exc)}") from None
    if protocol(manifest) not in LOCAL:
        # fsspec's buffered files read a whole block for every line; this reads blocks once.
        handle = io.BufferedReader(handle, buffer_size=1 << 20)
    try:
        with handle:
            yield from parse(manifest, handle)
    except (OSError, csv.Error) as exc:
        raise SourceError(f"{manifest}: cannot be read: {brief(exc)}") from None


def _lines(handle: Any) -> Iterator[bytes | None]:
    """The handle's lines; None for a line over MAX_LINE_BYTES, whose rest is read and dropped a
    megabyte at a time."""
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_LINE_BYTES:
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(2**20)
        yield None


def _decoded_lines(handle: Any, bad: set[int], long: set[int] | None = None
                   ) -> Iterator[str]:
    """Text lines (BOM dropped); the numbers of lines that were not UTF-8 go into bad, those
    over MAX_LINE_BYTES into long (and stand as _TOO_LONG)."""
    for number, raw in enumerate(_lines(handle), 1):
        if raw is None:
            if long is not None:
                long.add(number)
            yield _TOO_LONG
            continue
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            yield raw.decode("utf-8", "replace")


def _csv_rows(manifest: str, handle: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    bad: set[int] = set()
    long: set[int] = set()
    reader = csv.reader(_decoded_lines(handle, bad, long))
    header: list[str] | None = None
    end = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # A cell over the csv module's field limit (or a stray quote): this row, not the
            # manifest, is malformed.
            start, end = end + 1, reader.line_num
            if header is None:
                raise SourceError(f"{manifest}: the header cannot be parsed: {brief(exc)}") from None
            yield start, f"cannot be parsed: {brief(exc)}"
            continue
        start, end = end + 1, reader.line_num
        if not values:
            continue
        if long & set(range(start, end + 1)):
            if header is None:
                raise SourceError(f"{manifest}: the header is over {MAX_LINE_BYTES} bytes")
            yield start, f"a line over {MAX_LINE_BYTES} bytes"
            continue
        if header is None:
            header = [h.strip() for h in values]
            if not {"path", "url"} & {h.lower() for h in header}:
                raise SourceError(f"{manifest}: the header has neither a path nor a url column "
                                  f"(columns: {', '.join(header)})")
            _refuse_reserved(manifest, header, 1)
            continue
        if bad & set(range(start, end + 1)):
            yield start, "not valid UTF-8"
        elif len(values) > len(header):
            yield start, f"{len(values)} values, the header has {len(header)} columns"
        else:
            values += [""] * (len(header) - len(values))
            yield start, dict(zip(header, values, strict=True))
    if header is None:
        raise SourceError(f"{manifest}: empty CSV, not even a header")


def _jsonl_rows(manifest: str, handle: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    bad: set[int] = set()
    long: set[int] = set()
    for number, text in enumerate(_decoded_lines(handle, bad, long), 1):
        if number in long:
            yield number, f"a line over {MAX_LINE_BYTES} bytes"
            continue
        if not text.strip():
            continue
        if number in bad:
            yield number, "not valid UTF-8"
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, f"bad JSON: {exc.msg} at column {exc.colno}"
            continue
        if not isinstance(row, dict):
            yield number, f"a JSON object was expected, got {type(row).__name__}"
        else:
            _refuse_reserved(manifest, row, number)
            yield number, row


def _refuse_reserved(manifest: str, columns: Iterable[str], line: int) -> None:
    """A column named like a field ximrun builds (`_id`, `_url`, `_base64`, anything starting
    with `_`) would be sent inside the record: the manifest is refused before anything is sent."""
    for name in columns:
        if str(name).strip().startswith("_"):
            raise SourceError(f"{manifest}:{line}: the column {text_safe(str(name))!r} is named "
                              "like a field of the request record (names starting with '_' are "
                              "reserved); rename or drop it")


def check_manifest(source: SourceConfig) -> None:
    """Refuse a manifest whose rows share an id (or, without ids, a path) before anything is sent.

    Streams the manifest keeping 8 bytes per row; only when a duplicate digest turns up does it
    read the manifest again to name the keys and their lines. No-op without a manifest.
    """
    if not source.manifest:
        return
    # One array of 64-bit digests per low byte, so that finding duplicates sorts 1/256 at a time.
    buckets = [array("Q") for _ in range(256)]
    for _line, target in _manifest_targets(source):
        if isinstance(target, _Target):
            d = _digest(target.key)
            buckets[d & 0xFF].append(d)
    suspects: set[int] = set()
    for bucket in buckets:
        ordered = sorted(bucket)
        suspects.update(a for a, b in zip(ordered, ordered[1:], strict=False) if a == b)
    if not suspects:
        return

    lines: dict[str, list[int]] = {}
    labels: dict[str, str] = {}
    for line, target in _manifest_targets(source):
        if isinstance(target, _Target) and _digest(target.key) in suspects:
            lines.setdefault(target.key, []).append(line)
            labels.setdefault(target.key, "id" if target.has_id else "path")
    dups = [(key, at) for key, at in lines.items() if len(at) > 1]  # a digest collision is not one
    if not dups:
        return
    parts = [f"duplicate {labels[key]} {key!r} on lines {_and_list(at)}"
             for key, at in dups[:_MAX_DUPLICATES_NAMED]]
    more = f" (and {len(dups) - _MAX_DUPLICATES_NAMED} more)" if len(dups) > _MAX_DUPLICATES_NAMED else ""
    raise SourceError(f"{source.manifest}: {'; '.join(parts)}{more}")


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def _and_list(numbers: list[int]) -> str:
    shown = [str(n) for n in numbers]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
