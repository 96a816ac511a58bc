"""The server's HTTP/1.1 connections: uvicorn's httptools protocol with a request-read deadline, and
JSON for the two answers uvicorn writes without the app (a 400 for broken framing, the 503 past
`limit_concurrency`).

uvicorn closes a keep-alive connection that stays idle after an answer (`timeout_keep_alive`), but
nothing bounds a connection that never sends a request, sends its headers byte by byte, or stops
half-way through its body: each holds a socket and a file descriptor for as long as the client
likes. Here a connection must deliver each request, headers and body, within
`request_read_timeout_s` of its first byte, and a new connection its first request within as long
of being accepted; otherwise it is closed without an answer. The clock stops while the request is
complete and the app answers, and while the server is the one not reading (a pipelined request
waiting behind another, or a body the app has not taken yet).

Written against uvicorn 0.55's `HttpToolsProtocol` (the `auto` choice when httptools is installed,
as `uvicorn[standard]` does): it overrides the parser callbacks and the two answer methods below,
which tests/ml_service/backend/test_connections.py checks against a real server.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ml_service.backend.errors import BadRequest, Overloaded
from ml_service.settings import get_settings

INVALID_REQUEST = (
    "invalid HTTP request: its request line, headers or body framing (Content-Length, "
    "Transfer-Encoding, chunk sizes) cannot be parsed"
)
AT_CAPACITY = "too many connections at once (ML_SERVICE_MAX_CONNECTIONS); retry later"


class ServiceHttpProtocol(HttpToolsProtocol):
    """`uvicorn.run(..., http=ServiceHttpProtocol)`; the deadline is the settings'
    `request_read_timeout_s`, the connection limit uvicorn's `limit_concurrency`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout_s = get_settings().request_read_timeout_s
        self.read_deadline: asyncio.TimerHandle | None = None
        # the limit is checked here, so that uvicorn's own check (a text/plain 503) never runs
        self.connection_limit, self.limit_concurrency = self.limit_concurrency, None

    # -- the read deadline ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request must arrive within the deadline too

    def data_received(self, data: bytes) -> None:
        self._arm()  # any byte starts the clock: even bytes that begin no request
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a request that began in the chunk that ended the one before

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection belongs to the WebSocket protocol from here
        super().handle_websocket_upgrade()

    def _arm(self) -> None:
        if self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.read_timeout_s, self._deadline_passed)

    def _disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _deadline_passed(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        if self._server_is_behind():
            self._arm()  # not the client's delay: give it a new deadline
            return
        self.transport.close()

    def _server_is_behind(self) -> bool:
        """Whether the server, not the client, holds the request up: a request waits behind
        another (pipelining), reading is paused until the app takes the body, or the request is
        complete and the app is answering it."""
        cycle = self.cycle
        answering = cycle is not None and not cycle.more_body and not cycle.response_complete
        return bool(self.pipeline) or self.flow.read_paused or answering

    # -- the answers uvicorn writes itself ------------------------------------------------------
    def on_headers_complete(self) -> None:
        limit = self.connection_limit
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            return super().on_headers_complete()
        self.logger.warning("Exceeded concurrency limit.")
        app, self.app = self.app, _at_capacity
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refuses, in our JSON (OpenAI's on /v1, when
        the path was read), then the connection closes."""
        path = getattr(self, "url", b"").decode("latin-1")
        response = BadRequest.one("request", INVALID_REQUEST).response(path)
        content = [STATUS_LINE[400]]
        for name, value in [*self.server_state.default_headers, *response.raw_headers]:
            content += [name, b": ", value, b"\r\n"]
        content += [b"connection: close\r\n\r\n", response.body]
        self.transport.write(b"".join(content))
        self.transport.close()


async def _at_capacity(scope, receive, send) -> None:
    """The answer past the connection limit: 503 with Retry-After, and the connection closes."""
    response = Overloaded([{"loc": ["connections"], "msg": AT_CAPACITY}]).response(scope["path"])
    response.headers["connection"] = "close"
    await response(scope, receive, send)
