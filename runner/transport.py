"""The transport under the API client: one urllib3 pool shared by every thread, the proxy and
CA bundle the environment names, and an adaptive limit on the requests in flight.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol
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

from runner.errors import JobError, brief

log = logging.getLogger("ximrun.client")


class Flag(Protocol):
    """What a waiter looks at to give up: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


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

    def acquire(self, stop: Flag | None = None) -> bool:
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


def never_sent(exc: TransportError) -> bool:
    """Whether the request surely never reached the service: no connection was made (refused,
    DNS, a connect timeout; NameResolutionError and NewConnectionError are ConnectTimeoutErrors),
    or the proxy could not be reached (urllib3 says ProxyError only before it connected to it).
    Anything later may have handed the body to the socket."""
    return isinstance(exc, (ConnectTimeoutError, ProxyError))


_current = threading.local()


class Deadline:
    """A whole request's time limit (connect, send and the answer's last byte), not one socket
    read's: past it the request's socket is shut down, so a server dripping a byte at a time
    cannot keep a request (or a stop waiting for it) open. Use as a context manager around the
    request and the reading of its answer, on the thread that makes the request. One watchdog
    thread serves every deadline of the process."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.finished = False
        self.when = 0.0
        self._conn: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self.when = time.monotonic() + self.seconds
        _WATCHDOG.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _current.deadline = None
        with self._lock:
            self.finished = True
            self._conn = None

    def attach(self, conn: Any) -> None:
        """The connection carrying the request (called by the connection itself)."""
        with self._lock:
            self._conn = conn
            if self.expired:
                _shut(conn)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            if self._conn is not None:
                _shut(self._conn)


class _Watchdog:
    """Expires deadlines in time order on one daemon thread (a timer thread per request would
    cost more than many requests do)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                # First use, or a forked child (which has no copy of the parent's thread).
                self._heap = [e for e in self._heap if not e[2].finished]
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="ximrun-deadlines",
                                                daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline.when, next(self._seq), deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when = self._heap[0][0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                _, _, deadline = heapq.heappop(self._heap)
                deadline.expire()


_WATCHDOG = _Watchdog()


def _shut(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def attach_deadline(conn: Any) -> None:
    """Tell the thread's Deadline, if any, which connection (anything with `.sock`) to cut."""
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(conn)


class _DeadlineConnection:
    """Mixed into urllib3's connections: tells the thread's Deadline which connection to cut."""

    def connect(self) -> None:
        attach_deadline(self)
        super().connect()  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        attach_deadline(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_DeadlineConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class AnswerTooLarge(Exception):
    """An answer's decoded body passed its cap."""


def read_capped(resp: urllib3.BaseHTTPResponse, cap: int) -> bytes:
    """The answer's body, decoded (gzip, deflate), read a bounded piece at a time: never more
    than `cap` bytes decoded (AnswerTooLarge), so a huge or decompression-bomb answer cannot fill
    memory. The connection goes back to the pool only after a complete read."""
    chunks: list[bytes] = []
    total = 0
    complete = False
    try:
        while True:
            chunk = resp.read(64 * 1024, decode_content=True)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise AnswerTooLarge(f"answer over {cap} bytes decoded")
            chunks.append(chunk)
        complete = True
    finally:
        if not complete:
            resp.close()
        resp.release_conn()
    return b"".join(chunks)


def transport_error(exc: TransportError, timeout: tuple[float, float]) -> str:
    """What went wrong with a request, in a few words, from urllib3's exception."""
    if isinstance(exc, (NewConnectionError, ProxyError)):  # the API or the proxy unreachable
        return f"connection failed ({brief(str(exc), 160)})"
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
        return f"connection failed ({brief(str(exc), 160)})"
    if isinstance(exc, SSLError):
        return f"TLS failed ({brief(str(exc), 160)})"
    if isinstance(exc, DecodeError):
        return "the answer could not be decompressed"
    return f"{type(exc).__name__}: {brief(str(exc), 160)}"


def pool_manager(endpoint_url: str, size: int, timeout: tuple[float, float],
                  proxy: str | None) -> urllib3.PoolManager:
    """Connections to the endpoint, shared by every thread, through `proxy` if any, with the CA
    bundle REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE names, else certifi's (a declared dependency:
    the same trust store on every server, whatever the system has)."""
    kw: dict[str, Any] = {
        # `size` requests at once, and room for the account's GET beside them.
        "num_pools": 4, "maxsize": size + 2, "block": False, "retries": False,
        "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]),
    }
    kw["ca_certs"], kw["ca_cert_dir"] = ca_bundle()
    if proxy is None:
        return _with_deadlines(urllib3.PoolManager(**kw))
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
    return _with_deadlines(urllib3.ProxyManager(f"{parts.scheme}://{netloc}",
                                                proxy_headers=headers, **kw))


def ca_bundle() -> tuple[str | None, str | None]:
    """The CA bundle REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE names, else certifi's, as (file,
    None) or (None, folder)."""
    ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not ca:
        import certifi

        ca = certifi.where()
    return (ca, None) if os.path.isfile(ca) else (None, ca)


def _with_deadlines(manager: urllib3.PoolManager) -> urllib3.PoolManager:
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


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


class Breaker:
    """The circuit breaker: says when the service has been failing long enough to stop sending.

    It opens when `failures` batches in a row ended with their retries run out on failures of the
    service (no record of theirs answered), or when every request for `window_s` seconds failed,
    counted from the start of the first failed request after the last one the service answered:
    it opens when a failure is reported that late, or as soon as that late with no request in
    flight (all waiting before a retry, say after a long Retry-After). A request still in flight
    may yet be answered, so a slow service is not taken for a dead one. Once open it stays open:
    the run that owns it stops taking batches and exits 69. Shared by every request thread of
    one client.
    """

    def __init__(self, failures: int, window_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = max(1, failures)
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._failed_batches = 0
        self._failed_requests = 0
        self._failing_since: float | None = None  # the clock's time
        self._failing_since_wall: float | None = None  # the same instant, as time.time()
        self._last_error = ""
        self.why: str | None = None  # set when it opens
        self.opened = threading.Event()

    def began(self) -> float:
        """A request leaves; returns its start, on the breaker's clock, for `ended`."""
        with self._lock:
            self._in_flight += 1
        return self._clock()

    def ended(self, started: float, error: str | None = None, *, answered: bool = True) -> None:
        """A request ended: answered by the service (`error` None), failed with the service's
        failure (`error`), or neither (an exception of ours: `answered` False)."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if error is not None:
                if self._failing_since is None:
                    self._failing_since = started
                    self._failing_since_wall = time.time() - (self._clock() - started)
                self._failed_requests += 1
                self._last_error = error
                self._check(reported=True)
            elif answered:
                self._failing_since = self._failing_since_wall = None
                self._failed_requests = 0

    def batch_done(self, answered: bool, error: str | None = None) -> None:
        """A batch ended: `answered` if a record got the API's word, else (with `error`) its
        retries ran out on failures of the service."""
        with self._lock:
            if answered:
                self._failed_batches = 0
                return
            self._failed_batches += 1
            if error:
                self._last_error = error
            if self._failing_since is None:
                self._failing_since = self._clock()
                self._failing_since_wall = time.time()
            self._check(reported=True)

    def is_open(self) -> bool:
        if self.opened.is_set():
            return True
        with self._lock:
            return self._check(reported=False)

    def describe(self) -> str:
        """Since when the service failed and what failed, for the run's summary."""
        since = self.since()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since is not None else "?"
        return f"since {when}: {self.why}"

    def since(self) -> float | None:
        """When the failures began (time.time()), if they have."""
        with self._lock:
            return self._failing_since_wall

    def _check(self, *, reported: bool) -> bool:
        if self.opened.is_set():
            return True
        since = self._failing_since
        if self._failed_batches >= self.failures:
            why = f"{self._failed_batches} batch(es) in a row ran out of retries"
        elif (since is not None and self._clock() - since >= self.window_s
              and (reported or self._in_flight == 0)):
            why = f"every request failed for {self.window_s:g}s"
        else:
            return False
        self.why = (f"{why} ({self._failed_requests} request(s) failed); "
                    f"last error: {self._last_error}")
        self.opened.set()
        log.warning("the API looks unavailable (%s): the circuit breaker opened", self.why)
        return True


class Halt:
    """A stop (a signal) or the breaker open, as one thing to wait on."""

    POLL_S = 0.1

    def __init__(self, stop: threading.Event | None, breaker: Breaker) -> None:
        self.stop = stop
        self.breaker = breaker

    def is_set(self) -> bool:
        return (self.stop is not None and self.stop.is_set()) or self.breaker.is_open()

    def wait(self, timeout: float) -> bool:
        if self.stop is not None:
            self.stop.wait(timeout)
        else:
            self.breaker.opened.wait(timeout)
        return self.is_set()
