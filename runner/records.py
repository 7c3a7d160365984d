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


# Query parameters whose value is a secret: API keys, tokens, signatures of presigned URLs (S3's
# X-Amz-Signature and session token, GCS's X-Goog-*, Azure's sig), passwords.
SECRET_PARAM = re.compile(
    r"(?i)^(?:.*(?:key|token|secret|passw(?:or)?d|pwd|signature|credential|auth|session).*"
    r"|sig|awsaccesskeyid|code)$")
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>]+")
REDACTED = "REDACTED"


def url_without_secrets(url: str) -> str:
    """The URL as it may be stored or shown: a password in `user:password@` and the values of
    secret-looking query parameters (api_key, token, X-Amz-Signature, X-Amz-Security-Token, sig,
    ...) replaced by REDACTED. Anything else is kept, so the URL still says where it points."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAM.match(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if SECRET_PARAM.match(k) else v) for k, v in pairs],
                              safe="/:")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def text_without_secret_urls(text: str) -> str:
    """Every URL inside a text with its secrets removed (url_without_secrets)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: url_without_secrets(m.group()), text)


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
    # A manifest row whose source cannot be read ("missing: <path>", ...): listed, never read or
    # sent, failed with this reason.
    problem: str | None = None


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
    text: str | None = None  # the record as received, when it is kept as is (else None)
    reason: str | None = None  # why it failed: the API's text or the last transport error
    status: int | None = None  # the record's `_status.code`, else the HTTP status
    attempts: int = 1  # how many requests carried this record
    too_large: bool = False  # the API said the payload was too large (the caller may downscale)
    final: bool = True  # False: no answer was had (a stop came first); the image stays pending
    # The service failed, not this record (connection, timeout, 5xx, 429 after the retries):
    # not final either, so the image stays pending for the next run.
    unavailable: bool = False

    @property
    def answer(self) -> Mapping[str, Any] | str:
        """The record, parsed or as its text (a Dask worker sends the text alone), {} if none."""
        return self.record if self.record is not None else (self.text or {})


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
