"""pyworker.HttpClient against scripted upstream servers on loopback, and the streaming relay
(HttpServer -> handler -> HttpClient -> fake model server) end to end.

The fake upstreams are raw asyncio servers whose per-connection script each test writes, so
each can misbehave in one precise way; one interop test uses http.server in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import FastGenerateHandler, RawClient, Runner, worker_rig

import hello_world
import pyworker
from pyworker import HttpClient, Request, Response, UpstreamError, UpstreamTimeout

TIMEOUT = 5.0
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


run = Runner(timeout=20.0)


class Upstream:
    """A raw asyncio server running `script` once per accepted connection; by default it
    answers `answers_per_connection` requests on a connection, echoing each body as JSON."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or self._echo
        self.answers_per_connection = 10
        self.accepted = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body) as received
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(self.answers_per_connection):
            _, body = await self.read_request(reader)
            writer.write(json_answer({"echo": body.decode()}))
            await writer.drain()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        """One request from the client: head and Content-Length body."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def client_for(upstream: Upstream, **kwargs: Any) -> AsyncGenerator[HttpClient, None]:
    client = HttpClient(upstream.url, **kwargs)
    try:
        yield client
    finally:
        await client.close()


def json_answer(obj: Any, extra: bytes = b"") -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (len(body), extra, body)
    )


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# Body framing ####################################################################################


def test_content_length_body_and_request_format() -> None:
    async def main() -> None:
        upstream = Upstream()
        upstream.answers_per_connection = 1
        async with upstream:
            client = HttpClient(upstream.url + "/api/")
            try:
                response = await client.request(
                    "POST", "/generate", b'{"prompt":"hi"}', headers=[("X-Req", "7")]
                )
                assert response.status == 200
                assert response.content_type == "application/json"
                assert await response.json() == {"echo": '{"prompt":"hi"}'}
            finally:
                await client.close()
            head, body = upstream.requests[0]
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /api/generate HTTP/1.1"
            assert b"Host: 127.0.0.1:%d" % upstream.port in lines
            assert b"Content-Length: 15" in lines
            assert b"Content-Type: application/json" in lines
            assert b"X-Req: 7" in lines
            assert body == b'{"prompt":"hi"}'

    run(main())


# H4: what a request may carry. A worker that puts a client's decoded text in a path (a /view
# proxy: backend.session.get("/view/" + request.query["f"])) or in model_headers must not
# write a second request to the model: refused with a clear ValueError, before any byte is
# sent (no connection is even opened).
SMUGGLED = "a HTTP/1.1\r\nHost: x\r\n\r\nPOST /generate HTTP/1.1\r\nX: y"
UNSENDABLE: list[tuple[str, dict[str, Any], str]] = [
    ("smuggled-target", {"path": "/view/" + SMUGGLED}, "target '/view/a HTTP/1.1"),
    ("lf-in-target", {"path": "/a\nb"}, "must start with / and hold printable ASCII"),
    ("space-in-target", {"path": "/a b"}, "no spaces"),
    ("nul-in-target", {"path": "/a\x00"}, "printable ASCII"),
    ("tab-in-target", {"path": "/a\tb"}, "printable ASCII"),
    ("non-ascii-target", {"path": "/caf\u00e9"}, "percent-encode"),
    ("relative-target", {"path": "generate"}, "must start with /"),
    ("space-in-method", {"method": "GET /x"}, "method 'GET /x' is not a token"),
    ("name-with-space", {"headers": [("X Y", "1")]}, "header name 'X Y' is not a token"),
    ("name-with-colon", {"headers": [("X:Y", "1")]}, "header name 'X:Y' is not a token"),
    ("empty-name", {"headers": [("", "1")]}, "header name '' is not a token"),
    ("crlf-in-name", {"headers": [("X: 1\r\nY", "1")]}, "is not a token"),
    ("non-ascii-name", {"headers": [("X-\u00e9", "1")]}, "is not a token"),
    ("crlf-in-value", {"headers": [("X-A", "1\r\nX-Evil: 2")]}, "header 'X-A': its value holds CR"),
    ("lf-in-value", {"headers": [("X-A", "1\nX-Evil: 2")]}, "header 'X-A'"),
    ("cr-in-value", {"headers": [("X-A", "1\r")]}, "header 'X-A'"),
    ("nul-in-value", {"headers": [("X-A", "1\x00")]}, "NUL"),
    ("beyond-latin-1", {"headers": [("X-A", "\u20ac")]}, "beyond Latin-1"),
    ("crlf-in-type", {"content_type": "text/plain\r\nX-Evil: 1"}, "header 'Content-Type'"),
]


@pytest.mark.parametrize(("case", "call", "said"), UNSENDABLE, ids=[c[0] for c in UNSENDABLE])
def test_unsendable_request_is_refused_before_anything_is_sent(
    case: str, call: dict[str, Any], said: str
) -> None:
    async def main() -> None:
        async with Upstream() as upstream, client_for(upstream) as client:
            args: dict[str, Any] = {"method": "POST", "path": "/generate", **call}
            with pytest.raises(ValueError, match="not sent") as info:
                await client.request(
                    args["method"],
                    args["path"],
                    b"{}",
                    headers=args.get("headers", ()),
                    content_type=args.get("content_type", "application/json"),
                    timeout=TIMEOUT,
                )
            assert said in str(info.value), info.value
            assert str(info.value).startswith(f"request to {upstream.url} not sent: ")
            assert "Evil: 2" not in str(info.value)  # a value is not repeated in the message
            assert upstream.accepted == 0 and client.connections_opened == 0
            # ... and the client is as usable as before
            response = await client.request("POST", "/generate", b"{}", timeout=TIMEOUT)
            assert await response.json() == {"echo": "{}"}

    run(main())


def test_sendable_edge_cases_are_sent_as_they_are() -> None:
    # The check refuses no more than it must: any printable ASCII in the target (a query,
    # percent-escapes), an empty value, HTAB and Latin-1 text in a value, tchar names.
    async def main() -> None:
        async with Upstream() as upstream, client_for(upstream) as client:
            headers = [
                ("X-Empty", ""),
                ("X-Tab", "a\tb"),
                ("X-Latin", "caf\u00e9"),
                ("!#$%&'*+-.^_`|~", "1"),
            ]
            path = "/a%0d%0a/b?q=1&r=%20~!$'()*+,;=:@[]"
            response = await client.request("GET", path, headers=headers, timeout=TIMEOUT)
            assert response.status == 200
            await response.read()
        head = upstream.requests[0][0]
        assert head.startswith(b"GET " + path.encode() + b" HTTP/1.1\r\n"), head
        for line in (b"X-Empty: ", b"X-Tab: a\tb", b"X-Latin: caf\xe9", b"!#$%&'*+-.^_`|~: 1"):
            assert line + b"\r\n" in head, head

    run(main())


class _ModelHeadersFromTheClient(FastGenerateHandler):
    """A worker's handler that passes a client's field on to the model as a header."""

    def model_headers(self, payload: hello_world.InputData) -> Sequence[tuple[str, str]]:
        return [("X-Trace", payload.prompt)]


def test_bad_model_headers_are_a_500_with_the_reason_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # H4, the model route's side: a handler's model_headers holding CR LF (here a client's
    # prompt) is the worker's bug: 500 at once, the reason in the log, nothing at the model.
    async def main() -> None:
        def routes(backend: pyworker.Backend) -> list[pyworker.Route]:
            handler = backend.create_handler(_ModelHeadersFromTheClient())
            return [pyworker.post("/generate", handler)]

        async with worker_rig(tmp_path, routes=routes, cached_max_perf=100.0) as rig:
            reply = await rig.post("/generate", rig.body("t1"))
            assert reply.status == 200
            served = len(rig.fake.requests)
            caplog.set_level("WARNING", logger="pyworker")
            reply = await rig.post(
                "/generate", rig.body("t1\r\nContent-Length: 99"), timeout=TIMEOUT
            )
            assert reply.status == 500, reply
            assert len(rig.fake.requests) == served
            logged = caplog.text  # the handler's failure, with its traceback
            assert "/generate: the worker's handler raised ValueError; answered 500" in logged
            assert "not sent: header 'X-Trace': its value holds CR, LF" in logged, logged
            assert "Content-Length: 99" not in logged, logged  # the client's text is not logged
            reply = await rig.post("/generate", rig.body("t2"))  # the worker serves on
            assert reply.status == 200 and len(rig.fake.requests) == served + 1

    run(main())


def test_chunked_body_yields_each_chunk_as_it_arrives() -> None:
    async def main() -> None:
        go_on = asyncio.Event()
        second_sent = asyncio.Event()
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.wait_for(go_on.wait(), TIMEOUT)
            second_sent.set()
            writer.write(b"6;ext=1\r\nsecond\r\n0\r\nX-Trailer: t\r\n\r\n")
            await writer.drain()
            await reader.read()  # keep the connection open until the client closes it

        async with Upstream(script) as upstream, client_for(upstream) as client:
            response = await client.request("POST", "/stream", b"{}")
            chunks = response.iter_chunks()
            assert await asyncio.wait_for(chunks.__anext__(), TIMEOUT) == b"first"
            assert not second_sent.is_set()
            go_on.set()
            rest = [c async for c in chunks]
            assert rest == [b"second"]
            assert second_sent.is_set()
            assert client.idle_connections == 1  # read completely: back in the pool

    run(main())


def test_close_delimited_body() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"part two")
            await writer.drain()
            writer.close()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            response = await client.request("GET", "/")
            assert await asyncio.wait_for(response.read(), TIMEOUT) == b"part one, part two"
            assert client.idle_connections == 0  # ended by the close: never reusable

    run(main())


def test_informational_answers_skipped() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            writer.write(json_answer({"ok": True}))
            await writer.drain()
            await reader.read()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            response = await client.request("POST", "/", b"{}")
            assert response.status == 200
            assert await response.json() == {"ok": True}

    run(main())


# Connection reuse ################################################################################


def test_keep_alive_reuses_one_connection() -> None:
    async def main() -> None:
        upstream = Upstream()
        upstream.answers_per_connection = 10
        async with upstream, client_for(upstream) as client:
            for i in range(3):
                response = await client.request("POST", "/", b"%d" % i)
                assert await response.json() == {"echo": str(i)}
            assert upstream.accepted == 1
            assert client.connections_opened == 1
            assert client.idle_connections == 1

    run(main())


def test_concurrent_requests_use_separate_connections() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                _, body = await upstream.read_request(reader)
                await asyncio.sleep(0.1)
                writer.write(json_answer({"echo": body.decode()}))
                await writer.drain()

        async with Upstream(script) as upstream, client_for(upstream) as client:

            async def one(i: int) -> Any:
                response = await client.request("POST", "/", b"%d" % i)
                return await response.json()

            got = await asyncio.gather(*(one(i) for i in range(4)))
            assert got == [{"echo": str(i)} for i in range(4)]
            assert upstream.accepted == 4
            assert client.idle_connections == 4  # all of them pooled for later

    run(main())


def test_idle_close_by_server_detected() -> None:
    """The model server closes a kept-alive connection after one answer (its idle timeout);
    the next request must not fail because of it."""

    async def main() -> None:
        upstream = Upstream()
        upstream.answers_per_connection = 1
        async with upstream, client_for(upstream) as client:
            assert await (await client.request("POST", "/", b"a")).json() == {"echo": "a"}
            await asyncio.sleep(0.1)  # the FIN arrives while the connection is idle
            assert await (await client.request("POST", "/", b"b")).json() == {"echo": "b"}
            assert upstream.accepted == 2

    run(main())


def test_idle_close_racing_the_next_request_is_retried() -> None:
    """The server closes the kept-alive connection just as the next request goes out (it
    reads the request, then closes without answering): retried once, on a new connection."""

    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, body = await upstream.read_request(reader)
            writer.write(json_answer({"echo": body.decode()}))
            await writer.drain()
            if upstream.accepted == 1:
                await upstream.read_request(reader)  # then close: no answer to it

        async with Upstream(script) as upstream, client_for(upstream) as client:
            assert await (await client.request("POST", "/", b"a")).json() == {"echo": "a"}
            response = await asyncio.wait_for(client.request("POST", "/", b"b"), TIMEOUT)
            assert await response.json() == {"echo": "b"}
            assert upstream.accepted == 2

    run(main())


def test_pooled_connection_with_unread_bytes_is_not_reused() -> None:
    """Guards a mixed-up answer: bytes an idle server sent on its own (here a 408 before it
    closes, as some servers do on their idle timeout) must never be taken for the answer
    to the next request."""

    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, body = await upstream.read_request(reader)
            writer.write(json_answer({"echo": body.decode()}))
            await writer.drain()
            if upstream.accepted == 1:  # idle: an unsolicited 408, and the connection stays up
                writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                await reader.read()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            assert await (await client.request("POST", "/", b"a")).json() == {"echo": "a"}
            await asyncio.sleep(0.2)  # the 408 arrives while the connection is idle
            response = await asyncio.wait_for(client.request("POST", "/", b"b"), TIMEOUT)
            assert response.status == 200
            assert await response.json() == {"echo": "b"}
            assert upstream.accepted == 2

    run(main())


def test_connection_close_from_server_not_reused() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, body = await upstream.read_request(reader)
            writer.write(json_answer({"echo": body.decode()}, b"Connection: close\r\n"))
            await writer.drain()
            await reader.read()  # the server leaves it open; the client must not reuse it

        async with Upstream(script) as upstream, client_for(upstream) as client:
            assert await (await client.request("POST", "/", b"a")).json() == {"echo": "a"}
            assert client.idle_connections == 0
            assert await (await client.request("POST", "/", b"b")).json() == {"echo": "b"}
            assert upstream.accepted == 2

    run(main())


def test_unread_body_not_reused() -> None:
    """A response closed before its body was read must not put its connection back: the
    next request would read the old body as its answer."""

    async def main() -> None:
        upstream = Upstream()
        upstream.answers_per_connection = 10
        async with upstream, client_for(upstream) as client:
            response = await client.request("POST", "/", b"first")
            response.close()
            assert client.idle_connections == 0
            second = await client.request("POST", "/", b"second")
            assert await second.json() == {"echo": "second"}

    run(main())


def test_interop_with_http_server_keep_alive() -> None:
    peers: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            peers.append(self.client_address[1])
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = json.dumps({"len": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()

    async def main() -> None:
        client = HttpClient(f"http://127.0.0.1:{server.server_address[1]}")
        try:
            for size in (0, 10, 100_000):
                response = await client.request("POST", "/x", b"z" * size, timeout=TIMEOUT)
                assert await response.json() == {"len": size}
        finally:
            await client.close()

    try:
        run(main())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
    assert len(peers) == 3
    assert len(set(peers)) == 1  # one connection for all three


# Failures ########################################################################################


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS where HTTP was expected
    ],
    ids=["no_status", "long_status", "not_http", "bare_lf", "cl_conflict", "cl_text", "101", "tls"],
)
def test_malformed_head_is_upstream_error(answer: bytes) -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(answer)
            await writer.drain()
            await reader.read()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            with pytest.raises(UpstreamError) as info:
                await client.request("POST", "/", b"{}", timeout=TIMEOUT)
            assert not isinstance(info.value, UpstreamTimeout)

    run(main())


def test_head_closed_early_is_upstream_error() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await writer.drain()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            with pytest.raises(UpstreamError):
                await client.request("POST", "/", b"{}", timeout=TIMEOUT)

    run(main())


@pytest.mark.parametrize(
    "body",
    [b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n-1\r\n", b"3\r\nabcd\r\n0\r\n\r\n", b"zz\r\n"],
    ids=["0x", "negative", "no_crlf_after_data", "not_hex"],
)
def test_bad_chunk_is_upstream_error(body: bytes) -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            await writer.drain()
            await reader.read()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            response = await client.request("POST", "/", b"{}", timeout=TIMEOUT)
            with pytest.raises(UpstreamError):
                async for _ in response.iter_chunks():
                    pass
            assert client.idle_connections == 0

    run(main())


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("how", ["reset", "fin"])
def test_server_breaks_off_mid_body(framing: str, how: str) -> None:
    """A body cut short is an UpstreamError from iter_chunks, never a short success (a
    close-delimited body ended by FIN is the one exception: that is its normal end)."""
    heads = {
        "length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        "close": b"HTTP/1.1 200 OK\r\n\r\n0123456789",
    }

    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(heads[framing])
            await writer.drain()
            await asyncio.sleep(0.1)
            if how == "reset":
                abort_with_reset(writer)
            else:
                writer.close()

        async with Upstream(script) as upstream, client_for(upstream) as client:
            response = await client.request("POST", "/", b"{}", timeout=TIMEOUT)
            received: list[bytes] = []
            if framing == "close" and how == "fin":
                async for chunk in response.iter_chunks():
                    received.append(chunk)
            else:
                with pytest.raises(UpstreamError) as info:
                    async for chunk in response.iter_chunks():
                        received.append(chunk)
                assert not isinstance(info.value, UpstreamTimeout)
            assert b"".join(received) == b"0123456789"
            assert client.idle_connections == 0

    run(main())


def test_no_answer_is_upstream_timeout() -> None:
    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            await asyncio.sleep(10)

        async with Upstream(script) as upstream, client_for(upstream) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await client.request("POST", "/", b"{}", timeout=0.3)
            assert time.monotonic() - started < 2
            assert client.idle_connections == 0

    run(main())


def test_stalled_body_is_upstream_timeout() -> None:
    """The total timeout covers the body too, not only the head."""

    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
            await writer.drain()
            await asyncio.sleep(10)

        async with Upstream(script) as upstream, client_for(upstream) as client:
            started = time.monotonic()
            response = await client.request("POST", "/", b"{}", timeout=0.4)
            with pytest.raises(UpstreamTimeout):
                await response.read()
            assert time.monotonic() - started < 2

    run(main())


def test_timeout_on_reused_connection_is_timeout() -> None:
    """A pooled connection that then stalls times out; it is not retried as if it were stale."""

    async def main() -> None:
        upstream: Upstream

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, body = await upstream.read_request(reader)
            writer.write(json_answer({"echo": body.decode()}))
            await writer.drain()
            await upstream.read_request(reader)
            await asyncio.sleep(10)

        async with Upstream(script) as upstream, client_for(upstream) as client:
            assert await (await client.request("POST", "/", b"a")).json() == {"echo": "a"}
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await client.request("POST", "/", b"b", timeout=0.3)
            assert time.monotonic() - started < 2
            assert upstream.accepted == 1

    run(main())


def test_connect_refused_is_upstream_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # bound then closed, never listening: connections are refused

    async def main() -> None:
        client = HttpClient(f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(UpstreamError) as info:
                await client.request("GET", "/", timeout=TIMEOUT)
            assert not isinstance(info.value, UpstreamTimeout)
        finally:
            await client.close()

    run(main())


# The streaming relay: client -> HttpServer -> HttpClient -> fake model ##########################


@contextlib.asynccontextmanager
async def relay(upstream: Upstream) -> AsyncGenerator[int, None]:
    """A worker whose /stream relays the model's /stream body chunk by chunk."""
    model = HttpClient(upstream.url)

    async def handler(request: Request) -> Response:
        answer = await model.request("POST", "/stream", request.body)
        return await pyworker.relay_stream(answer)

    server = pyworker.HttpServer([pyworker.post("/stream", handler)])
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.shutdown(grace=0)
        await model.close()


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
RELAY_REQUEST = b"POST /stream HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\n\r\n{}"


def test_relay_forwards_each_chunk_before_the_next_is_sent() -> None:
    tokens = [b"data: tok%d\n\n" % i for i in range(5)]

    async def main() -> None:
        received = [asyncio.Event() for _ in tokens]
        sent = 0

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            await upstream.read_request(reader)
            writer.write(STREAM_HEAD)
            for i, token in enumerate(tokens):
                writer.write(b"%x\r\n%s\r\n" % (len(token), token))
                await writer.drain()
                sent = i + 1
                # Wait (bounded) for the final client to have it: a relay that buffers fails.
                await asyncio.wait_for(received[i].wait(), TIMEOUT)
                await asyncio.sleep(0.02)  # a model's pace between tokens
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()

        upstream = Upstream(script)
        async with upstream, relay(upstream) as port:
            client = await RawClient.connect(port, timeout=TIMEOUT)
            try:
                await client.send(RELAY_REQUEST)
                head = await client.head_bytes()
                assert head.startswith(b"HTTP/1.1 200 ")
                assert b"Content-Type: text/event-stream\r\n" in head
                assert b"Transfer-Encoding: chunked\r\n" in head
                for i, token in enumerate(tokens):
                    assert await client.chunk() == token
                    assert sent == i + 1  # the next one has not been sent yet
                    received[i].set()
                # The last chunk and the empty trailer section: a complete, proper end.
                assert await client.chunk() == b""
            finally:
                await client.close()

    run(main())


def test_relay_cuts_client_stream_when_upstream_breaks() -> None:
    """The model dies mid-stream: the client must see an error (IncompleteRead), never a
    chunked body properly ended by 0 CRLF CRLF."""

    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upstream.read_request(reader)
            writer.write(STREAM_HEAD + b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            abort_with_reset(writer)

        upstream = Upstream(script)
        async with upstream, relay(upstream) as port:

            def call() -> bytes:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    conn.request("POST", "/stream", b"{}")
                    resp = conn.getresponse()
                    assert resp.status == 200
                    with pytest.raises(http.client.IncompleteRead) as info:
                        resp.read()
                    return info.value.partial
                finally:
                    conn.close()

            assert await asyncio.to_thread(call) == b"hello"

    run(main())


async def _relay_once(upstream_answer: bytes, *, read_rest: bool) -> tuple[bytes, bytes]:
    """One request through a relay whose upstream answers `upstream_answer` and then waits;
    the client's response head, and (if `read_rest`) what follows it until the close."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(upstream_answer)
        await writer.drain()
        await reader.read()

    upstream = Upstream(script)
    async with upstream, relay(upstream) as port:
        client = await RawClient.connect(port, timeout=TIMEOUT)
        try:
            await client.send(RELAY_REQUEST)
            head = await client.head_bytes()
            rest = b""
            if read_rest:
                with contextlib.suppress(ConnectionError):
                    rest = await client.read_to_eof()
            return head, rest
        finally:
            await client.close()


def test_relay_cuts_client_stream_on_malformed_upstream_chunk() -> None:
    async def main() -> None:
        answer = STREAM_HEAD + b"5\r\nhello\r\n+5\r\nworld\r\n0\r\n\r\n"
        _, rest = await _relay_once(answer, read_rest=True)
        assert b"0\r\n\r\n" not in rest
        assert b"world" not in rest

    run(main())


def test_relay_answers_502_when_upstream_breaks_before_its_first_chunk() -> None:
    """Nothing was sent to the client yet: it gets a proper 502, not a cut stream."""

    async def main() -> None:
        answer = STREAM_HEAD + b"+5\r\nworld\r\n0\r\n\r\n"
        head, _ = await _relay_once(answer, read_rest=False)
        assert head.startswith(b"HTTP/1.1 502 "), head
        assert b"content-length:" in head.lower()

    run(main())


async def _disconnect_mid_stream(*, reset: bool, upstream_pace: float | None) -> float:
    """The final client goes away after the first chunk; returns how long the upstream
    connection stayed open after that (the upstream sees EOF or a reset)."""
    upstream_closed = asyncio.Event()
    client_gone_at = 0.0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(STREAM_HEAD + b"5\r\nfirst\r\n")
        await writer.drain()

        async def keep_streaming() -> None:
            while upstream_pace is not None:
                await asyncio.sleep(upstream_pace)
                writer.write(b"4\r\nmore\r\n")
                await writer.drain()

        streaming = asyncio.ensure_future(keep_streaming())
        try:
            with contextlib.suppress(ConnectionError):
                while await reader.read(1024):
                    pass
            upstream_closed.set()
        finally:
            streaming.cancel()
            with contextlib.suppress(BaseException):
                await streaming

    upstream = Upstream(script)
    async with upstream, relay(upstream) as port:
        client = await RawClient.connect(port, timeout=TIMEOUT)
        try:
            await client.send(RELAY_REQUEST)
            await client.head_bytes()
            assert await client.chunk() == b"first"
            client_gone_at = time.monotonic()
            if reset:
                client.reset()
            else:
                client.writer.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(upstream_closed.wait(), 3)
        finally:
            client.writer.close()
        return time.monotonic() - client_gone_at


def test_relay_client_reset_closes_upstream() -> None:
    assert run(_disconnect_mid_stream(reset=True, upstream_pace=None)) < 1.0


def test_relay_client_close_closes_upstream_while_streaming() -> None:
    # The model keeps producing tokens; writing them to the departed client fails.
    assert run(_disconnect_mid_stream(reset=False, upstream_pace=0.1)) < 1.0


def test_relay_client_close_closes_upstream_while_model_is_silent() -> None:
    """The client closes (FIN) while the model is between tokens (or still before its first
    real one): the model request must be abandoned at once, not when the model next writes."""
    assert run(_disconnect_mid_stream(reset=False, upstream_pace=None)) < 1.0


def test_relay_request_body_reaches_upstream() -> None:
    async def main() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, body = await upstream.read_request(reader)
            writer.write(STREAM_HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            await writer.drain()
            await reader.read()

        upstream = Upstream(script)
        async with upstream, relay(upstream) as port:

            def call() -> bytes:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    conn.request("POST", "/stream", b'{"prompt": "x"}')
                    return conn.getresponse().read()
                finally:
                    conn.close()

            assert await asyncio.to_thread(call) == b'{"prompt": "x"}'

    run(main())
