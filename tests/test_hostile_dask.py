"""A token refused under the Dask executor: the refused requests are not listed as possibly
billed (the coordinator records a batch's first request before it leaves)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Any

import pytest
from driver import invoke, make_images, status_json, write_job

distributed = pytest.importorskip("distributed")


@pytest.mark.slow
def test_a_refused_token_on_dask_leaves_nothing_possibly_billed(tmp_path: Path):
    posts: list[int] = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer(404, b'{"detail": "Not found."}')

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posts.append(1)
            self._answer(401, b'{"detail": "Invalid token."}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        make_images(tmp_path / "imgs", 8)
        url = f"http://127.0.0.1:{server.server_address[1]}/collectibles/v2/tcg_id"
        job = write_job(tmp_path, url, tmp_path / "imgs", api={"batch_size": 1, "concurrency": 1},
                        executor={"kind": "dask", "workers": 1})
        res = invoke("run", str(job))
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 5, res.output
    assert 1 <= len(posts) <= 2  # one worker's client; a second batch may have been handed over
    assert status_json(job)["possibly_billed_without_answer"] == []
