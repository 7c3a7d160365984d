"""Reading and presigning an image's bytes, through one rule for local files versus any fsspec URL.

Local files are read with open() (a third of fsspec's cost per file); everything else goes through
one fsspec filesystem per protocol and options, shared by every thread. Objects of an asynchronous
filesystem (S3, HTTP) are fetched together on fsspec's event loop.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runner.errors import ReadError, brief
from runner.job import SourceConfig, is_url
from runner.records import Item, text_safe

if TYPE_CHECKING:  # fsspec loads with the first remote object: a local run does without it
    from fsspec.spec import AbstractFileSystem

S3 = ("s3", "s3a")
HTTP = ("http", "https")
LOCAL = ("file", "local")


def protocol(uri: str) -> str:
    """The URL's scheme, lower case; "file" for a plain path."""
    return uri.split("://", 1)[0].lower() if is_url(uri) else "file"


def is_local(uri: str) -> bool:
    """The one rule for local versus remote: a plain path or a file:// URL is read with open()."""
    return protocol(uri) in LOCAL


def local_path(uri: str) -> str:
    """The path of a local URI (file:// and local:// dropped)."""
    return uri.split("://", 1)[1] if is_url(uri) else uri


def read_bytes(item: Item, source: SourceConfig, max_bytes: int | None = None, *,
               limit: int | None = None) -> bytes:
    """The item's bytes (or only the first max_bytes); ReadError "not_found: ...", "access_denied:
    ...", "too_large_file: ..." (more than `limit` bytes: never read) or "read_error: ..." when
    they cannot be had. Only regular files are read, and opening one never blocks (a FIFO put in
    a file's place is refused, not waited on). Safe to call from many threads at once."""
    uri = item.uri
    try:
        if is_local(uri):
            return _read_local(uri, max_bytes, limit)
        if max_bytes is None and limit is not None and item.size is not None \
                and item.size > limit:
            raise _too_large(uri, item.size, limit)
        fs, path = fs_for(uri, source)
        if max_bytes is not None:
            return fs.cat_file(path, start=0, end=max_bytes)
        if limit is None:
            return fs.cat_file(path)
        return _read_bounded(fs, path, uri, limit)
    except Exception as exc:
        raise _read_error(exc, uri) from None


def _read_bounded(fs: AbstractFileSystem, path: str, uri: str, limit: int) -> bytes:
    """An object of unknown size, read no further than limit + 1 bytes, a piece at a time: a
    server that ignores Range (or streams without end) is not read whole."""
    with fs.open(path, "rb") as fh:
        size = getattr(fh, "size", None)
        if isinstance(size, int) and size > limit:
            raise _too_large(uri, size, limit)
        data = _read_upto(fh.read, limit + 1, _BLOCK)
    if len(data) > limit:
        raise _too_large(uri, None, limit)
    return data


# O_NONBLOCK: opening a FIFO does not wait for a writer (POSIX; Windows has no FIFOs to open).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _read_local(uri: str, max_bytes: int | None, limit: int | None) -> bytes:
    # Plain os.open() costs a third of fsspec's path handling, and os.read() half of a Python
    # file object (which asks the kernel whether the file is a terminal, and where it stands).
    fd = os.open(local_path(uri), _OPEN_FLAGS)
    reader = functools.partial(os.read, fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(uri)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(f"read_error: {text_safe(uri)} is not a regular file (a device, "
                            "FIFO or socket)")
        if max_bytes is not None:
            return _read_upto(reader, max_bytes, max_bytes)
        if limit is None:
            return _read_upto(reader, None, st.st_size + 1)
        if st.st_size > limit:
            raise _too_large(uri, st.st_size, limit)
        # What the file holds, and a byte more to tell that it grew since (then on, never past
        # limit + 1): a read of limit + 1 would allocate that much first, a fixed cost per file
        # three times that of the read itself.
        data = _read_upto(reader, limit + 1, st.st_size + 1)
        if len(data) > limit:
            raise _too_large(uri, None, limit)
        return data
    finally:
        os.close(fd)


def _read_upto(read: Callable[[int], bytes], most: int | None, first: int) -> bytes:
    """Up to `most` bytes through `read` (to the end with None): `first` of them at once, then
    on in blocks of a megabyte until the end."""
    chunks: list[bytes] = []
    total = 0
    want = first if most is None else min(first, most)
    while want > 0:
        chunk = read(want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = _BLOCK if most is None else min(_BLOCK, most - total)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_BLOCK = 2**20


def _too_large(uri: str, size: int | None, limit: int) -> ReadError:
    what = f"{size} bytes" if size is not None else "larger"
    return ReadError(f"too_large_file: {text_safe(uri)} is {what}, over images.max_bytes "
                     f"({limit})")


def read_many(items: Sequence[Item], source: SourceConfig, limit: int | None = None
              ) -> list[bytes | ReadError]:
    """Every item's bytes, or the ReadError that says why not, in order. Objects of an
    asynchronous filesystem (S3, HTTP, ...) are fetched at the same time, the rest one by one.
    An object larger than `limit` bytes is not fetched (its listed size says so) or not past
    limit + 1 bytes (its size unknown): "too_large_file"."""
    out: list[bytes | ReadError | None] = [None] * len(items)
    remote: dict[int, tuple[AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, item in enumerate(items):
        if limit is not None and item.size is not None and item.size > limit:
            out[i] = _too_large(item.uri, item.size, limit)
            continue
        if not is_local(item.uri):
            try:
                fs, path = fs_for(item.uri, source)
            except Exception as exc:
                out[i] = _read_error(exc, item.uri)
                continue
            # Fetched together when the size is known (and checked); otherwise read bounded.
            if getattr(fs, "async_impl", False) and (limit is None or item.size is not None):
                remote.setdefault(id(fs), (fs, []))[1].append((i, path))
                continue
        try:
            out[i] = read_bytes(item, source, limit=limit)
        except ReadError as exc:
            out[i] = exc
    for fs, paths in remote.values():
        # fs.cat would expand glob characters in keys; each object's own coroutine does not.
        import fsspec.asyn

        got = fsspec.asyn.sync(fs.loop, _cat_all, fs, [path for _, path in paths])
        for (i, _), data in zip(paths, got, strict=True):
            if isinstance(data, BaseException):
                out[i] = _read_error(data, items[i].uri)
            elif limit is not None and len(data) > limit:  # it grew since it was listed
                out[i] = _too_large(items[i].uri, None, limit)
            else:
                out[i] = data
    return out  # type: ignore[return-value]


async def _cat_all(fs: Any, paths: list[str]) -> list[bytes | BaseException]:
    import asyncio

    return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)


def _read_error(exc: BaseException, uri: str) -> ReadError:
    """The reason an item's bytes could not be read, from whatever its backend raised."""
    if isinstance(exc, ReadError):
        return exc
    uri = text_safe(uri)  # a reason is stored: SQLite text is UTF-8
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
    return ReadError(text_safe(f"read_error: {uri}: {brief(exc)}"))


def presign(item: Item, source: SourceConfig, expires_s: int = 3600) -> str | None:
    """A URL the API can fetch the item from: presigned GET for s3://, the URL itself for
    http(s)://, None otherwise (the caller sends the bytes instead)."""
    scheme = protocol(item.uri)
    if scheme in HTTP:
        return item.uri
    if scheme not in S3:
        return None
    try:
        fs, path = fs_for(item.uri, source)
        return fs.sign(path, expiration=expires_s)
    except Exception as exc:  # signing needs credentials; a missing one is this item's problem
        raise ReadError(f"read_error: cannot presign {item.uri}: {brief(exc)}") from None


# --- filesystems -------------------------------------------------------------------------------

_fs_lock = threading.Lock()
_fs_cache: dict[tuple[int, str, str], AbstractFileSystem] = {}


def filesystem(protocol: str, storage_options: Mapping[str, Any]) -> AbstractFileSystem:
    """One filesystem per process, protocol and options, shared by every thread."""
    if protocol in LOCAL:
        opts: dict[str, Any] = {}
    elif protocol in HTTP:
        # http's options go to aiohttp, which refuses the S3-style keys a mixed job carries.
        opts = {}
    else:
        opts = dict(storage_options)
    # The pid keeps a forked worker from reusing its parent's event loop and connections.
    key = (os.getpid(), protocol, json.dumps(opts, sort_keys=True, default=repr))
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            if protocol not in LOCAL:
                # Our listings are read once; a cached one would hide objects changed since.
                opts["use_listings_cache"] = False
            import fsspec

            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
            _fs_cache[key] = fs
        return fs


def fs_for(uri: str, source: SourceConfig) -> tuple[AbstractFileSystem, str]:
    """The filesystem of a URI, and the URI as that filesystem names it."""
    fs = filesystem(protocol(uri), source.storage_options)
    return fs, fs._strip_protocol(uri)


def listing_reason(exc: BaseException) -> str:
    """Why a root or a manifest cannot be listed, from whatever its backend raised."""
    if isinstance(exc, FileNotFoundError):
        return f"no such bucket ({brief(exc)})"
    if isinstance(exc, PermissionError):
        return f"access denied ({brief(exc)})"
    return brief(exc)


def fingerprint_of(info: Mapping[str, Any]) -> str:
    """Size plus the first version marker the backend gives (ETag, generation, mtime, ...)."""
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "mtime",
                                      "LastModified", "last_modified", "updated", "created")
                    if info.get(k) is not None), "")
    return f"{info.get('size')}:{str(version).strip(chr(34))}"
