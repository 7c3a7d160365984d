"""The batch requests' own HTTP/1.1 (runner/http1.py) against a server that answers scripted
bytes on loopback: framings (Content-Length, chunked, to the end), encodings, interim answers,
keep-alive and its end, and failures in the words urllib3's path uses (transport.py)."""

from __future__ import annotations

import gzip
import socket
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from urllib3.exceptions import HTTPError as TransportError

from runner.http1 import DirectPool
from runner.transport import AnswerTooLarge, never_sent, transport_error

TIMEOUT = (2.0, 2.0)


@contextmanager
def scripted(*answers: bytes) -> Iterator[tuple[str, list[int]]]:
    """A server answering each request it reads with the next of `answers` (b"" closes the
    connection without a word); yields its URL and, per request, the connection's number."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[int] = []
    script = list(answers)

    def read_request(conn: socket.socket, buf: bytearray) -> bool:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return False
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        while len(rest) < length:
            rest += conn.recv(65536)
        buf[:] = rest[length:]
        return True

    def serve() -> None:
        n = 0
        while script:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            n += 1
            buf = bytearray()
            with conn:
                while script and read_request(conn, buf):
                    seen.append(n)
                    answer = script.pop(0)
                    if not answer:
                        break
                    conn.sendall(answer)
                    if b"Connection: close" in answer or b"HTTP/1.0" in answer[:8]:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{port}/v2/x", seen
    finally:
        listener.close()
        t.join(5)


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def post(url: str, cap: int = 1 << 20) -> tuple[int, bytes, DirectPool]:
    pool = DirectPool(url, 4, TIMEOUT, None)
    answer, data = pool.post(b'{"records":[]}', {"Content-Type": "application/json"}, cap)
    return answer.status, data, pool


def failure(url: str) -> tuple[str, bool]:
    pool = DirectPool(url, 4, TIMEOUT, None)
    with pytest.raises(TransportError) as info:
        pool.post(b"{}", {}, 1 << 20)
    return transport_error(info.value, TIMEOUT), never_sent(info.value)


def test_content_length_answers_reuse_one_connection():
    with scripted(ok(b'{"a":1}'), ok(b'{"b":2}', "Content-Type: application/json")) as (url, seen):
        pool = DirectPool(url, 4, TIMEOUT, None)
        first, data1 = pool.post(b"{}", {}, 1 << 20)
        second, data2 = pool.post(b"{}", {}, 1 << 20)
    assert (data1, data2) == (b'{"a":1}', b'{"b":2}')
    assert second.headers.get("content-type") == "application/json"
    assert second.headers.get("Content-Type") == "application/json"
    assert seen == [1, 1]


def test_a_chunked_answer_with_extensions_and_trailers_is_read_whole():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;name=x\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-Trailer: y\r\n\r\n")
    with scripted(chunked, ok(b"again")) as (url, seen):
        pool = DirectPool(url, 4, TIMEOUT, None)
        assert pool.post(b"{}", {}, 1 << 20)[1] == b'{"a":1}'
        assert pool.post(b"{}", {}, 1 << 20)[1] == b"again"
    assert seen == [1, 1]


@pytest.mark.parametrize("encoding, encode", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send it
], ids=["gzip", "deflate", "raw-deflate"])
def test_compressed_answers_are_decoded(encoding, encode):
    body = b'{"records":[' + b",".join(b'{"n":%d}' % i for i in range(500)) + b"]}"
    with scripted(ok(encode(body), f"Content-Encoding: {encoding}")) as (url, _):
        assert post(url)[1] == body


def test_a_compression_bomb_stops_at_the_cap():
    bomb = gzip.compress(b"0" * (20 << 20))
    with scripted(ok(bomb, "Content-Encoding: gzip")) as (url, _):
        with pytest.raises(AnswerTooLarge):
            post(url, cap=1 << 20)


def test_interim_answers_come_before_the_real_one():
    with scripted(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real")) as (url, _):
        assert post(url)[:2] == (200, b"real")


def test_bare_line_feeds_are_taken_as_http_client_takes_them():
    with scripted(b"HTTP/1.1 200 OK\nContent-Length: 4\nX-A: b\n\nbody", ok(b"next")) as (url, seen):
        pool = DirectPool(url, 4, TIMEOUT, None)
        answer, data = pool.post(b"{}", {}, 1 << 20)
        assert (answer.status, answer.headers.get("x-a"), data) == (200, "b", b"body")
        assert pool.post(b"{}", {}, 1 << 20)[1] == b"next"
    assert seen == [1, 1]


def test_an_answer_read_to_the_end_closes_its_connection():
    with scripted(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", ok(b"new")) as (url, seen):
        pool = DirectPool(url, 4, TIMEOUT, None)
        assert pool.post(b"{}", {}, 1 << 20)[1] == b"until the end"
        assert pool.post(b"{}", {}, 1 << 20)[1] == b"new"
    assert seen == [1, 2]


def test_connection_close_is_not_reused():
    with scripted(ok(b"one", "Connection: close"), ok(b"two")) as (url, seen):
        pool = DirectPool(url, 4, TIMEOUT, None)
        pool.post(b"{}", {}, 1 << 20)
        pool.post(b"{}", {}, 1 << 20)
    assert seen == [1, 2]


def test_failures_are_told_as_urllib3_tells_them():
    with scripted(b"") as (url, _):
        assert failure(url) == ("connection dropped", False)
    with scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort") as (url, _):
        assert failure(url) == ("connection dropped while reading the answer", False)
    with scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n") as (url, _):
        assert failure(url) == ("connection dropped while reading the answer", False)
    with scripted(b"SPDY/9 nonsense\r\n\r\n") as (url, _):  # urllib3: "Connection aborted."
        assert failure(url) == ("connection dropped", False)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    reason, unsent = failure(f"http://127.0.0.1:{port}/")
    assert reason.startswith("connection failed") and unsent  # nothing was sent: no attempt
