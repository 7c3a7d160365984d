"""The API's wire protocol: auth, batch requests, retries, per-record outcomes, adaptive limits.

`ApiClient.submit_batch` turns a list of `RequestRecord`s into one `RecordOutcome` per record.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    SSLError,
)
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import TimeoutError as TransportTimeout

from runner import __version__
from runner.errors import AuthError, JobError
from runner.job import ApiConfig
from runner.records import RecordOutcome, RequestRecord

log = logging.getLogger("ximrun.client")

ACCOUNT_PATH = "account/v2/details/"
STOPPED = "stopped"
# Whole-request codes worth another try; 501/505 say the request can never work, so not all 5xx.
RETRY_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# Whole-request codes that mean "some record in here is the problem": split the batch to find it.
BISECT_HTTP = frozenset({400, 413})

AttemptFn = Callable[[Sequence[str], int], None]


def _is_retryable(code: int) -> bool:
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


class AdaptiveLimit:
    """AIMD cap on requests in flight, shared by all worker threads of one client."""

    WINDOW_S = 1.0  # 429s closer together than this are one congestion signal
    POLL_S = 0.1  # how often a waiter looks at the stop event (it cannot notify our Condition)

    def __init__(self, maximum: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self._limit = maximum
        self._in_flight = 0
        self._clean = 0
        self._last_decrease = float("-inf")
        self._clock = clock
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        with self._cond:
            return self._limit

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until a slot is free; False (and no slot taken) once `stop` is set."""
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    return False
                if self._in_flight < self._limit:
                    self._in_flight += 1
                    return True
                self._cond.wait(self.POLL_S if stop is not None else None)

    def release(self) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self._cond.notify()

    def on_throttle(self) -> None:
        with self._cond:
            self._clean = 0
            now = self._clock()
            if now - self._last_decrease < self.WINDOW_S:
                return
            self._last_decrease = now
            new = max(1, self._limit // 2)
            if new != self._limit:
                log.debug("throttled: requests in flight capped at %d (was %d)", new, self._limit)
                self._limit = new

    def on_success(self) -> None:
        with self._cond:
            if self._limit >= self.maximum:
                self._clean = 0
                return
            self._clean += 1
            if self._clean >= self._limit:
                self._clean = 0
                self._limit += 1
                log.debug("requests in flight capped at %d (was %d)", self._limit, self._limit - 1)
                self._cond.notify()


@dataclass
class _Batch:
    """Book-keeping of one submit_batch call across its requests, retries and bisections."""

    on_attempt: AttemptFn | None
    requests: int = 0
    retries: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, RecordOutcome] = field(default_factory=dict)
    last_error: dict[str, tuple[str, int | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Answer:
    """What one HTTP request came to, before the retry policy looks at it."""

    kind: str  # "records" | "retry" | "bisect" | "fail"
    error: str = ""
    status: int | None = None
    retry_after: float | None = None
    records: tuple[tuple[RequestRecord, Mapping[str, Any]], ...] = ()


class ApiClient:
    """Talks to one endpoint with one token; safe to share between `api.concurrency` threads."""

    BACKOFF_BASE_S = 0.5
    BACKOFF_CAP_S = 30.0
    RETRY_AFTER_CAP_S = 120.0

    def __init__(self, endpoint_url: str, token: str, api: ApiConfig, *,
                 fields: Mapping[str, Any] | None = None, stop: threading.Event | None = None,
                 sleep: Callable[[float], None] = time.sleep, direct: bool = False) -> None:
        """`direct`: no proxy, whatever the environment says (the embedded emulator)."""
        self.endpoint_url = endpoint_url
        parts = urlsplit(endpoint_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}/"
        self.api = api
        self.fields = dict(api.fields if fields is None else fields)
        self.limit = AdaptiveLimit(max(1, api.concurrency))
        self._token = token
        self._stop = stop
        self._sleep = sleep
        self._timeout = (api.connect_timeout_s, api.timeout_s)
        self._headers = {"Authorization": f"Token {token}", "Content-Type": "application/json",
                         "Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                         "User-Agent": f"ximrun/{__version__}"}
        self._http = _pool_manager(endpoint_url, max(1, api.concurrency), self._timeout,
                                   None if direct else environ_proxy(endpoint_url))

    def __repr__(self) -> str:  # the token stays out of reprs and tracebacks
        return f"ApiClient({self.endpoint_url!r})"

    # --- public API -----------------------------------------------------------------------------

    def submit_batch(self, records: Sequence[RequestRecord],
                     on_attempt: AttemptFn | None = None) -> list[RecordOutcome]:
        """Send records (retrying, bisecting as needed); one outcome per record, in input order.

        `on_attempt(ids, n)` runs before every HTTP request, so the caller can record that these
        records may be billed. Raises AuthError when the API refuses the token.
        """
        records = list(records)
        for r in records:
            if r.data is None and r.url is None:
                raise ValueError(f"record {r.id!r} has neither bytes nor a URL")
        batch = _Batch(on_attempt)
        if records:
            self._send(batch, records)
        out = []
        for r in records:
            o = batch.outcomes.get(r.id)
            if o is None:  # not reachable by design; a pending record is safer than a lost one
                o = RecordOutcome(r.id, ok=False, reason=STOPPED, final=False)
            out.append(_with_attempts(o, batch.attempts.get(r.id, 0)))
        return out

    def account_details(self) -> dict[str, Any] | None:
        """The account's details (credits), or None if the API does not offer them."""
        url = self.base_url + ACCOUNT_PATH
        try:
            resp = self._http.urlopen("GET", url, headers=self._headers, redirect=False)
        except TransportError as exc:
            reason = _transport_error(exc, self._timeout)
            log.debug("account details unavailable: %s", self._redact(reason))
            return None
        if resp.status in (401, 403):
            raise AuthError(self._auth_message(resp))
        if not 200 <= resp.status < 300:
            log.debug("account details unavailable: http %d", resp.status)
            return None
        try:
            body = json.loads(resp.data)
        except ValueError:
            log.debug("account details unavailable: the answer is not JSON")
            return None
        return body if isinstance(body, dict) else None

    def close(self) -> None:
        self._http.clear()  # closes the pooled connections

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the retry policy -----------------------------------------------------------------------

    def _send(self, batch: _Batch, group: list[RequestRecord]) -> None:
        """Settle every record of `group` in batch.outcomes: answered, failed, or stopped."""
        pending = group
        while pending:
            if not self.limit.acquire(self._stop):
                self._settle_stopped(batch, pending)
                return
            try:
                answer = self._request(batch, pending)
            finally:
                self.limit.release()

            if answer.kind == "bisect":
                self._bisect(batch, pending, answer)
                return
            if answer.kind == "fail":
                for r in pending:
                    self._settle(batch, r, ok=False, reason=answer.error, status=answer.status)
                return
            if answer.kind == "retry":
                again = pending
                for r in again:
                    batch.last_error[r.id] = (answer.error, answer.status)
            else:
                again = self._settle_records(batch, answer)
            if not again:
                return
            if batch.retries >= self.api.max_retries:
                log.info("%d record(s) failed after %d retries: %s", len(again), batch.retries,
                         _retry_reason(batch, again))
                for r in again:
                    error, status = batch.last_error[r.id]
                    self._settle(batch, r, ok=False, reason=error, status=status)
                return
            batch.retries += 1
            delay = self._delay(batch.retries, answer.retry_after)
            log.debug("%d of %d record(s): %s; retry %d/%d in %.1fs", len(again), len(group),
                     _retry_reason(batch, again), batch.retries, self.api.max_retries, delay)
            if self._pause(delay):
                self._settle_stopped(batch, again)
                return
            pending = again

    def _bisect(self, batch: _Batch, group: list[RequestRecord], answer: _Answer) -> None:
        if len(group) == 1:
            self._settle(batch, group[0], ok=False, reason=answer.error, status=answer.status,
                         too_large=answer.status == 413)
            return
        # A refused batch usually hides one poisonous record; halves find it in log2(n) steps
        # while its neighbours still get their answers.
        log.info("%d records refused together (%s); splitting to find the culprit",
                 len(group), answer.error)
        mid = (len(group) + 1) // 2
        self._send(batch, group[:mid])
        self._send(batch, group[mid:])

    def _settle_records(self, batch: _Batch, answer: _Answer) -> list[RequestRecord]:
        """Record each answered record's outcome; return the records to send again."""
        again: list[RequestRecord] = []
        throttled = False
        for r, rec in answer.records:
            code, text = _record_status(rec)
            if code is None:
                if _has_content(rec, r):
                    # No `_status`, but the service answered with content: trust the HTTP 2xx.
                    self._settle(batch, r, ok=True, record=_clean(rec), status=answer.status)
                else:
                    batch.last_error[r.id] = ("bad answer: record without status or content",
                                              answer.status)
                    again.append(r)
                continue
            reason = f"api {code}: {self._redact(text)}" if text else f"api {code}"
            if 200 <= code < 300:
                self._settle(batch, r, ok=True, record=_clean(rec), status=code)
            elif _is_retryable(code):
                throttled = throttled or code == 429
                batch.last_error[r.id] = (reason, code)
                again.append(r)
            else:
                self._settle(batch, r, ok=False, record=_clean(rec), reason=reason, status=code,
                             too_large=code == 413)
        if throttled:
            self.limit.on_throttle()
        return again

    def _settle(self, batch: _Batch, r: RequestRecord, **kw: Any) -> None:
        batch.outcomes[r.id] = RecordOutcome(r.id, **kw)

    def _settle_stopped(self, batch: _Batch, records: Sequence[RequestRecord]) -> None:
        for r in records:
            batch.outcomes[r.id] = RecordOutcome(r.id, ok=False, reason=STOPPED, final=False)

    def _delay(self, retry_no: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.RETRY_AFTER_CAP_S)
        # Full jitter: threads that failed together do not come back together.
        return random.uniform(0, min(self.BACKOFF_CAP_S, self.BACKOFF_BASE_S * 2 ** (retry_no - 1)))

    def _pause(self, delay: float) -> bool:
        """Wait before a retry; True if a stop came meanwhile (then the wait ends at once)."""
        if self._stop is not None and self._sleep is time.sleep:
            return self._stop.wait(delay)
        self._sleep(delay)
        return self._stopped()

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    # --- one HTTP request -----------------------------------------------------------------------

    def _request(self, batch: _Batch, group: list[RequestRecord]) -> _Answer:
        batch.requests += 1
        for r in group:
            batch.attempts[r.id] = batch.attempts.get(r.id, 0) + 1
        if batch.on_attempt is not None:
            batch.on_attempt([r.id for r in group], batch.requests)
        try:
            # No redirects: a redirected POST would become a GET without its body. The pool
            # never retries on its own (retries=False): every try is counted here.
            resp = self._http.urlopen("POST", self.endpoint_url, body=build_body(group, self.fields),
                                      headers=self._headers, redirect=False)
        except TransportError as exc:
            # urllib3 already replaces a pooled connection found dead before sending; what reaches
            # here may have been sent and billed, so it counts as an attempt like any other.
            return _Answer("retry", error=self._redact(_transport_error(exc, self._timeout)))
        return self._read_answer(resp, group)

    def _read_answer(self, resp: urllib3.BaseHTTPResponse, group: list[RequestRecord]
                     ) -> _Answer:
        code = resp.status
        if code in (401, 403):
            raise AuthError(self._auth_message(resp))
        body: Any = None
        try:
            body = json.loads(resp.data)
        except ValueError:
            pass  # a proxy's HTML page: judged by its status code below
        if 200 <= code < 300 and isinstance(body, dict) and isinstance(body.get("records"), list):
            matched = _match(group, body["records"])
            if matched is None:
                return _Answer("retry", status=code, error=(
                    f"bad answer: {len(body['records'])} records for {len(group)} sent"))
            self.limit.on_success()
            return _Answer("records", status=code, records=matched)
        if 200 <= code < 300:
            # Some answers carry the error in the body's own `status`; otherwise it is garbage.
            inner = _body_status(body)
            if inner is None or 200 <= inner < 300:
                what = "no records" if isinstance(body, dict) else "not JSON"
                return _Answer("retry", status=code, error=f"bad answer: http {code} with {what}")
            if inner in (401, 403):
                raise AuthError(self._auth_message(resp, inner))
            code = inner
        error = f"http {code}: {self._redact(_detail(resp, body))}"
        if 300 <= code < 400:
            where = self._redact(resp.headers.get("Location", "?"))
            error = f"http {code}: redirected to {where}; check api.endpoint"
        if code == 429:
            self.limit.on_throttle()
        if _is_retryable(code):
            return _Answer("retry", status=code, error=error,
                           retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if code in BISECT_HTTP:
            return _Answer("bisect", status=code,
                           error=f"api {code}: {self._redact(_detail(resp, body))}")
        return _Answer("fail", status=code, error=error)

    # --- plumbing -------------------------------------------------------------------------------

    def _auth_message(self, resp: urllib3.BaseHTTPResponse, code: int | None = None) -> str:
        try:
            body = json.loads(resp.data)
        except ValueError:
            body = None
        detail = self._redact(_detail(resp, body))
        return (f"the API refused the token (HTTP {code or resp.status}): {detail}; "
                "check the token variable named in api.token_env")

    def _redact(self, text: str) -> str:
        if self._token and len(self._token) >= 4:
            text = text.replace(self._token, "<token>")
        return text


# --- answers --------------------------------------------------------------------------------------


def _match(group: list[RequestRecord], out: list[Any]
           ) -> tuple[tuple[RequestRecord, Mapping[str, Any]], ...] | None:
    """Pair each sent record with its answer: by `_id`, else by position; None if counts differ."""
    if len(out) != len(group) or not all(isinstance(o, dict) for o in out):
        return None
    sent = [r.id for r in group]
    got = [o.get("_id") for o in out]
    if got == sent:
        return tuple(zip(group, out, strict=True))
    if len(set(sent)) == len(sent) and sorted(map(str, got)) == sorted(sent) and \
            all(isinstance(g, str) for g in got):
        log.debug("the answer's records are out of order; matched by _id")
        by_id = {o["_id"]: o for o in out}
        return tuple((r, by_id[r.id]) for r in group)
    log.info("the answer's _id values do not match those sent; matched by position")
    return tuple(zip(group, out, strict=True))


def _record_status(rec: Mapping[str, Any]) -> tuple[int | None, str]:
    for key in ("_status", "status"):
        value = rec.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value, _text_of(rec)
        if isinstance(value, Mapping) and isinstance(value.get("code"), int):
            return value["code"], str(value.get("text") or _text_of(rec))
    return None, ""


def _text_of(d: Mapping[str, Any]) -> str:
    for key in ("text", "detail", "message", "error"):
        if d.get(key):
            return str(d[key])
    return ""


def _has_content(rec: Mapping[str, Any], sent: RequestRecord) -> bool:
    echoed = {"_id", "_url", "_base64", *sent.extra}
    return any(k not in echoed for k in rec)


def _clean(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The record to keep: never an echoed upload."""
    return {k: v for k, v in rec.items() if k != "_base64"}


def _body_status(body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    value = body.get("status")
    if isinstance(value, Mapping):
        value = value.get("code")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _detail(resp: urllib3.BaseHTTPResponse, body: Any) -> str:
    """A short reason from an error answer: its JSON detail, or the first words of its text."""
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if body.get(key):
                return _short(str(body[key]))
        status = body.get("status")
        if isinstance(status, Mapping) and status.get("text"):
            return _short(str(status["text"]))
    text = _text_of_body(resp)
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        text = title.group(1)
    text = re.sub(r"<[^>]+>", " ", text)
    return _short(text) or (resp.reason or "no detail")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text_of_body(resp: urllib3.BaseHTTPResponse) -> str:
    """The answer's body as text, in the charset its Content-Type names (else UTF-8)."""
    match = re.search(r"charset=([\w.:-]+)", resp.headers.get("Content-Type", ""), re.I)
    try:
        return resp.data.decode(match.group(1) if match else "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return resp.data.decode("utf-8", errors="replace")


def _transport_error(exc: TransportError, timeout: tuple[float, float]) -> str:
    if isinstance(exc, (NewConnectionError, ProxyError)):  # the API or the proxy unreachable
        return f"connection failed ({_short(str(exc), 160)})"
    if isinstance(exc, ConnectTimeoutError):
        return f"connect timeout after {timeout[0]:g}s"
    if isinstance(exc, TransportTimeout):
        return f"timeout after {timeout[1]:g}s"
    if isinstance(exc, ProtocolError):
        # urllib3 says "Connection broken" once the answer has begun, "aborted" before.
        if str(exc).startswith("Connection broken") or _caused_by(exc, (
                http.client.IncompleteRead, urllib3.exceptions.IncompleteRead,
                urllib3.exceptions.InvalidChunkLength)):
            return "connection dropped while reading the answer"
        if _caused_by(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                            BrokenPipeError)) or "Connection aborted" in str(exc):
            return "connection dropped"
        return f"connection failed ({_short(str(exc), 160)})"
    if isinstance(exc, SSLError):
        return f"TLS failed ({_short(str(exc), 160)})"
    if isinstance(exc, DecodeError):
        return "the answer could not be decompressed"
    return f"{type(exc).__name__}: {_short(str(exc), 160)}"


def _pool_manager(endpoint_url: str, size: int, timeout: tuple[float, float],
                  proxy: str | None) -> urllib3.PoolManager:
    """Connections to the endpoint, shared by every thread, through `proxy` if any, with the CA
    bundle REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE names, else certifi's (a declared dependency:
    the same trust store on every server, whatever the system has)."""
    kw: dict[str, Any] = {
        # `size` requests at once, and room for the account's GET beside them.
        "num_pools": 4, "maxsize": size + 2, "block": False, "retries": False,
        "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]),
    }
    ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not ca:
        import certifi

        ca = certifi.where()
    kw["ca_certs" if os.path.isfile(ca) else "ca_cert_dir"] = ca
    if proxy is None:
        return urllib3.PoolManager(**kw)
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme not in ("http", "https"):
        raise JobError(f"the proxy for {endpoint_url} is {parts.scheme}://...: ximrun speaks "
                       "to http:// and https:// proxies only (see HTTPS_PROXY, ALL_PROXY)")
    headers = None
    if parts.username is not None:
        auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers = urllib3.make_headers(proxy_basic_auth=auth)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib3.ProxyManager(f"{parts.scheme}://{netloc}", proxy_headers=headers, **kw)


def environ_proxy(url: str) -> str | None:
    """The proxy URL the environment names for `url` (HTTP(S)_PROXY, ALL_PROXY), or None (none
    set, or NO_PROXY matches); read once per client."""
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not proxies or not host:
        return None
    # NO_PROXY entries may name a host or a host:port.
    if urllib.request.proxy_bypass_environment(host, proxies) or (
            parts.port and urllib.request.proxy_bypass_environment(f"{host}:{parts.port}",
                                                                   proxies)):
        return None
    return proxies.get(parts.scheme) or proxies.get("all") or None


def _caused_by(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, kinds) or any(isinstance(a, kinds) for a in getattr(cur, "args", ())):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _retry_reason(batch: _Batch, records: Sequence[RequestRecord]) -> str:
    return batch.last_error[records[0].id][0] if records else ""


def _with_attempts(o: RecordOutcome, attempts: int) -> RecordOutcome:
    return replace(o, attempts=attempts)
