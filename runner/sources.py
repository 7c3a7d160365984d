"""Listing: source roots (folders, files, globs, S3 prefixes, any fsspec URL) become a stream of
Items, then the manifest's rows (manifest.py).

Nothing here holds a whole listing: folders are walked with os.scandir, S3 prefixes are read one
ListObjectsV2 page at a time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fsspec.spec import AbstractFileSystem

from runner.errors import SourceError
from runner.job import SourceConfig
from runner.manifest import SkipFn, check_manifest, list_manifest
from runner.records import Item, text_safe
from runner.storage import HTTP, LOCAL, S3, filesystem, fingerprint_of, listing_reason, protocol

log = logging.getLogger("ximrun.sources")

_GLOB_CHARS = re.compile(r"[*?\[]")


def list_items(source: SourceConfig, on_skip: SkipFn | None = None) -> Iterator[Item]:
    """Stream the Items of every root in source.paths, then of source.manifest if set.

    A root is a folder, a single file, a glob (`*` and `?` stay within one path segment, `**`
    crosses segments) or any fsspec URL. `recursive = false` lists only a folder's direct
    children; a glob sets its own depth. Below a folder or a glob's fixed part:

    - an item is kept when one of `include` matches and none of `exclude` does, each pattern
      (fnmatch, case-sensitive, `*` also crosses `/`) tried against the path relative to the root
      ("cards/a.jpg") and against the base name ("a.jpg"); an empty `include` keeps everything;
    - hidden entries (a path segment starting with ".") are skipped, as are folders and S3
      "folder marker" keys ending in "/"; only regular files are listed (no devices, FIFOs or
      sockets); symlinks are skipped unless `follow_symlinks` (then a folder reached twice is
      walked once: no loops). A root that is itself a symlink is followed: it was named.

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
        yield from list_manifest(source, on_skip)


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


def _list_root(root: str, source: SourceConfig) -> Iterator[Item]:
    scheme = protocol(root)
    if scheme in LOCAL:
        yield from _list_local(root, source)
    elif scheme in S3:
        yield from _list_s3(root, scheme, source)
    else:
        yield from _list_fsspec(root, scheme, source)


def _wanted(rel: str, source: SourceConfig) -> bool:
    """Whether a path (or its file name) matches an `include` pattern, if any, and no
    `exclude` pattern."""
    base = rel.rsplit("/", 1)[-1]
    include, exclude = _patterns(tuple(source.include)), _patterns(tuple(source.exclude))
    return ((include is None or bool(include(rel) or include(base)))
            and (exclude is None or not (exclude(rel) or exclude(base))))


@functools.lru_cache(maxsize=64)
def _patterns(patterns: tuple[str, ...]) -> Callable[[str], object] | None:
    """One compiled regular expression for a list of fnmatch patterns (its `fullmatch`), or
    None for none: a file listed costs one match, not one per pattern."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


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
        for full, rel, st in _walk_local(base.rstrip("/") or "/", root, _glob_depth(pattern),
                                         source.follow_symlinks):
            if regex.match(rel) and _wanted(rel, source) and (item := _local_item(full, st)):
                yield item
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{root}: no such file or folder") from None
    except OSError as exc:
        raise SourceError(f"{root}: cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{root}: not a regular file (a device, FIFO or socket): ximrun "
                              "reads regular files only")
        if _wanted(os.path.basename(path), source) and (item := _local_item(path, st)):
            yield item
        return
    for full, rel, st in _walk_local(path, root, None if source.recursive else 1,
                                     source.follow_symlinks):
        if _wanted(rel, source) and (item := _local_item(full, st)):
            yield item


def _walk_local(top: str, root: str, maxdepth: int | None, follow: bool = False
                ) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, path relative to top with "/", stat) of every visible regular file below top.

    Symlinks are skipped unless `follow`; then each folder is walked once, however many links
    lead to it."""
    pending = [(top, "", 1)]
    seen: set[tuple[int, int]] = set()
    if follow:
        with contextlib.suppress(OSError):
            st = os.stat(top)
            seen.add((st.st_dev, st.st_ino))
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
                    if entry.is_symlink():
                        if not follow:
                            log.debug("not following the symlink %s (source.follow_symlinks)",
                                      text_safe(entry.path))
                            continue
                        st = os.stat(entry.path)  # dangling: OSError, not listed
                    else:
                        st = entry.stat(follow_symlinks=False)
                except OSError:  # vanished between scandir and stat: not listed, nothing lost
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if follow:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    if maxdepth is None or depth < maxdepth:
                        pending.append((entry.path, rel + "/", depth + 1))
                    continue
                if not stat.S_ISREG(st.st_mode):  # sockets, FIFOs, devices
                    continue
                yield entry.path, rel, st


def _local_item(path: str, st: os.stat_result) -> Item | None:
    """The file's Item; its key is `path` as text SQLite can hold (a name that is not UTF-8 is
    escaped, records.text_safe), while `uri` keeps the name as the system spells it. None, with
    a warning, when the escaped key is also the name of another file: never two images, one key."""
    key = text_safe(path)
    if key != path and os.path.lexists(key):
        log.warning("skipped %s: its name is not UTF-8 and its escaped form names another file",
                    key)
        return None
    return Item(key=key, uri=path, size=st.st_size, fingerprint=f"{st.st_size}:{st.st_mtime_ns}")


# S3: ListObjectsV2 page by page


def _list_s3(root: str, protocol: str, source: SourceConfig) -> Iterator[Item]:
    fs = filesystem(protocol, source.storage_options)
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
        raise SourceError(f"{root}: cannot be read: {listing_reason(exc)}") from None
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
            raise SourceError(f"{root}: cannot be listed: {listing_reason(exc)}") from None
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith("/"):  # folder markers
                yield obj
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _s3_item(protocol: str, bucket: str, key: str, size: int, etag: str | None) -> Item:
    uri = f"{protocol}://{bucket}/{key}"
    return Item(key=uri, uri=uri, size=size, fingerprint=f"{size}:{(etag or '').strip(chr(34))}")


def _list_fsspec(root: str, protocol: str, source: SourceConfig) -> Iterator[Item]:
    fs = filesystem(protocol, source.storage_options)
    path = fs._strip_protocol(root)
    single = False
    try:
        if protocol not in HTTP and (split := _split_glob(path)) is not None:
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
        missing = "not found or not reachable" if protocol in HTTP else "no such file or folder"
        raise SourceError(f"{root}: {missing}") from None
    except Exception as exc:  # each backend has its own errors; all mean "cannot be listed"
        raise SourceError(f"{root}: cannot be listed: {listing_reason(exc)}") from None
    for name, info in found.items():
        if info.get("type") != "file" or name.endswith("/"):
            continue
        rel = name[len(base):] if name.startswith(base) else posixpath.basename(name)
        if (not single and _hidden(rel)) or not _wanted(rel, source):
            continue
        uri = name if protocol in HTTP else fs.unstrip_protocol(name)
        yield Item(key=text_safe(uri), uri=uri, size=info.get("size"), fingerprint=fingerprint_of(info))


def iter_chunks(items: Iterable[Any], size: int | Callable[[], int]) -> Iterator[list[Any]]:
    """Lists of `size` items (the last one shorter); a callable size is asked for each list."""
    limit = size if callable(size) else lambda: size
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= limit():
            yield chunk
            chunk = []
    if chunk:
        yield chunk
