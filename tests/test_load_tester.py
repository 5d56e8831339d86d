"""Tests of test_load.py: the load tester, its report, its CLI and the --local setup.

The tester runs against a small fake autoscaler and fake worker defined here, whose delays
are fixed, so the percentiles it reports can be checked against what the servers did, and
whose failures are injected by request number, so every outcome count is known exactly.
The --local tests run the real command as a subprocess and check that no process it started
outlives it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from support import free_port

import hello_world
import pyworker
import test_load
from pyworker import HttpServer, Request, Response, error_response, json_response, post
from test_load import LoadOptions, LoadResult, LoadTester

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_LOAD = os.path.join(ROOT, "test_load.py")
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


closed_port = free_port  # a loopback port nobody listens on: connections to it are refused


# Fakes with known latencies ######################################################################

Plan = Callable[[int], str]  # call number (from 1) -> what to do


def always_ok(_: int) -> str:
    return "ok"


class FakeWorker:
    """POST /generate answers after `delay`; /generate_stream sends `tokens` SSE events,
    the first after `first_token`, then one every `token_delay`. `plan` injects failures:
    "500", "hang" (never answers) or "cut" (a stream broken off after 2 tokens)."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        tokens: int = 5,
        first_token: float = 0.0,
        token_delay: float = 0.0,
        plan: Plan = always_ok,
    ) -> None:
        self.delay = delay
        self.tokens = tokens
        self.first_token = first_token
        self.token_delay = token_delay
        self.plan = plan
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.server = HttpServer(
            [post("/generate", self.generate), post("/generate_stream", self.generate_stream)]
        )
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeWorker:
        self.port = await self.server.start()
        return self

    async def _accept(self, request: Request) -> str:
        self.calls += 1
        self.bodies.append(pyworker.json_loads(request.body))
        action = self.plan(self.calls)
        if action == "hang":
            await asyncio.sleep(3600)
        return action

    async def generate(self, request: Request) -> Response:
        if await self._accept(request) == "500":
            return error_response(500, "injected failure")
        await asyncio.sleep(self.delay)
        return json_response({"response": "hello", "tokens": 1})

    async def generate_stream(self, request: Request) -> Response:
        action = await self._accept(request)
        if action == "500":
            return error_response(500, "injected failure")
        return Response(content_type="text/event-stream", stream=self._events(action == "cut"))

    async def _events(self, cut: bool) -> AsyncIterator[bytes]:
        for i in range(self.tokens):
            await asyncio.sleep(self.first_token if i == 0 else self.token_delay)
            if cut and i == 2:
                raise ConnectionResetError("injected: stream cut")
            yield b'data: {"token": "t%d"}\n\n' % i


class FakeAutoscaler:
    """POST /route/ answers after `delay` with the worker's url and auth_data fields.
    `plan` injects failures: "401", "nourl" (no worker ready) or "dead" (a refused url)."""

    def __init__(self, worker_url: str, *, delay: float = 0.0, plan: Plan = always_ok) -> None:
        self.worker_url = worker_url
        self.dead_url = f"http://127.0.0.1:{closed_port()}"
        self.delay = delay
        self.plan = plan
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.server = HttpServer([post("/route/", self.route)])
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeAutoscaler:
        self.port = await self.server.start()
        return self

    async def route(self, request: Request) -> Response:
        self.calls += 1
        body: dict[str, Any] = pyworker.json_loads(request.body)
        self.bodies.append(body)
        await asyncio.sleep(self.delay)
        action = self.plan(self.calls)
        if action == "401":
            return error_response(401, "bad api_key")
        if action == "nourl":
            return json_response({"error": "no worker ready yet", "status": "loading"})
        url = self.dead_url if action == "dead" else self.worker_url
        return json_response(
            {
                "url": url,
                "signature": "c2ln",
                "cost": body["cost"],
                "endpoint": body["endpoint"],
                "reqnum": self.calls,
                "__request_id": "x",
            }
        )


async def load(
    worker: FakeWorker,
    autoscaler: FakeAutoscaler | None = None,
    **options: Any,
) -> LoadResult:
    """Start the fakes, run the tester against them (through the autoscaler if given)."""
    await worker.start()
    if autoscaler is not None:
        await autoscaler.start()
    defaults: dict[str, Any] = {"total": 20, "rps": 200.0, "progress": False}
    defaults.update(options)
    opts = LoadOptions(
        server=autoscaler.url if autoscaler is not None else None,
        worker=None if autoscaler is not None else worker.url,
        api_key="key",
        endpoint="ep",
        **defaults,
    )
    try:
        return await LoadTester(opts, hello_world.InputData.for_test, io.StringIO()).run()
    finally:
        await worker.server.shutdown(grace=0)
        if autoscaler is not None:
            await autoscaler.server.shutdown(grace=0)


def within(value: float | None, low: float, high: float) -> bool:
    return value is not None and low <= value <= high


# Latencies, counts, rate #########################################################################


def test_percentiles_match_known_server_latencies() -> None:
    async def main() -> LoadResult:
        worker = FakeWorker(delay=0.05)
        await worker.start()
        return await load(worker, FakeAutoscaler(worker.url, delay=0.02), total=40, rps=40)

    report = run(main()).report()
    latency = report["latency"]
    assert report["outcomes"]["ok"] == 40
    route, worker, total = latency["route"], latency["worker"], latency["total"]
    assert route["count"] == worker["count"] == total["count"] == 40
    # Never below what the servers waited; on loopback a few ms above (slack for slow CI).
    assert route["min"] >= 0.02 and within(route["p50"], 0.02, 0.045)
    assert worker["min"] >= 0.05 and within(worker["p50"], 0.05, 0.08)
    assert within(total["p50"], 0.07, 0.12)
    for summary in (route, worker, total):
        assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"] < 0.5
    assert report["stream"] is None


def test_counts_by_outcome_are_exact() -> None:
    # 60 route calls: those ending in 0 answer 401 (6), those ending in 5 point to a refused
    # port (6), 7, 27 and 47 find no worker ready (3). The worker gets the other 45: calls
    # 3, 6, ... answer 500 (15); 4, 8, 16, 20, 28, 32, 40, 44 hang past the timeout (8).
    def route_plan(call: int) -> str:
        return {0: "401", 5: "dead"}.get(call % 10) or ("nourl" if call % 20 == 7 else "ok")

    def worker_plan(call: int) -> str:
        return "500" if call % 3 == 0 else "hang" if call % 4 == 0 else "ok"

    async def main() -> tuple[FakeAutoscaler, FakeWorker, LoadResult]:
        worker = FakeWorker(plan=worker_plan)
        await worker.start()
        autoscaler = FakeAutoscaler(worker.url, plan=route_plan)
        return autoscaler, worker, await load(worker, autoscaler, total=60, timeout=0.5)

    autoscaler, worker, result = run(main())
    assert (autoscaler.calls, worker.calls) == (60, 45)  # one call each, never retried
    report = result.report()
    expected = {
        "ok": 45 - 15 - 8,
        "route_error": 6 + 3,
        "connect_error": 6,
        "timeout": 8,
        "broken": 0,
        "cancelled": 0,
        "http_500": 15,
    }
    assert report["outcomes"] == expected
    assert report["requests"] == {
        "asked": 60,
        "sent": 60,
        "finished": 60,
        "failed": 60 - expected["ok"],
        "interrupted": False,
    }
    assert report["http_status"] == {"200": expected["ok"], "500": 15}
    assert not result.ok
    kinds = {
        (k["outcome"], k["stage"], k["message"][:8]): k["count"] for k in report["error_kinds"]
    }
    assert kinds[("http_500", "worker", '{"error"')] == 15
    assert kinds[("route_error", "route", "HTTP 401")] == 6
    assert kinds[("route_error", "route", "no worke")] == 3
    assert sum(k["count"] for k in report["error_kinds"] if k["outcome"] == "connect_error") == 6
    assert len(report["errors"]) == test_load.ERROR_SAMPLES
    # Percentiles describe the successful requests only.
    assert report["latency"]["worker"]["count"] == expected["ok"]


def test_rate_within_10_percent_of_asked() -> None:
    async def main() -> LoadResult:
        worker = FakeWorker(delay=0.01)
        await worker.start()
        return await load(worker, FakeAutoscaler(worker.url), total=100, rps=50)

    report = run(main()).report()
    assert report["outcomes"]["ok"] == 100
    assert within(report["rate"]["sent"], 45, 55)
    assert within(report["elapsed"], 1.98, 2.5)  # 99 intervals of 20 ms, then the last answer
    assert report["in_flight"]["held_back"] == 0


def test_slow_answers_do_not_slow_the_sender() -> None:
    # Open loop: at 50 rps with half-second answers, about 25 requests are in flight and the
    # rate holds. A closed-loop tester would have sent at the pace of the answers.
    async def main() -> LoadResult:
        worker = FakeWorker(delay=0.5)
        await worker.start()
        return await load(worker, FakeAutoscaler(worker.url), total=50, rps=50)

    report = run(main()).report()
    assert report["outcomes"]["ok"] == 50
    assert within(report["rate"]["sent"], 45, 55)
    assert 20 <= report["in_flight"]["max"] <= 30
    assert within(report["latency"]["worker"]["p50"], 0.5, 0.6)


def test_in_flight_limit_holds_the_sender_back() -> None:
    async def main() -> LoadResult:
        return await load(FakeWorker(delay=0.1), total=20, rps=1000, max_in_flight=4)

    report = run(main()).report()
    assert report["outcomes"]["ok"] == 20
    assert report["in_flight"]["max"] == 4
    assert report["in_flight"]["held_back"] > 0
    assert report["in_flight"]["max_send_lag"] >= 0.3  # 20 requests, 4 at a time, 0.1 s each


def test_stream_timings_and_broken_streams() -> None:
    # Tokens: the first 50 ms after the request, then one every 20 ms; every 5th stream is
    # cut after 2 tokens and must count as broken, never as a short success.
    def plan(call: int) -> str:
        return "cut" if call % 5 == 0 else "ok"

    async def main() -> LoadResult:
        worker = FakeWorker(tokens=6, first_token=0.05, token_delay=0.02, plan=plan)
        await worker.start()
        return await load(
            worker, FakeAutoscaler(worker.url), total=20, rps=100, route="/generate_stream"
        )

    report = run(main()).report()
    assert report["outcomes"]["ok"] == 16
    assert report["outcomes"]["broken"] == 4
    stream = report["stream"]
    assert stream["requests"] == 16 and stream["tokens"] == 16 * 6
    assert within(stream["ttft"]["p50"], 0.05, 0.075)
    assert stream["itl"]["count"] == 16 * 5
    assert within(stream["itl"]["p50"], 0.015, 0.03)  # arrivals jitter both ways
    assert within(stream["stream_tokens_per_s"]["p50"], 33, 55)  # 1 token per 20 ms: 50/s
    assert within(report["latency"]["worker"]["p50"], 0.15, 0.2)  # 50 + 5 x 20 ms


def test_direct_worker_mode_sends_complete_unsigned_auth_data() -> None:
    worker = FakeWorker()
    result = run(load(worker, total=5))
    assert result.ok
    assert result.report()["target"]["mode"] == "worker"
    for body in worker.bodies:
        # the whole /route/ answer is the auth_data (SPEC 11.1); this one is the seed's
        assert {"signature", "cost", "endpoint", "reqnum", "url"} <= set(body["auth_data"])
        assert body["auth_data"]["url"] == worker.url
        hello_world.InputData.from_json_msg(body["payload"])  # the worker's own parser


def test_route_call_and_payload_follow_the_protocol() -> None:
    async def main() -> tuple[FakeWorker, FakeAutoscaler, LoadResult]:
        worker = FakeWorker()
        await worker.start()
        autoscaler = FakeAutoscaler(worker.url)
        return worker, autoscaler, await load(worker, autoscaler, total=5)

    worker, autoscaler, result = run(main())
    assert result.ok
    for route, body in zip(autoscaler.bodies, worker.bodies):
        # today's /route/ (SPEC 11.6) adds request_idx and replay_timeout to the seed's three
        assert set(route) == {"endpoint", "api_key", "cost", "request_idx", "replay_timeout"}
        assert route["endpoint"] == "ep" and route["api_key"] == "key"
        payload = hello_world.InputData.from_json_msg(body["payload"])
        assert route["cost"] == payload.count_workload()
        # Exactly the five signed fields, as the route call answered them.
        # the whole /route/ answer is the auth_data (SPEC 11.1); this one is the seed's
        assert {"signature", "cost", "endpoint", "reqnum", "url"} <= set(body["auth_data"])
        assert body["auth_data"]["cost"] == route["cost"]


def test_interrupt_returns_a_partial_result() -> None:
    async def main() -> LoadResult:
        worker = FakeWorker(delay=1.0)
        await worker.start()
        options = LoadOptions(total=1000, rps=100, server=None, worker=worker.url, progress=False)
        tester = LoadTester(options, hello_world.InputData.for_test, io.StringIO())
        asyncio.get_running_loop().call_later(0.3, tester.interrupt)
        started = time.monotonic()
        result = await asyncio.wait_for(tester.run(), 5)
        assert time.monotonic() - started < 1.0  # did not wait for the 1 s answers
        await worker.server.shutdown(grace=0)
        return result

    report = run(main()).report()
    assert report["requests"]["interrupted"]
    assert 10 <= report["requests"]["sent"] < 1000
    assert report["outcomes"]["cancelled"] == report["requests"]["sent"]


# Progress ########################################################################################


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_cls", [io.StringIO, Terminal])
def test_progress_line(stream_cls: type[io.StringIO]) -> None:
    out = stream_cls()

    async def main() -> None:
        worker = FakeWorker(delay=0.05)
        await worker.start()
        options = LoadOptions(
            total=20, rps=50, server=None, worker=worker.url, progress_interval=0.1
        )
        await LoadTester(options, hello_world.InputData.for_test, out).run()
        await worker.server.shutdown(grace=0)

    run(main())
    text = out.getvalue()
    assert "sent " in text and "in flight" in text and "errors: none" in text
    if stream_cls is Terminal:  # one line redrawn, finished by a newline
        assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
        assert "sent 20/20" in text.rsplit("\r", 1)[-1]
    else:  # plain lines, no carriage returns
        assert "\r" not in text and len(text.splitlines()) >= 2


# Report, CLI, exit status ########################################################################

SUMMARY_KEYS = {"count", "mean", "min", "p50", "p90", "p99", "max"}


def check_schema(report: dict[str, Any]) -> None:
    """The --json schema that LoadResult.report() documents."""
    assert report["schema"] == "pyworker-load-test/1"
    assert set(report["target"]) == {"mode", "server", "worker", "route", "endpoint"}
    assert report["target"]["mode"] in ("autoscaler", "worker", "local")
    assert set(report["requests"]) == {"asked", "sent", "finished", "failed", "interrupted"}
    assert set(test_load.OUTCOMES) <= set(report["outcomes"])
    for key, count in report["outcomes"].items():
        assert key in test_load.OUTCOMES or key.startswith("http_")
        assert isinstance(count, int)
    assert sum(report["outcomes"].values()) == report["requests"]["sent"]
    assert all(isinstance(v, int) for v in report["http_status"].values())
    assert set(report["rate"]) == {"asked", "sent", "completed"}
    assert isinstance(report["elapsed"], float)
    assert set(report["in_flight"]) == {"limit", "max", "held_back", "max_send_lag"}
    assert set(report["latency"]) == {"route", "worker", "total"}
    for summary in report["latency"].values():
        assert summary is None or set(summary) == SUMMARY_KEYS
    stream = report["stream"]
    if stream is not None:
        assert set(stream) == {
            "requests",
            "tokens",
            "tokens_per_s",
            "ttft",
            "itl",
            "stream_tokens_per_s",
        }
    for seen in report["workers"].values():
        assert set(seen) == {"requests", "ok"}
    for error in report["errors"]:
        assert set(error) == {"index", "outcome", "stage", "worker", "message"}
    for kind in report["error_kinds"]:
        assert set(kind) == {"outcome", "stage", "message", "count"}


def test_cli_json_report_and_exit_status(tmp_path: Any) -> None:
    path = str(tmp_path / "report.json")

    async def main(plan: Plan, route: str) -> int:
        worker = await FakeWorker(plan=plan).start()
        autoscaler = await FakeAutoscaler(worker.url).start()
        argv = ["--server", autoscaler.url, "-k", "key", "-e", "ep", "-n", "10", "-rps", "100"]
        argv += ["--route", route, "--json", path, "-q"]
        try:
            return await test_load.amain(argv, out=io.StringIO())
        finally:
            await worker.server.shutdown(grace=0)
            await autoscaler.server.shutdown(grace=0)

    assert run(main(always_ok, "/generate")) == 0
    with open(path) as f:
        report = json.load(f)
    check_schema(report)
    assert report["outcomes"]["ok"] == 10 and report["target"]["mode"] == "autoscaler"

    def one_500(call: int) -> str:
        return "500" if call == 4 else "ok"

    assert run(main(one_500, "/generate_stream")) == 1  # a single failure fails the run
    with open(path) as f:
        report = json.load(f)
    check_schema(report)
    assert report["outcomes"]["http_500"] == 1 and report["stream"]["requests"] == 9


def test_cli_subprocess_exit_status() -> None:
    # A worker nobody listens on: every request fails, so the exit status is 1.
    dead = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(
        [sys.executable, TEST_LOAD, "--worker", dead, "-n", "3", "-rps", "100", "-q"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "connect error 3" in proc.stdout
    # Bad usage: 2, with a message.
    for argv in (["-n", "0"], ["-rps", "x"], ["--route", "generate"], ["-k", "k"]):
        proc = subprocess.run(
            [sys.executable, TEST_LOAD, *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, argv
        assert "error" in proc.stderr


def test_import_has_no_side_effects() -> None:
    code = "import test_load, threading, asyncio; assert threading.active_count() == 1"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout, proc.stderr


# Pieces ##########################################################################################


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert abs(test_load.percentile(values, 50) - 50.5) < 1e-9
    assert abs(test_load.percentile(values, 90) - 90.1) < 1e-9
    assert test_load.percentile(values, 100) == 100.0
    assert test_load.percentile([3.0], 99) == 3.0
    summary = test_load.summarize([0.3, 0.1, 0.2])
    assert summary is not None and abs(summary["p50"] - 0.2) < 1e-9
    assert summary["min"] == 0.1 and summary["max"] == 0.3
    assert test_load.summarize([]) is None


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_token_counter_counts_sse_events_across_chunks(size: int) -> None:
    data = b'data: {"t": 1}\n\n: comment\n\ndata: {"t": 2}\n\nevent: x\ndata: 3\n\n'
    counter = test_load._TokenCounter(sse=True)  # pyright: ignore[reportPrivateUsage]
    total = sum(counter.feed(data[i : i + size]) for i in range(0, len(data), size))
    assert total == 3
    plain = test_load._TokenCounter(sse=False)  # pyright: ignore[reportPrivateUsage]
    assert plain.feed(b"abc") == 1 and plain.feed(b"") == 0


def test_load_payload_class(tmp_path: Any) -> None:
    assert test_load.load_payload_class() is hello_world.InputData
    assert test_load.load_payload_class("hello_world") is hello_world.InputData
    worker = tmp_path / "two_payloads.py"
    worker.write_text(
        "import dataclasses\n"
        "from hello_world import InputData\n"
        "@dataclasses.dataclass\n"
        "class Image(InputData):\n"
        "    steps: int = 20\n"
        "@dataclasses.dataclass\n"
        "class Audio(InputData):\n"
        "    seconds: int = 5\n"
    )
    with pytest.raises(ValueError, match="several"):
        test_load.load_payload_class(str(worker))
    cls = test_load.load_payload_class(f"{worker}:Audio")
    assert cls.__name__ == "Audio"
    with pytest.raises(ValueError, match="no worker file"):
        test_load.load_payload_class(str(tmp_path / "missing.py"))


def test_local_autoscaler_spreads_load_between_reports() -> None:
    # Regression: a worker that reported slightly less load got every request until the next
    # report (a routed request only added 1e-3 to its load).
    async def main() -> dict[str, int]:
        autoscaler = await test_load.LocalAutoscaler(test_load.RsaPrivateKey.generate(1024)).start()
        client = pyworker.HttpClient(autoscaler.url)
        try:
            for url, cur_load in (("http://a", 100.0), ("http://b", 120.0)):
                report = {"url": url, "max_perf": 1000.0, "cur_load": cur_load, "error_msg": ""}
                async with await client.request(
                    "POST", "/worker_status/", pyworker.json_dumps(report)
                ) as resp:
                    assert resp.status == 200
            routed = {"http://a": 0, "http://b": 0}
            for _ in range(20):
                route = {"endpoint": "local", "api_key": "local-key", "cost": 50}
                async with await client.request(
                    "POST", "/route/", pyworker.json_dumps(route)
                ) as resp:
                    routed[(await resp.json())["url"]] += 1
            return routed
        finally:
            await client.close()
            await autoscaler.stop()

    routed = run(main())
    assert routed["http://a"] in (10, 11) and routed["http://b"] in (9, 10)


def test_fake_model_stream_closed_before_its_first_token_is_settled() -> None:
    # Regression: `active` leaked when a stream was closed before its first step, and with
    # one_at_a_time every later request was then refused.
    async def main() -> None:
        model = await test_load.FakeModel(one_at_a_time=True).start()
        head = b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n"
        request = pyworker.parse_request_head(head)
        request.body = b'{"prompt": "hi"}'
        try:
            response = await model._generate_stream(request)  # pyright: ignore[reportPrivateUsage]
            assert model.active == 1 and response.stream is not None
            await response.stream.aclose()  # type: ignore[attr-defined]
            assert model.active == 0 and model.cancelled == 1
        finally:
            await model.stop()

    run(main())


def test_fake_model_realistic_pacing() -> None:
    async def main() -> tuple[float, list[float]]:
        model = await test_load.FakeModel.realistic(tokens=5, jitter=0.0).start()
        client = pyworker.HttpClient(model.url)
        body = pyworker.json_dumps({"prompt": "hi", "max_response_tokens": None})
        try:
            started = time.monotonic()
            async with await client.request("POST", "/generate", body) as resp:
                await resp.read()
            json_time = time.monotonic() - started
            started = time.monotonic()
            arrivals: list[float] = []
            async with await client.request("POST", "/generate_stream", body) as resp:
                async for _ in resp.iter_chunks():
                    arrivals.append(time.monotonic() - started)
            return json_time, arrivals
        finally:
            await client.close()
            await model.stop()

    json_time, arrivals = run(main())
    assert within(json_time, 0.05 + 5 * 0.015, 0.2)  # as long as the stream takes
    assert len(arrivals) == 5 and within(arrivals[0], 0.065, 0.1)


# --local, end to end #############################################################################

FAST_MODEL = [
    "--model-load-time",
    "0.2",
    "--model-token-delay",
    "0.002",
    "--model-first-token-delay",
    "0",
]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_leftovers(pids: list[int]) -> None:
    """If a test failed half-way, do not leave its workers running."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_local_end_to_end(tmp_path: Any) -> None:
    path = str(tmp_path / "local.json")
    argv = [sys.executable, TEST_LOAD, "--local", "--workers", "2", "-n", "30", "-rps", "30"]
    argv += ["--route", "/generate_stream", "--json", path, "--keep", *FAST_MODEL]
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    pids: list[int] = []
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(path) as f:
            report = json.load(f)
        check_schema(report)
        local = report["local"]
        pids = [w["pid"] for w in local["workers"]]
        assert len(pids) == 2
        assert report["target"]["mode"] == "local"
        assert report["outcomes"]["ok"] == 30 and report["stream"]["tokens"] == 30 * 16
        assert set(report["workers"]) == {w["url"] for w in local["workers"]}
        for worker in local["workers"]:
            last = worker["last_report"]
            assert last["url"] == worker["url"] and last["max_perf"] > 0
            assert worker["reports"] >= 2 and worker["loadtime"] > 0
            assert last["id"] == worker["index"]
        assert "load reports of each worker" in proc.stdout
        for worker in local["workers"]:
            with open(worker["log"]) as f:
                log = f.read()
            # Secured: it fetched the autoscaler's key and checked every request's signature.
            assert "public key loaded" in log and "UNSECURED" not in log
            assert "benchmark:" in log  # its own benchmark, in its own directory
            directory = os.path.dirname(worker["log"])
            assert os.path.isfile(os.path.join(directory, ".has_benchmark"))
        assert f"logs kept in {local['directory']}" in proc.stdout  # --keep
        for pid in pids:
            assert not alive(pid), f"worker pid {pid} outlived test_load.py"
    finally:
        kill_leftovers(pids)
        if "local setup in " in proc.stdout:
            shutil.rmtree(report_dir(proc.stdout), ignore_errors=True)


def report_dir(stdout: str) -> str:
    """The working directory a --local run names on its first line."""
    return stdout.split("local setup in ", 1)[1].split(":", 1)[0]


def test_local_secured_workers_and_setup_failure(tmp_path: Any) -> None:
    # A worker file that dies at start: a clear error naming its log, status 3, logs kept,
    # nothing left running.
    bad = tmp_path / "bad_worker.py"
    bad.write_text(
        "from hello_world import backend, routes\n"
        "import os, sys\n"
        "if __name__ == '__main__':\n"
        "    print('UNSECURED=' + os.environ.get('UNSECURED', '<unset>'))\n"
        "    sys.exit('cannot load weights')\n"
    )
    argv = [sys.executable, TEST_LOAD, "--local", "--worker-module", str(bad), "-n", "5"]
    proc = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UNSECURED": "true"},  # the local setup must not pass it on
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "worker 1 exited with status 1 before it was ready" in proc.stdout
    assert "cannot load weights" in proc.stdout
    assert "UNSECURED=<unset>" in proc.stdout
    log = proc.stdout.split("its log is ", 1)[1].split(":\n", 1)[0]
    assert os.path.isfile(log)  # kept, since the run failed
    assert f"logs kept in {report_dir(proc.stdout)}" in proc.stdout
    pids = worker_pids(proc.stdout)
    assert pids and not any(alive(pid) for pid in pids)
    shutil.rmtree(report_dir(proc.stdout), ignore_errors=True)


def worker_pids(stdout: str) -> list[int]:
    """The pids a --local run prints as it starts its workers."""
    return [
        int(line.split(": pid ")[1].split(",")[0])
        for line in stdout.splitlines()
        if ": pid " in line
    ]


def test_local_ctrl_c_shuts_everything_down_bare_interpreter(tmp_path: Any) -> None:
    # python -S: no site-packages (no orjson, no uvloop), as on a machine where
    # `pip install -r requirements.txt` never ran; its workers run bare too.
    out_path = tmp_path / "out.txt"
    argv = [sys.executable, "-S", TEST_LOAD, "--local", "-n", "100000", *FAST_MODEL]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "ready after" not in text and time.monotonic() < deadline:
            assert proc.poll() is None, out_path.read_text()
            time.sleep(0.2)
            text = out_path.read_text()
        pids = worker_pids(text)
        assert pids and all(alive(pid) for pid in pids), text
        time.sleep(1.0)  # under load
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        text = out_path.read_text()
        assert "(interrupted)" in text and "stopped" in text
        assert "ok " in text.split("requests ", 1)[1].split("\n", 1)[0]
        assert not os.path.exists(report_dir(text))  # an interrupted run cleans up too
        for pid in pids:
            assert not alive(pid), f"worker pid {pid} outlived test_load.py"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(pids)
