"""The API emulator over real HTTP: protocol, per-record answers, billing, faults and the ledger."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pillow_heif
import pytest
import requests
from PIL import Image

from runner.job import SandboxSettings
from runner.sandbox import Sandbox

TOKEN = "sandbox-test-token"
AUTH = {"Authorization": f"Token {TOKEN}"}
REPO = Path(__file__).resolve().parent.parent


def card(n: int, fmt: str = "PNG", size: tuple[int, int] = (60, 84)) -> bytes:
    """A small card on a white background whose colours differ with n."""
    img = Image.new("RGB", size, (255, 255, 255))
    inner = Image.new("RGB", (size[0] - 16, size[1] - 16),
                      ((n * 67) % 256, (n * 29 + 80) % 256, (n * 101 + 40) % 256))
    inner.putpixel((n % inner.width, 3), (0, 0, 0))
    img.paste(inner, (8, 8))
    buf = io.BytesIO()
    if fmt == "HEIC":
        pillow_heif.from_pillow(img).save(buf, quality=80)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rec(rid: str, data: bytes, **meta: Any) -> dict[str, Any]:
    return {"_id": rid, "_base64": b64(data), **meta}


@contextlib.contextmanager
def sandbox(**settings: Any) -> Iterator[Sandbox]:
    with Sandbox(SandboxSettings(**{"token": TOKEN, **settings})) as sb:
        yield sb


def post(sb: Sandbox, records: list[dict[str, Any]], path: str = "collectibles/v2/tcg_id",
         headers: dict[str, str] | None = None, **fields: Any) -> requests.Response:
    return requests.post(sb.endpoint_url(path), json={"records": records, **fields},
                         headers=AUTH if headers is None else headers, timeout=10)


def codes(resp: requests.Response) -> list[int]:
    return [r["_status"]["code"] for r in resp.json()["records"]]


# --- auth and account ------------------------------------------------------------------------


@pytest.mark.parametrize("headers, detail", [
    ({}, "Authentication credentials were not provided."),
    ({"Authorization": TOKEN}, "Authentication credentials were not provided."),
    ({"Authorization": "Bearer " + TOKEN}, "Authentication credentials were not provided."),
    ({"Authorization": "Token wrong"}, "Invalid token."),
])
def test_a_missing_or_wrong_token_is_401_and_nothing_is_billed(headers, detail):
    with sandbox() as sb:
        resp = post(sb, [rec("a", card(1))], headers=headers)
        account = requests.get(sb.base_url + "account/v2/details/", headers=headers, timeout=5)
        ledger = sb.ledger()
    assert resp.status_code == 401 and resp.json() == {"detail": detail}
    assert account.status_code == 401 and account.json() == {"detail": detail}
    assert [(e.record_id, e.code, e.billed) for e in ledger] == [("a", 401, False)]


def test_without_a_configured_token_any_token_is_accepted_but_not_none():
    with Sandbox(SandboxSettings()) as sb:
        assert post(sb, [rec("a", card(1))], headers={"Authorization": "Token x"}).status_code == 200
        assert post(sb, [rec("a", card(1))], headers={}).status_code == 401


def test_account_details_count_the_credits_used():
    with sandbox(credits=500, credits_per_record=7) as sb:
        url = sb.base_url + "account/v2/details/"
        before = requests.get(url, headers=AUTH, timeout=5).json()
        post(sb, [rec("a", card(1)), rec("b", card(2))])
        after = requests.get(url, headers=AUTH, timeout=5).json()
    assert before["email"] == "sandbox@example.com" and before["credits_limit"] == 500
    assert {"id", "default_workspace"} <= before.keys()
    assert before["credits_counter"] == 0 and after["credits_counter"] == 14


def test_unknown_paths_are_404_and_the_inspection_endpoints_need_no_token():
    with sandbox() as sb:
        assert post(sb, [rec("a", card(1))], path="nope/v2/x").json() == {"detail": "Not found."}
        assert requests.get(sb.base_url + "nope", timeout=5).status_code == 404
        assert requests.get(sb.base_url + "_sandbox/health", timeout=5).json() == {"ok": True}
        post(sb, [rec("a", card(1))])
        ledger = requests.get(sb.base_url + "_sandbox/ledger", timeout=5).json()
    assert ledger["credits_used"] == 10
    assert [(e["request_no"], e["record_id"], e["code"], e["billed"]) for e in ledger["entries"]] \
        == [(1, "a", 404, False), (2, "a", 200, True)]


# --- records ---------------------------------------------------------------------------------


def test_a_batch_of_real_images_is_answered_per_record_in_order():
    avif = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 99, 199)).save(avif, "AVIF")
    records = [rec("png", card(1), sku="X1"), rec("jpeg", card(2, "JPEG")),
               rec("heic", card(3, "HEIC")), rec("webp", card(4, "WEBP")),
               rec("avif", avif.getvalue()), rec("corrupt", card(5)[:60]),
               {"_id": "data-url", "_base64": "data:image/png;base64," + b64(card(6))}]
    with sandbox() as sb:
        resp = post(sb, records, lang="en")
        ledger = sb.ledger()
        used = sb.credits_used
    body = resp.json()
    assert resp.status_code == 200
    assert body["status"]["code"] == 200 and "processing time" in body["statistics"]
    out = body["records"]
    assert [r["_id"] for r in out] == [r["_id"] for r in records]
    assert codes(resp) == [200, 200, 200, 200, 400, 400, 200]
    assert out[4]["_status"]["text"] == out[5]["_status"]["text"] == "Unable to load image"
    assert all("_base64" not in r for r in out)
    assert out[0]["sku"] == "X1" and out[0]["_request_fields"] == {"lang": "en"}
    assert (out[2]["_width"], out[2]["_height"]) == (60, 84)
    card_obj = out[0]["_objects"][0]
    assert card_obj["name"] == "Card" and card_obj["bound_box"] == [8, 8, 52, 76]
    assert card_obj["_tags"]["Category"][0]["name"] == "Card/Trading Card Game"
    assert {"name", "set_code", "card_number"} <= card_obj["_identification"]["best_match"].keys()
    assert [e.billed for e in ledger] == [True, True, True, True, False, False, True]
    assert used == 50


def test_the_same_pixels_get_the_same_answer_whatever_the_encoding():
    def identify(data: bytes) -> dict[str, Any]:
        return post(sb, [rec("x", data)]).json()["records"][0]["_objects"][0]["_identification"]

    with sandbox() as sb:
        png, bmp, again = identify(card(7)), identify(card(7, "BMP")), identify(card(7))
        others = [identify(card(n))["best_match"] for n in range(8, 14)]
    assert png == bmp == again
    assert any(o != png["best_match"] for o in others)


def test_tagging_and_colour_services_answer_their_own_keys():
    with sandbox() as sb:
        tags = post(sb, [rec("a", card(1))], path="tagging/fashion/v2/tags").json()["records"][0]
        colors = post(sb, [rec("a", card(1))],
                      path="dom_colors/generic/v2/dominantcolor").json()["records"][0]
    assert tags["_tags_simple"] and tags["best_label"]["name"] == tags["_tags_simple"][0]
    hexes = colors["_dominant_colors"]["rgb_hex_colors"]
    assert "#ffffff" in hexes and all(h.startswith("#") and len(h) == 7 for h in hexes)


def test_a_record_past_max_image_bytes_is_413_and_not_billed():
    big = card(1, size=(400, 560))
    with sandbox(max_image_bytes=len(big) - 1) as sb:
        resp = post(sb, [rec("small", card(2)), rec("big", big)])
        used = sb.credits_used
    assert codes(resp) == [200, 413]
    assert resp.json()["records"][1]["_status"]["text"] == "Image too large"
    assert used == 10


def test_urls_are_fetched_from_loopback_only():
    image = card(3)

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            found = self.path == "/card.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(image) if found else 0))
            self.end_headers()
            self.wfile.write(image if found else b"")

        def log_message(self, *args: Any) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with sandbox() as sb:
            resp = post(sb, [{"_id": "a", "_url": f"{local}/card.png"},
                             {"_id": "b", "_url": f"{local}/missing.png"},
                             {"_id": "c", "_url": "https://example.com/card.png"}])
            ledger = sb.ledger()
    finally:
        files.shutdown()
        files.server_close()
    out = resp.json()["records"]
    assert codes(resp) == [200, 400, 400]
    assert out[0]["_url"] == f"{local}/card.png" and out[0]["_width"] == 60
    assert out[1]["_status"]["text"] == out[2]["_status"]["text"] == "Unable to download image"
    assert [e.url for e in ledger] == [r["_url"] for r in out]


# --- whole-request refusals ------------------------------------------------------------------


@pytest.mark.parametrize("path, n", [("collectibles/v2/tcg_id", 11), ("upscaler/2x/upscale", 2),
                                     ("card-grader/v2/grade", 3)])
def test_more_records_than_the_service_takes_is_400_for_the_whole_request(path, n):
    with sandbox() as sb:
        resp = post(sb, [rec(f"r{i}", card(i)) for i in range(n)], path=path)
        ledger = sb.ledger()
        used = sb.credits_used
    assert resp.status_code == 400 and "Too many records" in resp.json()["detail"]
    assert len(ledger) == n and not any(e.billed for e in ledger) and used == 0
    assert {e.code for e in ledger} == {400}


def test_max_records_lowers_the_cap():
    with sandbox(max_records=3) as sb:
        assert post(sb, [rec(f"r{i}", card(i)) for i in range(3)]).status_code == 200
        assert post(sb, [rec(f"r{i}", card(i)) for i in range(4)]).status_code == 400


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"images": []}',
    b'{"records": []}',
    json.dumps({"records": [{"_id": "a"}]}).encode(),
    json.dumps({"records": [{"_id": "a", "_url": "http://127.0.0.1/x",
                             "_base64": "AAAA"}]}).encode(),
])
def test_a_malformed_request_is_400_with_a_detail(body):
    with sandbox() as sb:
        resp = requests.post(sb.endpoint_url(), data=body, headers=AUTH, timeout=5)
        used = sb.credits_used
    assert resp.status_code == 400 and resp.json()["detail"] and used == 0


def test_grading_front_and_back_is_billed_once():
    with sandbox() as sb:
        resp = post(sb, [rec("front", card(1)), rec("back", card(2))], path="card-grader/v2/grade")
        ledger = sb.ledger()
        used = sb.credits_used
    assert codes(resp) == [200, 200] and "final" in resp.json()["records"][0]["grades"]
    assert used == 10 and [e.billed for e in ledger] == [True, False]


def test_a_record_past_the_balance_is_402_and_not_billed():
    with sandbox(credits=25) as sb:
        resp = post(sb, [rec(f"r{i}", card(i)) for i in range(3)])
        used = sb.credits_used
    assert codes(resp) == [200, 200, 402]
    assert resp.json()["records"][2]["_status"]["text"] == "Insufficient credits"
    assert "_objects" not in resp.json()["records"][2]
    assert used == 20


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after_s, header", [(2.0, "2"), (0.25, "0.25")])
def test_p429_throttles_with_retry_after_and_processes_nothing(retry_after_s, header):
    with sandbox(p429=1.0, retry_after_s=retry_after_s) as sb:
        resp = post(sb, [rec("a", card(1))])
        ledger = sb.ledger()
    assert resp.status_code == 429 and resp.headers["Retry-After"] == header
    assert resp.json() == {"detail": "Request was throttled."}
    assert [(e.code, e.billed) for e in ledger] == [(429, False)]


def test_p500_is_json_and_p502_is_a_proxy_html_page():
    with sandbox(p500=1.0) as sb:
        resp = post(sb, [rec("a", card(1))])
        assert resp.status_code == 500 and resp.json() == {"detail": "Internal server error"}
        assert sb.credits_used == 0
    with sandbox(p502=1.0) as sb:
        resp = post(sb, [rec("a", card(1))])
        assert resp.status_code == 502 and resp.headers["Content-Type"] == "text/html"
        assert "<title>502 Bad Gateway</title>" in resp.text
        assert [(e.code, e.billed) for e in sb.ledger()] == [(502, False)]


def test_a_dropped_answer_is_billed_but_never_reaches_the_client():
    with sandbox(pdrop=1.0) as sb:
        with pytest.raises(requests.ConnectionError):
            post(sb, [rec("a", card(1)), rec("b", card(2))])
        ledger = sb.ledger()
        used = sb.credits_used
    assert [(e.record_id, e.code, e.billed, e.answered) for e in ledger] == [
        ("a", 200, True, False), ("b", 200, True, False)]
    assert used == 20


def test_prefuse_refuses_the_same_bytes_every_time():
    records = [rec(f"r{i}", card(i)) for i in range(10)]
    with sandbox(prefuse=0.5) as sb:
        first, second = codes(post(sb, records)), codes(post(sb, records[::-1]))
        used = sb.credits_used
    assert set(first) == {200, 400}
    assert second == first[::-1]
    assert used == 2 * 10 * first.count(200)


def test_precord_retry_answers_some_records_temporarily_unavailable_unbilled():
    with sandbox(precord_retry=0.5, seed=3) as sb:
        resp = post(sb, [rec(f"r{i}", card(i)) for i in range(10)])
        ledger = sb.ledger()
    out = resp.json()["records"]
    failed = [r for r in out if r["_status"]["code"] != 200]
    assert failed and len(failed) < 10
    assert all(r["_status"]["code"] in (500, 503) and
               r["_status"]["text"] == "Temporarily unavailable" for r in failed)
    assert [e.billed for e in ledger] == [r["_status"]["code"] == 200 for r in out]


def test_faults_replay_with_the_same_seed():
    def run(seed: int) -> list[int]:
        with sandbox(p500=0.3, p429=0.3, precord_retry=0.3, seed=seed) as sb:
            return [c for i in range(12) for c in (
                [post(sb, [rec("a", card(i)), rec("b", card(i + 50))]).status_code]
                + [e.code for e in sb.ledger() if e.request_no == i + 1])]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_the_rate_limit_throttles_past_its_rate_with_a_fractional_retry_after():
    with sandbox(rate_limit_rps=2) as sb:  # a burst of 2, then one request every 0.5 s
        statuses = [post(sb, [rec("a", card(1))]) for _ in range(4)]
        time.sleep(0.5)
        later = post(sb, [rec("a", card(1))])
        ledger = sb.ledger()
    assert [r.status_code for r in statuses] == [200, 200, 429, 429]
    assert all(0 < float(r.headers["Retry-After"]) <= 0.5 for r in statuses[2:])
    assert later.status_code == 200
    assert [e.billed for e in ledger] == [True, True, False, False, True]


def test_latency_delays_every_answer():
    with sandbox(latency_ms=150) as sb:
        started = time.monotonic()
        post(sb, [rec("a", card(1))])
        assert time.monotonic() - started >= 0.15


# --- the connection --------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_by_the_server():
    sb = Sandbox(SandboxSettings(token=TOKEN))
    sb.idle_timeout_s = 0.3
    with sb:
        conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=5)
        conn.request("GET", "/_sandbox/health")
        resp = conn.getresponse()
        assert resp.read() == b'{"ok": true}' and not resp.will_close  # kept alive
        time.sleep(0.6)
        assert conn.sock.recv(1024) == b""  # meanwhile the server hung up
        conn.close()


def test_a_client_that_hangs_up_mid_request_does_not_hurt_the_server(capfd):
    with sandbox() as sb:
        with socket.create_connection(("127.0.0.1", sb.port), timeout=5) as sock:
            sock.sendall(b"POST /collectibles/v2/tcg_id HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"records\"")
        with socket.create_connection(("127.0.0.1", sb.port), timeout=5) as sock:
            sock.sendall(b"GET /_sandbox/health HTTP/1.1\r\nHost: x\r\n\r\n")  # then gone
        time.sleep(0.1)
        assert post(sb, [rec("a", card(1))]).status_code == 200
        assert [e.record_id for e in sb.ledger()] == ["a"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_stopped_sandbox_answers_nobody():
    sb = Sandbox(SandboxSettings(token=TOKEN)).start()
    session = requests.Session()
    assert session.get(sb.base_url + "_sandbox/health", timeout=5).ok
    sb.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(sb.base_url + "_sandbox/health", timeout=5)


def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from runner.job import SandboxSettings\nfrom runner.sandbox import serve\n"
            f"serve(SandboxSettings(), '127.0.0.1', {port})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        assert requests.get(f"http://127.0.0.1:{port}/_sandbox/health", timeout=5).ok
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err


@pytest.mark.parametrize("scheme", ["Token", "JWT", "jwt"])
def test_both_the_token_and_the_jwt_scheme_are_accepted(scheme):
    with sandbox() as sb:
        resp = post(sb, [rec("a", card(1))], headers={"Authorization": f"{scheme} {TOKEN}"})
        assert resp.status_code == 200, resp.text
        resp = post(sb, [rec("a", card(1))], headers={"Authorization": f"{scheme} wrong"})
        assert resp.status_code == 401 and resp.json() == {"detail": "Invalid token."}
