"""End to end on loopback: hello_world's handlers in a real worker, a FakeModel behind it and a
LocalAutoscaler (or PUBKEY_FILE) beside it, driven by real clients over real sockets.

Each test starts its own Backend, worker, fake model and autoscaler on port 0 and stops them,
so no state leaks between tests. Raw sockets are used where the bytes on the wire matter
(chunk boundaries, a cut stream, a client that goes away); pyworker.HttpClient elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    DATA,
    RawClient,
    Reply,
    Rig,
    Runner,
    load_private_key,
    until,
    worker_rig,
)

import hello_world
import pyworker
from pyworker import State
from test_load import FakeModel, LocalAutoscaler

# Keys: the same test data as test_signatures.py
KEY = load_private_key("test_key.pem")
OTHER_KEY = load_private_key("other_key.pem")


# The worker under test ###########################################################################


class FastGenerateHandler(hello_world.GenerateHandler):
    benchmark_runs = 2  # the benchmark is not what these tests measure


class HealthGenerateHandler(FastGenerateHandler):
    healthcheck_endpoint = "/health"


async def wait_for(condition: Callable[[], bool], *, what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    await until(condition, timeout, what, interval=0.01)


run = Runner(timeout=60.0)  # one test's event loop, bounded: a hang fails, CI does not stall


def worker_setup(
    tmp_path: Path,
    *,
    handler: pyworker.EndpointHandler[Any] | None = None,
    autoscaler: LocalAutoscaler | None = None,
    pubkey_file: Path | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[Rig]:
    """The rig with hello_world's handlers, a LocalAutoscaler (or `autoscaler`) serving
    KEY's public key, requests signed with KEY at cost 250.

    With `fake` left out, the fake model writes its log and the worker becomes ready (the
    benchmark runs, unless `cached_max_perf` pre-fills the cache). `ready=False` returns at once.
    """
    return worker_rig(
        tmp_path,
        handler=handler or FastGenerateHandler(),
        autoscaler=autoscaler or LocalAutoscaler(KEY),
        signer=KEY,
        cost="250",
        pubkey_file=None if pubkey_file is None else str(pubkey_file),
        log_poll_interval=0.02,
        **options,
    )


class KeylessAutoscaler(LocalAutoscaler):
    """A local autoscaler whose /pubkey/ answers 503 until `serve_key` is set."""

    serve_key = False
    pubkey_requests = 0

    async def _pubkey(self, request: pyworker.Request) -> pyworker.Response:
        self.pubkey_requests += 1
        if not self.serve_key:
            return pyworker.error_response(503, "no key for you yet")
        return await super()._pubkey(request)


# Raw HTTP on a socket: for chunk boundaries, cut streams and clients that go away ###############


async def raw_open(w: Rig, path: str, body: bytes) -> RawClient:
    """A raw connection to the worker with a POST of `body` sent on it."""
    client = await RawClient.connect(w.port)
    await client.send_request("POST", path, body)
    return client


def close_with(client: RawClient, how: str) -> None:
    """Go away: "fin" is an ordinary close(); "rst" an abortive one (SO_LINGER 0)."""
    if how == "rst":
        client.reset()
    else:
        client.writer.close()


async def gather_tasks(*coros: Awaitable[Reply]) -> list[Reply]:
    return list(await asyncio.gather(*coros))


# Success #########################################################################################


def test_signed_generate(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            before = len(w.fake.requests)
            prompt = "Tell me, in a few words, about cats and dogs."
            reply = await w.post("/generate", w.body(prompt, max_response_tokens=5))
            assert reply.status == 200, reply.body
            assert reply.headers.get("content-type") == "application/json"
            answer = reply.json()
            assert answer["tokens"] == 5 and len(answer["response"].split()) == 5
            # The model got the payload's fields and nothing of auth_data.
            assert w.fake.requests[before:] == [{"prompt": prompt, "max_response_tokens": 5}]
            m = w.backend.metrics
            assert m.served.requests == 1
            assert m.served.workload == hello_world.count_tokens(prompt) == 13
            assert w.settled()

    run(main())


def test_signed_generate_stream_arrives_chunk_by_chunk(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            w.fake.token_delay = 0.05
            client = await raw_open(w, "/generate_stream", w.body(max_response_tokens=8))
            try:
                status, headers = await client.head()
                assert status == 200
                assert headers["content-type"] == "text/event-stream"
                assert headers["transfer-encoding"] == "chunked"
                chunks: list[bytes] = []
                arrivals: list[float] = []
                while chunk := await client.chunk():
                    chunks.append(chunk)
                    arrivals.append(time.monotonic())
            finally:
                await client.close()
            # One token per chunk, in order, relayed as each came (not buffered to the end).
            assert len(chunks) == 8
            for i, chunk in enumerate(chunks):
                assert chunk.startswith(b'data: {"token": "tok%d"' % i) and chunk.endswith(b"\n\n")
            assert arrivals[-1] - arrivals[0] >= 0.25
            await wait_for(lambda: w.backend.metrics.served.requests == 1, what="served")
            assert w.settled()

    run(main())


def test_stream_through_http_client(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            async with await w.client.request(
                "POST", "/generate_stream", w.body(max_response_tokens=4)
            ) as resp:
                assert resp.status == 200
                body = b"".join([chunk async for chunk in resp.iter_chunks()])
            assert body.count(b"data: ") == 4
            await wait_for(w.settled, what="the stream to be accounted")
            assert w.backend.metrics.served.requests == 1

    run(main())


def test_pubkey_file_pkcs1_and_autoscaler_without_key(tmp_path: Path) -> None:
    # PUBKEY_FILE wins over /pubkey/: this autoscaler never serves a key.
    async def main() -> None:
        autoscaler = KeylessAutoscaler(KEY)
        pubkey = DATA / "test_key.rsapub.pem"  # BEGIN RSA PUBLIC KEY (PKCS#1)
        async with worker_setup(tmp_path, autoscaler=autoscaler, pubkey_file=pubkey) as w:
            assert w.backend.pubkey == KEY.public_key
            assert (await w.post("/generate", w.body())).status == 200
            assert autoscaler.pubkey_requests == 0

    run(main())


def test_unsecured_needs_no_auth_data_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pyworker")

    async def main() -> None:
        async with worker_setup(tmp_path, unsecured=True) as w:
            reply = await w.post("/generate", {"payload": {"prompt": "no ticket"}})
            assert reply.status == 200, reply.body
            reply = await w.post("/generate", {"payload": {}})
            assert reply.json() == {"payload": {"prompt": "missing parameter"}}

    run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("UNSECURED" in r.getMessage() for r in warnings)


# 401 #############################################################################################


def test_every_401_case(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            before = len(w.fake.requests)
            cases: list[tuple[str, dict[str, Any]]] = []
            for field, value in (
                ("cost", "251"),
                ("cost", 250),  # signed as the string "250"
                ("endpoint", "hellO"),
                ("reqnum", 10**6),
                ("url", "http://127.0.0.1:1"),
            ):
                auth = w.auth()
                auth[field] = value
                cases.append((f"tampered {field}={value!r}", auth))
            cases.append(("wrong key", w.auth(OTHER_KEY)))
            auth = w.auth()
            auth["signature"] = "not base64!"
            cases.append(("bad base64", auth))
            auth = w.auth()
            auth["signature"] = auth["signature"].rstrip("=")
            cases.append(("base64 without its padding", auth))
            for length in (255, 257, 0):
                auth = w.auth()
                raw = base64.b64decode(auth["signature"])
                auth["signature"] = base64.b64encode((raw + b"\x00")[:length]).decode()
                cases.append((f"signature of {length} bytes", auth))
            auth = w.auth()
            auth["signature"] = "A" * 100_000
            cases.append(("huge signature", auth))
            for name, auth in cases:
                body = {"auth_data": auth, "payload": {"prompt": f"secret {name}"}}
                reply = await w.post("/generate", body)
                assert reply.status == 401, name
                assert isinstance(reply.json()["error"], str), name

            # Replay: the same signed request twice.
            body = w.body("replayed")
            assert (await w.post("/generate", body)).status == 200
            assert (await w.post("/generate", body)).status == 401
            # Stale reqnum: more than 100 below the highest accepted.
            high = w.reqnum + 1000
            ok = {"auth_data": w.auth(reqnum=high), "payload": {"prompt": "high"}}
            assert (await w.post("/generate", ok)).status == 200
            stale = {"auth_data": w.auth(reqnum=high - 101), "payload": {"prompt": "stale"}}
            assert (await w.post("/generate", stale)).status == 401
            edge = {"auth_data": w.auth(reqnum=high - 100), "payload": {"prompt": "edge"}}
            assert (await w.post("/generate", edge)).status == 200
            # A bad signature wins over a bad payload: the payload is read only once verified.
            bad = {"auth_data": w.auth(OTHER_KEY), "payload": {"prompt": 5}}
            assert (await w.post("/generate", bad)).status == 401
            stream = {"auth_data": w.auth(OTHER_KEY), "payload": {"prompt": "s"}}
            assert (await w.post("/generate_stream", stream)).status == 401

            prompts = [r["prompt"] for r in w.fake.requests[before:]]
            assert prompts == ["replayed", "high", "edge"]  # no refused request reached it
            assert w.backend.metrics.received.requests == 3
            assert w.settled()

    run(main())


# 422 #############################################################################################


def test_every_422_case(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            before = len(w.fake.requests)

            def auth_without(field: str) -> dict[str, Any]:
                auth = w.auth()
                del auth[field]
                return auth

            def auth_with(field: str, value: Any) -> dict[str, Any]:
                auth = w.auth()
                auth[field] = value
                return auth

            invalid_json = {"error": "invalid JSON"}
            cases: list[tuple[str, bytes | dict[str, Any], Any]] = [
                ("not JSON", b'{"auth_data": ', invalid_json),
                ("not UTF-8", b'{"payload": "\xff"}', invalid_json),
                ("empty body", b"", invalid_json),
                ("JSON array", b'[{"auth_data": {}, "payload": {}}]', invalid_json),
                ("JSON string", b'"payload"', invalid_json),
                ("JSON null", b"null", invalid_json),
                (
                    "the SPEC's example",
                    {"auth_data": auth_without("reqnum"), "payload": {}},
                    {
                        "auth_data": {"reqnum": "missing parameter"},
                        "payload": {"prompt": "missing parameter"},
                    },
                ),
                (
                    "missing auth_data",
                    {"payload": {"prompt": "p"}},
                    {"auth_data": "missing parameter"},
                ),
                (
                    "missing auth_data and payload",
                    {"other": 1},
                    {"auth_data": "missing parameter", "payload": "missing parameter"},
                ),
                (
                    "missing payload",
                    {"auth_data": w.auth()},
                    {"payload": "missing parameter"},
                ),
                (
                    "payload not an object",
                    {"auth_data": w.auth(), "payload": ["p"]},
                    {"payload": "expected a JSON object"},
                ),
                (
                    "auth_data not an object",
                    {"auth_data": "ticket", "payload": {"prompt": "p"}},
                    {"auth_data": "expected a JSON object"},
                ),
            ]
            for field in ("signature", "cost", "endpoint", "reqnum", "url"):
                cases.append(
                    (
                        f"missing auth_data.{field}",
                        {"auth_data": auth_without(field), "payload": {"prompt": "p"}},
                        {"auth_data": {field: "missing parameter"}},
                    )
                )
            for name, body, expected in cases:
                reply = await w.post("/generate", body)
                assert reply.status == 422, name
                assert reply.headers.get("content-type") == "application/json", name
                assert reply.json() == expected, name

            # Wrong types: the message wording is the worker's; the shape is the contract.
            typed: list[tuple[str, dict[str, Any], str, str]] = [
                ("reqnum as a string", auth_with("reqnum", "5"), "auth_data", "reqnum"),
                ("reqnum as a bool", auth_with("reqnum", True), "auth_data", "reqnum"),
                ("reqnum as a float", auth_with("reqnum", 5.0), "auth_data", "reqnum"),
                ("signature as a number", auth_with("signature", 7), "auth_data", "signature"),
                ("cost as null", auth_with("cost", None), "auth_data", "cost"),
                ("url as an object", auth_with("url", {}), "auth_data", "url"),
            ]
            for name, auth, part, field in typed:
                reply = await w.post("/generate", {"auth_data": auth, "payload": {"prompt": "p"}})
                assert reply.status == 422, name
                errors = reply.json()
                assert list(errors) == [part] and list(errors[part]) == [field], name
                assert isinstance(errors[part][field], str) and errors[part][field], name

            # Payload errors come once the signature is verified (each request freshly signed).
            for route in ("/generate", "/generate_stream"):
                reply = await w.post(route, {"auth_data": w.auth(), "payload": {}})
                assert reply.status == 422, route
                assert reply.json() == {"payload": {"prompt": "missing parameter"}}, route
                for value in (5, None, ["p"], {"text": "p"}, True):
                    body = {"auth_data": w.auth(), "payload": {"prompt": value}}
                    reply = await w.post(route, body)
                    assert reply.status == 422, (route, value)
                    errors = reply.json()
                    assert list(errors) == ["payload"] and list(errors["payload"]) == ["prompt"]
                    assert "string" in errors["payload"]["prompt"], (route, value)
            wrong_tokens: list[Any] = ["10", 1.5, True, [10]]
            for value in wrong_tokens:
                payload = {"prompt": "p", "max_response_tokens": value}
                body = {"auth_data": w.auth(), "payload": payload}
                errors = (await w.post("/generate", body)).json()
                assert list(errors) == ["payload"], value
                assert list(errors["payload"]) == ["max_response_tokens"], value

            assert len(w.fake.requests) == before  # nothing reached the model
            assert w.backend.metrics.received.requests == 0
            assert w.settled()

    run(main())


# 429, 502, 503 ###################################################################################


def test_429_with_retry_after_when_the_queue_is_too_long(tmp_path: Path) -> None:
    async def main() -> None:
        # max_perf 10 workload/s from the benchmark cache; each prompt is 5 tokens of workload,
        # so past two requests in flight the estimated wait exceeds max_queue_time.
        async with worker_setup(tmp_path, max_queue_time=0.5, cached_max_perf=10.0) as w:
            assert w.backend.max_perf == 10.0
            w.fake.json_delay = 1.0
            prompt = "one two three four five"
            assert hello_world.count_tokens(prompt) == 5
            replies = await gather_tasks(*(w.post("/generate", w.body(prompt)) for _ in range(10)))
            statuses = sorted(r.status for r in replies)
            accepted, refused = statuses.count(200), statuses.count(429)
            assert accepted + refused == 10 and 1 <= accepted <= 2, statuses
            for reply in replies:
                if reply.status == 429:
                    retry_after = reply.headers.get("retry-after")
                    assert retry_after is not None and retry_after.isdigit()
                    assert int(retry_after) >= 1
                    assert reply.json()["error"]
            m = w.backend.metrics
            assert m.rejected == refused
            assert m.received.requests == m.served.requests == accepted  # 429s never accepted
            # Once the queue drained, requests are accepted again.
            w.fake.json_delay = 0.0
            assert (await w.post("/generate", w.body(prompt))).status == 200
            assert w.settled()

    run(main())


def test_a_ticket_refused_with_429_can_be_retried(tmp_path: Path) -> None:
    """Guards against spending the autoscaler's ticket on a request that was never accepted:
    the client is told to retry (Retry-After), so the same auth_data must work then."""

    async def main() -> None:
        async with worker_setup(tmp_path, max_queue_time=0.5, cached_max_perf=10.0) as w:
            w.fake.json_delay = 1.0
            prompt = "one two three four five"
            busy = [asyncio.ensure_future(w.post("/generate", w.body(prompt))) for _ in range(3)]
            await wait_for(lambda: w.backend.metrics.in_flight.requests >= 2, what="a queue")
            retried = w.body(prompt)
            first = await w.post("/generate", retried)
            assert first.status == 429, first.body
            await gather_tasks(*busy)
            w.fake.json_delay = 0.0
            again = await w.post("/generate", retried)
            assert again.status == 200, again.body
            replay = await w.post("/generate", retried)  # accepted once: now it is spent
            assert replay.status == 401, replay.body

    run(main())


def test_model_failure_details_stay_in_the_log(tmp_path: Path) -> None:
    """The model's internal address is the worker's business, not the client's."""

    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            model_port = str(w.fake.port)
            await w.fake.stop()
            reply = await w.post("/generate", w.body())
            assert reply.status == 502
            assert model_port not in reply.body.decode() and "127.0.0.1" not in reply.body.decode()

    run(main())


def test_502_when_the_model_is_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            await w.fake.stop()  # the model server dies after the worker became ready
            for route in ("/generate", "/generate_stream"):
                reply = await w.post(route, w.body())
                assert reply.status == 502, reply.body
                assert "error" in reply.json()
            m = w.backend.metrics
            assert m.errored.requests == 2 and m.served.requests == 0
            assert w.settled()

    run(main())


def test_502_when_the_model_breaks_http(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            port = w.fake.port
            await w.fake.stop()

            async def garbage(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(b"SMTP ready\r\n\r\n")
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(garbage, "127.0.0.1", port)
            try:
                reply = await w.post("/generate", w.body())
                assert reply.status == 502, reply.body
            finally:
                server.close()
            assert w.backend.metrics.errored.requests == 1 and w.settled()

    run(main())


def test_503_before_ready_then_ready_then_errored(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel()  # writes no log: this test writes it
        async with worker_setup(tmp_path, fake=fake, ready=False) as w:
            for route in ("/generate", "/generate_stream"):
                reply = await w.post(route, w.body())
                assert reply.status == 503
                assert reply.json() == {"error": "model not ready", "state": "loading"}
            reply = await w.post("/generate", b"not even JSON")  # readiness comes first
            assert reply.status == 503 and reply.json()["state"] == "loading"

            w.log.write_text('{"message":"Downloading"}\ninfer server has started\n')
            await w.wait_ready()
            assert (await w.post("/generate", w.body())).status == 200

            with w.log.open("a") as f:
                f.write("Traceback ...\nException: corrupted model file /models/x.bin\n")
            await wait_for(lambda: w.backend.state is State.ERRORED, what="errored")
            reply = await w.post("/generate", w.body())
            assert reply.status == 503
            assert reply.json()["state"] == "errored"
            assert "corrupted model file" in reply.json()["error"]
            assert w.backend.metrics.received.requests == 1

    run(main())


def test_503_errored_when_the_model_never_answers_the_benchmark(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # MODEL_API_WAIT (model_api_wait) short: the worker waits that long for the API
        async with worker_setup(tmp_path, model_url=dead, ready=False, model_api_wait=0.5) as w:
            await wait_for(lambda: w.backend.state is State.ERRORED, what="errored")
            reply = await w.post("/generate", w.body())
            assert reply.status == 503 and reply.json()["state"] == "errored"
            assert "did not open within" in reply.json()["error"]

    run(main())


def test_503_until_the_public_key_is_fetched(tmp_path: Path) -> None:
    async def main() -> None:
        autoscaler = KeylessAutoscaler(KEY)
        async with worker_setup(tmp_path, autoscaler=autoscaler, ready=False) as w:
            await wait_for(lambda: w.backend.state is State.READY, what="the model to be ready")
            assert autoscaler.pubkey_requests >= 1
            reply = await w.post("/generate", w.body())
            assert reply.status == 503
            assert reply.json() == {"error": "no public key yet", "state": "no_pubkey"}
            autoscaler.serve_key = True  # the worker retries in the background, with backoff
            await wait_for(lambda: w.backend.pubkey is not None, what="the key", timeout=8.0)
            assert (await w.post("/generate", w.body())).status == 200

    run(main())


# Queueing ########################################################################################


def test_fifo_one_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"), one_at_a_time=True)
        async with worker_setup(tmp_path, fake=fake, parallel=False) as w:
            before = len(fake.requests)
            fake.json_delay = 0.03
            fake.token_delay = 0.01
            tasks: list[asyncio.Task[Reply]] = []
            sent: list[str] = []
            for i in range(10):
                prompt = f"request number {i}"
                route = "/generate_stream" if i % 3 == 1 else "/generate"
                body = w.body(prompt, max_response_tokens=4)
                tasks.append(asyncio.get_running_loop().create_task(w.post(route, body)))
                sent.append(prompt)
                # Wait until the worker holds it, so that arrival order is the sending order.
                await wait_for(
                    lambda n=i + 1: w.backend.metrics.received.requests == n, what="arrival"
                )
            replies = await asyncio.gather(*tasks)
            assert [r.status for r in replies] == [200] * 10  # the fake answers 500 if crowded
            assert [r["prompt"] for r in fake.requests[before:]] == sent
            assert fake.max_active == 1
            await wait_for(w.settled, what="all accounted")
            assert w.backend.metrics.served.requests == 10

    run(main())


# Clients that go away ############################################################################


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_disconnect_while_queued(tmp_path: Path, how: str) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path, parallel=False) as w:
            before = len(w.fake.requests)
            w.fake.json_delay = 1.0
            first = asyncio.get_running_loop().create_task(w.post("/generate", w.body("first")))
            await wait_for(lambda: w.backend.metrics.in_flight.requests == 1, what="first")
            prompt = "second, gone before its turn"
            client = await raw_open(w, "/generate", w.body(prompt))
            await wait_for(lambda: w.backend.metrics.queued == 1, what="the second to queue")
            close_with(client, how)
            m = w.backend.metrics
            await wait_for(lambda: m.cancelled.requests == 1, what="cancelled", timeout=0.8)
            assert not first.done()  # it was noticed at once, not when its turn came
            assert m.queued == 0 and m.in_flight.requests == 1 and m.consistent()
            assert (await first).status == 200
            await asyncio.sleep(0.1)
            assert [r["prompt"] for r in w.fake.requests[before:]] == ["first"]
            assert m.served.requests == 1 and m.cancelled.requests == 1
            assert m.cancelled.workload == hello_world.count_tokens(prompt)
            assert w.settled()

    run(main())


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_disconnect_while_waiting_for_the_model(tmp_path: Path, how: str) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            w.fake.json_delay = 5.0
            client = await raw_open(w, "/generate", w.body("slow"))
            await wait_for(lambda: w.fake.active == 1, what="the model to start")
            close_with(client, how)
            m = w.backend.metrics
            await wait_for(lambda: m.cancelled.requests == 1, what="cancelled", timeout=2.0)
            await wait_for(lambda: w.fake.active == 0, what="upstream abandoned", timeout=2.0)
            assert w.settled()

    run(main())


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_disconnect_mid_stream(tmp_path: Path, how: str) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            w.fake.tokens = 1000
            w.fake.token_delay = 0.01
            client = await raw_open(w, "/generate_stream", w.body("stream"))
            status, _headers = await client.head()
            assert status == 200
            for _ in range(3):
                assert await client.chunk()
            close_with(client, how)
            m = w.backend.metrics
            await wait_for(lambda: m.cancelled.requests == 1, what="cancelled", timeout=3.0)
            await wait_for(lambda: w.fake.cancelled == 1, what="the model's stream cancelled")
            assert w.fake.active == 0
            assert m.served.requests == 0 and m.errored.requests == 0
            assert w.settled()

    run(main())


def test_model_crash_mid_stream_cuts_the_clients_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            w.fake.crash_after = 3
            w.fake.token_delay = 0.01
            client = await raw_open(w, "/generate_stream", w.body("crash"))
            try:
                status, headers = await client.head()
                assert status == 200 and headers["transfer-encoding"] == "chunked"
                chunks: list[bytes] = []
                with pytest.raises(asyncio.IncompleteReadError):
                    while True:
                        chunk = await client.chunk()
                        assert chunk, "the stream ended with a last chunk: a silent short success"
                        chunks.append(chunk)
                assert len(chunks) == 3
            finally:
                await client.close()
            m = w.backend.metrics
            await wait_for(lambda: m.errored.requests == 1, what="errored")
            assert m.served.requests == 0 and m.cancelled.requests == 0
            assert w.settled()

            # The worker is still fine afterwards.
            w.fake.crash_after = None
            assert (await w.post("/generate_stream", w.body())).status == 200

    run(main())


# Built-in routes, logging, hello_world ###########################################################


def test_ping(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel()  # never ready: /ping answers regardless
        async with worker_setup(tmp_path, fake=fake, ready=False) as w:
            reply = await w.get("/ping")
            assert (reply.status, reply.body) == (200, b"pong")

    run(main())


def test_healthcheck_forwards_to_the_models_health_endpoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path, handler=HealthGenerateHandler()) as w:
            reply = await w.get("/healthcheck")
            assert (reply.status, reply.body) == (200, b"ok")
            w.fake.healthy = False
            reply = await w.get("/healthcheck")
            assert reply.status == 503 and reply.json() == {"error": "unhealthy"}

    run(main())


def test_healthcheck_without_a_health_endpoint(tmp_path: Path) -> None:
    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            reply = await w.get("/healthcheck")
            assert reply.status == 200
            assert reply.json()["state"] == "ready"

    run(main())


SECRET_PROMPT = "zebra quokka platypus secret prompt"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pyworker.access"]


def assert_no_secrets(caplog: pytest.LogCaptureFixture, signatures: list[str]) -> None:
    """No log line of any logger, at any level, holds the prompt or a signature."""
    assert signatures
    for record in caplog.records:
        text = record.getMessage()
        assert SECRET_PROMPT not in text and "zebra" not in text, text
        for signature in signatures:
            assert signature[:24] not in text, text


async def send_and_check_access_log(
    w: Rig, caplog: pytest.LogCaptureFixture, requests: list[tuple[str, dict[str, Any], int]]
) -> None:
    """Send each request; expect one INFO line on pyworker.access naming its route and status."""
    caplog.clear()
    for route, body, status in requests:
        assert (await w.post(route, body)).status == status
    await wait_for(w.settled, what="all accounted")
    await asyncio.sleep(0.1)  # a line logged late would still be counted
    access = access_records(caplog)
    assert len(access) == len(requests), [r.getMessage() for r in access]
    for record, (route, _body, status) in zip(access, requests):
        assert record.levelno == logging.INFO
        assert route in record.getMessage() and f" {status}" in record.getMessage()


def test_access_log_one_line_per_served_request_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyworker")
    signatures: list[str] = []

    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            requests: list[tuple[str, dict[str, Any], int]] = []
            for route in ("/generate", "/generate_stream", "/generate"):
                body = {"auth_data": w.auth(), "payload": {"prompt": SECRET_PROMPT}}
                signatures.append(body["auth_data"]["signature"])
                requests.append((route, body, 200))
            await send_and_check_access_log(w, caplog, requests)
            for record in access_records(caplog):
                assert "workload=" in record.getMessage()

    run(main())
    assert_no_secrets(caplog, signatures)


def test_access_log_one_line_per_refused_request_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Requests refused before they reach the model (401, 422) are requests too: one line each.
    caplog.set_level(logging.DEBUG, logger="pyworker")
    signatures: list[str] = []

    async def main() -> None:
        async with worker_setup(tmp_path) as w:
            forged_auth, good_auth = w.auth(OTHER_KEY), w.auth()
            signatures.extend([forged_auth["signature"], good_auth["signature"]])
            forged = {"auth_data": forged_auth, "payload": {"prompt": SECRET_PROMPT}}
            bad_payload = {"auth_data": good_auth, "payload": {"prompt": 5, "x": SECRET_PROMPT}}
            unsigned = {"auth_data": {"reqnum": 1}, "payload": {"prompt": SECRET_PROMPT}}
            requests: list[tuple[str, dict[str, Any], int]] = [
                ("/generate", forged, 401),
                ("/generate_stream", bad_payload, 422),
                ("/generate", unsigned, 422),
            ]
            await send_and_check_access_log(w, caplog, requests)

    run(main())
    assert_no_secrets(caplog, signatures)


def test_hello_world_payload_and_token_count() -> None:
    payload = hello_world.InputData.for_test()
    words = payload.prompt.split()
    assert len(words) == 250 and set(words) <= set(hello_world.WORDS)
    assert 250 <= payload.count_workload() <= 400
    assert payload.max_response_tokens is not None and payload.max_response_tokens > 0
    assert hello_world.InputData.from_json_msg(payload.generate_payload_json()) == payload
    assert hello_world.InputData.for_test().prompt != payload.prompt  # random each time
    assert hello_world.count_tokens("") == 0
    assert hello_world.count_tokens("Hello, world!") == 4
    assert hello_world.count_tokens("a internationalization") > 2  # long words count more
    assert hello_world.InputData(prompt="cats").count_workload() == 1.0
