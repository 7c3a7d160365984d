"""The small frozen values that travel between the stages (sources -> prepare -> client -> store)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Final and non-final states of an image (docs/contract.md, "Image states").
PENDING, DONE, FAILED, REJECTED = "pending", "done", "failed", "rejected"
STATES = (PENDING, DONE, FAILED, REJECTED)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match[str]) -> str:
    code = ord(m.group())
    # U+DC80..U+DCFF is how Python carries an undecodable byte of a file name (surrogateescape).
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def text_safe(text: str) -> str:
    """Text SQLite (and UTF-8 output) can hold: a file name byte that is not UTF-8 becomes
    `\\xNN` (its value in hex), any other lone surrogate (a JSON `\\ud800`) `\\uNNNN`; valid text
    is returned unchanged (docs/schema.md, "Keys")."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(_escape_surrogate, text)


def json_text_safe(value: Any) -> Any:
    """A JSON value (an API's answer) with every string, keys included, made text_safe."""
    if isinstance(value, str):
        return text_safe(value)
    if isinstance(value, dict):
        return {text_safe(k) if isinstance(k, str) else k: json_text_safe(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [json_text_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Item:
    """One image as listed: where it is and what identifies this version of it."""

    key: str  # identity in the state database: the full source URI, or a manifest id
    uri: str  # where the bytes are read from (an fsspec URL or a local absolute path)
    size: int | None
    fingerprint: str  # size plus ETag (object storage) or mtime (files)
    extra: Mapping[str, Any] = field(default_factory=dict)  # manifest columns sent in the record


@dataclass(frozen=True)
class Verdict:
    """What the format policy does with some bytes: accept, convert, or reject (and why)."""

    action: str  # "accept" | "convert" | "reject"
    format: str | None  # the sniffed format ("jpeg", "heic", "avif", ...), None if unknown
    reason: str | None = None  # reject: "unsupported_format:avif", "truncated", ...; convert: what


@dataclass(frozen=True)
class PreparedImage:
    """Bytes ready for upload, after the format policy and any resize."""

    data: bytes
    format: str  # format of `data` as sent ("jpeg", "png", ...)
    verdict: Verdict  # accept (bytes as they were) or convert (re-encoded)
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class RequestRecord:
    """One record of a request: `_id` plus exactly one of the bytes or a URL, plus metadata."""

    id: str
    data: bytes | None = None
    url: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordOutcome:
    """The API's last word on one record."""

    id: str
    ok: bool
    record: Mapping[str, Any] | None = None  # the API's record as returned (never the upload)
    reason: str | None = None  # why it failed: the API's text or the last transport error
    status: int | None = None  # the record's `_status.code`, else the HTTP status
    attempts: int = 1  # how many requests carried this record
    too_large: bool = False  # the API said the payload was too large (the caller may downscale)
    final: bool = True  # False: no answer was had (a stop came first); the image stays pending


@dataclass(frozen=True)
class Ready:
    """A prepared image: the record to send, and what routing needs (its content hash)."""

    item: Item
    record: RequestRecord
    content_hash: str | None  # None when the API fetches the bytes itself (send = "url")
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Refused:
    """An image that will not be sent, and why."""

    item: Item
    reason: str
    read_failed: bool  # True: the bytes could not be read (failed); False: the policy (rejected)
