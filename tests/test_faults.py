"""Faults around a live worker: a model server that refuses, hangs, hangs up, breaks off,
speaks broken HTTP or answers a byte at a time; an autoscaler that is down, slow, failing or
speaking garbage; a model log that is deleted, truncated, rotated or holds a 10 MB line; a
shutdown while requests are in flight.

The model here is a raw asyncio server written in this file (RawModel), so each fault is
exact bytes on the wire. For every fault: the client gets the documented answer (502, 504, or
a cut stream), the bookkeeping holds (received = in flight + served + errored + cancelled,
in flight back to 0), and the worker serves normally once the model behaves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import tracemalloc
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import (
    MODEL_ERROR,
    UNUSED_URL,
    RawClient,
    Rig,
    Runner,
    append,
    fetch,
    model_log,
    until,
    worker_rig,
)

import hello_world
import pyworker
from pyworker import Backend, State
from test_load import FakeModel

MODEL_TIMEOUT = 0.5  # seconds, the timed route's model_timeout
LOADED = FakeModel.LOADED_LINE
ERROR = MODEL_ERROR

run = Runner(timeout=60.0)


if TYPE_CHECKING:  # typing.Self is 3.11+
    from typing_extensions import Self

# A raw model server ##############################################################################

JSON_BODY = b'{"response": "cats and dogs", "tokens": 3}'


class _RawServer:
    """A loopback asyncio-streams server whose subclass writes `_serve`."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawModel(_RawServer):
    """The hello_world model API as raw bytes, with a switchable fault `mode`."""

    MODES = (
        "ok",
        "hang",
        "close_before_head",
        "close_mid_head",
        "die_mid_body",
        "die_mid_stream",
        "garbage",
        "bad_status_line",
        "status_outside_100_599",
        "bad_content_length",
        "bad_chunk_size",
        "slow",
    )

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.byte_delay = 0.01  # for "slow"
        self.received = 0
        self._conns: set[asyncio.StreamWriter] = set()

    async def stop(self) -> None:
        server = self._server
        if server is not None:
            server.close()
            for writer in list(self._conns):
                writer.transport.abort()
            await server.wait_closed()
        await super().stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.received += 1
                path = head.split(b" ", 2)[1]
                if not await self._answer(path, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    async def _answer(
        self, path: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request per the mode; False to close the connection."""
        stream = path.endswith(b"_stream")
        if stream:
            chunks = [b'data: {"token": "t%d"}\n\n' % i for i in range(3)]
            ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            ok += b"Transfer-Encoding: chunked\r\n\r\n"
            ok += b"".join(pyworker.encode_chunk(c) for c in chunks) + pyworker.LAST_CHUNK
        else:
            ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            ok += b"Content-Length: %d\r\n\r\n%s" % (len(JSON_BODY), JSON_BODY)
        mode = self.mode
        if mode == "ok":
            writer.write(ok)
            await writer.drain()
            return True
        if mode == "hang":
            await reader.read()  # until the worker gives up and closes
            return False
        if mode == "close_before_head":
            return False
        if mode == "close_mid_head":
            writer.write(ok[:20])
            await writer.drain()
            return False
        if mode in ("die_mid_body", "die_mid_stream"):
            writer.write(ok[: len(ok) - 12])  # the head and part of the body, then a crash
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        if mode == "garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02\r\n\r\n")
        elif mode == "bad_status_line":
            writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}")
        elif mode == "status_outside_100_599":
            writer.write(b"HTTP/1.1 004 Odd\r\nContent-Length: 2\r\n\r\n{}")
        elif mode == "bad_content_length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n{}")
        elif mode == "bad_chunk_size":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n")
        elif mode == "slow":
            for i in range(len(ok)):
                writer.write(ok[i : i + 1])
                await writer.drain()
                await asyncio.sleep(self.byte_delay)
            return True
        await writer.drain()
        await asyncio.sleep(0.05)
        return False


# The worker ######################################################################################


class TimedGenerateHandler(hello_world.GenerateHandler):
    model_timeout = MODEL_TIMEOUT


class TimedStreamHandler(hello_world.GenerateStreamHandler):
    model_timeout = 2.0


def timed_routes(backend: Backend) -> list[pyworker.Route]:
    return [
        pyworker.post("/generate", backend.create_handler(TimedGenerateHandler())),
        pyworker.post("/generate_untimed", backend.create_handler(hello_world.GenerateHandler())),
        pyworker.post("/generate_stream", backend.create_handler(TimedStreamHandler())),
    ]


def live_worker(
    tmp: Path,
    report_url: str = UNUSED_URL,
    *,
    model_url: str | None = None,
    fake: FakeModel | None = None,
) -> AbstractAsyncContextManager[Rig]:
    """The rig, UNSECURED, with the timed routes, reporting to `report_url`; the model is
    `fake` or whatever listens at `model_url`; the model log says loaded."""
    log_path = model_log(tmp)
    if not log_path.exists():
        log_path.write_text(LOADED + "\n")
    return worker_rig(
        tmp,
        fake=fake or FakeModel(),
        model_url=model_url,
        report_addrs=[report_url],
        routes=timed_routes,
        unsecured=True,
        report_check_interval=0.1,
        report_max_interval=1.0,
        report_timeout=0.5,
        log_poll_interval=0.05,
    )


async def call(live: Rig, route: str = "/generate", timeout: float = 10.0) -> tuple[int, bytes]:
    """POST a valid request on a new connection; (status, body). A cut body raises."""
    body = json.dumps({"payload": {"prompt": "hello there", "max_response_tokens": 3}})
    return await fetch(live.url, "POST", route, body.encode(), timeout=timeout)


async def settled(live: Rig) -> None:
    """Nothing in flight, and every request in exactly one outcome."""
    metrics = live.backend.metrics
    await until(lambda: metrics.in_flight.requests == 0, 5.0, "in_flight back to 0")
    assert metrics.consistent(), vars(metrics)


# Model server faults #############################################################################

FAULTS: list[tuple[str, str, set[int]]] = [
    ("hang", "/generate", {504}),
    ("close_before_head", "/generate", {502}),
    ("close_before_head", "/generate_stream", {502}),
    ("close_mid_head", "/generate", {502}),
    ("die_mid_body", "/generate", {502}),
    ("garbage", "/generate", {502}),
    ("bad_status_line", "/generate", {502}),
    ("status_outside_100_599", "/generate", {502}),
    ("bad_content_length", "/generate", {502}),
    ("bad_chunk_size", "/generate_stream", {502}),
    ("slow", "/generate", {504}),  # 0.01 s a byte: about 1.2 s, over the 0.5 s model_timeout
]


@pytest.mark.parametrize(
    ("mode", "route", "statuses"), FAULTS, ids=[f"{m} {r}" for m, r, _ in FAULTS]
)
def test_model_fault_answers_502_or_504_and_the_worker_recovers(
    mode: str, route: str, statuses: set[int], tmp_path: Path
) -> None:
    """Guards the upstream error path: each model fault becomes 502 (unreachable or broken
    HTTP) or 504 (too slow), never a hang, a 500 or a relayed broken answer; the bookkeeping
    settles; the next request after the model recovers is served."""

    async def main() -> None:
        model = await RawModel().start()
        try:
            async with live_worker(tmp_path, model_url=model.url) as live:
                model.mode = mode
                started = time.monotonic()
                results = await asyncio.gather(*(call(live, route) for _ in range(3)))
                elapsed = time.monotonic() - started
                assert {status for status, _ in results} <= statuses, results
                assert elapsed < 5.0, elapsed
                await settled(live)
                assert live.backend.metrics.errored.requests == 3
                model.mode = "ok"
                for path in ("/generate", "/generate_stream"):
                    status, body = await call(live, path)
                    assert status == 200, (path, body)
                await settled(live)
                assert live.backend.metrics.served.requests == 2
        finally:
            await model.stop()

    run(main())


def test_model_dies_mid_stream_cuts_the_clients_stream(tmp_path: Path) -> None:
    """Guards against a silently short "success": a model that dies mid-stream leaves the
    client's chunked stream without its last chunk, so the client sees an error."""

    async def main() -> None:
        model = await RawModel().start()
        try:
            async with live_worker(tmp_path, model_url=model.url) as live:
                model.mode = "die_mid_stream"
                for _ in range(3):
                    with pytest.raises(pyworker.UpstreamError):
                        await call(live, "/generate_stream")
                await settled(live)
                assert live.backend.metrics.errored.requests == 3
                model.mode = "ok"
                status, body = await call(live, "/generate_stream")
                assert status == 200 and body.count(b"data:") == 3, body
                await settled(live)
        finally:
            await model.stop()

    run(main())


def test_model_slow_byte_by_byte_but_in_time_is_relayed_whole(tmp_path: Path) -> None:
    """A model answering one byte every 5 ms (slow, not broken) is relayed intact, on the
    untimed JSON route and on the stream route (its 2 s model_timeout is enough)."""

    async def main() -> None:
        model = await RawModel().start()
        try:
            async with live_worker(tmp_path, model_url=model.url) as live:
                model.mode, model.byte_delay = "slow", 0.005
                json_reply, stream_reply = await asyncio.gather(
                    call(live, "/generate_untimed"), call(live, "/generate_stream")
                )
                assert json_reply == (200, JSON_BODY)
                assert stream_reply[0] == 200 and stream_reply[1].count(b"data:") == 3
                await settled(live)
                assert live.backend.metrics.served.requests == 2
        finally:
            await model.stop()

    run(main())


def test_model_refused_then_back(tmp_path: Path) -> None:
    """A model server that went away answers 502 quickly; once it listens again on the same
    port (a restart), requests are served again (no stale pooled connection breaks them)."""

    async def main() -> None:
        model = await RawModel().start()
        port = model.port
        try:
            async with live_worker(tmp_path, model_url=model.url) as live:
                assert (await call(live))[0] == 200  # leaves a pooled connection
                await model.stop()
                started = time.monotonic()
                results = await asyncio.gather(*(call(live) for _ in range(5)))
                assert [s for s, _ in results] == [502] * 5, results
                assert time.monotonic() - started < 2.0
                model = await RawModel().start(port)
                assert [(await call(live, p))[0] for p in ("/generate", "/generate_stream")] == [
                    200,
                    200,
                ]
                await settled(live)
                metrics = live.backend.metrics
                assert (metrics.served.requests, metrics.errored.requests) == (3, 5)
        finally:
            await model.stop()

    run(main())


def test_cancelling_a_request_while_it_connects_is_not_swallowed() -> None:
    """Guards RunningWorker.stop() against hanging: a task cancelled while HttpClient is connecting
    must end with CancelledError. asyncio.wait_for (Python <= 3.11) returns the inner result
    when the connection completes in the same loop step as the cancel, swallowing it; the
    report loop then runs on forever and Backend.stop() waits for it without end (seen as a
    hung RunningWorker.stop in the abuse tests). Each delay below lands the cancel on one step
    of the connect; every one of them must be honoured."""

    async def main() -> dict[int, str]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                await reader.read()
            writer.transport.abort()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        client = pyworker.HttpClient(f"http://127.0.0.1:{port}")
        outcomes: dict[int, str] = {}
        try:
            for steps in range(16):
                task = asyncio.ensure_future(client.request("POST", "/", b"{}", timeout=0.3))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
                    outcomes[steps] = "returned a response"
                except asyncio.CancelledError:
                    outcomes[steps] = "cancelled"
                except Exception as exc:
                    outcomes[steps] = f"went on and raised {type(exc).__name__}"
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
        return outcomes

    outcomes = run(main())
    assert {k: v for k, v in outcomes.items() if v != "cancelled"} == {}


# Autoscaler faults ###############################################################################


class RawAutoscaler(_RawServer):
    """POST /worker_status/ with a switchable fault: ok, slow, 500, garbage, hang."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.reports: list[dict[str, Any]] = []
        self.attempts = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            self.attempts += 1
            mode = self.mode
            if mode == "ok":
                self.reports.append(json.loads(body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            elif mode == "slow":
                await asyncio.sleep(3.0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            elif mode == "500":
                writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}")
            elif mode == "garbage":
                writer.write(b"\x00\xff garbage \r\n\r\n")
            elif mode == "hang":
                await reader.read()
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


def test_autoscaler_faults_do_not_touch_requests_and_reports_resume(tmp_path: Path) -> None:
    """Guards the report loop's isolation: while the autoscaler is down, slow, failing or
    answering garbage, client requests are served at full speed; reports start arriving
    again once it behaves, and one of them counts every request served meanwhile."""

    async def main() -> None:
        scaler = await RawAutoscaler().start()
        port = scaler.port
        try:
            async with live_worker(tmp_path, scaler.url, fake=FakeModel(tokens=3)) as live:
                await until(lambda: scaler.reports, 5.0, "a first report")
                served = 0
                for mode in ("down", "slow", "500", "garbage", "hang"):
                    if mode == "down":
                        await scaler.stop()
                    else:
                        scaler.mode = mode
                    attempts = scaler.attempts
                    worst = 0.0
                    for _ in range(10):
                        started = time.monotonic()
                        status, _body = await call(live)
                        worst = max(worst, time.monotonic() - started)
                        assert status == 200, (mode, status)
                        served += 1
                        await asyncio.sleep(0.05)
                    assert worst < 0.3, (mode, worst)  # no report ever delays a request
                    if mode == "down":
                        scaler = await RawAutoscaler().start(port)
                    else:
                        current, before = scaler, attempts
                        await until(
                            lambda c=current, b=before: c.attempts > b, 5.0, f"{mode} tried"
                        )
                    scaler.mode = "ok"
                    # A report retried through the outage may carry its first try's numbers;
                    # a fresh one soon follows and counts every request served meanwhile.
                    back, total = scaler, served
                    await until(
                        lambda a=back, t=total: any(
                            r["num_requests_recieved"] >= t for r in a.reports
                        ),
                        6.0,
                        f"reports resumed after {mode}",
                    )
                await settled(live)
        finally:
            await scaler.stop()

    run(main())


# Model log faults ################################################################################


async def _stays(live: Rig, state: State, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert live.backend.state is state, (live.backend.state, live.backend.error_msg)
        await asyncio.sleep(0.02)


LOG_FAULTS = ["deleted", "deleted then recreated", "truncated", "rotated", "10 MB line"]


@pytest.mark.parametrize("fault", LOG_FAULTS)
def test_model_log_fault_is_survived(fault: str, tmp_path: Path) -> None:
    """Guards the log tail: after the fault the worker stays ready and serving, memory stays
    bounded (a 10 MB line is never held whole), and the tail still follows the log, proven
    by an error line written afterwards turning the worker errored."""

    async def main() -> None:
        async with live_worker(tmp_path, fake=FakeModel(tokens=3)) as live:
            log_path = live.log
            append(log_path, '{"message":"Download 3/3"}\n')
            await asyncio.sleep(0.2)
            peak = 0
            if fault.startswith("deleted"):
                log_path.unlink()
            elif fault == "truncated":
                log_path.write_text("")
            elif fault == "rotated":
                log_path.rename(log_path.with_suffix(".log.1"))
                log_path.write_text("a new log\n")
            else:
                block = b"x" * (1 << 20)
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
                    try:
                        for _ in range(10):
                            os.write(fd, block)
                            await asyncio.sleep(0.02)
                        os.write(fd, b"\n")
                    finally:
                        os.close(fd)
                    await asyncio.sleep(0.5)
                    peak = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
                assert peak < 8 * (1 << 20), peak  # far less than the 10 MB line
            await _stays(live, State.READY, 0.4)
            assert (await call(live))[0] == 200
            if fault == "deleted then recreated":
                log_path.write_text("the model restarted\n")
                await asyncio.sleep(0.2)
            if fault != "deleted":
                append(log_path, f"{ERROR}: shard 2\n")
                await until(lambda: live.backend.state is State.ERRORED, 3.0, "errored")
                assert ERROR in live.backend.error_msg

    run(main())


def test_huge_log_line_is_matched_on_its_start_only_once(tmp_path: Path) -> None:
    """MAX_LOG_LINE says a log line is matched on its first 64 KiB, acted on once. A 10 MB line
    of 'x' whose later part repeats the error text must therefore leave the worker ready:
    where a match happens must not depend on how the tail's reads happened to split it."""

    async def main() -> None:
        async with live_worker(tmp_path, fake=FakeModel(tokens=3)) as live:
            filler = (ERROR + " ").encode()
            line = b"x" * (pyworker.MAX_LOG_LINE + 1000)
            line += filler * ((10 << 20) // len(filler)) + b"\n"
            with open(live.log, "ab") as f:
                f.write(line)
            await _stays(live, State.READY, 1.0)

    run(main())


# Shutdown under load #############################################################################


def test_stop_under_load_finishes_every_request_in_flight(tmp_path: Path) -> None:
    """Guards SIGTERM handling (RunningWorker.stop is what the signal handler runs): 20 requests in
    flight (JSON and streams) when the stop begins all complete whole; new connections are
    refused; the bookkeeping counts them all served."""

    async def main() -> None:
        async with live_worker(
            tmp_path, fake=FakeModel(tokens=5, json_delay=0.6, token_delay=0.12)
        ) as live:
            routes = ["/generate_untimed", "/generate_stream"] * 10
            calls = [asyncio.ensure_future(call(live, r)) for r in routes]
            metrics = live.backend.metrics
            await until(lambda: metrics.in_flight.requests == 20, 5.0, "20 in flight")
            stopping = asyncio.ensure_future(live.worker.stop(grace=5))
            await asyncio.sleep(0.1)
            with pytest.raises(OSError):
                await RawClient.connect(live.port)
            results = await asyncio.gather(*calls)
            await asyncio.wait_for(stopping, 8.0)
            for route, (status, body) in zip(routes, results):
                assert status == 200, (route, status, body)
                if route == "/generate_stream":
                    assert body.count(b"data:") == 3, body
                else:
                    assert json.loads(body)["tokens"] == 3
            assert metrics.served.requests == 20 and metrics.in_flight.requests == 0
            assert metrics.consistent()

    run(main())
