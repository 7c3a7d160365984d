"""The client against the emulator over real HTTP: outcomes, retries, bisection, AIMD."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from runner.client import ApiClient
from runner.errors import AuthError
from runner.job import ApiConfig, SandboxSettings
from runner.records import RequestRecord
from runner.sandbox import Sandbox
from runner.transport import AdaptiveLimit
from runner.wire import build_body, parse_retry_after

TOKEN = "tok-7f3a9c1e5b"


def image_bytes(n: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    """A small real image whose content differs with n (the emulator keys faults on content)."""
    img = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))
    img.putpixel((0, 0), (n % 256, (n // 256) % 256, 7))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noisy_png(side: int = 96) -> bytes:
    """An image that compresses badly, to be larger than a small max_image_bytes."""
    rnd = random.Random(1)
    pixels = bytes(rnd.getrandbits(8) for _ in range(side * side * 3))
    img = Image.frombytes("RGB", (side, side), pixels)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def records(n: int, prefix: str = "img") -> list[RequestRecord]:
    return [RequestRecord(f"{prefix}/{i:03d}.jpg", data=image_bytes(i)) for i in range(n)]


class Sleeps:
    """Stands in for time.sleep: remembers what the client asked to wait, waits for nothing."""

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.delays: list[float] = []
        self.then = then

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.then is not None:
            self.then()


class Attempts:
    """An on_attempt callback that remembers every request's ids and attempt number."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.lock = threading.Lock()

    def __call__(self, ids: Any, attempt: int) -> None:
        with self.lock:
            self.calls.append((list(ids), attempt))


def client_for(sb: Sandbox, *, sleep: Callable[[float], None] | None = None,
               stop: threading.Event | None = None, token: str = TOKEN,
               **api: Any) -> ApiClient:
    cfg = ApiConfig(**{"concurrency": 4, "timeout_s": 5.0, "connect_timeout_s": 2.0,
                       "max_retries": 5, **api})
    return ApiClient(sb.endpoint_url(), token, cfg, stop=stop,
                     sleep=sleep if sleep is not None else Sleeps())


@contextlib.contextmanager
def sandbox(**settings: Any) -> Iterator[Sandbox]:
    with Sandbox(SandboxSettings(**{"token": TOKEN, "seed": 7, **settings})) as sb:
        yield sb


def billed_per_record(sb: Sandbox) -> Counter[str]:
    return Counter(e.record_id for e in sb.ledger() if e.billed)


def carried_per_record(sb: Sandbox) -> Counter[str]:
    return Counter(e.record_id for e in sb.ledger())


# --- the happy path -------------------------------------------------------------------------------


def test_a_batch_gets_one_outcome_per_record_in_input_order():
    recs = records(5)
    seen = Attempts()
    with sandbox() as sb, client_for(sb) as client:
        out = client.submit_batch(recs, on_attempt=seen)
        ledger = sb.ledger()
    assert [o.id for o in out] == [r.id for r in recs]
    assert all(o.ok and o.final and o.status == 200 and o.attempts == 1 for o in out)
    assert [o.record["_id"] for o in out] == [r.id for r in recs]
    assert all("_base64" not in o.record for o in out)
    assert seen.calls == [([r.id for r in recs], 1)]
    assert sorted(e.record_id for e in ledger) == sorted(r.id for r in recs)


def test_the_body_carries_fields_metadata_and_one_image_per_record():
    recs = [RequestRecord("a", data=b"\x01\x02", extra={"sku": "X1", "_id": "not-me"}),
            RequestRecord("b", url="https://example.com/b.jpg")]
    body = json.loads(build_body(recs, {"lang": "en", "pricing": True}))
    assert body["lang"] == "en" and body["pricing"] is True
    assert body["records"] == [
        {"_id": "a", "_base64": base64.b64encode(b"\x01\x02").decode(), "sku": "X1"},
        {"_id": "b", "_url": "https://example.com/b.jpg"},
    ]
    # Metadata never replaces the image; any key text survives; fields cannot replace records.
    recs = [RequestRecord('ключ/"ü"\\.jpg', data=b"\xff" * 7, extra={"_base64": "no", "n": 1}),
            RequestRecord("u", url="https://example.com/u.jpg", extra={"_url": "no", "_base64": 2})]
    body = json.loads(build_body(recs, {"records": "no"}))
    assert body == {"records": [
        {"_id": 'ключ/"ü"\\.jpg', "_base64": base64.b64encode(b"\xff" * 7).decode(), "n": 1},
        {"_id": "u", "_url": "https://example.com/u.jpg", "_base64": 2}]}
    assert json.loads(build_body(recs[:1], {})) == {"records": body["records"][:1]}


def test_a_record_with_neither_bytes_nor_url_is_a_programming_error():
    with sandbox() as sb, client_for(sb) as client, pytest.raises(ValueError):
        client.submit_batch([RequestRecord("empty")])


# --- per-record outcomes --------------------------------------------------------------------------


def test_a_record_the_api_refuses_fails_with_its_reason_and_is_not_retried():
    recs = records(10)
    with sandbox(prefuse=0.5) as sb, client_for(sb) as client:
        out = client.submit_batch(recs)
        carried = carried_per_record(sb)
    refused = [o for o in out if not o.ok]
    assert refused and len(refused) < len(out), "the seed should refuse some records, not all"
    for o in refused:
        assert o.final and o.status is not None and 400 <= o.status < 500
        assert o.reason.startswith(f"api {o.status}: ")
        assert o.attempts == 1
    assert all(n == 1 for n in carried.values())


def test_records_answered_with_a_retryable_status_are_resent_alone():
    recs = records(10)
    seen = Attempts()
    with sandbox(precord_retry=0.3) as sb, client_for(sb, max_retries=10) as client:
        out = client.submit_batch(recs, on_attempt=seen)
        carried = carried_per_record(sb)
    assert all(o.ok for o in out)
    assert len(seen.calls) > 1, "the seed should ask for at least one retry"
    assert seen.calls[0][0] == [r.id for r in recs]
    for ids, _ in seen.calls[1:]:
        assert len(ids) < len(recs)  # only the records that asked for it
    assert [n for _, n in seen.calls] == list(range(1, len(seen.calls) + 1))
    for o in out:
        assert o.attempts == carried[o.id]


# --- whole-request failures -----------------------------------------------------------------------


def test_429_honours_retry_after_and_lowers_the_limit():
    sleeps = Sleeps()
    with sandbox(p429=0.6, retry_after_s=2) as sb, \
            client_for(sb, sleep=sleeps, max_retries=10) as client:
        out = client.submit_batch(records(3))
        limit = client.limit.limit
    assert all(o.ok for o in out)
    assert 2.0 in sleeps.delays, "the seed should throttle at least once"
    assert limit == 2  # halved once: 429s of one moment count once, one success does not undo it


def test_5xx_answers_html_or_json_are_retried_with_backoff():
    sleeps = Sleeps()
    with sandbox(p500=0.3, p502=0.3) as sb, \
            client_for(sb, sleep=sleeps, max_retries=10) as client:
        out = client.submit_batch(records(4))
    assert all(o.ok for o in out)
    assert sleeps.delays, "the seed should fail at least one request"
    assert all(0 <= d <= ApiClient.BACKOFF_CAP_S for d in sleeps.delays)


def test_a_dropped_answer_is_retried_and_the_duplicate_billing_is_bounded_and_visible():
    recs = records(6)
    with sandbox(pdrop=0.5) as sb, client_for(sb, max_retries=10) as client:
        out = client.submit_batch(recs)
        billed = billed_per_record(sb)
        credits = sb.credits_used
        ledger = sb.ledger()
    assert all(o.ok for o in out)
    assert any(n > 1 for n in billed.values()), "the seed should drop at least one answer"
    assert any(not e.answered for e in ledger)  # the emulator knows which answers were lost
    for o in out:
        assert billed[o.id] <= o.attempts  # every charge was an attempt the caller was told about
    assert credits == sum(billed.values()) * 10


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_without_an_attempt():
    seen = Attempts()
    sb = Sandbox(SandboxSettings(token=TOKEN))
    sb.idle_timeout_s = 0.2
    with sb, client_for(sb) as client:
        first = client.submit_batch(records(1), on_attempt=seen)
        time.sleep(0.5)  # the server hangs up the idle connection meanwhile
        second = client.submit_batch(records(1, prefix="again"), on_attempt=seen)
        assert len(sb.ledger()) == 2
    assert first[0].ok and second[0].ok and second[0].attempts == 1
    assert [n for _, n in seen.calls] == [1, 1]


def test_when_retries_run_out_every_record_is_left_unavailable_with_the_last_error():
    seen = Attempts()
    with sandbox(p500=1.0) as sb, client_for(sb, max_retries=2) as client:
        out = client.submit_batch(records(3), on_attempt=seen)
    assert len(seen.calls) == 3
    for o in out:
        # a failure of the service, not of the record: not final, the image stays pending
        assert not o.ok and not o.final and o.unavailable and o.attempts == 3
        assert o.reason.startswith("http 500") and o.status == 500


def test_a_request_that_times_out_is_retried_then_fails_saying_so():
    with sandbox(latency_ms=400) as sb, client_for(sb, timeout_s=0.1, max_retries=1) as client:
        out = client.submit_batch(records(2))
    assert all(not o.ok and o.unavailable and o.attempts == 2 for o in out)
    assert all(o.reason == "timeout after 0.1s" for o in out)


def test_a_refused_token_raises_auth_error_that_never_shows_the_token(caplog):
    caplog.set_level(logging.DEBUG, logger="ximrun.client")
    wrong = "wrong-secret-4242"
    seen = Attempts()
    with sandbox() as sb, client_for(sb, token=wrong) as client:
        with pytest.raises(AuthError) as info:
            client.submit_batch(records(2), on_attempt=seen)
        with pytest.raises(AuthError):
            client.account_details()
        assert wrong not in repr(client)
    assert "401" in str(info.value) or "403" in str(info.value)
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    assert wrong not in caplog.text
    assert len(seen.calls) == 1  # never retried


def test_a_whole_request_400_is_bisected_down_to_the_poisonous_record():
    recs = records(6)
    # Both `_url` and `_base64` on one record make the whole request malformed.
    recs[4] = RequestRecord(recs[4].id, data=recs[4].data,
                            extra={"_url": "https://example.com/x.jpg"})
    seen = Attempts()
    with sandbox() as sb, client_for(sb) as client:
        out = client.submit_batch(recs, on_attempt=seen)
        billed = billed_per_record(sb)
    bad = out[4]
    assert not bad.ok and bad.final and bad.status == 400 and bad.reason.startswith("api 400: ")
    assert all(o.ok for i, o in enumerate(out) if i != 4)
    assert all(n == 1 for n in billed.values()) and recs[4].id not in billed
    assert len(seen.calls) <= 2 * len(recs) - 1


def test_a_batch_larger_than_the_service_takes_is_split():
    with sandbox(max_records=4) as sb, client_for(sb) as client:
        out = client.submit_batch(records(7))
        billed = billed_per_record(sb)
    assert all(o.ok for o in out)
    assert sorted(billed.values()) == [1] * 7


def test_a_record_too_large_fails_as_too_large():
    big = RequestRecord("big.png", data=noisy_png())
    with sandbox(max_image_bytes=len(big.data) - 1) as sb, client_for(sb) as client:
        out = client.submit_batch([*records(2), big])
    assert out[0].ok and out[1].ok
    assert not out[2].ok and out[2].too_large and out[2].final and out[2].status == 413
    assert out[2].reason.startswith("api 413")


# --- stop -----------------------------------------------------------------------------------------


def test_a_stop_before_sending_leaves_every_record_pending():
    stop = threading.Event()
    stop.set()
    seen = Attempts()
    with sandbox() as sb, client_for(sb, stop=stop) as client:
        out = client.submit_batch(records(3), on_attempt=seen)
        assert sb.ledger() == []
    assert seen.calls == []
    assert all(not o.ok and not o.final and o.reason == "stopped" and o.attempts == 0 for o in out)


def test_a_stop_during_backoff_wakes_at_once_and_leaves_records_pending():
    stop = threading.Event()
    with sandbox(p500=1.0) as sb:
        client = ApiClient(sb.endpoint_url(), TOKEN, ApiConfig(max_retries=5), stop=stop)
        client.BACKOFF_BASE_S = client.BACKOFF_CAP_S = 30.0  # and no jitter can make it short
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with client:
            out = client.submit_batch(records(2))
        took = time.monotonic() - started
    assert took < 5
    assert all(not o.final and o.reason == "stopped" and o.attempts >= 1 for o in out)


# --- the adaptive limit ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_halves_on_throttle_once_per_window():
    clock = Clock()
    lim = AdaptiveLimit(8, clock=clock)
    lim.on_throttle()
    lim.on_throttle()  # the same moment's burst
    assert lim.limit == 4
    clock.now += 1.5
    lim.on_throttle()
    assert lim.limit == 2
    for _ in range(5):
        clock.now += 1.5
        lim.on_throttle()
    assert lim.limit == 1


def test_the_limit_grows_by_one_after_limit_clean_answers_and_never_past_maximum():
    clock = Clock()
    lim = AdaptiveLimit(4, clock=clock)
    lim.on_throttle()
    assert lim.limit == 2
    lim.on_success()
    assert lim.limit == 2
    lim.on_success()
    assert lim.limit == 3
    for _ in range(3):
        lim.on_success()
    assert lim.limit == 4
    for _ in range(50):
        lim.on_success()
    assert lim.limit == 4


def test_a_throttle_restarts_the_count_of_clean_answers():
    clock = Clock()
    lim = AdaptiveLimit(4, clock=clock)
    lim.on_throttle()
    lim.on_success()
    lim.on_throttle()  # same window: no decrease, but the run of clean answers is broken
    lim.on_success()
    assert lim.limit == 2


def test_acquire_blocks_at_the_limit_and_gives_up_on_stop(caplog):
    caplog.set_level(logging.DEBUG, logger="ximrun.client")
    lim = AdaptiveLimit(2, clock=Clock())
    assert lim.acquire() and lim.acquire()
    stop = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(lim.acquire(stop)))
    waiter.start()
    time.sleep(0.15)
    assert got == []  # still waiting for a slot
    stop.set()
    waiter.join(2)
    assert got == [False]
    lim.release()
    assert lim.acquire()
    lim.on_throttle()
    assert "capped at 1" in caplog.text


def test_a_released_slot_wakes_a_waiter():
    lim = AdaptiveLimit(1)
    assert lim.acquire()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(lim.acquire()))
    waiter.start()
    time.sleep(0.05)
    lim.release()
    waiter.join(2)
    assert got == [True]


def test_concurrent_batches_share_one_client():
    with sandbox(latency_ms=30) as sb, client_for(sb, concurrency=3) as client:
        batches = [records(3, prefix=f"b{i}") for i in range(6)]
        results: dict[int, list] = {}

        def send(i: int) -> None:
            results[i] = client.submit_batch(batches[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert client.limit.in_flight == 0
        assert len(sb.ledger()) == 18
    assert all(o.ok for i in range(6) for o in results[i])


# --- Retry-After ----------------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True),
                             now=now.timestamp()) == 0.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_retry_after_is_capped():
    # A 429 that asks for an hour: the client waits RETRY_AFTER_CAP_S before its retry.
    sleeps = Sleeps()
    with sandbox(p429=1.0, retry_after_s=3600) as sb, \
            client_for(sb, sleep=sleeps, max_retries=1) as client:
        out = client.submit_batch(records(1))
    assert sleeps.delays == [ApiClient.RETRY_AFTER_CAP_S]
    assert not out[0].ok and out[0].status == 429 and out[0].attempts == 2


# --- account --------------------------------------------------------------------------------------


def test_account_details_come_from_the_root_of_the_endpoint():
    with sandbox() as sb, client_for(sb) as client:
        client.submit_batch(records(2))
        details = client.account_details()
        used = sb.credits_used
    assert isinstance(details, dict) and "credits_counter" in details
    assert used == 20


def test_account_details_are_none_when_the_api_cannot_give_them():
    with fake_api(lambda body, path: (404, {}, b"not here")) as url:
        client = ApiClient(url + "collectibles/v2/tcg_id", TOKEN, ApiConfig())
        assert client.account_details() is None
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ApiClient(f"http://127.0.0.1:{port}/x", TOKEN, ApiConfig(connect_timeout_s=1))
    assert client.account_details() is None


# --- answers the emulator never gives -------------------------------------------------------------
# A tiny local server for malformed answers only: the emulator follows the protocol, so count
# mismatches, missing `_id`s, reordered records and proxy pages have to be staged by hand.

Reply = tuple[int, dict[str, str], bytes]


@contextlib.contextmanager
def fake_api(answer: Callable[[dict[str, Any] | None, str], Reply | None],
             tls: ssl.SSLContext | None = None) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real API

        def _reply(self, body: dict[str, Any] | None) -> None:
            reply = answer(body, self.path)
            if reply is None:  # hang up without an answer, as if the connection dropped
                self.close_connection = True
                return
            code, headers, data = reply
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            n = int(self.headers.get("Content-Length", 0))
            self._reply(json.loads(self.rfile.read(n)))

        def do_GET(self) -> None:  # noqa: N802
            self._reply(None)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler, tls) as port:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/"


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler],
            tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A threaded HTTP(S) server on a free loopback port; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def ok_json(records: list[dict[str, Any]]) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps({"records": records}).encode()


def fake_client(url: str, **api: Any) -> ApiClient:
    return ApiClient(url + "collectibles/v2/tcg_id", TOKEN, ApiConfig(**{"max_retries": 2, **api}),
                     sleep=Sleeps())


def test_an_answer_with_the_wrong_number_of_records_is_a_retryable_bad_answer():
    with fake_api(lambda body, _: ok_json(body["records"][:1])) as url:
        out = fake_client(url).submit_batch(records(2))
    assert all(not o.ok and o.unavailable and o.attempts == 3 for o in out)
    assert out[0].reason == "bad answer: 1 records for 2 sent"


def test_answers_are_matched_by_id_when_reordered_and_by_position_without_ids():
    def reordered(body, _):
        recs = [{"_id": r["_id"], "_status": {"code": 200}, "n": i}
                for i, r in enumerate(body["records"])]
        return ok_json(recs[::-1])

    def anonymous(body, _):
        return ok_json([{"_status": {"code": 200}, "n": i} for i in range(len(body["records"]))])

    with fake_api(reordered) as url:
        out = fake_client(url).submit_batch(records(3))
    assert [o.record["n"] for o in out] == [0, 1, 2]
    with fake_api(anonymous) as url:
        out = fake_client(url).submit_batch(records(3))
    assert [o.record["n"] for o in out] == [0, 1, 2] and all(o.ok for o in out)


def test_a_record_without_status_is_a_success_only_if_it_has_content():
    def answer(body, _):
        return ok_json([{"_id": r["_id"], "_tags": ["Card"]} if r["_id"].endswith("000.jpg")
                        else {"_id": r["_id"]} for r in body["records"]])

    with fake_api(answer) as url:
        out = fake_client(url, max_retries=1).submit_batch(records(2))
    assert out[0].ok and out[0].status == 200 and out[0].attempts == 1
    assert not out[1].ok and out[1].attempts == 2
    assert out[1].reason == "bad answer: record without status or content"


def test_a_proxy_page_or_an_integer_status_is_read_for_its_reason():
    def proxy(body, _):
        return 502, {"Content-Type": "text/html"}, b"<html><title>502 Bad Gateway</title></html>"

    with fake_api(proxy) as url:
        out = fake_client(url, max_retries=1).submit_batch(records(1))
    assert out[0].reason == "http 502: 502 Bad Gateway" and out[0].attempts == 2

    def int_status(body, _):
        return ok_json([{"_id": r["_id"], "status": 400, "detail": "Unable to load image"}
                        for r in body["records"]])

    with fake_api(int_status) as url:
        out = fake_client(url).submit_batch(records(1))
    assert out[0].reason == "api 400: Unable to load image" and out[0].attempts == 1


def test_a_whole_request_413_is_bisected_and_404_is_final():
    def too_large(body, _):
        if len(body["records"]) > 1:
            return 413, {}, b'{"detail": "Request entity too large"}'
        return ok_json([{"_id": body["records"][0]["_id"], "_status": {"code": 200}}])

    with fake_api(too_large) as url:
        out = fake_client(url).submit_batch(records(3))
    assert all(o.ok for o in out)
    assert [o.attempts for o in out] == [3, 3, 2]  # 3 records, then 2 + 1, then 1 + 1
    with fake_api(lambda body, _: (404, {}, b'{"detail": "Not found."}')) as url:
        out = fake_client(url).submit_batch(records(2))
    assert all(o.reason == "http 404: Not found." and o.attempts == 1 and o.final for o in out)




def test_a_connection_dropped_before_the_answer_is_retried_and_counted():
    calls = Counter()

    def answer(body, _):
        calls["n"] += 1
        if calls["n"] == 1:
            return None
        return ok_json([{"_id": r["_id"], "_status": {"code": 200}} for r in body["records"]])

    with fake_api(answer) as url:
        out = fake_client(url).submit_batch(records(2))
    assert all(o.ok and o.attempts == 2 for o in out)
    with fake_api(lambda body, _: None) as url:
        out = fake_client(url, max_retries=0).submit_batch(records(1))
    assert out[0].reason == "connection dropped" and out[0].unavailable and out[0].attempts == 1


def test_an_answer_cut_short_is_retried_as_a_connection_dropped_while_reading():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):  # the first try and one retry
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 500\r\n\r\n{\"records\": [")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        out = fake_client(f"http://127.0.0.1:{port}/", max_retries=1).submit_batch(records(1))
    finally:
        thread.join(5)
        listener.close()
    assert out[0].reason == "connection dropped while reading the answer"
    assert out[0].unavailable and out[0].attempts == 2


def test_a_gzip_answer_is_read():
    import gzip

    def answer(body, _):
        data = json.dumps({"records": [{"_id": r["_id"], "_status": {"code": 200}}
                                       for r in body["records"]]}).encode()
        return 200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, \
            gzip.compress(data)

    with fake_api(answer) as url:
        out = fake_client(url).submit_batch(records(2))
    assert all(o.ok for o in out)


@contextlib.contextmanager
def forward_proxy() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """A plain HTTP forward proxy on loopback; yields its URL and (target URL, Proxy-Authorization)
    of every request it forwarded."""
    import http.client
    from urllib.parse import urlsplit

    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            seen.append((self.path, self.headers.get("Proxy-Authorization")))
            target = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("proxy-authorization", "proxy-connection", "host")}
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
            upstream.request(self.command, target.path or "/", body=body or None, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        do_GET = do_POST = _forward  # noqa: N815 (http.server's naming)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as port:
        yield f"127.0.0.1:{port}", seen


def test_requests_go_through_the_proxy_the_environment_names_unless_no_proxy_says_otherwise(
        monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with sandbox() as sb, forward_proxy() as (proxy, seen):
        monkeypatch.setenv("http_proxy", f"http://ximrun:p%40ss@{proxy}")
        with client_for(sb) as client:
            out = client.submit_batch(records(3))
            details = client.account_details()
        assert all(o.ok for o in out) and details is not None
        assert [url for url, _ in seen] == [sb.endpoint_url(), sb.base_url + "account/v2/details/"]
        expected = "Basic " + base64.b64encode(b"ximrun:p@ss").decode()
        assert all(auth == expected for _, auth in seen)
        assert sum(billed_per_record(sb).values()) == 3

        port = sb.endpoint_url().split(":")[2].split("/")[0]
        for no_proxy in ("127.0.0.1", f"127.0.0.1:{port}", "*"):
            monkeypatch.setenv("no_proxy", no_proxy)
            before = len(seen)
            with client_for(sb) as client:
                assert all(o.ok for o in client.submit_batch(records(1, prefix=no_proxy)))
            assert len(seen) == before, no_proxy


def test_a_proxy_of_a_scheme_the_client_cannot_speak_is_refused_by_name(monkeypatch):
    from runner.errors import JobError

    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("https_proxy", "socks5://127.0.0.1:1080")
    with pytest.raises(JobError, match="socks5"):
        ApiClient("https://api.example.com/v2/tag", TOKEN, ApiConfig())


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own authority, and its key (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_is_verified_against_the_ca_bundle_the_environment_names(tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path, "api")
    stranger, _ = self_signed(tmp_path, "stranger")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    def answer(body, _):
        return ok_json([{"_id": r["_id"], "_status": {"code": 200}} for r in body["records"]])

    with fake_api(answer, tls) as url:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        assert all(o.ok for o in fake_client(url).submit_batch(records(2)))
        # A server whose certificate the bundle does not vouch for gets no image.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stranger))
        out = fake_client(url, max_retries=1).submit_batch(records(1))
    assert out[0].reason.startswith("TLS failed") and "certificate verify failed" in out[0].reason
    assert out[0].unavailable and not out[0].final and out[0].attempts == 2


def test_without_a_bundle_named_the_trust_store_is_certifis(monkeypatch):
    """certifi is a declared dependency: the same CA store on every server, not the system's."""
    import certifi

    from runner.transport import pool_manager

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    pm = pool_manager("https://api.example.com/v2/tag", 2, (1.0, 1.0), None)
    assert pm.connection_pool_kw["ca_certs"] == certifi.where()
    monkeypatch.setenv("CURL_CA_BUNDLE", "/nonexistent/ca-dir")
    pm = pool_manager("https://api.example.com/v2/tag", 2, (1.0, 1.0), None)
    assert pm.connection_pool_kw["ca_cert_dir"] == "/nonexistent/ca-dir"


@pytest.mark.parametrize("text", [
    '{"records":[{"_id":"a","n":[1,{"b":"[x]"}]},{"_id":"b"}],"status":{"code":200}}',
    ' { "status" : 1 ,\n "records" : [ {"_id": "a"} ,\t{"_id" : "b", "s": "{["} ] } \n',
    '{"records":[]}',
])
def test_a_plain_answer_keeps_each_record_as_received(text):
    from runner.wire import split_plain

    body, texts = split_plain(text.encode())
    assert body == json.loads(text)
    assert [json.loads(t) for t in texts] == json.loads(text)["records"]
    assert all(t == t.strip() and t in text for t in texts)


@pytest.mark.parametrize("text", [
    '{"records":[{"_id":"a","s":"caf\\u00e9"}]}',  # an escape: parsed and written again
    '{"records":[{"_id":"a","_base64":"AAAA"}]}',  # an echoed upload
    '{"records":[{"_id":"a"}]} trailing',
    '{"records":{"_id":"a"}}',
    '[{"_id":"a"}]',
    '{"records":[' + '[' * 70 + ']' * 70 + ']}',  # nested deeper than MAX_ANSWER_DEPTH
])
def test_an_answer_that_is_not_plain_is_left_to_the_parser(text):
    from runner.wire import split_plain

    assert split_plain(text.encode()) is None
