"""Connections against a real server process (ml_service/backend/http_protocol.py, wired in
ml_service/runner.py): idle, slow-header and slow-body connections are closed after
ML_SERVICE_REQUEST_READ_TIMEOUT_S, a normal keep-alive connection is served on, past
ML_SERVICE_MAX_CONNECTIONS a JSON 503 answers, and broken HTTP framing gets a JSON 400.

Raw sockets, since an HTTP client would finish its requests. The slow clients send a byte every
0.2 s: that pacing is the client under test, not a wait for the server."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import httpx
import pytest

from tests.helpers import CHECKPOINT, HANG_S, running_server, wait_for

pytestmark = pytest.mark.slow
READ_TIMEOUT_S = 2
ARGS = ["--checkpoint", str(CHECKPOINT)]


@pytest.fixture(scope="module")
def short_deadline():
    """A server whose requests must arrive whole within 2 s (idle keep-alive: the default 5 s)."""
    # keep-alive long enough that only the read deadline can close a connection here: the
    # keep-alive test's pause passes the deadline, and a busy machine must not make it pass 5 s
    env = {
        "ML_SERVICE_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "ML_SERVICE_KEEP_ALIVE_TIMEOUT_S": "60",
    }
    with running_server(ARGS, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def three_connections():
    """A server that takes 3 connections at once (and the default read deadline, 30 s)."""
    with running_server(ARGS, env={"ML_SERVICE_MAX_CONNECTIONS": "3"}) as proc:
        yield proc


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HANG_S)


def dribble_until_closed(sock: socket.socket, byte: bytes) -> bytes:
    """Send `byte` every 0.2 s until the server closes; what the server sent before closing."""
    received = b""
    deadline = time.monotonic() + HANG_S
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(byte)
            except (BrokenPipeError, ConnectionResetError):
                return received
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    pytest.fail(f"the server kept a slow client for {HANG_S} s")


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """A whole answer read until the server closed: status, headers (lower-case), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


# -- the read deadline ----------------------------------------------------------------------------
def test_an_idle_connection_is_closed_without_an_answer(short_deadline):
    with connect(short_deadline) as sock:
        assert sock.recv(1) == b""  # closed (no fix: the recv waits HANG_S, then times out)


def test_headers_sent_byte_by_byte_are_cut_off(short_deadline):
    with connect(short_deadline) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n")
        assert dribble_until_closed(sock, b"x") == b""


def test_a_body_sent_byte_by_byte_is_cut_off(short_deadline):
    head = b"POST /forward HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    with connect(short_deadline) as sock:
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n{")
        assert dribble_until_closed(sock, b" ") == b""


def test_a_keep_alive_connection_is_served_on_after_the_deadline(short_deadline):
    """Whole requests on one connection, with a pause longer than the read deadline (but shorter
    than the keep-alive timeout) between them: the clock runs only while a request is arriving,
    so the connection is still open and serves the next one."""
    host, port = short_deadline.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HANG_S)
    body = json.dumps({"text": "Привет", "max_new_tokens": 2})
    headers = {"Content-Type": "application/json"}
    try:
        conn.request("POST", "/forward", body=body, headers=headers)
        first = conn.getresponse()
        assert first.status == 200 and json.loads(first.read())["text"]
        sock = conn.sock
        # idle past the read deadline (under the 60 s keep-alive): a server that closed the
        # connection would make the socket readable (its end) before the wait is over
        closed, _, _ = select.select([sock], [], [], READ_TIMEOUT_S + 1)
        assert not closed, "the server closed an idle keep-alive connection at the read deadline"
        for _ in range(3):
            conn.request("POST", "/forward", body=body, headers=headers)
            again = conn.getresponse()
            assert again.status == 200 and json.loads(again.read())["text"]
        assert conn.sock is sock  # the same connection throughout
    finally:
        conn.close()
    assert httpx.get(f"{short_deadline.url}/health", timeout=HANG_S).status_code == 200


# -- the connection limit -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/forward", "/v1/completions"])
def test_past_the_connection_limit_a_json_503_answers(three_connections, path):
    held = [connect(three_connections) for _ in range(3)]
    try:
        r = httpx.post(f"{three_connections.url}{path}", json={"text": "a"}, timeout=HANG_S)
    finally:
        for sock in held:
            sock.close()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "1"
    assert r.headers["connection"] == "close"
    if path.startswith("/v1/"):
        error = r.json()["error"]
        assert "too many connections" in error["message"] and error["param"] == "connections"
    else:
        assert r.json()["errors"][0]["loc"] == ["connections"]

    def served() -> bool:
        return httpx.get(f"{three_connections.url}/health", timeout=HANG_S).status_code == 200

    wait_for(served, "the server answers once the held connections are gone")


# -- broken framing -------------------------------------------------------------------------------
POST = b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: -1\r\n\r\n",
        b"Content-Length: 99999999999999999999999999\r\n\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
    ids=["negative-length", "overflowing-length", "length-and-chunked", "bad-chunk", "two-lengths"],
)
@pytest.mark.parametrize("path", [b"/forward", b"/v1/completions"])
def test_broken_framing_gets_a_json_400_and_the_connection_closes(three_connections, framing, path):
    with connect(three_connections) as sock:
        sock.sendall(POST % path + framing)
        status, headers, body = answer(read_until_closed(sock))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    if path.startswith(b"/v1/"):
        assert json.loads(body)["error"]["param"] == "request"
    else:
        assert json.loads(body)["errors"][0]["loc"] == ["request"]


def test_a_huge_but_well_formed_length_is_refused_before_reading(three_connections):
    with connect(three_connections) as sock:
        length = b"Content-Length: 1000000000000000\r\nConnection: close\r\n\r\n{"
        sock.sendall(POST % b"/forward" + length)
        status, headers, body = answer(read_until_closed(sock))
    assert status == 413 and json.loads(body)["errors"][0]["loc"] == ["body"]
