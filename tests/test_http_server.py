"""pyworker.HttpServer end to end on real loopback sockets.

Raw asyncio sockets replay the malformed-request table of test_framing and check keep-alive,
pipelining, 100-continue, timeouts and stream cuts byte for byte; CPython's http.client (in a
thread) checks interoperability with a real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest
from support import RawClient, Runner, parse_head, raw_client
from test_framing import MALFORMED, SMALL_MAX_BODY, Bad

import pyworker
from pyworker import Request, Response

TIMEOUT = 5.0


run = Runner(timeout=20.0)


@contextlib.asynccontextmanager
async def serving(routes: Iterable[pyworker.Route], **kwargs: Any) -> AsyncGenerator[int, None]:
    server = pyworker.HttpServer(routes, **kwargs)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.shutdown(grace=0)


async def echo(request: Request) -> Response:
    return pyworker.json_response(
        {
            "method": request.method,
            "target": request.target,
            "body": request.body.decode("latin-1"),
            "remote": request.remote,
            "headers": dict(request.headers.items()),
        }
    )


def echo_routes(*paths: str) -> list[pyworker.Route]:
    routes: list[pyworker.Route] = []
    for path in paths or ("/", "/echo"):
        routes += [pyworker.get(path, echo), pyworker.post(path, echo)]
    return routes


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path,
        len(body),
        extra,
        body,
    )


async def assert_still_serving(port: int) -> None:
    async with raw_client(port) as client:
        await client.send(GET)
        response = await client.response()
        assert response.status == 200
        assert response.json()["target"] == "/"


# The malformed-request table over sockets ########################################################


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_request_answered_and_closed(case: Bad) -> None:
    """Each answers its status with Connection: close, then the connection is closed (the
    stream position is unknown: reading on would let a smuggled request through)."""

    async def main() -> None:
        async with serving(echo_routes(), max_body=SMALL_MAX_BODY) as port:
            async with raw_client(port) as client:
                await client.send(case.raw)
                data = await client.read_to_eof()  # bounded: the server must close
            head, sep, body = data.partition(b"\r\n\r\n")
            assert sep, data[:200]
            status, headers = parse_head(head + sep)
            assert status == case.status, body
            assert ("Connection", "close") in headers
            assert "error" in json.loads(body)
            await assert_still_serving(port)

    run(main())


def test_content_length_over_max_refused_before_the_body_is_sent() -> None:
    """413 from the head alone, and no 100 Continue: the client never has to send the body."""

    async def main() -> None:
        server = serving(echo_routes(), max_body=SMALL_MAX_BODY)
        async with server as port, raw_client(port) as client:
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % (SMALL_MAX_BODY + 1)
            )
            status, headers = await client.head()  # the first head: no 100 before it
            assert status == 413
            assert ("Connection", "close") in headers
            size = int(dict(headers)["Content-Length"])
            await asyncio.wait_for(client.reader.readexactly(size), TIMEOUT)
            assert await client.closed_by_peer()

    run(main())


# CPython's http.client as the client #############################################################


def test_http_client_json_round_trip() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port:

            def call() -> tuple[int, str, Any]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    body = json.dumps({"prompt": "héllo", "n": 3}).encode()
                    conn.request("POST", "/echo?x=1", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    return (
                        resp.status,
                        resp.getheader("Content-Type") or "",
                        json.loads(resp.read()),
                    )
                finally:
                    conn.close()

            status, ctype, got = await asyncio.to_thread(call)
            assert status == 200
            assert ctype == "application/json"
            assert got["method"] == "POST"
            assert got["target"] == "/echo?x=1"
            assert json.loads(got["body"].encode("latin-1")) == {"prompt": "héllo", "n": 3}

    run(main())


def test_http_client_keep_alive_reuses_one_connection() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port:

            def call() -> list[str]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                remotes: list[str] = []
                try:
                    for i in range(4):
                        method = "POST" if i % 2 else "GET"
                        conn.request(method, "/echo", b"x" * i if i % 2 else None)
                        resp = conn.getresponse()
                        assert resp.status == 200
                        assert not resp.will_close
                        remotes.append(json.loads(resp.read())["remote"])
                finally:
                    conn.close()
                return remotes

            remotes = await asyncio.to_thread(call)
            assert len(set(remotes)) == 1, remotes  # one client port: one connection

    run(main())


def test_http_client_chunked_request_body() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port:

            def call() -> Any:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    parts = iter([b"hello ", b"chunked ", b"world"])
                    conn.request("POST", "/echo", parts, encode_chunked=True)
                    resp = conn.getresponse()
                    assert resp.status == 200
                    return json.loads(resp.read())
                finally:
                    conn.close()

            got = await asyncio.to_thread(call)
            assert got["body"] == "hello chunked world"
            assert got["headers"]["transfer-encoding"] == "chunked"

    run(main())


def test_http_client_reads_stream_incrementally() -> None:
    """Each chunk reaches the client when produced: the server never buffers a stream."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        go_on = asyncio.Event()
        sent_second = threading.Event()

        async def stream() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await asyncio.wait_for(go_on.wait(), TIMEOUT)
            sent_second.set()
            yield b"data: two\n\n"

        async def handler(request: Request) -> Response:
            return Response(stream=stream(), content_type="text/event-stream")

        async with serving([pyworker.post("/stream", handler)]) as port:

            def call() -> tuple[bytes, bool, bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    conn.request("POST", "/stream", b"{}")
                    resp = conn.getresponse()
                    assert resp.status == 200
                    assert resp.getheader("Transfer-Encoding") == "chunked"
                    first = resp.read1(1024)
                    second_was_sent = sent_second.is_set()
                    loop.call_soon_threadsafe(go_on.set)
                    return first, second_was_sent, resp.read()
                finally:
                    conn.close()

            first, second_was_sent, rest = await asyncio.to_thread(call)
            assert first == b"data: one\n\n"
            assert not second_was_sent
            assert rest == b"data: two\n\n"

    run(main())


def test_http_client_sees_cut_stream_as_an_error() -> None:
    """A stream that raises mid-way must not look like a short success to the client."""

    async def stream() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("the model broke off")

    async def handler(request: Request) -> Response:
        return Response(stream=stream())

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port:

            def call() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    assert resp.status == 200
                    with pytest.raises(http.client.IncompleteRead):
                        resp.read()
                finally:
                    conn.close()

            await asyncio.to_thread(call)
            await assert_still_serving_route(port, "/")

    run(main())


async def assert_still_serving_route(port: int, path: str) -> None:
    async with raw_client(port) as client:
        await client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        status, _ = await client.head()
        assert status == 200


# Raw-socket behaviour ############################################################################


def test_stream_cut_has_no_last_chunk() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"bc"
        raise ConnectionResetError("upstream reset")

    async def handler(request: Request) -> Response:
        return Response(stream=stream())

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port, raw_client(port) as client:
            await client.send(GET)
            status, headers = await client.head()
            assert status == 200
            assert ("Transfer-Encoding", "chunked") in headers
            try:
                rest = await client.read_to_eof()
            except ConnectionError:
                rest = b""  # an abort may also arrive as a reset
            assert not rest.endswith(b"0\r\n\r\n")
            assert b"0\r\n\r\n" not in rest
            assert rest in (b"1\r\na\r\n2\r\nbc\r\n", b"1\r\na\r\n", b"")

    run(main())


def test_expect_100_continue_before_body() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            # The interim answer comes while the body has not been sent.
            status, _ = await client.head()
            assert status == 100
            await client.send(b"hello")
            response = await client.response()
            assert response.status == 200
            assert response.json()["body"] == "hello"

    run(main())


def test_pipelined_requests_answered_in_order() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.2)  # the first is the slowest: order must still hold
        return pyworker.text_response("slow")

    async def main() -> None:
        routes = [pyworker.get("/slow", slow), *echo_routes("/echo")]
        async with serving(routes) as port, raw_client(port) as client:
            await client.send(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                + post(b"/echo", b"two")
                + b"GET /echo?3 HTTP/1.1\r\nHost: x\r\n\r\n"
                + post(b"/echo", b"", b"Connection: close\r\n")
            )
            first = await client.response()
            assert first.body == b"slow"
            assert (await client.response()).json()["body"] == "two"
            assert (await client.response()).json()["target"] == "/echo?3"
            last = await client.response()
            assert last.status == 200
            assert last.header("Connection") == "close"
            assert await client.closed_by_peer()

    run(main())


def test_http10_closes_unless_keep_alive() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port:
            async with raw_client(port) as client:
                await client.send(b"GET / HTTP/1.0\r\n\r\n")
                response = await client.response()
                assert response.status == 200
                assert response.header("Connection") == "close"
                assert await client.closed_by_peer()
            async with raw_client(port) as client:
                for _ in range(2):
                    await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                    response = await client.response()
                    assert response.status == 200
                    assert response.header("Connection") != "close"
                assert not await client.closed_by_peer(0.2)

    run(main())


def test_http10_stream_is_not_chunked() -> None:
    """RFC 9112 6.1: a server MUST NOT send Transfer-Encoding to an HTTP/1.0 request; an
    HTTP/1.0 client cannot decode chunked, so it would see chunk sizes in its data."""

    async def stream() -> AsyncIterator[bytes]:
        yield b"one "
        yield b"two"

    async def handler(request: Request) -> Response:
        return Response(stream=stream(), content_type="text/plain")

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port, raw_client(port) as client:
            await client.send(b"GET / HTTP/1.0\r\n\r\n")
            status, headers = await client.head()
            assert status == 200
            assert not any(k.lower() == "transfer-encoding" for k, _ in headers), headers
            assert await client.read_to_eof() == b"one two"  # delimited by the close

    run(main())


def test_connection_close_honoured() -> None:
    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = await client.response()
            assert response.status == 200
            assert response.header("Connection") == "close"
            assert await client.closed_by_peer()

    run(main())


def test_404_and_405_with_allow() -> None:
    async def main() -> None:
        async with serving(echo_routes("/x")) as port, raw_client(port) as client:
            await client.send(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await client.response()
            assert response.status == 404
            await client.send(b"DELETE /x HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await client.response()
            assert response.status == 405
            assert response.header("Allow") == "GET, POST"
            # Routing errors are answers, not framing errors: the connection stays usable.
            await client.send(b"GET /x?q HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.response()).status == 200

    run(main())


def test_handler_error_is_500_and_server_keeps_serving() -> None:
    async def broken(request: Request) -> Response:
        raise KeyError("bug in a handler")

    async def refused(request: Request) -> Response:
        raise pyworker.HttpError(429, "queue full", [("Retry-After", "2")])

    async def main() -> None:
        routes = [pyworker.get("/broken", broken), pyworker.get("/busy", refused), *echo_routes()]
        async with serving(routes) as port:
            async with raw_client(port) as client:
                await client.send(b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
                response = await client.response()
                assert response.status == 500
                assert "bug in a handler" not in response.body.decode()  # no internals leak
                await client.send(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
                response = await client.response()
                assert response.status == 429
                assert response.header("Retry-After") == "2"
                await client.send(GET)
                assert (await client.response()).status == 200
            await assert_still_serving(port)

    run(main())


def test_slow_loris_head_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client trickling a head (a byte every 50 ms) is cut at HEAD_TIMEOUT for the whole
    head, not per byte: the guard against slow-loris holding connections forever."""
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 0.3)

    async def main() -> None:
        async with serving(echo_routes()) as port:
            async with raw_client(port) as client:
                started = time.monotonic()
                closed = False
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    try:
                        await client.send(bytes([byte]))
                    except ConnectionError:
                        closed = True
                        break
                    if client.reader.at_eof() or await client.closed_by_peer(0.05):
                        closed = True
                        break
                assert closed
                assert time.monotonic() - started < 2.0
            await assert_still_serving(port)

    run(main())


def test_stalled_partial_head_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 0.3)

    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(b"GET / HTTP/1.1\r\nHos")
            started = time.monotonic()
            assert await client.closed_by_peer(3)
            assert 0.2 < time.monotonic() - started < 2.0

    run(main())


def test_slow_second_head_on_keep_alive_connection_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow-loris after one honest request: once the next head has begun, HEAD_TIMEOUT
    applies, not the (long) idle keep-alive allowance."""
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(pyworker, "KEEPALIVE_TIMEOUT", 5.0)

    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(GET)
            assert (await client.response()).status == 200
            await client.send(b"GET / HTTP/1.1\r\nHo")
            started = time.monotonic()
            assert await client.closed_by_peer(3)
            assert time.monotonic() - started < 2.0

    run(main())


def test_idle_keep_alive_connection_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyworker, "KEEPALIVE_TIMEOUT", 0.3)

    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(GET)
            assert (await client.response()).status == 200
            started = time.monotonic()
            assert await client.closed_by_peer(3)
            assert time.monotonic() - started < 2.0

    run(main())


def _cancellation_probe() -> tuple[
    Callable[[Request], Awaitable[Response]], asyncio.Event, asyncio.Event
]:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(30)  # a model request that would take long
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return pyworker.text_response("too late")

    return handler, started, cancelled


def test_client_reset_cancels_handler() -> None:
    async def main() -> None:
        handler, started, cancelled = _cancellation_probe()
        async with serving([pyworker.post("/", handler), *echo_routes("/echo")]) as port:
            client = await RawClient.connect(port)
            await client.send(post(b"/", b"{}"))
            await asyncio.wait_for(started.wait(), TIMEOUT)
            client.reset()
            await asyncio.wait_for(cancelled.wait(), 2)
            await assert_still_serving_route(port, "/echo")

    run(main())


def test_client_close_cancels_handler() -> None:
    """A client that closes normally (FIN, as curl on Ctrl-C or a timed-out SDK does) has gone
    away: the handler, and the model request behind it, must be cancelled (SPEC section 4)."""

    async def main() -> None:
        handler, started, cancelled = _cancellation_probe()
        async with serving([pyworker.post("/", handler), *echo_routes("/echo")]) as port:
            client = await RawClient.connect(port)
            await client.send(post(b"/", b"{}"))
            await asyncio.wait_for(started.wait(), TIMEOUT)
            await client.close()
            await asyncio.wait_for(cancelled.wait(), 2)
            await assert_still_serving_route(port, "/echo")

    run(main())


def test_many_sequential_connections_leave_no_connection_behind() -> None:
    """Guards a leak: closed connections leave the server's bookkeeping."""

    async def main() -> None:
        server = pyworker.HttpServer(echo_routes())
        port = await server.start("127.0.0.1", 0)
        try:
            for _ in range(20):
                async with raw_client(port) as client:
                    await client.send(GET)
                    assert (await client.response()).status == 200
            for _ in range(100):
                if server.connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert server.connections == 0
        finally:
            await server.shutdown(grace=0)

    run(main())


def test_no_content_answers_carry_no_framing_and_keep_the_connection() -> None:
    """Guards framing: a 204 with Transfer-Encoding or a body would desynchronise the next
    answer on a keep-alive connection (RFC 9110 15.3.5)."""

    async def empty_stream() -> AsyncIterator[bytes]:
        for part in (b"",):
            yield part

    async def no_content(request: pyworker.Request) -> pyworker.Response:
        return pyworker.Response(204, stream=empty_stream())

    async def main() -> None:
        routes = [pyworker.get("/nothing", no_content), *echo_routes("/")]
        async with serving(routes) as port, raw_client(port) as client:
            await client.send(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
            status, headers = await client.head()
            names = {k.lower() for k, _ in headers}
            assert status == 204
            assert "transfer-encoding" not in names and "content-length" not in names
            assert (await client.response()).status == 200  # the next answer is intact

    run(main())


def test_every_connection_header_line_counts() -> None:
    """`Connection: close` on a second line must not be overlooked."""

    async def main() -> None:
        async with serving(echo_routes()) as port, raw_client(port) as client:
            await client.send(
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
            )
            assert (await client.response()).status == 200
            assert await client.closed_by_peer(3)

    run(main())


def test_pipelined_request_keeps_its_stream_when_more_bytes_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards a cut stream: a request that was already buffered (pipelined) is being answered,
    and the client's next request arrives meanwhile; that must not arm the head timeout on
    the connection and cut the answer in progress."""
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 0.3)

    async def tokens() -> AsyncIterator[bytes]:
        for i in range(8):
            await asyncio.sleep(0.15)  # 1.2 s in all, four head timeouts
            yield b"tok%d " % i

    async def slow(request: pyworker.Request) -> pyworker.Response:
        return pyworker.Response(stream=tokens(), content_type="text/plain")

    async def main() -> None:
        routes = [pyworker.get("/slow", slow), *echo_routes("/")]
        async with serving(routes) as port, raw_client(port) as client:
            await client.send(GET + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.response()).status == 200
            status, _ = await client.head()
            assert status == 200
            await asyncio.sleep(0.1)
            await client.send(GET)  # the next request, while the stream runs
            assert await asyncio.wait_for(client.chunked_body(), 5) == b"".join(
                b"tok%d " % i for i in range(8)
            )
            assert (await client.response()).status == 200

    run(main())


def test_shutdown_answers_a_request_whose_body_is_still_arriving() -> None:
    """Guards a dropped request at SIGTERM: a head already received with its body on the way
    is a request in flight; only connections between requests are closed."""

    async def main() -> None:
        server = pyworker.HttpServer(echo_routes())
        port = await server.start("127.0.0.1", 0)
        client = await RawClient.connect(port)
        try:
            await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
            await asyncio.sleep(0.1)
            stopping = asyncio.ensure_future(server.shutdown(grace=5))
            await asyncio.sleep(0.2)
            await client.send(b"56789")
            reply = await client.response()
            assert reply.status == 200
            assert b"0123456789" in reply.body
            await asyncio.wait_for(stopping, 5)
        finally:
            client.reset()
            await server.shutdown(grace=0)

    run(main())


# Answers a handler writes itself (request.responder: EarlyResponse) ##############################


def _responder(request: Request) -> pyworker.EarlyResponse:
    early = request.responder
    assert early is not None, "a request served by a server has a responder"
    return early


def test_early_response_refuses_writes_after_its_end() -> None:
    """Guards the next answer on a keep-alive connection: a handler that kept its
    EarlyResponse (a task left writing) and writes after the server finished it must get an
    error, not put raw chunks into the connection where the next response goes."""
    kept: list[pyworker.EarlyResponse] = []

    async def stream(request: Request) -> Response:
        early = _responder(request)
        early.start(200, [("Content-Type", "text/plain")])
        await early.write(b"first")
        kept.append(early)
        return Response()

    async def late(request: Request) -> Response:
        try:
            await kept[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        except RuntimeError as exc:
            return pyworker.text_response(f"refused: {exc}")
        return pyworker.text_response("written")

    async def main() -> None:
        routes = [pyworker.get("/s", stream), pyworker.get("/late", late)]
        async with serving(routes) as port, raw_client(port) as client:
            await client.send(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await client.response()
            assert (first.status, first.body, first.complete) == (200, b"first", True)
            await client.send(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await client.response()  # a forged chunk here would not parse as a head
            assert second.status == 200
            assert second.body.startswith(b"refused: the response has ended"), second.body

    run(main())


@pytest.mark.parametrize("field", [("X-A", "a\nb"), ("X-A", "\u20ac")], ids=["newline", "euro"])
def test_early_response_head_that_cannot_be_sent_leaves_it_unstarted(
    field: tuple[str, str],
) -> None:
    """Guards a bare last chunk as the whole answer: start() with a field no head can hold
    raises before anything is sent and the response is not started, so the handler's own
    answer (here a 500 it chose) is what the client gets."""

    async def handler(request: Request) -> Response:
        try:
            _responder(request).start(200, [field])
        except ValueError:
            assert not request.response_started
            return pyworker.text_response("caught", 500)
        return pyworker.text_response("started")

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port, raw_client(port) as client:
            await client.send(GET)
            reply = await client.response()
            assert (reply.status, reply.body) == (500, b"caught")
            await client.send(GET)  # the connection is still in step
            assert (await client.response()).body == b"caught"

    run(main())


def test_unsendable_response_head_is_answered_500() -> None:
    """Guards an unanswered request: a returned Response whose head cannot be written (CR or
    LF in a field or the reason, a character beyond Latin-1), sized or streamed, is a 500
    with a proper head, and the connection stays usable; it used to be closed with no
    status line at all."""

    async def one_piece() -> AsyncIterator[bytes]:
        yield b"never sent"

    bad: dict[str, Callable[[], Response]] = {
        "/newline": lambda: Response(headers=[("X-A", "a\r\nSet-Cookie: evil=1")]),
        "/euro": lambda: Response(headers=[("X-A", "\u20ac")]),
        "/type": lambda: Response(content_type="text/plain\r\nX-Evil: 1"),
        "/reason": lambda: Response(reason="OK\r\nX-Evil: 1"),
        "/stream": lambda: Response(headers=[("X-A", "\u20ac")], stream=one_piece()),
        "/empty": lambda: Response(204, headers=[("X-A", "\u20ac")]),
    }

    def answer(make: Callable[[], Response]) -> pyworker.Handler:
        async def handler(request: Request) -> Response:
            return make()

        return handler

    async def main() -> None:
        routes = [pyworker.get(path, answer(make)) for path, make in bad.items()]
        async with serving(routes) as port, raw_client(port) as client:
            for path in bad:
                await client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                reply = await client.response()
                assert reply.status == 500, (path, reply)
                assert reply.json() == {"error": "internal error"}
                assert "x-evil" not in {k.lower() for k, _ in reply.headers}

    run(main())


def test_early_response_204_has_no_framing_and_no_body() -> None:
    """Guards the next answer on the connection: a 204 (or 304) begun by its handler carries
    no Transfer-Encoding and no last chunk (RFC 9110 15.3.5), and data written to it is
    refused, not sent."""
    refused: list[str] = []

    async def no_content(request: Request) -> Response:
        early = _responder(request)
        early.start(204, [])
        try:
            await early.write(b"a body")
        except RuntimeError as exc:
            refused.append(str(exc))
        return Response()

    async def main() -> None:
        routes = [pyworker.get("/nothing", no_content), *echo_routes("/")]
        async with serving(routes) as port, raw_client(port) as client:
            await client.send(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
            status, headers = await client.head()
            assert status == 204
            names = {k.lower() for k, _ in headers}
            assert "transfer-encoding" not in names and "content-length" not in names
            reply = await client.response()  # a "0\r\n\r\n" first would not parse as a head
            assert reply.status == 200 and reply.json()["target"] == "/"
            assert refused == ["a 204 or 304 answer has no body"]

    run(main())


def test_reason_phrase_is_the_responses_own() -> None:
    # what it guards: Response(reason=) (web.Response's reason=) reaches the status line
    async def handler(request: Request) -> Response:
        return Response(reason="Fine Indeed")

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port, raw_client(port) as client:
            await client.send(GET)
            assert (await client.head_bytes()).startswith(b"HTTP/1.1 200 Fine Indeed\r\n")

    run(main())


@pytest.mark.parametrize("other", ["body", "stream"])
def test_answer_begun_then_another_returned_is_cut(other: str) -> None:
    """Guards a short success: a handler that began its answer (start, write) and then
    returned another Response (a body, or a stream left unread) had the other one dropped
    without a word and its answer finished as if whole; now it is cut (the client sees an
    error) and the returned stream is closed (its generator's cleanup runs)."""
    closed: list[bool] = []

    async def pieces() -> AsyncIterator[bytes]:
        try:
            yield b"other"
        finally:
            closed.append(True)

    async def handler(request: Request) -> Response:
        early = _responder(request)
        early.start(200, [("Content-Type", "text/plain")])
        await early.write(b"first")
        if other == "body":
            return Response(body=b"other")
        stream = pieces()
        await stream.__anext__()  # under way: only aclose() runs its finally
        return Response(stream=stream)

    async def main() -> None:
        async with serving([pyworker.get("/", handler)]) as port, raw_client(port) as client:
            await client.send(GET)
            reply = await client.response()
            assert reply.status == 200 and not reply.complete, reply
            assert closed == ([True] if other == "stream" else [])

    run(main())
