"""The batch requests' HTTP/1.1 on connections of our own, when no proxy is in the way.

A batch request through urllib3 costs its thread about 0.9 ms of CPU (its response objects,
http.client's header parsing through the email package, the pool's bookkeeping), most of it
under the interpreter lock every other thread needs; this exchange costs about 0.2 ms, mostly
the socket's own system calls. It does what the batch POST needs and nothing more: keep-alive
connections to one origin (http or https, the CA bundle transport.py picks), Content-Length or
chunked answers, gzip and deflate decoded under the caller's cap. Requests through a proxy, and
every other request (the account's GET), go through urllib3 (transport.py).

Failures are raised as the urllib3 exceptions transport.py reads (`transport_error`,
`never_sent`): a connection that could not be made is a ConnectTimeoutError or a
NewConnectionError (nothing was sent), anything later a ProtocolError, a ReadTimeoutError, an
SSLError or a DecodeError, so that both paths say the same thing of the same failure.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
import zlib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from runner.transport import AnswerTooLarge, attach_deadline

MAX_HEAD_BYTES = 64 * 1024  # the status line and headers of an answer, at most
READ_BYTES = 64 * 1024


class Headers(dict[str, str]):
    """An answer's headers by lower-cased name (a repeated header's values joined by ", ")."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class Answer:
    """What urllib3's response offers the client: status, reason, headers."""

    __slots__ = ("status", "reason", "headers")

    def __init__(self, status: int, reason: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers


class _Conn:
    """One connection: its socket, and bytes read past the last answer (none, with HTTP/1.1
    answers read exactly)."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class DirectPool:
    """Keep-alive connections to the origin of `endpoint_url`, shared by every request thread."""

    def __init__(self, endpoint_url: str, size: int, timeout: tuple[float, float],
                 ca: tuple[str | None, str | None]) -> None:
        """`ca`: the CA bundle's file or folder (transport.ca_bundle)."""
        parts = urlsplit(endpoint_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        netloc = parts.netloc.rpartition("@")[2]
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.url = endpoint_url
        self._head_start = f"POST {self.target} HTTP/1.1\r\nHost: {netloc}\r\n"
        self.timeout = timeout
        self.size = size
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca[0], capath=ca[1])
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx

    def post(self, body: bytes, headers: Mapping[str, str], cap: int) -> tuple[Answer, bytes]:
        """One request; the answer's body decoded, at most `cap` bytes (AnswerTooLarge)."""
        conn = self._take()
        attach_deadline(conn)
        head = self._head_start + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + \
            f"Content-Length: {len(body)}\r\n\r\n"
        try:
            with self._failures("Write", "Connection aborted."):
                if len(body) <= READ_BYTES:
                    conn.sock.sendall(head.encode("latin-1") + body)
                else:
                    conn.sock.sendall(head.encode("latin-1"))
                    conn.sock.sendall(body)
            answer, data, keep = self._answer(conn, cap)
        except BaseException:
            conn.close()
            raise
        if keep and not conn.buf:  # bytes past the answer: the connection is out of step
            self._give_back(conn)
        else:
            conn.close()
        return answer, data

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- connections ------------------------------------------------------------------------------

    def _take(self) -> _Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not _dropped(conn.sock):
                conn.sock.settimeout(self.timeout[1])
                return conn
            conn.close()  # the server closed it while it was idle: nothing was sent on it

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout[0])
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                None, f"Connection to {self.host} timed out. (connect timeout={self.timeout[0]})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(None, f"Failed to establish a new connection: {exc}"  # type: ignore[arg-type]
                                     ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise SSLError(exc) from exc
                except TimeoutError as exc:
                    raise ConnectTimeoutError(
                        None, f"TLS handshake with {self.host} timed out") from exc
            sock.settimeout(self.timeout[1])
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    # --- the answer -------------------------------------------------------------------------------

    def _answer(self, conn: _Conn, cap: int) -> tuple[Answer, bytes, bool]:
        while True:
            version, status, reason, headers = self._head(conn)
            if not 100 <= status < 200 or status == 101:
                break  # 1xx answers (100 Continue, 103 Early Hints) come before the real one
        if status == 101:
            raise ProtocolError("Connection aborted.",
                                http.client.BadStatusLine("101 Switching Protocols"))
        close = "close" in headers.get("connection", "").lower() or (
            version == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower())
        decoder = _decoder(headers.get("content-encoding", ""))
        out = _Capped(cap, decoder)
        if status in (204, 304):
            return Answer(status, reason, headers), b"", not close
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            self._chunked(conn, out)
        elif headers.get("content-length") is not None:
            try:
                length = int(headers["content-length"].split(",")[0].strip())
            except ValueError:
                raise ProtocolError("Connection broken: invalid Content-Length",
                                    http.client.IncompleteRead(b"")) from None
            self._exactly(conn, length, out)
        else:
            self._to_end(conn, out)
            close = True
        return Answer(status, reason, headers), out.finish(), not close

    def _head(self, conn: _Conn) -> tuple[str, int, str, Headers]:
        buf = conn.buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", max(0, start - 3))
            if end >= 0:
                size = 4
                break
            end = buf.find(b"\n\n", max(0, start - 1))  # bare LFs, which http.client takes too
            if end >= 0:
                size = 2
                break
            if len(buf) > MAX_HEAD_BYTES:
                raise ProtocolError("Connection aborted.",
                                    http.client.LineTooLong("the answer's headers"))
            start = len(buf)
            chunk = self._recv(conn, before_answer=not buf)
            if not chunk:
                raise ProtocolError("Connection aborted.", http.client.RemoteDisconnected(
                    "Remote end closed connection without response"))
            buf += chunk
        lines = bytes(buf[:end]).decode("latin-1").replace("\r\n", "\n").split("\n")
        del buf[:end + size]
        status_line = lines[0].split(None, 2)
        try:
            version, status = status_line[0], int(status_line[1])
            if not version.startswith("HTTP/") or not 100 <= status <= 999:
                raise ValueError
        except (ValueError, IndexError):
            raise ProtocolError("Connection aborted.",
                                http.client.BadStatusLine(lines[0][:100])) from None
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                continue
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return version, status, status_line[2] if len(status_line) > 2 else "", headers

    def _recv(self, conn: _Conn, *, before_answer: bool = False) -> bytes:
        with self._failures("Read", "Connection aborted." if before_answer
                            else "Connection broken: "):
            return conn.sock.recv(READ_BYTES)

    @contextlib.contextmanager
    def _failures(self, doing: str, dropped: str) -> Iterator[None]:
        """A socket's errors as urllib3's: a timeout, TLS, or the connection dropped."""
        try:
            yield
        except TimeoutError as exc:
            raise ReadTimeoutError(None, self.url,  # type: ignore[arg-type]
                                   f"{doing} timed out. (timeout={self.timeout[1]})") from exc
        except ssl.SSLError as exc:
            raise SSLError(exc) from exc
        except OSError as exc:
            raise ProtocolError(dropped, exc) from exc

    def _more(self, conn: _Conn) -> bytes:
        """Bytes of the body: what was read past the head first, then the socket's."""
        if conn.buf:
            data = bytes(conn.buf)
            conn.buf.clear()
            return data
        return self._recv(conn)

    def _exactly(self, conn: _Conn, length: int, out: _Capped) -> None:
        left = length
        while left > 0:
            data = self._more(conn)
            if not data:
                raise ProtocolError(f"Connection broken: IncompleteRead({length - left} bytes "
                                    f"read, {left} more expected)",
                                    http.client.IncompleteRead(b"", left))
            if len(data) > left:  # bytes past the answer: the server's, kept for nothing
                conn.buf += data[left:]
                data = data[:left]
            left -= len(data)
            out.add(data)

    def _to_end(self, conn: _Conn, out: _Capped) -> None:
        while data := self._more(conn):
            out.add(data)

    def _line(self, conn: _Conn) -> bytes:
        buf = conn.buf
        while (i := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise ProtocolError("Connection broken: InvalidChunkLength",
                                    http.client.IncompleteRead(b""))
            data = self._recv(conn)
            if not data:
                raise ProtocolError("Connection broken: IncompleteRead",
                                    http.client.IncompleteRead(b""))
            buf += data
        line = bytes(buf[:i])
        del buf[:i + 2]
        return line

    def _chunked(self, conn: _Conn, out: _Capped) -> None:
        while True:
            line = self._line(conn)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                raise ProtocolError(f"Connection broken: InvalidChunkLength(got length "
                                    f"{line[:20]!r})", http.client.IncompleteRead(b"")) from None
            if size == 0:
                while self._line(conn):  # trailers, up to the empty line
                    pass
                return
            inner = _Capped(size, None)
            self._exactly(conn, size, inner)
            out.add(inner.finish())
            if self._line(conn):
                raise ProtocolError("Connection broken: the chunk has no CRLF after it",
                                    http.client.IncompleteRead(b""))


class _Capped:
    """An answer's body as it arrives, decoded, never more than `cap` bytes decoded."""

    __slots__ = ("cap", "decoder", "parts", "total")

    def __init__(self, cap: int, decoder: Any) -> None:
        self.cap = cap
        self.decoder = decoder
        self.parts: list[bytes] = []
        self.total = 0

    def add(self, data: bytes) -> None:
        if self.decoder is not None:
            data = self._decode(data)
        self.total += len(data)
        if self.total > self.cap:
            raise AnswerTooLarge(f"answer over {self.cap} bytes decoded")
        self.parts.append(data)

    def _decode(self, data: bytes) -> bytes:
        try:
            # Never more than the cap allows (plus a byte, to tell): a bomb stops here.
            out = self.decoder.decompress(data, self.cap - self.total + 1)
        except zlib.error as exc:
            raise DecodeError(f"Received response with content-encoding, but failed to "
                              f"decode it: {exc}") from exc
        return out

    def finish(self) -> bytes:
        return b"".join(self.parts)


class _Deflate:
    """"deflate" as servers send it: zlib-wrapped as the standard says, or raw (told by the
    first bytes: zlib refuses a raw stream at once)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj()
        self._started = False

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._started:
            return self._d.decompress(data, max_length)
        self._started = True
        try:
            return self._d.decompress(data, max_length)
        except zlib.error:
            self._d = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._d.decompress(data, max_length)


def _decoder(encoding: str) -> Any:
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Deflate()
    return None  # identity, or an encoding not asked for: the bytes as they are (as urllib3)


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle connection was closed by the server (readable: EOF, or stray bytes)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True

