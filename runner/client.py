"""The API's wire protocol (docs/api-protocol.md): auth, batch requests, retries, per-record
outcomes.

`ApiClient.submit_batch` turns a list of `RequestRecord`s into one `RecordOutcome` per record; the
connections, proxies, TLS and the adaptive limit on requests in flight are transport.py's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from urllib3.exceptions import HTTPError as TransportError

from runner import __version__
from runner.errors import AuthError, brief
from runner.http1 import DirectPool
from runner.job import ApiConfig
from runner.records import (
    RecordOutcome,
    RequestRecord,
    url_without_secrets,
)
from runner.transport import (
    AdaptiveLimit,
    AnswerTooLarge,
    Breaker,
    Deadline,
    Halt,
    ca_bundle,
    environ_proxy,
    never_sent,
    pool_manager,
    read_capped,
    transport_error,
)
from runner.wire import (
    ACCOUNT_PATH,
    Redactor,
    Reply,
    authorization,
    build_body,
    has_content,
    is_retryable,
    parse_answer,
    read_reply,
    record_status,
    refusal,
)

log = logging.getLogger("ximrun.client")

STOPPED = "stopped"

AttemptFn = Callable[[Sequence[str], int], None]
# Before each request: None to send it, or why it is withheld (a spending limit, a time window).
GateFn = Callable[[Sequence[str], int], str | None]


@dataclass
class _Submission:
    """Book-keeping of one submit_batch call across its requests, retries and bisections."""

    on_attempt: AttemptFn | None
    on_unsent: AttemptFn | None = None
    on_lost: AttemptFn | None = None
    may_send: GateFn | None = None
    requests: int = 0
    retries: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, RecordOutcome] = field(default_factory=dict)
    last_error: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    # Records whose last try got an answer, but none that is theirs with certainty (no answer
    # with their _id, or one with neither a status nor content): a fault of the record's answer,
    # not of the service, so they fail when their retries run out instead of staying pending.
    record_faults: set[str] = field(default_factory=set)


class ApiClient:
    """Talks to one endpoint with one token; safe to share between `api.concurrency` threads."""

    BACKOFF_BASE_S = 0.5
    BACKOFF_CAP_S = 30.0
    RETRY_AFTER_CAP_S = 120.0
    # The largest answer read, decoded: a base plus a share per record sent (docs/api-protocol.md).
    ANSWER_BASE_BYTES = 4 * 1024 * 1024
    ANSWER_PER_RECORD_BYTES = 2 * 1024 * 1024

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
        self.breaker = Breaker(api.breaker_failures, api.breaker_s)
        self._halt = Halt(stop, self.breaker)  # a stop, or the breaker open: send nothing more
        self._token = token
        # What of the endpoint URL is secret (a password, an api_key value): never stored.
        self._redactor = Redactor(token, endpoint_url)
        self.shown_endpoint = url_without_secrets(endpoint_url)
        self._refused: AuthError | None = None  # after a 401/403 nothing more is sent
        self._stop = stop
        self._sleep = sleep
        self._timeout = (api.connect_timeout_s, api.timeout_s)
        self._headers = {"Authorization": authorization(token, api.auth_scheme),
                         "Content-Type": "application/json",
                         "Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                         "User-Agent": f"ximrun/{__version__}"}
        proxy = None if direct else environ_proxy(endpoint_url)
        self._http = pool_manager(endpoint_url, max(1, api.concurrency), self._timeout, proxy)
        # Batch requests without a proxy: the leaner exchange of http1.py.
        self._direct = (DirectPool(endpoint_url, max(1, api.concurrency) + 2, self._timeout,
                                   ca_bundle())
                        if proxy is None and parts.scheme in ("http", "https") else None)

    def __repr__(self) -> str:  # the token stays out of reprs and tracebacks
        return f"ApiClient({self.shown_endpoint!r})"

    # --- public API -----------------------------------------------------------------------------

    def submit_batch(self, records: Sequence[RequestRecord],
                     on_attempt: AttemptFn | None = None,
                     on_unsent: AttemptFn | None = None, on_lost: AttemptFn | None = None,
                     may_send: GateFn | None = None) -> list[RecordOutcome]:
        """Send records (retrying, bisecting as needed); one outcome per record, in input order.

        `on_attempt(ids, n)` runs before every HTTP request, so the caller can record that these
        records may be billed; `on_unsent(ids, n)` runs after one that never connected (nothing
        of it reached the service), and it is not counted in the outcomes' `attempts`;
        `on_lost(ids, n)` after one that may have been billed whose answer is lost (a transport
        error after connecting, a gateway's page, a 2xx the client cannot use). `may_send(ids,
        n)` before each request: a reason withholds it, and its records stay pending. Raises
        AuthError when the API refuses the token.
        """
        records = list(records)
        for r in records:
            if r.data is None and r.url is None:
                raise ValueError(f"record {r.id!r} has neither bytes nor a URL")
        batch = _Submission(on_attempt, on_unsent, on_lost, may_send)
        if records:
            self._send(batch, records)
            final = [o for o in batch.outcomes.values() if o.final]
            given_up = [o for o in batch.outcomes.values() if o.unavailable]
            if final or given_up:
                self.breaker.batch_done(bool(final), given_up[0].reason if given_up else None)
        out = []
        for r in records:
            o = batch.outcomes.get(r.id)
            if o is None:  # not reachable by design; a pending record is safer than a lost one
                o = RecordOutcome(r.id, ok=False, reason=STOPPED, final=False,
                                  attempts=batch.attempts.get(r.id, 0))
            out.append(o)
        return out

    def account_details(self) -> dict[str, Any] | None:
        """The account's details (credits), or None if the API does not offer them."""
        url = self.base_url + ACCOUNT_PATH
        self._check_refused()
        try:
            with Deadline(self.api.timeout_s) as deadline:
                resp = self._http.urlopen("GET", url, headers=self._headers, redirect=False,
                                          preload_content=False)
                data = read_capped(resp, self.ANSWER_BASE_BYTES)
        except (TransportError, AnswerTooLarge) as exc:
            reason = self._transport_reason(exc, deadline)
            log.debug("account details unavailable: %s", self._redactor.text(reason))
            return None
        if resp.status in (401, 403):
            self._refuse(AuthError(refusal(resp, data, self._redactor)))
        if not 200 <= resp.status < 300:
            log.debug("account details unavailable: http %d", resp.status)
            return None
        body = parse_answer(data)
        if body is None:
            log.debug("account details unavailable: the answer is not JSON")
            return None
        return body if isinstance(body, dict) else None

    def close(self) -> None:
        self._http.clear()  # closes the pooled connections
        if self._direct is not None:
            self._direct.clear()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the retry policy -----------------------------------------------------------------------

    def _send(self, batch: _Submission, group: list[RequestRecord]) -> None:
        """Settle every record of `group` in batch.outcomes: answered, failed, or stopped."""
        pending = group
        while pending:
            if not self.limit.acquire(self._halt):
                self._halted_outcomes(batch, pending)
                return
            if self.breaker.is_open():
                self.limit.release()
                self._halted_outcomes(batch, pending)
                return
            withheld = (batch.may_send([r.id for r in pending], batch.requests + 1)
                        if batch.may_send is not None else None)
            if withheld is not None:
                self.limit.release()
                for r in pending:
                    self._set_outcome(batch, r, ok=False, final=False,
                                      reason=f"not sent: {withheld}")
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
                    self._set_outcome(batch, r, ok=False, reason=answer.error, status=answer.status)
                return
            if answer.kind == "retry":
                again = pending
                for r in again:
                    batch.last_error[r.id] = (answer.error, answer.status)
                    batch.record_faults.discard(r.id)
            else:
                again = self._record_outcomes(batch, answer)
            if not again:
                return
            if batch.retries >= self.api.max_retries:
                # The service failed them, not their records: they stay pending for the next run.
                log.info("%d record(s) left pending after %d retries: %s", len(again),
                         batch.retries, _retry_reason(batch, again))
                faulty = [r for r in again if r.id in batch.record_faults]
                for r in faulty:
                    reason, status = batch.last_error[r.id]
                    self._set_outcome(batch, r, ok=False, reason=reason, status=status)
                self._unavailable_outcomes(batch, [r for r in again if r.id not in batch.record_faults])
                return
            batch.retries += 1
            delay = self._delay(batch.retries, answer.retry_after)
            log.debug("%d of %d record(s): %s; retry %d/%d in %.1fs", len(again), len(group),
                     _retry_reason(batch, again), batch.retries, self.api.max_retries, delay)
            if self._pause(delay):
                self._halted_outcomes(batch, again)
                return
            pending = again

    def _bisect(self, batch: _Submission, group: list[RequestRecord], answer: Reply) -> None:
        if len(group) == 1:
            self._set_outcome(batch, group[0], ok=False, reason=answer.error, status=answer.status,
                         too_large=answer.status == 413)
            return
        # A refused batch usually hides one poisonous record; halves find it in log2(n) steps
        # while its neighbours still get their answers.
        log.info("%d records refused together (%s); splitting to find the culprit",
                 len(group), answer.error)
        mid = (len(group) + 1) // 2
        self._send(batch, group[:mid])
        self._send(batch, group[mid:])

    def _record_outcomes(self, batch: _Submission, answer: Reply) -> list[RequestRecord]:
        """Record each answered record's outcome; return the records to send again."""
        again: list[RequestRecord] = []
        throttled = False
        for r in answer.unmatched:
            batch.last_error[r.id] = ("bad answer: no record with this _id in the answer",
                                      answer.status)
            batch.record_faults.add(r.id)
            again.append(r)
        for r, rec in answer.records:
            code, text = record_status(rec)
            if code is None:
                if has_content(rec, r):
                    # No `_status`, but the service answered with content: trust the HTTP 2xx.
                    self._set_outcome(batch, r, ok=True, status=answer.status,
                                      **self._kept(answer, rec))
                else:
                    batch.last_error[r.id] = ("bad answer: record without status or content",
                                              answer.status)
                    batch.record_faults.add(r.id)
                    again.append(r)
                continue
            if 200 <= code < 300:
                self._set_outcome(batch, r, ok=True, status=code, **self._kept(answer, rec))
                continue
            # The API's text, on one line and short: a hostile server may send megabytes.
            reason = f"api {code}: {brief(self._redactor.text(text))}" if text else f"api {code}"
            if is_retryable(code):
                throttled = throttled or code == 429
                batch.last_error[r.id] = (reason, code)
                batch.record_faults.discard(r.id)
                again.append(r)
            else:
                self._set_outcome(batch, r, ok=False, reason=reason, status=code,
                                  too_large=code == 413, **self._kept(answer, rec))
        if throttled:
            self.limit.on_throttle()
        return again

    def _kept(self, answer: Reply, rec: Mapping[str, Any]) -> dict[str, Any]:
        """What an outcome keeps of its record: as received when the answer was plain and clean,
        else redacted (and then encoded by the store)."""
        if answer.texts is not None:
            return {"record": rec, "text": answer.texts[id(rec)]}
        return {"record": self._redactor.record(rec)}

    def _set_outcome(self, batch: _Submission, r: RequestRecord, **kw: Any) -> None:
        """A record is settled: its outcome, with the requests that carried it so far (none
        carries it after this)."""
        batch.outcomes[r.id] = RecordOutcome(r.id, attempts=batch.attempts.get(r.id, 0), **kw)

    def _halted_outcomes(self, batch: _Submission, records: Sequence[RequestRecord]) -> None:
        """Nothing more is sent: a stop came (stopped), or the breaker opened (unavailable)."""
        if self._stopped():
            self._stopped_outcomes(batch, records)
        else:
            self._unavailable_outcomes(batch, records)

    def _unavailable_outcomes(self, batch: _Submission, records: Sequence[RequestRecord]) -> None:
        for r in records:
            error, status = batch.last_error.get(
                r.id, (f"not sent: the API is unavailable ({self.breaker.why})", None))
            self._set_outcome(batch, r, ok=False, reason=error, status=status, final=False,
                              unavailable=True)

    def _stopped_outcomes(self, batch: _Submission, records: Sequence[RequestRecord]) -> None:
        for r in records:
            self._set_outcome(batch, r, ok=False, reason=STOPPED, final=False)

    def _delay(self, retry_no: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.RETRY_AFTER_CAP_S)
        # Full jitter: threads that failed together do not come back together.
        return random.uniform(0, min(self.BACKOFF_CAP_S, self.BACKOFF_BASE_S * 2 ** (retry_no - 1)))

    def _pause(self, delay: float) -> bool:
        """Wait before a retry; True if a stop came or the breaker opened meanwhile (then the
        wait ends within a tenth of a second)."""
        if self._sleep is time.sleep:
            end = time.monotonic() + delay
            while (left := end - time.monotonic()) > 0:
                if self._halt.wait(min(left, self._halt.POLL_S)):
                    return True
            return self._halt.is_set()
        self._sleep(delay)
        return self._halt.is_set()

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    # --- one HTTP request -----------------------------------------------------------------------

    def _check_refused(self) -> None:
        """Once the API has refused the token, nothing more leaves (other threads included)."""
        if self._refused is not None:
            raise AuthError(str(self._refused))

    def _refuse(self, exc: AuthError) -> None:
        """The request just sent was refused (not billed): remember it and raise."""
        exc.refused_request = True
        if self._refused is None:
            self._refused = exc
        raise exc

    def _transport_reason(self, exc: BaseException, deadline: Deadline) -> str:
        if deadline.expired:
            return f"timeout after {self.api.timeout_s:g}s"
        if isinstance(exc, AnswerTooLarge):
            return f"bad answer: {exc}"
        assert isinstance(exc, TransportError)
        return transport_error(exc, self._timeout)

    def _request(self, batch: _Submission, group: list[RequestRecord]) -> Reply:
        self._check_refused()
        batch.requests += 1
        for r in group:
            batch.attempts[r.id] = batch.attempts.get(r.id, 0) + 1
        if batch.on_attempt is not None:
            batch.on_attempt([r.id for r in group], batch.requests)
        started = self.breaker.began()
        reply: Reply | None = None
        try:
            reply = self._exchange(batch, group)
        finally:
            self.breaker.ended(started, reply.error if reply and reply.kind == "retry" else None,
                               answered=reply is not None)
        if reply.unsent:
            # No connection was made: not a send, not billed, not an attempt of these records.
            for r in group:
                batch.attempts[r.id] -= 1
            if batch.on_unsent is not None:
                batch.on_unsent([r.id for r in group], batch.requests)
            batch.requests -= 1
        elif reply.lost and batch.on_lost is not None:
            batch.on_lost([r.id for r in group], batch.requests)
        return reply

    def _exchange(self, batch: _Submission, group: list[RequestRecord]) -> Reply:
        body = build_body(group, self.fields)
        cap = self.ANSWER_BASE_BYTES + self.ANSWER_PER_RECORD_BYTES * len(group)
        try:
            # timeout_s bounds the whole request, not only each socket read: a server dripping
            # its answer cannot hold the request (or a stop waiting for it) any longer.
            with Deadline(self.api.timeout_s) as deadline:
                # No redirects: a redirected POST would become a GET without its body. The pool
                # never retries on its own (retries=False): every try is counted here.
                if self._direct is not None:
                    resp, data = self._direct.post(body, self._headers, cap)
                else:
                    resp = self._http.urlopen("POST", self.endpoint_url, body=body,
                                              headers=self._headers, redirect=False,
                                              preload_content=False)
                    data = read_capped(resp, cap)
        except (TransportError, AnswerTooLarge) as exc:
            # urllib3 already replaces a pooled connection found dead before sending; what reaches
            # here may have been sent and billed, so it counts as an attempt like any other,
            # unless no connection was ever made.
            unsent = isinstance(exc, TransportError) and never_sent(exc)
            return Reply("retry", error=self._redactor.text(self._transport_reason(exc, deadline)),
                          unsent=unsent, lost=not unsent)
        reply = read_reply(resp, data, group, self._redactor)
        if reply.kind == "refused":
            self._refuse(AuthError(reply.error))
        if reply.status == 429:
            self.limit.on_throttle()
        elif reply.kind == "records" and not reply.unmatched:
            self.limit.on_success()
        return reply


# --- answers --------------------------------------------------------------------------------------


def _retry_reason(batch: _Submission, records: Sequence[RequestRecord]) -> str:
    return batch.last_error[records[0].id][0] if records else ""

