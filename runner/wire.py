"""The API's wire format (docs/api-protocol.md): the request body, the Authorization header,
Retry-After, and reading an answer: its JSON, its records matched to what was sent by `_id`,
each record's status, an error's detail. No I/O: client.py sends, this reads and writes bytes.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from runner.errors import brief
from runner.job import JWT_MIN_LENGTH
from runner.records import (
    REDACTED,
    SECRET_PARAM,
    RequestRecord,
    json_text_safe,
    text_without_secret_urls,
)

log = logging.getLogger("ximrun.client")


class HttpAnswer(Protocol):
    """What an answer is read by: urllib3's response, or http1.py's `Answer`."""

    status: int
    reason: str | None

    @property
    def headers(self) -> Any: ...  # `.get(name, default)`, the name in any case

ACCOUNT_PATH = "account/v2/details/"
# Whole-request codes worth another try; 501/505 say the request can never work, so not all 5xx.
RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# Whole-request codes that mean "some record in here is the problem": split the batch to find it.
BISECT_HTTP = frozenset({400, 413})


def authorization(token: str, scheme: str = "auto") -> str:
    """The Authorization header: `Token <t>`, or `JWT <t>` for scheme "jwt", or for "auto" when
    the token has JWT_MIN_LENGTH characters or more."""
    jwt = scheme == "jwt" or (scheme == "auto" and len(token) >= JWT_MIN_LENGTH)
    return f"{'JWT' if jwt else 'Token'} {token}"


def is_retryable(code: int) -> bool:
    return code in RETRY_HTTP or (code >= 500 and code not in (501, 505))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (seconds or an HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None  # an HTTP-date is always GMT; a naive date is not one
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def build_body(records: Sequence[RequestRecord], fields: Mapping[str, Any]) -> bytes:
    """The JSON body: `records` (`_id` plus `_base64` or `_url`) beside the top-level fields."""
    out = []
    for r in records:
        if r.data is not None and not r.extra:  # the usual record: its id and its bytes
            out.append(b"".join((b'{"_id":', _encode(r.id).encode("ascii"), b',"_base64":"',
                                 base64.b64encode(r.data), b'"}')))
            continue
        if r.data is not None:
            image = "_base64"
        elif r.url is not None:
            image = "_url"
        else:
            raise ValueError(f"record {r.id!r} has neither bytes nor a URL")
        rec: dict[str, Any] = {"_id": r.id}
        if image == "_url":
            rec["_url"] = r.url
        # Metadata travels with the record but never replaces its id or its image.
        for key, value in r.extra.items():
            if key != image:
                rec.setdefault(key, value)
        text = _encode(rec).encode("ascii")
        if image == "_base64":
            # Base64 needs no JSON escaping: the record is closed around it, not encoded again.
            text = b"".join((text[:-1], b',"_base64":"', base64.b64encode(r.data), b'"}'))
        out.append(text)
    rest = {k: v for k, v in fields.items() if k != "records"}
    head = _encode(rest).encode("ascii")[:-1] + (b"," if rest else b"")
    return b"".join((head, b'"records":[', b",".join(out), b"]}"))


MAX_ANSWER_DEPTH = 64  # nesting of an answer's JSON: an API record is a few levels deep


def parse_answer(data: bytes) -> Any:
    """The answer's JSON, or None: not JSON, or nested deeper than MAX_ANSWER_DEPTH (a hostile
    answer nested a million levels deep must not end a run with a RecursionError)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    stack = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_ANSWER_DEPTH:
                return None
            children = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in children if isinstance(v, dict | list))
    return body


# A plain answer: ASCII, without a single backslash (so without escapes: every string in it is
# its own bytes, no lone surrogate can hide in one) and without an echoed upload. Nearly every
# answer is plain; its records are kept as the text they came in, not parsed, redacted and
# encoded again (docs/api-protocol.md, "Answers").
_ONLY_SHAPE = bytes(range(256)).translate(None, b'{}[]"')
_STRINGS = re.compile(rb'"[^"]*"')
_SPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE = " \t\n\r"
_decoder = json.JSONDecoder()


def is_plain(data: bytes) -> bool:
    return data.isascii() and b"\\" not in data and b'"_base64"' not in data


def split_plain(data: bytes) -> tuple[dict[str, Any], list[str]] | None:
    """A plain answer's JSON object and the text of each of its `records`, as received; None
    when the answer is not plain, not an object with a list of records, or nested deeper than
    MAX_ANSWER_DEPTH (parse_answer then says what it is)."""
    if not is_plain(data) or not _shallow(data):
        return None
    s = data.decode("ascii")
    try:
        return _split(s)
    except (ValueError, IndexError, RecursionError):
        return None


def _shallow(data: bytes) -> bool:
    """Nesting within MAX_ANSWER_DEPTH, read off the brackets (strings taken out first); for a
    plain answer only: no escaped quote can end a string early."""
    shape = data.translate(None, _ONLY_SHAPE).replace(b'""', b"")
    if b'"' in shape:  # strings holding brackets
        shape = _STRINGS.sub(b"", shape)
    for _ in range(MAX_ANSWER_DEPTH):
        inner = shape.replace(b"{}", b"").replace(b"[]", b"")
        if not inner:
            return True
        shape = inner
    return False


def _split(s: str) -> tuple[dict[str, Any], list[str]] | None:
    i = _skip(s, 0)
    if s[i] != "{":
        return None
    body: dict[str, Any] = {}
    texts: list[str] | None = None
    i = _skip(s, i + 1)
    while s[i] != "}":
        if s[i] != '"':
            return None
        key, i = json.decoder.scanstring(s, i + 1)
        i = _skip(s, i)
        if s[i] != ":":
            return None
        i = _skip(s, i + 1)
        if key == "records" and s[i] == "[":
            records, texts = [], []
            i = _skip(s, i + 1)
            while s[i] != "]":
                value, end = _decoder.raw_decode(s, i)
                records.append(value)
                texts.append(s[i:end])
                i = _skip(s, end)
                if s[i] == ",":
                    i = _skip(s, i + 1)
                elif s[i] != "]":
                    return None
            body[key], i = records, i + 1
        else:
            body[key], i = _decoder.raw_decode(s, i)
        i = _skip(s, i)
        if s[i] == ",":
            i = _skip(s, i + 1)
        elif s[i] != "}":
            return None
    if s[i + 1:].strip(" \t\n\r") or texts is None:
        return None
    return body, texts


def _skip(s: str, i: int) -> int:
    """The index of the first character from i on that is not JSON whitespace (most often i,
    or i + 1 after a separator's space: no regular expression call for those)."""
    if s[i] not in _WHITESPACE:
        return i
    if s[i + 1] not in _WHITESPACE:
        return i + 1
    return _SPACE.match(s, i).end()


def match_records(group: list[RequestRecord], out: list[Any]
           ) -> tuple[tuple[tuple[RequestRecord, Mapping[str, Any]], ...],
                      tuple[RequestRecord, ...]] | None:
    """Pair each sent record with its answer: (pairs, records left without an answer).

    By `_id` whenever the answer carries any: a record gets the one answer holding its `_id`, and
    a record with none (or with two) is left unmatched, to be sent again: an answer is never
    stored on another image. By position only when no answer carries an `_id` at all (a server
    that does not echo `_id`). None: the counts differ or a record is not an object.
    """
    if len(out) != len(group) or not all(isinstance(o, dict) for o in out):
        return None
    if all(o.get("_id") == r.id for o, r in zip(out, group, strict=True)) and len(
            {r.id for r in group}) == len(group):
        return tuple(zip(group, out, strict=True)), ()  # the usual answer: every _id in order
    if not any("_id" in o for o in out):
        log.info("the answer's records carry no _id; matched by position")
        return tuple(zip(group, out, strict=True)), ()
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for o in out:
        if isinstance(o.get("_id"), str):
            by_id.setdefault(o["_id"], []).append(o)
    sent_count: dict[str, int] = {}
    for r in group:
        sent_count[r.id] = sent_count.get(r.id, 0) + 1
    pairs: list[tuple[RequestRecord, Mapping[str, Any]]] = []
    unmatched: list[RequestRecord] = []
    for r in group:
        found = by_id.get(r.id, [])
        if len(found) == 1 and sent_count[r.id] == 1:
            pairs.append((r, found[0]))
        else:
            unmatched.append(r)
    if unmatched:
        log.info("the answer's _id values do not match those sent: %d of %d record(s) without "
                 "an answer of their own", len(unmatched), len(group))
    elif [o.get("_id") for o in out] != [r.id for r in group]:
        log.debug("the answer's records are out of order; matched by _id")
    return tuple(pairs), tuple(unmatched)


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL (its password, the values of secret-looking parameters), the
    longest first; at least 4 characters each, so that redacting them cannot eat a common word."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if SECRET_PARAM.match(k):
            found.append(v)
    return sorted({f for f in found if len(f) >= 4}, key=len, reverse=True)


def record_status(rec: Mapping[str, Any]) -> tuple[int | None, str]:
    for key in ("_status", "status"):
        value = rec.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value, text_of(rec)
        if isinstance(value, Mapping) and isinstance(value.get("code"), int):
            return value["code"], str(value.get("text") or text_of(rec))
    return None, ""


def text_of(d: Mapping[str, Any]) -> str:
    for key in ("text", "detail", "message", "error"):
        if d.get(key):
            return str(d[key])
    return ""


def has_content(rec: Mapping[str, Any], sent: RequestRecord) -> bool:
    echoed = {"_id", "_url", "_base64", *sent.extra}
    return any(k not in echoed for k in rec)


def body_status(body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    value = body.get("status")
    if isinstance(value, Mapping):
        value = value.get("code")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def error_detail(resp: HttpAnswer, data: bytes, body: Any) -> str:
    """A short reason from an error answer: its JSON detail, or the first words of its text."""
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if body.get(key):
                return brief(str(body[key]))
        status = body.get("status")
        if isinstance(status, Mapping) and status.get("text"):
            return brief(str(status["text"]))
    text = text_of_body(resp, data)
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        text = title.group(1)
    text = re.sub(r"<[^>]+>", " ", text)
    return brief(text) or (resp.reason or "no detail")


def text_of_body(resp: HttpAnswer, data: bytes) -> str:
    """The answer's body as text, in the charset its Content-Type names (else UTF-8)."""
    match = re.search(r"charset=([\w.:-]+)", resp.headers.get("Content-Type", ""), re.I)
    try:
        return data.decode(match.group(1) if match else "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", errors="replace")


class Redactor:
    """What may be stored, logged or shown of a text or an answer's record: the token, the
    endpoint's own secrets (a password, an api_key in its query) and the secrets of any URL in it
    removed; lone surrogates escaped (records.text_safe), so that it is valid UTF-8."""

    def __init__(self, token: str, endpoint_url: str) -> None:
        self._token = token if token and len(token) >= 4 else None
        self._secrets = url_secrets(endpoint_url)
        self._token_bytes = (self._token or "").encode("utf-8", "surrogateescape")
        self._secret_bytes = [s.encode("utf-8", "surrogateescape") for s in self._secrets]

    def clean(self, data: bytes) -> bool:
        """Whether a plain answer (is_plain) holds nothing to redact: not the token, not the
        endpoint's secrets, no URL. Then its records are kept exactly as they came."""
        if self._token and self._token_bytes in data:
            return False
        return b"://" not in data and not any(s in data for s in self._secret_bytes)

    def text(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "<token>")
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text_without_secret_urls(text)

    def record(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """The record to keep: never an echoed upload, every string redacted like a reason (an
        error text echoing the token, an echoed presigned `_url`)."""
        return self._scrub(json_text_safe({k: v for k, v in rec.items() if k != "_base64"}))

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        return value

@dataclass(frozen=True)
class Reply:
    """What one HTTP request came to, before the client's retry policy looks at it."""

    kind: str  # "records" | "retry" | "bisect" | "fail" | "refused" (the token: error says why)
    error: str = ""
    status: int | None = None
    retry_after: float | None = None
    records: tuple[tuple[RequestRecord, Mapping[str, Any]], ...] = ()
    unsent: bool = False  # the request never reached the service (no connection was made)
    lost: bool = False  # it may have been billed and its answer is lost (dropped, timed out, ...)
    unmatched: tuple[RequestRecord, ...] = ()  # sent, but no answer is theirs with certainty
    # A plain, clean answer's records as received, by id() of their parsed dicts: kept as they
    # are (split_plain, Redactor.clean)
    texts: Mapping[int, str] | None = None


def read_reply(resp: HttpAnswer, data: bytes, group: list[RequestRecord],
               redactor: Redactor) -> Reply:
    """What an answer to the records of `group` says (docs/api-protocol.md, "Response" and
    "Errors and retry rules")."""
    code = resp.status
    if code in (401, 403):
        return Reply("refused", status=code, error=refusal(resp, data, redactor))
    plain = split_plain(data) if 200 <= code < 300 and redactor.clean(data) else None
    # None for a proxy's HTML page: judged by its status code below
    body = plain[0] if plain is not None else parse_answer(data)
    if 200 <= code < 300 and isinstance(body, dict) and isinstance(body.get("records"), list):
        matched = match_records(group, body["records"])
        if matched is None:
            return Reply("retry", status=code, lost=True, error=(
                f"bad answer: {len(body['records'])} records for {len(group)} sent"))
        pairs, unmatched = matched
        texts = ({id(rec): text for rec, text in zip(body["records"], plain[1], strict=True)}
                 if plain is not None else None)
        return Reply("records", status=code, records=pairs, unmatched=unmatched, texts=texts)
    if 200 <= code < 300:
        # Some answers carry the error in the body's own `status`; otherwise it is garbage.
        inner = body_status(body)
        if inner is None or 200 <= inner < 300:
            what = "no records" if isinstance(body, dict) else "not JSON"
            return Reply("retry", status=code, lost=True,
                         error=f"bad answer: http {code} with {what}")
        if inner in (401, 403):
            return Reply("refused", status=inner, error=refusal(resp, data, redactor, inner))
        code = inner
    error = f"http {code}: {redactor.text(error_detail(resp, data, body))}"
    if 300 <= code < 400:
        where = redactor.text(resp.headers.get("Location", "?"))
        error = f"http {code}: redirected to {where}; check api.endpoint"
    if is_retryable(code):
        # A gateway that timed out waiting (504) may hide a request the service processed
        # and billed; other error answers say it was not processed.
        return Reply("retry", status=code, error=error, lost=code == 504,
                     retry_after=parse_retry_after(resp.headers.get("Retry-After")))
    if code in BISECT_HTTP:
        return Reply("bisect", status=code,
                     error=f"api {code}: {redactor.text(error_detail(resp, data, body))}")
    return Reply("fail", status=code, error=error)


def refusal(resp: HttpAnswer, data: bytes, redactor: Redactor, code: int | None = None) -> str:
    """Why the API refused the token, for the run's error message."""
    detail = redactor.text(error_detail(resp, data, parse_answer(data)))
    return (f"the API refused the token (HTTP {code or resp.status}): {detail}; "
            "check the token variable named in api.token_env")



def account_figure(details: Mapping[str, Any] | None, key: str = "credits_counter") -> int | None:
    """A number of the account endpoint's answer (`credits_counter`, `credits_limit`), if any."""
    if not details:
        return None
    value = details.get(key)
    return int(value) if isinstance(value, int | float) else None
