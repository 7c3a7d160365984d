"""The emulated API behind the HTTP layer: auth, request checks, faults, billing and the ledger.

`Emulator.get` / `Emulator.post` take a path, the Authorization header and the body, and return a
`Reply`; they know nothing of sockets, so every rule of the protocol lives here in one place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from runner.job import SandboxSettings, endpoint_batch_cap
from runner.sandbox.results import SERVICES, Service, answer, read_picture

ACCOUNT_PATH = "account/v2/details"
LEDGER_PATH = "_sandbox/ledger"
HEALTH_PATH = "_sandbox/health"
URL_FETCH_TIMEOUT_S = 5.0
MAX_FETCH_BYTES = 64 * 1024 * 1024

NOT_PROVIDED = "Authentication credentials were not provided."
PROXY_PAGE = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
              b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
              b"</body>\r\n</html>\r\n")
_DATA_URL = re.compile(r"^data:[^,]{0,100};base64,", re.IGNORECASE)


@dataclass(frozen=True)
class LedgerEntry:
    """One record as the emulator received it, and what became of it (the tests' source of truth)."""

    request_no: int  # 1-based; counts every POST received, refused ones too
    path: str
    record_id: str | None  # `_id` as sent
    content_sha256: str | None  # of the decoded `_base64` bytes; None for `_url` records
    url: str | None  # `_url` as sent
    code: int  # the record's `_status.code`, or the HTTP status of a refused whole request
    billed: bool  # credits were taken for this record
    answered: bool  # False: processed (maybe billed) but the answer never reached the client


@dataclass(frozen=True)
class Reply:
    """An HTTP answer to write; `drop` means: write nothing and hang up."""

    code: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    request_no: int | None = None  # the POST this answers, to mark it unanswered if writing fails


def json_reply(code: int, data: Any, headers: dict[str, str] | None = None,
               drop: bool = False) -> Reply:
    return Reply(code, json.dumps(data).encode(),
                 {"Content-Type": "application/json", **(headers or {})}, drop=drop)


@dataclass(frozen=True)
class _Sent:
    """What a record carried, read as far as the request could be read (for the ledger)."""

    record_id: str | None
    content_sha256: str | None
    url: str | None


@dataclass(frozen=True)
class _Draws:
    """The random numbers one POST may use, drawn together so a seed replays the same faults."""

    jitter: float
    p429: float
    p500: float
    p502: float
    drop: float
    per_record: tuple[float, ...]


class _BadRequest(Exception):
    """The whole request is malformed (400)."""


class _TokenBucket:
    """Requests per second over all POSTs, with a burst of max(1, rate) requests."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when a request may pass; otherwise the seconds until the next token is free."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


def seconds_header(seconds: float) -> str:
    """A Retry-After value: whole seconds as an integer, otherwise decimals rounded up to the ms."""
    if seconds == int(seconds):
        return str(int(seconds))
    ms = math.ceil(seconds * 1000)
    return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0")


class Emulator:
    """The API's behaviour, shared by every connection of one sandbox; thread-safe."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self._lock = threading.Lock()  # guards the rng, the counters and the ledger
        self._ledger: list[LedgerEntry] = []
        self._requests = 0
        self._credits_used = 0
        self._bucket = _TokenBucket(settings.rate_limit_rps) if settings.rate_limit_rps > 0 else None
        self._account_id = uuid.UUID(int=random.Random(f"account:{settings.seed}").getrandbits(128))

    # --- inspection ------------------------------------------------------------------------

    def ledger(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._ledger)

    @property
    def credits_used(self) -> int:
        with self._lock:
            return self._credits_used

    def mark_unanswered(self, request_no: int) -> None:
        """The answer to this POST could not be written: its records were never answered."""
        with self._lock:
            for i in range(len(self._ledger) - 1, -1, -1):
                if self._ledger[i].request_no == request_no:
                    self._ledger[i] = replace(self._ledger[i], answered=False)

    # --- HTTP methods ----------------------------------------------------------------------

    def get(self, path: str, authorization: str | None) -> Reply:
        path = _clean_path(path)
        if path == HEALTH_PATH:
            return json_reply(200, {"ok": True})
        if path == LEDGER_PATH:
            with self._lock:
                entries = [asdict(e) for e in self._ledger]
                used = self._credits_used
            return json_reply(200, {"entries": entries, "credits_used": used})
        if path != ACCOUNT_PATH:
            return json_reply(404, {"detail": "Not found."})
        refused = self._check_token(authorization)
        if refused is not None:
            return refused
        return json_reply(200, {
            "id": str(self._account_id),
            "email": "sandbox@example.com",
            "credits_counter": self.credits_used,
            "credits_limit": self.settings.credits,
            "default_workspace": str(uuid.UUID(int=self._account_id.int ^ 1)),
        })

    def post(self, path: str, authorization: str | None, body: bytes | None) -> Reply:
        """One POST; body None means it was too large to read (413)."""
        started = time.monotonic()
        path = _clean_path(path)
        s = self.settings
        try:
            payload = json.loads(body) if body is not None else None
        except ValueError:  # not JSON, or not UTF-8: refused as 400 below
            payload = None
        records = payload.get("records") if isinstance(payload, dict) else None
        sent = _read_sent(records)
        with self._lock:
            self._requests += 1
            request_no = self._requests
            draws = _Draws(*(self._rng.random() for _ in range(5)),
                           per_record=tuple(self._rng.random() for _ in sent))
        delay_s = (s.latency_ms + s.jitter_ms * draws.jitter) / 1000
        reply = self._answer(path, authorization, body, payload, records, sent, request_no, draws)
        # The latency is the answer's: the work above is part of it, as on the real service.
        remaining = delay_s - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        return reply

    def _answer(self, path: str, authorization: str | None, body: bytes | None, payload: Any,
                records: Any, sent: list[_Sent], request_no: int, draws: _Draws) -> Reply:
        started = time.monotonic()
        s = self.settings

        def refuse(reply: Reply) -> Reply:
            self._record(request_no, path, [(x, reply.code, False) for x in sent], answered=True)
            return replace(reply, request_no=request_no)

        service = SERVICES.get(path)
        if service is None:
            return refuse(json_reply(404, {"detail": "Not found."}))
        refused = self._check_token(authorization)
        if refused is not None:
            return refuse(refused)
        if body is None:
            return refuse(json_reply(413, {"detail": "Request entity too large."}))
        wait = self._bucket.take() if self._bucket is not None else 0.0
        if wait > 0:
            return refuse(_throttled(wait))
        if draws.p429 < s.p429:
            return refuse(_throttled(s.retry_after_s))
        if draws.p500 < s.p500:
            return refuse(json_reply(500, {"detail": "Internal server error"}))
        if draws.p502 < s.p502:
            return refuse(Reply(502, PROXY_PAGE, {"Content-Type": "text/html"}))
        try:
            _check_request(payload, min(s.max_records, endpoint_batch_cap(path)))
        except _BadRequest as exc:
            return refuse(json_reply(400, {"detail": str(exc)}))

        assert isinstance(payload, dict) and isinstance(records, list)  # _check_request said so
        request_id = uuid.UUID(int=random.Random(f"{s.seed}:{request_no}").getrandbits(128)).hex
        extra = {k: v for k, v in payload.items() if k != "records"}
        out, outcomes = self._process(service, records, draws.per_record, request_id, extra)
        drop = draws.drop < s.pdrop
        self._record(request_no, path,
                     [(x, code, billed) for x, (code, billed) in zip(sent, outcomes, strict=True)],
                     answered=not drop)
        body_out = {"records": out,
                    "status": {"code": 200, "text": "OK", "request_id": request_id},
                    "statistics": {"processing time": round(time.monotonic() - started, 3)}}
        return replace(json_reply(200, body_out, drop=drop), request_no=request_no)

    # --- internals -------------------------------------------------------------------------

    def _check_token(self, authorization: str | None) -> Reply | None:
        m = re.fullmatch(r"\s*(?:token|jwt) +(\S+)\s*", authorization or "", re.IGNORECASE)
        if m is None:
            return json_reply(401, {"detail": NOT_PROVIDED}, headers={"WWW-Authenticate": "Token"})
        if self.settings.token is not None and m.group(1) != self.settings.token:
            return json_reply(401, {"detail": "Invalid token."}, headers={"WWW-Authenticate": "Token"})
        return None

    def _record(self, request_no: int, path: str, rows: list[tuple[_Sent, int, bool]],
                answered: bool) -> None:
        with self._lock:
            self._ledger.extend(
                LedgerEntry(request_no, path, x.record_id, x.content_sha256, x.url, code, billed,
                            answered)
                for x, code, billed in rows)

    def _process(self, service: Service, records: list[dict[str, Any]], draws: tuple[float, ...],
                 request_id: str, extra: dict[str, Any]
                 ) -> tuple[list[dict[str, Any]], list[tuple[int, bool]]]:
        """Answer every record and bill the successes; returns the records and (code, billed) each."""
        s = self.settings
        # Decoding runs outside the lock, so concurrent requests are analysed in parallel.
        results = [self._analyse(service, rec, u) for rec, u in zip(records, draws, strict=True)]
        billed = [False] * len(records)
        with self._lock:
            charged = False
            for i, (code, _, _) in enumerate(results):
                if code != 200 or (service.billed_per_request and charged):
                    continue  # failures are free; one grading charge covers front and back
                if s.credits - self._credits_used < s.credits_per_record:
                    results[i] = (402, "Insufficient credits", {})
                    continue
                self._credits_used += s.credits_per_record
                billed[i] = charged = True
        out = []
        for rec, (code, text, result) in zip(records, results, strict=True):
            meta = {k: v for k, v in rec.items() if k != "_base64"}
            meta.setdefault("_id", str(uuid.uuid4()))
            if extra:
                meta["_request_fields"] = extra
            out.append({**meta, "_status": {"code": code, "text": text, "request_id": request_id},
                        **result})
        return out, [(code, b) for (code, _, _), b in zip(results, billed, strict=True)]

    def _analyse(self, service: Service, rec: dict[str, Any], u: float
                 ) -> tuple[int, str, dict[str, Any]]:
        s = self.settings
        if "_base64" in rec:
            data = _b64decode(rec["_base64"])
            if data is None:
                return 400, "Unable to load image", {}
        else:
            data = fetch_loopback(rec["_url"])
            if data is None:
                return 400, "Unable to download image", {}
        if s.max_image_bytes and len(data) > s.max_image_bytes:
            return 413, "Image too large", {}
        pic = read_picture(data)
        if pic is None or self._refuses(data):
            return 400, "Unable to load image", {}
        if u < s.precord_retry:
            # The same draw picks the code, so both retryable codes show up at any probability.
            return (503 if u < s.precord_retry / 2 else 500), "Temporarily unavailable", {}
        return 200, "OK", {"_width": pic.width, "_height": pic.height, **answer(service, pic)}

    def _refuses(self, data: bytes) -> bool:
        """prefuse: decided by the content, so the same bytes are refused every time."""
        if self.settings.prefuse <= 0:
            return False
        h = hashlib.sha256(f"refuse:{self.settings.seed}:".encode() + data).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < self.settings.prefuse


def _throttled(seconds: float) -> Reply:
    return json_reply(429, {"detail": "Request was throttled."},
                      headers={"Retry-After": seconds_header(seconds)})


def _clean_path(path: str) -> str:
    return urlsplit(path).path.strip("/")


def _b64decode(value: str) -> bytes | None:
    try:
        # Line breaks are tolerated (MIME-style encoders wrap lines); other junk is refused.
        return base64.b64decode("".join(_DATA_URL.sub("", value.strip(), count=1).split()),
                                validate=True)
    except (binascii.Error, ValueError):
        return None


def _read_sent(records: Any) -> list[_Sent]:
    """Who the records are, as far as they can be read: a malformed request is still logged."""
    if not isinstance(records, list):
        return []
    sent = []
    for rec in records:
        rec = rec if isinstance(rec, dict) else {}
        rid, b64, url = rec.get("_id"), rec.get("_base64"), rec.get("_url")
        data = _b64decode(b64) if isinstance(b64, str) else None
        sent.append(_Sent(None if rid is None else str(rid),
                          hashlib.sha256(data).hexdigest() if data is not None else None,
                          url if isinstance(url, str) else None))
    return sent


def _check_request(payload: Any, cap: int) -> None:
    if not isinstance(payload, dict):
        raise _BadRequest("JSON parse error: the body must be a JSON object.")
    records = payload.get("records")
    if not isinstance(records, list) or not records:
        raise _BadRequest("The request must have a non-empty 'records' list.")
    if len(records) > cap:
        raise _BadRequest(f"Too many records: {len(records)} (at most {cap} per request).")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _BadRequest(f"records[{i}]: a record must be a JSON object.")
        has = [k for k in ("_url", "_base64") if k in rec]
        if len(has) != 1:
            raise _BadRequest(f"records[{i}]: a record needs exactly one of '_url' or '_base64'.")
        if not isinstance(rec[has[0]], str):
            raise _BadRequest(f"records[{i}]: '{has[0]}' must be a string.")


class _LoopbackOnly(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        if not is_loopback_url(newurl):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# No proxies: a proxy from the environment would send loopback URLs somewhere else.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _LoopbackOnly())


def is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def fetch_loopback(url: str) -> bytes | None:
    """The sandbox has no internet: it downloads from loopback only (e.g. a local S3's presigned
    URLs). None means "Unable to download image"."""
    if not is_loopback_url(url):
        return None
    try:
        with _opener.open(url, timeout=URL_FETCH_TIMEOUT_S) as resp:
            data = resp.read(MAX_FETCH_BYTES + 1)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return data if len(data) <= MAX_FETCH_BYTES else None
