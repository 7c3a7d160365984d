"""A lying or hostile server: answers paired with the wrong image, huge or bomb answers, answers
dripped a byte at a time, requests after a refused token."""

from __future__ import annotations

import contextlib
import gzip
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import invoke, make_images, start, status_json, wait_for, write_job

from runner.client import ApiClient
from runner.errors import AuthError
from runner.job import ApiConfig
from runner.records import RequestRecord

TOKEN = "tok-hostile-1234"

# A handler gets (the request's parsed JSON body, the connection) and writes the whole answer.
Handler = Callable[[dict[str, Any], socket.socket], None]


@contextlib.contextmanager
def raw_server(handler: Handler) -> Iterator[str]:
    """A bare HTTP/1.1 server on loopback, one thread per connection; yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    head += piece
                head, _, rest = head.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += conn.recv(65536)
                handler(json.loads(rest) if rest else {}, conn)
            except OSError:
                pass

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        done.set()
        listener.close()


def answer(conn: socket.socket, body: bytes, code: int = 200, headers: str = "") -> None:
    conn.sendall(f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def client(url: str, **api: Any) -> ApiClient:
    cfg = ApiConfig(**{"max_retries": 1, "timeout_s": 5.0, "connect_timeout_s": 2.0, **api})
    return ApiClient(url + "collectibles/v2/tcg_id", TOKEN, cfg, sleep=lambda _: None)


def recs(n: int) -> list[RequestRecord]:
    return [RequestRecord(f"img/{i}.jpg", data=b"\xff\xd8" + bytes([i]) * 10) for i in range(n)]


# --- A1: answers go to their own image or to none ----------------------------------------------


def test_an_answer_with_a_foreign_id_is_never_stored_on_another_image():
    def lying(body: dict[str, Any], conn: socket.socket) -> None:
        sent = [r["_id"] for r in body["records"]]
        # reversed, and the middle one replaced by a record for an image never sent
        out = [{"_id": i, "_status": {"code": 200}, "said_for": i} for i in reversed(sent)]
        out[len(out) // 2] = {"_id": "someone/else.jpg", "_status": {"code": 200},
                              "said_for": "someone/else.jpg"}
        answer(conn, json.dumps({"records": out}).encode())

    with raw_server(lying) as url, client(url, max_retries=1) as c:
        out = c.submit_batch(recs(3))
    by_id = {o.id: o for o in out}
    assert by_id["img/0.jpg"].ok and by_id["img/0.jpg"].record["said_for"] == "img/0.jpg"
    assert by_id["img/2.jpg"].ok and by_id["img/2.jpg"].record["said_for"] == "img/2.jpg"
    lost = by_id["img/1.jpg"]
    assert not lost.ok and lost.final and lost.attempts == 2 and lost.record is None
    assert lost.reason == "bad answer: no record with this _id in the answer"


def test_an_answer_mixing_records_with_and_without_id_pairs_only_the_certain_ones():
    def mixed(body: dict[str, Any], conn: socket.socket) -> None:
        out: list[dict[str, Any]] = [{"_status": {"code": 200}, "said_for": r["_id"]}
                                     for r in body["records"]]
        out[-1]["_id"] = body["records"][-1]["_id"]
        answer(conn, json.dumps({"records": out}).encode())

    with raw_server(mixed) as url, client(url, max_retries=0) as c:
        out = c.submit_batch(recs(2))
    assert out[1].ok and out[1].record["said_for"] == "img/1.jpg"
    assert not out[0].ok and out[0].reason.startswith("bad answer: no record with this _id")


# --- A2: the answer's size, decoded, is capped ---------------------------------------------------


def test_a_decompression_bomb_or_a_huge_answer_fails_the_request_without_filling_memory():
    bomb = gzip.compress(b" " * (40 * 1024 * 1024), compresslevel=9)  # 40 MB from ~40 KB
    assert len(bomb) < 100_000

    def bombing(body: dict[str, Any], conn: socket.socket) -> None:
        answer(conn, bomb, headers="Content-Encoding: gzip\r\n")

    with raw_server(bombing) as url, client(url, max_retries=1) as c:
        out = c.submit_batch(recs(1))
    cap = ApiClient.ANSWER_BASE_BYTES + ApiClient.ANSWER_PER_RECORD_BYTES
    assert not out[0].ok and out[0].attempts == 2
    assert out[0].reason == f"bad answer: answer over {cap} bytes decoded"

    def huge(body: dict[str, Any], conn: socket.socket) -> None:
        answer(conn, b"[" + b"0," * (4 * 1024 * 1024) + b"0]")

    with raw_server(huge) as url, client(url, max_retries=0) as c:
        out = c.submit_batch(recs(1))
    assert out[0].reason == f"bad answer: answer over {cap} bytes decoded"


# --- A3: timeout_s bounds the whole request ------------------------------------------------------


def dripping(body: dict[str, Any], conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    for _ in range(600):  # 60 s, a byte every 0.1 s: every socket read succeeds
        conn.sendall(b" ")
        time.sleep(0.1)


def test_a_server_dripping_its_answer_is_cut_off_at_timeout_s_for_the_whole_request():
    with raw_server(dripping) as url, client(url, timeout_s=1.0, max_retries=1) as c:
        started = time.monotonic()
        out = c.submit_batch(recs(2))
        took = time.monotonic() - started
    assert took < 4.0, took
    # a timeout is the service's failure, not the record's: pending for the next run
    assert all(not o.ok and not o.final and o.unavailable and o.attempts == 2 for o in out)
    assert out[0].reason == "timeout after 1s"


def test_a_stop_during_a_dripped_answer_waits_no_longer_than_timeout_s():
    stop = threading.Event()
    cfg = ApiConfig(max_retries=5, timeout_s=1.0, connect_timeout_s=1.0)
    with raw_server(dripping) as url:
        c = ApiClient(url + "collectibles/v2/tcg_id", TOKEN, cfg, stop=stop)
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        out = c.submit_batch(recs(1))
        took = time.monotonic() - started
        c.close()
    assert took < 2.5, took
    assert not out[0].ok and not out[0].final  # stopped: the image stays pending


# --- A4: nothing is sent after a 401 ---------------------------------------------------------------


def test_nothing_is_sent_after_a_401_and_the_refused_request_is_not_possibly_billed(
        tmp_path: Path):
    posts: list[int] = []

    def revoked(body: dict[str, Any], conn: socket.socket) -> None:
        if not body:  # the account's GET: not offered by this API
            answer(conn, b'{"detail": "Not found."}', code=404)
            return
        posts.append(len(body["records"]))
        time.sleep(0.2)  # the next batch is already waiting for the request's slot
        answer(conn, b'{"detail": "Invalid token."}', code=401)

    make_images(tmp_path / "imgs", 6)
    with raw_server(revoked) as url:
        job = write_job(tmp_path, url + "collectibles/v2/tcg_id", tmp_path / "imgs",
                        api={"batch_size": 1, "concurrency": 1})
        res = invoke("run", str(job))
    assert res.exit_code == 5, res.output
    assert posts == [1]
    status = status_json(job)
    assert status["possibly_billed_without_answer"] == []


def test_a_client_sends_nothing_more_once_a_request_was_refused():
    posts: list[int] = []

    def refusing(body: dict[str, Any], conn: socket.socket) -> None:
        posts.append(1)
        answer(conn, b'{"detail": "Invalid token."}', code=401)

    with raw_server(refusing) as url, client(url) as c:
        with pytest.raises(AuthError) as first:
            c.submit_batch(recs(1))
        assert first.value.refused_request
        for _ in range(3):
            with pytest.raises(AuthError) as later:
                c.submit_batch(recs(1))
            assert not later.value.refused_request
        with pytest.raises(AuthError):
            c.account_details()
    assert len(posts) == 1


# --- E: secrets are never stored or printed -------------------------------------------------------


def test_an_error_text_echoing_the_token_is_redacted_in_reason_and_result(tmp_path: Path):
    def echoing(body: dict[str, Any], conn: socket.socket) -> None:
        if not body:
            answer(conn, b'{"detail": "Not found."}', code=404)
            return
        out = [{"_id": r["_id"], "_status": {"code": 400, "text": f"bad token {TOKEN}!"},
                "debug": {"auth": f"Token {TOKEN}", "seen": [TOKEN]}} for r in body["records"]]
        answer(conn, json.dumps({"records": out}).encode())

    make_images(tmp_path / "imgs", 2)
    with raw_server(echoing) as url:
        job = write_job(tmp_path, url + "collectibles/v2/tcg_id", tmp_path / "imgs")
        res = invoke("run", str(job), env={"XIMILAR_TOKEN": TOKEN})
    assert res.exit_code == 1, res.output
    exported = invoke("export", str(job))
    status = invoke("status", str(job))
    for text in (res.output, exported.output, status.output):
        assert TOKEN not in text
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert all(r["reason"] == "api 400: bad token <token>!" for r in rows)
    assert all(r["result"]["debug"] == {"auth": "Token <token>", "seen": ["<token>"]}
               for r in rows)


def test_credentials_in_the_endpoint_are_not_stored(tmp_path: Path):
    def ok(body: dict[str, Any], conn: socket.socket) -> None:
        if not body:
            answer(conn, b'{"detail": "Not found."}', code=404)
            return
        out = [{"_id": r["_id"], "_status": {"code": 200}, "_tags": ["x"]}
               for r in body["records"]]
        answer(conn, json.dumps({"records": out}).encode())

    make_images(tmp_path / "imgs", 2)
    with raw_server(ok) as url:
        endpoint = url.replace("http://", "http://bob:hunter2pw@") + \
            "collectibles/v2/tcg_id?api_key=k3y-s3cret&lang=en"
        job = write_job(tmp_path, endpoint, tmp_path / "imgs")
        res = invoke("run", str(job))
    assert res.exit_code == 0, res.output
    db = tmp_path / "state" / "t.db"
    with sqlite3.connect(db) as c:
        stored = c.execute("SELECT endpoint FROM runs").fetchall()
    assert stored and all("hunter2pw" not in e and "k3y-s3cret" not in e for e, in stored)
    assert stored[0][0].endswith("collectibles/v2/tcg_id?api_key=REDACTED&lang=en")
    assert "bob:REDACTED@" in stored[0][0]
    for text in (db.read_bytes().decode("utf-8", "replace"), invoke("status", str(job)).output,
                 invoke("export", str(job)).output):
        assert "hunter2pw" not in text and "k3y-s3cret" not in text


def test_an_echoed_presigned_url_is_stored_without_its_signature_or_session_token():
    presigned = ("https://bucket.s3.amazonaws.com/cards/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKIAEXAMPLE%2F20261201%2Fus-east-1%2Fs3%2Faws4_request"
                 "&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
                 "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLESESSION"
                 "&X-Amz-Signature=0123456789abcdef0123&X-Amz-SignedHeaders=host")

    def echo_url(body: dict[str, Any], conn: socket.socket) -> None:
        out = [{"_id": r["_id"], "_url": r["_url"], "_status": {"code": 200},
                "note": f"fetched {r['_url']}"} for r in body["records"]]
        answer(conn, json.dumps({"records": out}).encode())

    with raw_server(echo_url) as url, client(url) as c:
        out = c.submit_batch([RequestRecord("s3://bucket/cards/a.jpg", url=presigned)])
    kept = json.dumps(out[0].record)
    assert out[0].ok
    for secret in ("AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLESESSION", "0123456789abcdef0123"):
        assert secret not in kept
    assert out[0].record["_url"].startswith("https://bucket.s3.amazonaws.com/cards/a.jpg?")
    assert "X-Amz-Signature=REDACTED" in out[0].record["_url"]


def test_the_sandbox_token_can_come_from_the_environment(monkeypatch):
    import runner.sandbox

    served: list[Any] = []
    monkeypatch.setattr(runner.sandbox, "serve", lambda cfg, host, port: served.append(cfg))
    res = invoke("sandbox", env={"XIMRUN_SANDBOX_TOKEN": "from-env-123"})
    assert res.exit_code == 0, res.output
    assert served[0].token == "from-env-123"
    assert "XIMRUN_SANDBOX_TOKEN" in invoke("sandbox", "--help").output


def test_an_answer_nested_a_million_levels_deep_is_a_bad_answer_not_a_crash():
    def deep(body: dict[str, Any], conn: socket.socket) -> None:
        n = 1_000_000 if body["records"][0]["_id"].endswith("0.jpg") else 200
        head = json.dumps({"_id": body["records"][0]["_id"], "_status": {"code": 200}})
        rec = head[:-1] + ', "x": ' + "[" * n + "]" * n + "}"
        answer(conn, ('{"records": [' + rec + "]}").encode())

    with raw_server(deep) as url, client(url, max_retries=1) as c:
        out = [c.submit_batch(recs(2)[i:i + 1])[0] for i in range(2)]
    assert all(not o.ok and o.attempts == 2 for o in out)
    assert all(o.reason == "bad answer: http 200 with not JSON" for o in out)


def test_a_record_text_of_megabytes_gives_a_short_one_line_reason():
    def wordy(body: dict[str, Any], conn: socket.socket) -> None:
        out = [{"_id": r["_id"], "_status": {"code": 400, "text": "bad\n" + "x" * 1_000_000}}
               for r in body["records"]]
        answer(conn, json.dumps({"records": out}).encode())

    with raw_server(wordy) as url, client(url) as c:
        out = c.submit_batch(recs(1))
    assert not out[0].ok and out[0].reason.startswith("api 400: bad xxx")
    assert len(out[0].reason) <= 220 and "\n" not in out[0].reason


@pytest.mark.slow
def test_sigterm_during_a_dripped_answer_ends_the_run_within_timeout_s(tmp_path: Path):
    posts: list[int] = []

    def drip_posts(body: dict[str, Any], conn: socket.socket) -> None:
        if not body:
            answer(conn, b'{"detail": "Not found."}', code=404)
            return
        posts.append(1)
        dripping(body, conn)

    make_images(tmp_path / "imgs", 3)
    with raw_server(drip_posts) as url:
        job = write_job(tmp_path, url + "collectibles/v2/tcg_id", tmp_path / "imgs",
                        api={"timeout_s": 3, "max_retries": 5, "batch_size": 3})
        child = start(tmp_path, "run", str(job), "--json")
        wait_for(lambda: posts, "a request in flight", child)
        time.sleep(0.5)
        child.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = child.wait(timeout=30)
        took = time.monotonic() - started
    assert code == 4, child.output()
    assert took < 3 + 3, took  # the request's own deadline, and the time to record and exit
    assert "Traceback" not in child.stderr
    assert json.loads(child.stdout)["pending"] == 3
