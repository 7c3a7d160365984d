"""The emulator's HTTP transport: a real keep-alive HTTP/1.1 server on loopback, in a thread.

Everything the API decides lives in `service.Emulator`; this module reads requests, writes
replies, hangs up when a fault says so, and drops connections left idle like the real API does.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from runner.errors import JobError
from runner.job import SANDBOX_DEFAULT_PATH, SandboxSettings
from runner.sandbox.service import (
    ACCOUNT_PATH,
    HEALTH_PATH,
    LEDGER_PATH,
    Emulator,
    LedgerEntry,
    Reply,
    json_reply,
)

log = logging.getLogger("ximrun.sandbox")

# The API drops keep-alive connections left idle; clients must notice and reconnect.
IDLE_TIMEOUT_S = 5.0
# Bodies past this are refused with 413 unread, as a proxy in front of the API would.
MAX_BODY_BYTES = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes: without this each answer waits for a delayed ACK.
    disable_nagle_algorithm = True
    server_version = "ximilar-sandbox/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        # The socket timeout is what ends a connection idle between requests.
        self.timeout = self.server.idle_timeout_s
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client is gone; there is nothing left to flush to
        finally:
            self.server.track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._reply(self.server.emulator.get(self.path, self.headers.get("Authorization")))

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = self._read_body()
        except (OSError, ValueError):  # a disconnect, an idle timeout or a garbled length
            self.close_connection = True  # half a request: nothing to answer, nobody to answer
            return
        if body is None:
            self.close_connection = True  # the rest of the body was never read
        try:
            reply = self.server.emulator.post(self.path, self.headers.get("Authorization"), body)
        except Exception:  # noqa: BLE001 -- an emulator bug must answer 500, not kill the thread
            log.exception("sandbox: unexpected error answering POST %s", self.path)
            reply = json_reply(500, {"detail": "Internal server error"})
        self._reply(reply)

    def _read_body(self) -> bytes | None:
        """The request body; None when it is larger than MAX_BODY_BYTES (left unread)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers carry nothing the emulator needs
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    return None
                chunks.append(self._read_exactly(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > MAX_BODY_BYTES:
            return None
        return self._read_exactly(length)

    def _read_exactly(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise ConnectionError("the client hung up in the middle of the body")
        return data

    def _reply(self, reply: Reply) -> None:
        if reply.drop:
            # The request was processed (and billed); the answer is lost with the connection.
            self.close_connection = True
            return
        try:
            self.send_response(reply.code)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            if reply.request_no is not None:
                self.server.emulator.mark_unanswered(reply.request_no)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("sandbox: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: thirty-two clients connecting at once would see SYNs
    # dropped and wait a second for the kernel to retry, which no real API front end does.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: Emulator, idle_timeout_s: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.emulator = emulator
        self.idle_timeout_s = idle_timeout_s
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Hang up every open connection, so a stopped sandbox answers nobody."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its own thread

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that disconnect are expected (drops, timeouts); anything else is worth a log line.
        log.debug("sandbox: error serving %s", client_address, exc_info=True)


class Sandbox:
    """The local emulator of the API, served over real HTTP on a background thread."""

    idle_timeout_s: float = IDLE_TIMEOUT_S  # tests shorten it on an instance before start()

    def __init__(self, settings: SandboxSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self._emulator = Emulator(settings)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Sandbox:
        """Listen and serve in a daemon thread; returns self. Raises OSError if the port is taken."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self._emulator, self.idle_timeout_s)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"sandbox:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._thread is None:
            raise RuntimeError("the sandbox was never started: its port is not known yet")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def endpoint_url(self, path: str = SANDBOX_DEFAULT_PATH) -> str:
        return self.base_url + path.lstrip("/")

    @property
    def open_connections(self) -> int:
        """Connections the server holds open now (0 when stopped): once a client is gone, each
        closes as soon as its request is answered, so 0 means every request was finished."""
        server = self._server
        if server is None:
            return 0
        with server._connections_lock:
            return len(server._connections)

    def ledger(self) -> list[LedgerEntry]:
        """A copy of every record received so far, in order of arrival."""
        return self._emulator.ledger()

    @property
    def credits_used(self) -> int:
        return self._emulator.credits_used

    def wait(self) -> None:
        """Block until the server stops; Ctrl-C interrupts (short joins keep signals deliverable)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)


def serve(settings: SandboxSettings, host: str, port: int) -> None:
    """Serve the emulator in the foreground until Ctrl-C (the `ximrun sandbox` command)."""
    sb = Sandbox(settings, host, port)
    try:
        sb.start()
    except OSError as exc:
        raise JobError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(startup_text(sb), flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM ends it as Ctrl-C does: with the totals.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        sb.wait()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how this command is meant to end
    finally:
        sb.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(totals_text(sb), flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def startup_text(sb: Sandbox) -> str:
    """What `ximrun sandbox` prints once it listens: what to put in a job, and where to look."""
    s = sb.settings
    token = ("any token (XIMILAR_TOKEN may hold anything)" if s.token is None
             else f"{s.token!r} only (export XIMILAR_TOKEN={s.token})")
    faults = ", ".join(f"{f.name} = {getattr(s, f.name)!r}" for f in dataclasses.fields(s)
                       if f.name != "token" and getattr(s, f.name) != f.default)
    base = sb.base_url
    return "\n".join([
        f"ximrun sandbox: serving the API emulator at {base} (Ctrl-C stops it and prints its "
        "totals)",
        f"  endpoint  {sb.endpoint_url()}",
        "            put it in the job: [api] endpoint = \"...\" (any service path of the API "
        "works, e.g. card-grader/v2/grade)",
        f"  token     {token}",
        f"  ledger    {base}{LEDGER_PATH}   (every record received and what became of it, and "
        "credits_used, as JSON)",
        f"  account   {base}{ACCOUNT_PATH}   (credits_counter, as the API's account endpoint)",
        f"  health    {base}{HEALTH_PATH}",
        f"  settings  {faults or 'no faults (all defaults)'}",
    ])


def totals_text(sb: Sandbox) -> str:
    """What `ximrun sandbox` prints when it stops: what it received and billed."""
    ledger = sb.ledger()
    requests = len({e.request_no for e in ledger})
    billed = sum(e.billed for e in ledger)
    lost = sum(e.billed and not e.answered for e in ledger)
    refused = sum(e.code >= 400 for e in ledger)
    images = len({e.record_id for e in ledger})
    return (f"ximrun sandbox: stopped. {requests} request(s) with {len(ledger)} record(s) "
            f"({images} distinct id(s)): {billed} billed ({lost} whose answer was lost), "
            f"{refused} refused; credits used {sb.credits_used}")
