"""Listing: source roots and manifests become a stream of Items; reading and presigning their bytes.

Nothing here holds a whole listing: folders are walked with os.scandir, S3 prefixes are read one
ListObjectsV2 page at a time, manifests one row at a time.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import fsspec
import fsspec.asyn
from fsspec.spec import AbstractFileSystem

from runner.errors import ReadError, SourceError
from runner.job import SourceConfig, is_url
from runner.records import Item

log = logging.getLogger("ximrun.sources")

SkipFn = Callable[[str], None]

_GLOB_CHARS = re.compile(r"[*?\[]")
_S3 = ("s3", "s3a")
_HTTP = ("http", "https")
_LOCAL = ("file", "local")
# Remote stats of manifest rows run this many at a time, in windows that keep the rows' order.
_STAT_THREADS = 16
_STAT_WINDOW = 256
_MAX_DUPLICATES_NAMED = 10


def list_items(source: SourceConfig, on_skip: SkipFn | None = None) -> Iterator[Item]:
    """Stream the Items of every root in source.paths, then of source.manifest if set.

    A root is a folder, a single file, a glob (`*` and `?` stay within one path segment, `**`
    crosses segments) or any fsspec URL. `recursive = false` lists only a folder's direct
    children; a glob sets its own depth. Below a folder or a glob's fixed part:

    - an item is kept when one of `include` matches and none of `exclude` does, each pattern
      (fnmatch, case-sensitive, `*` also crosses `/`) tried against the path relative to the root
      ("cards/a.jpg") and against the base name ("a.jpg"); an empty `include` keeps everything;
    - hidden entries (a path segment starting with ".") are skipped, as are folders and S3
      "folder marker" keys ending in "/"; symlinked folders are not followed (no loops).

    A root named as a single file bypasses the hidden rule but not include/exclude. Manifest rows
    bypass both: the manifest is an explicit list. A root that is missing or cannot be listed at
    all raises SourceError; an empty folder yields nothing. S3 has no folders: a root ending in
    "/" (or a bare bucket) with nothing under it is empty, one without the slash that is neither
    an object nor a prefix with objects is missing. A manifest row
    that cannot be used is reported to `on_skip` as "<manifest>:<line>: <why>" and logged; the
    rest goes on.
    """
    for root in source.paths:
        yield from _list_root(root, source)
    if source.manifest:
        yield from _list_manifest(source, on_skip)


def check_sources(source: SourceConfig) -> None:
    """Before anything is sent: every root can be listed (its first page is read) and the
    manifest has no duplicate ids, so a missing bucket or folder is refused up front."""
    for root in source.paths:
        first = _list_root(root, source)
        try:
            next(first, None)
        finally:
            first.close()
    check_manifest(source)


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


def is_local(item: Item) -> bool:
    """Whether the item is a local file, read with open() rather than through fsspec."""
    return item.uri.startswith("/")


def read_bytes(item: Item, source: SourceConfig, max_bytes: int | None = None) -> bytes:
    """The item's bytes (or only the first max_bytes); ReadError "not_found: ...", "access_denied:
    ..." or "read_error: ..." when they cannot be had. Safe to call from many threads at once."""
    uri = item.uri
    try:
        if is_local(item):
            # A local absolute path: plain open() costs a third of fsspec's path handling.
            with open(uri, "rb") as fh:
                return fh.read() if max_bytes is None else fh.read(max_bytes)
        fs, path = _fs_for(uri, source)
        if max_bytes is None:
            return fs.cat_file(path)
        return fs.cat_file(path, start=0, end=max_bytes)
    except Exception as exc:
        raise _read_error(exc, uri) from None


def read_many(items: Sequence[Item], source: SourceConfig) -> list[bytes | ReadError]:
    """Every item's bytes, or the ReadError that says why not, in order. Objects of an
    asynchronous filesystem (S3, HTTP, ...) are fetched at the same time, the rest one by one."""
    out: list[bytes | ReadError | None] = [None] * len(items)
    remote: dict[int, tuple[AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, item in enumerate(items):
        if not is_local(item):
            try:
                fs, path = _fs_for(item.uri, source)
            except Exception as exc:
                out[i] = _read_error(exc, item.uri)
                continue
            if getattr(fs, "async_impl", False):
                remote.setdefault(id(fs), (fs, []))[1].append((i, path))
                continue
        try:
            out[i] = read_bytes(item, source)
        except ReadError as exc:
            out[i] = exc
    for fs, paths in remote.values():
        # fs.cat would expand glob characters in keys; each object's own coroutine does not.
        got = fsspec.asyn.sync(fs.loop, _cat_all, fs, [path for _, path in paths])
        for (i, _), data in zip(paths, got, strict=True):
            out[i] = _read_error(data, items[i].uri) if isinstance(data, BaseException) else data
    return out  # type: ignore[return-value]


async def _cat_all(fs: Any, paths: list[str]) -> list[bytes | BaseException]:
    return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)


def _read_error(exc: BaseException, uri: str) -> ReadError:
    """The reason an item's bytes could not be read, from whatever its backend raised."""
    if isinstance(exc, ReadError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ReadError(f"not_found: {uri}")
    if isinstance(exc, PermissionError):
        return ReadError(f"access_denied: {uri}")
    if isinstance(exc, IsADirectoryError):
        return ReadError(f"read_error: {uri} is a folder")
    # Each fsspec backend raises its own types (botocore, aiohttp, ...).
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if status == 404:
        return ReadError(f"not_found: {uri}")
    if status in (401, 403):
        return ReadError(f"access_denied: {uri}")
    return ReadError(f"read_error: {uri}: {_short(exc)}")


def presign(item: Item, source: SourceConfig, expires_s: int = 3600) -> str | None:
    """A URL the API can fetch the item from: presigned GET for s3://, the URL itself for
    http(s)://, None otherwise (the caller sends the bytes instead)."""
    protocol = _protocol(item.uri)
    if protocol in _HTTP:
        return item.uri
    if protocol not in _S3:
        return None
    try:
        fs, path = _fs_for(item.uri, source)
        return fs.sign(path, expiration=expires_s)
    except Exception as exc:  # signing needs credentials; a missing one is this item's problem
        raise ReadError(f"read_error: cannot presign {item.uri}: {_short(exc)}") from None


# --- filesystems -------------------------------------------------------------------------------

_fs_lock = threading.Lock()
_fs_cache: dict[tuple[int, str, str], AbstractFileSystem] = {}


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if is_url(uri) else "file"


def _filesystem(protocol: str, storage_options: Mapping[str, Any]) -> AbstractFileSystem:
    """One filesystem per process, protocol and options, shared by every thread."""
    if protocol in _LOCAL:
        opts: dict[str, Any] = {}
    elif protocol in _HTTP:
        # http's options go to aiohttp, which refuses the S3-style keys a mixed job carries.
        opts = {}
    else:
        opts = dict(storage_options)
    # The pid keeps a forked worker from reusing its parent's event loop and connections.
    key = (os.getpid(), protocol, json.dumps(opts, sort_keys=True, default=repr))
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            if protocol not in _LOCAL:
                # Our listings are read once; a cached one would hide objects changed since.
                opts["use_listings_cache"] = False
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
            _fs_cache[key] = fs
        return fs


def _fs_for(uri: str, source: SourceConfig) -> tuple[AbstractFileSystem, str]:
    protocol = _protocol(uri)
    fs = _filesystem(protocol, source.storage_options)
    return fs, fs._strip_protocol(uri)


# --- roots -------------------------------------------------------------------------------------


def _list_root(root: str, source: SourceConfig) -> Iterator[Item]:
    protocol = _protocol(root)
    if protocol in _LOCAL:
        yield from _list_local(root, source)
    elif protocol in _S3:
        yield from _list_s3(root, protocol, source)
    else:
        yield from _list_fsspec(root, protocol, source)


def _wanted(rel: str, source: SourceConfig) -> bool:
    base = rel.rsplit("/", 1)[-1]

    def hit(patterns: Iterable[str]) -> bool:
        return any(fnmatchcase(rel, p) or fnmatchcase(base, p) for p in patterns)

    return (not source.include or hit(source.include)) and not hit(source.exclude)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _split_glob(path: str) -> tuple[str, str] | None:
    """("fixed/part/", "pattern/rest") when a segment of path has a glob character, else None."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return "/".join(parts[:i]) + "/" if i else "", "/".join(parts[i:])
    return None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell-style: `*`, `?` and `[...]` stay within a segment, `**` crosses segments."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _glob_depth(pattern: str) -> int | None:
    return None if "**" in pattern else pattern.count("/") + 1


# local files: os.scandir, one directory at a time


def _list_local(root: str, source: SourceConfig) -> Iterator[Item]:
    path = root[len("file://"):] if root.startswith("file://") else root
    path = os.path.normpath(path)
    if not os.path.lexists(path) and (split := _split_glob(path)) is not None:
        base, pattern = split
        regex = _glob_regex(pattern)
        for full, rel, st in _walk_local(base.rstrip("/") or "/", root, _glob_depth(pattern)):
            if regex.match(rel) and _wanted(rel, source):
                yield _local_item(full, st)
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{root}: no such file or folder") from None
    except OSError as exc:
        raise SourceError(f"{root}: cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        if _wanted(os.path.basename(path), source):
            yield _local_item(path, st)
        return
    for full, rel, st in _walk_local(path, root, None if source.recursive else 1):
        if _wanted(rel, source):
            yield _local_item(full, st)


def _walk_local(top: str, root: str, maxdepth: int | None) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, path relative to top with "/", stat) of every visible file below top."""
    pending = [(top, "", 1)]
    while pending:
        folder, rel_folder, depth = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            if folder == top:
                reason = "no such folder" if isinstance(exc, FileNotFoundError) else exc.strerror
                raise SourceError(f"{root}: cannot be listed: {reason or exc}") from None
            log.warning("cannot list %s: %s", folder, exc.strerror or exc)
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = rel_folder + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if maxdepth is None or depth < maxdepth:
                            pending.append((entry.path, rel + "/", depth + 1))
                        continue
                    if not entry.is_file():  # sockets, fifos, dangling links
                        continue
                    st = entry.stat()
                except OSError:  # vanished between scandir and stat: not listed, nothing lost
                    continue
                yield entry.path, rel, st


def _local_item(path: str, st: os.stat_result) -> Item:
    return Item(key=path, uri=path, size=st.st_size, fingerprint=f"{st.st_size}:{st.st_mtime_ns}")


# S3: ListObjectsV2 page by page


def _list_s3(root: str, protocol: str, source: SourceConfig) -> Iterator[Item]:
    fs = _filesystem(protocol, source.storage_options)
    bucket, _, key = root.split("://", 1)[1].partition("/")
    if not bucket or _GLOB_CHARS.search(bucket):
        raise SourceError(f"{root}: name one bucket (globs work below the bucket, not in its name)")
    if (split := _split_glob(key)) is not None:
        prefix, pattern = split
        regex = _glob_regex(pattern)
        delimiter = "/" if "/" not in pattern and "**" not in pattern else ""
        for obj in _s3_objects(fs, root, bucket, prefix, delimiter):
            rel = obj["Key"][len(prefix):]
            if regex.match(rel) and not _hidden(rel) and _wanted(rel, source):
                yield _s3_item(protocol, bucket, obj["Key"], obj["Size"], obj.get("ETag"))
        return

    prefix = key if not key or key.endswith("/") else key + "/"
    delimiter = "" if source.recursive else "/"
    found = False
    for obj in _s3_objects(fs, root, bucket, prefix, delimiter):
        found = True
        rel = obj["Key"][len(prefix):]
        if not _hidden(rel) and _wanted(rel, source):
            yield _s3_item(protocol, bucket, obj["Key"], obj["Size"], obj.get("ETag"))
    if found or prefix == key:
        return
    # No trailing slash and nothing below it: the root names one object, or nothing at all.
    try:
        info = fs.info(f"{bucket}/{key}", refresh=True)
    except FileNotFoundError:
        raise SourceError(f"{root}: no such object or prefix") from None
    except Exception as exc:  # whatever the backend raises, this root cannot be listed
        raise SourceError(f"{root}: cannot be read: {_listing_reason(exc)}") from None
    if info.get("type") == "file" and _wanted(key.rsplit("/", 1)[-1], source):
        yield _s3_item(protocol, bucket, key, info.get("size", 0), info.get("ETag"))


def _s3_objects(fs: AbstractFileSystem, root: str, bucket: str, prefix: str,
                delimiter: str) -> Iterator[dict[str, Any]]:
    """The objects under prefix, one page in memory at a time.

    s3fs's find/glob collect the whole listing before returning; its per-request wrapper
    (`call_s3`) gives us one page at a time with s3fs's retries and error translation.
    """
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    while True:
        try:
            page = fs.call_s3("list_objects_v2", **kwargs)
        except Exception as exc:  # s3fs translates to OSError subclasses; others may pass through
            raise SourceError(f"{root}: cannot be listed: {_listing_reason(exc)}") from None
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith("/"):  # folder markers
                yield obj
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _s3_item(protocol: str, bucket: str, key: str, size: int, etag: str | None) -> Item:
    uri = f"{protocol}://{bucket}/{key}"
    return Item(key=uri, uri=uri, size=size, fingerprint=f"{size}:{(etag or '').strip(chr(34))}")


def _listing_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such bucket ({_short(exc)})"
    if isinstance(exc, PermissionError):
        return f"access denied ({_short(exc)})"
    return _short(exc)


# any other fsspec protocol: its own find/glob, which hold one root's listing in memory


def _list_fsspec(root: str, protocol: str, source: SourceConfig) -> Iterator[Item]:
    fs = _filesystem(protocol, source.storage_options)
    path = fs._strip_protocol(root)
    single = False
    try:
        if protocol not in _HTTP and (split := _split_glob(path)) is not None:
            base, pattern = split
            found = fs.glob(path, detail=True)
        else:
            info = fs.info(path)
            if info.get("type") == "directory":
                base = path.rstrip("/") + "/"
                found = fs.find(path, maxdepth=None if source.recursive else 1, detail=True)
            else:
                base, single = posixpath.dirname(path.rstrip("/")) + "/", True
                found = {info["name"]: info}
    except FileNotFoundError:
        # fsspec's http reports a refused connection as not found, too
        missing = "not found or not reachable" if protocol in _HTTP else "no such file or folder"
        raise SourceError(f"{root}: {missing}") from None
    except Exception as exc:  # each backend has its own errors; all mean "cannot be listed"
        raise SourceError(f"{root}: cannot be listed: {_listing_reason(exc)}") from None
    for name, info in found.items():
        if info.get("type") != "file" or name.endswith("/"):
            continue
        rel = name[len(base):] if name.startswith(base) else posixpath.basename(name)
        if (not single and _hidden(rel)) or not _wanted(rel, source):
            continue
        uri = name if protocol in _HTTP else fs.unstrip_protocol(name)
        yield Item(key=uri, uri=uri, size=info.get("size"), fingerprint=_fingerprint(info))


def _fingerprint(info: Mapping[str, Any]) -> str:
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "mtime",
                                      "LastModified", "last_modified", "updated", "created")
                    if info.get(k) is not None), "")
    return f"{info.get('size')}:{str(version).strip(chr(34))}"


# --- manifests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    uri: str
    key: str
    has_id: bool
    extra: Mapping[str, Any]


_RESERVED = ("path", "url", "id")


def _list_manifest(source: SourceConfig, on_skip: SkipFn | None) -> Iterator[Item]:
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
            elif _protocol(target.uri) in _LOCAL:
                window.append((line, _stat_target(target, source)))
            else:
                window.append((line, pool.submit(_stat_target, target, source)))
            if len(window) >= _STAT_WINDOW:
                yield from _settle(window)
                window = []
        yield from _settle(window)


def _settle(window: list[tuple[int, Item | str | Future[Item | str]]]
            ) -> Iterator[tuple[int, Item | str]]:
    for line, result in window:
        yield line, result.result() if isinstance(result, Future) else result


def _stat_target(t: _Target, source: SourceConfig) -> Item | str:
    protocol = _protocol(t.uri)
    if protocol in _HTTP:
        # Stat-ing every URL would make listing as slow as downloading; the URL is the version.
        return Item(key=t.key, uri=t.uri, size=None, fingerprint=f"url:{t.uri}", extra=t.extra)
    try:
        if protocol in _LOCAL:
            st = os.stat(t.uri)
            if stat.S_ISDIR(st.st_mode):
                return f"{t.uri} is a folder"
            return Item(key=t.key, uri=t.uri, size=st.st_size,
                        fingerprint=f"{st.st_size}:{st.st_mtime_ns}", extra=t.extra)
        fs, path = _fs_for(t.uri, source)
        info = fs.info(path)
    except FileNotFoundError:
        return f"no such file: {t.uri}"
    except PermissionError:
        return f"access denied: {t.uri}"
    except Exception as exc:  # one unreadable row must not stop the listing
        return f"cannot stat {t.uri}: {_short(exc)}"
    if info.get("type") != "file":
        return f"{t.uri} is a folder"
    return Item(key=t.key, uri=t.uri, size=info.get("size"), fingerprint=_fingerprint(info),
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
    if _protocol(manifest) in _LOCAL:
        path = manifest[len("file://"):] if manifest.startswith("file://") else manifest
        return os.path.dirname(os.path.abspath(path))
    return manifest.split("?", 1)[0].rsplit("/", 1)[0]


def _row_target(fields: Mapping[str, Any], base: str) -> _Target | str:
    named = {k.strip().lower(): v for k, v in fields.items() if k.strip().lower() in _RESERVED}
    where = next((v.strip() for v in (named.get("path"), named.get("url"))
                  if isinstance(v, str) and v.strip()), None)
    if where is None:
        return "no path or url value"
    raw_id = named.get("id")
    ident = "" if raw_id is None else str(raw_id).strip()
    uri = _resolve(where, base)
    extra = {k: v for k, v in fields.items() if k.strip() and k.strip().lower() not in _RESERVED}
    return _Target(uri=uri, key=ident or uri, has_id=bool(ident), extra=extra)


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
        fs, path = _fs_for(manifest, source)
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise SourceError(f"{manifest}: no such manifest") from None
    except Exception as exc:  # any backend error here means the manifest cannot be read at all
        raise SourceError(f"{manifest}: cannot be read: {_listing_reason(exc)}") from None
    if _protocol(manifest) not in _LOCAL:
        # fsspec's buffered files read a whole block for every line; this reads blocks once.
        handle = io.BufferedReader(handle, buffer_size=1 << 20)
    try:
        with handle:
            yield from parse(manifest, handle)
    except (OSError, csv.Error) as exc:
        raise SourceError(f"{manifest}: cannot be read: {_short(exc)}") from None


def _decoded_lines(handle: Iterable[bytes], bad: set[int]) -> Iterator[str]:
    """Text lines (BOM dropped); the numbers of lines that were not UTF-8 go into bad."""
    for number, raw in enumerate(handle, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            yield raw.decode("utf-8", "replace")


def _csv_rows(manifest: str, handle: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    bad: set[int] = set()
    reader = csv.reader(_decoded_lines(handle, bad))
    header: list[str] | None = None
    end = 0
    for values in reader:
        start, end = end + 1, reader.line_num
        if not values:
            continue
        if header is None:
            header = [h.strip() for h in values]
            if not {"path", "url"} & {h.lower() for h in header}:
                raise SourceError(f"{manifest}: the header has neither a path nor a url column "
                                  f"(columns: {', '.join(header)})")
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
    for number, text in enumerate(_decoded_lines(handle, bad), 1):
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
            yield number, row


# --- small helpers -----------------------------------------------------------------------------


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def _and_list(numbers: list[int]) -> str:
    shown = [str(n) for n in numbers]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."

