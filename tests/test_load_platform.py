"""Tests of test_load.py against today's platform (SPEC 11): route polling, the local
autoscaler's `url` signatures, request_idx, mtoken and report checks, reconciliation of
completion reports, --platform 2024, -l alone, --worker readiness, FakeModel's any-route API
and stream token counts. Real sockets on loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, Runner, signing_key, spawned_worker, unsecured_vars, until

import hello_world
import pyworker
import test_load
from pyworker import HttpServer, Request, Response, error_response, json_response, post
from test_load import LoadOptions, LoadResult, LoadTester, LocalAutoscaler

run = Runner(60.0)
FAST_MODEL = [
    "--model-load-time",
    "0.2",
    "--model-token-delay",
    "0.002",
    "--model-first-token-delay",
    "0",
]
FAST_LOCAL = ["-n", "12", "-rps", "40", "-q", *FAST_MODEL]


# Fakes ###########################################################################################


class EchoWorker:
    """POST /generate answers 200 JSON and keeps every body and Authorization header."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.server = HttpServer([post("/generate", self.generate)])
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> EchoWorker:
        self.port = await self.server.start("127.0.0.1", 0)
        return self

    async def generate(self, request: Request) -> Response:
        self.bodies.append(pyworker.json_loads(request.body))
        return json_response({"response": "hi", "tokens": 1})


class PollingAutoscaler:
    """POST /route/ answers "wait" (no url) `waits` times per request, then the url; with
    `seed`, answers as the 2024 autoscaler did (no request_idx, always a url)."""

    def __init__(self, worker_url: str, *, waits: int = 2, seed: bool = False) -> None:
        self.worker_url = worker_url
        self.waits = waits
        self.seed = seed
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[str | None] = []
        self.next_idx = 100
        self.polls: dict[int, int] = {}
        self.server = HttpServer([post("/route/", self.route)])
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> PollingAutoscaler:
        self.port = await self.server.start("127.0.0.1", 0)
        return self

    async def route(self, request: Request) -> Response:
        body: dict[str, Any] = pyworker.json_loads(request.body)
        self.bodies.append(body)
        self.headers.append(request.headers.get("authorization"))
        auth = {"signature": "c2ln", "cost": body["cost"], "endpoint": body["endpoint"]}
        if self.seed:
            return json_response({**auth, "reqnum": len(self.bodies), "url": self.worker_url})
        idx = body.get("request_idx") or 0
        if idx == 0:
            self.next_idx += 1
            idx = self.next_idx
        self.polls[idx] = self.polls.get(idx, 0) + 1
        if self.polls[idx] <= self.waits:
            return json_response({"request_idx": idx, "status": "waiting"})
        answer = {**auth, "reqnum": idx, "request_idx": idx, "url": self.worker_url}
        return json_response({**answer, "__request_id": f"r{idx}"})


async def load_via(
    autoscaler_url: str, total: int = 3, **options: Any
) -> tuple[LoadResult, io.StringIO]:
    out = io.StringIO()
    opts = LoadOptions(
        total=total,
        rps=50.0,
        server=autoscaler_url,
        api_key="key",
        endpoint="ep",
        progress=False,
        timeout=20.0,
        **options,
    )
    result = await LoadTester(opts, hello_world.InputData.for_test, out).run()
    return result, out


# Route mode ######################################################################################


def test_route_polls_until_a_url_and_reports_the_wait() -> None:
    async def main() -> tuple[EchoWorker, PollingAutoscaler, LoadResult]:
        worker = await EchoWorker().start()
        scaler = await PollingAutoscaler(worker.url, waits=2).start()
        try:
            result, _ = await load_via(scaler.url, total=3)
            return worker, scaler, result
        finally:
            await worker.server.shutdown(grace=0)
            await scaler.server.shutdown(grace=0)

    worker, scaler, result = run(main())
    assert result.ok, result.render()
    assert len(scaler.bodies) == 9  # three calls per request: wait, wait, url
    firsts = [b for b in scaler.bodies if b["request_idx"] == 0]
    assert len(firsts) == 3
    for body in scaler.bodies:
        assert set(body) == {"endpoint", "api_key", "cost", "request_idx", "replay_timeout"}
        assert body["replay_timeout"] == 60.0
    # The polls echo the request_idx each first answer handed out.
    polled = [b["request_idx"] for b in scaler.bodies if b["request_idx"]]
    assert sorted(set(polled)) == [101, 102, 103] and len(polled) == 6
    assert scaler.headers == ["Bearer key"] * 9
    # The worker got the whole answer as auth_data, and session_id null.
    for body in worker.bodies:
        assert body["session_id"] is None
        assert body["auth_data"]["request_idx"] in (101, 102, 103)
        assert body["auth_data"]["__request_id"].startswith("r")
    report = result.report()
    wait = report["route_wait"]
    assert wait["requests"] == 3 and wait["polls"] == 6
    # Two pauses, 0.125-0.25 s then 0.25-0.5 s: within the route time.
    assert wait["wait"]["min"] >= 0.37 and wait["wait"]["max"] <= 0.76
    assert report["latency"]["route"]["min"] >= wait["wait"]["min"]
    assert "route wait" in result.render()
    assert sorted(r.request_idx or 0 for r in result.records) == [101, 102, 103]


def test_seed_style_route_answers_still_work() -> None:
    async def main() -> tuple[EchoWorker, LoadResult]:
        worker = await EchoWorker().start()
        scaler = await PollingAutoscaler(worker.url, seed=True).start()
        try:
            result, _ = await load_via(scaler.url, total=4)
            return worker, result
        finally:
            await worker.server.shutdown(grace=0)
            await scaler.server.shutdown(grace=0)

    worker, result = run(main())
    assert result.ok, result.render()
    assert result.report()["route_wait"]["requests"] == 0
    assert all(r.request_idx is None for r in result.records)
    assert len(worker.bodies) == 4


def test_platform_2024_tester_sends_the_seed_calls() -> None:
    async def main() -> tuple[EchoWorker, PollingAutoscaler, LoadResult]:
        worker = await EchoWorker().start()
        scaler = await PollingAutoscaler(worker.url, seed=True).start()
        try:
            result, _ = await load_via(scaler.url, total=2, platform="2024")
            return worker, scaler, result
        finally:
            await worker.server.shutdown(grace=0)
            await scaler.server.shutdown(grace=0)

    worker, scaler, result = run(main())
    assert result.ok
    assert all(set(b) == {"endpoint", "api_key", "cost"} for b in scaler.bodies)
    for body in worker.bodies:
        assert set(body) == {"auth_data", "payload"}
        assert set(body["auth_data"]) == {"signature", "cost", "endpoint", "reqnum", "url"}


# The local autoscaler ############################################################################


async def post_json(url: str, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    client = pyworker.HttpClient(url)
    try:
        async with await client.request(
            "POST", path, pyworker.json_dumps(body), headers=list(headers.items()), timeout=10
        ) as resp:
            return resp.status, await resp.json()
    finally:
        await client.close()


def good_report(url: str, token: str, **fields: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "id": 1,
        "mtoken": token,
        "version": "1.1.0",
        "loadtime": 1.5,
        "cur_load": 0.0,
        "rej_load": 0.0,
        "new_load": 0.0,
        "error_msg": "",
        "max_perf": 100.0,
        "cur_perf": 0.0,
        "cur_capacity": 0,
        "max_capacity": 0,
        "num_requests_working": 0,
        "num_requests_recieved": 0,
        "additional_disk_usage": 0.0,
        "disk_usage": 1.0,
        "working_request_idxs": [],
        "url": url,
    }
    report.update(fields)
    return report


def test_local_autoscaler_signs_url_layout_that_pyworker_accepts(tmp_path: Path) -> None:
    async def main() -> None:
        model = await test_load.FakeModel().start()
        scaler = await LocalAutoscaler(signing_key(), master_token="tok").start()
        log = tmp_path / "model.log"
        log.write_text(test_load.FakeModel.LOADED_LINE + "\n")
        env = unsecured_vars(log, model.url, scaler.url, MASTER_TOKEN="tok")
        del env["UNSECURED"]  # secured: it fetches /pubkey/ and checks every signature
        env["SIGNATURE_LAYOUTS"] = "url"  # only today's layout
        try:
            async with spawned_worker(tmp_path, **env) as process:
                url = f"http://127.0.0.1:{process.port}"
                await until(
                    lambda: url in scaler.workers and scaler.workers[url].ready, 40, "ready"
                )
                seen: set[int] = set()
                auth: dict[str, Any] = {}
                for _ in range(3):
                    route = {"endpoint": "local", "api_key": "local-key", "cost": 5}
                    route |= {"request_idx": 0, "replay_timeout": 60.0}
                    status, auth = await post_json(
                        scaler.url, "/route/", route, Authorization="Bearer local-key"
                    )
                    assert status == 200 and auth["url"] == url
                    assert auth["request_idx"] not in seen
                    seen.add(auth["request_idx"])
                    payload = {"prompt": "hi there"}
                    body = {"auth_data": auth, "session_id": None, "payload": payload}
                    status, _ = await post_json(url, "/generate", body)
                    assert status == 200
                # A forged signature is refused: the worker really checks.
                forged: dict[str, Any] = {**auth, "signature": auth["signature"][:-4] + "AAA="}
                del forged["request_idx"]  # not a routed request: no completion to reconcile
                status, _ = await post_json(url, "/generate", {"auth_data": forged, "payload": {}})
                assert status in (401, 422)
                await until(lambda: set(scaler.completions) >= seen, 10, "completion reports")
                assert not scaler.faults, scaler.faults
                assert scaler.reports and all(r["mtoken"] == "tok" for r in scaler.reports)
                client = {idx: ("Success",) for idx in seen}
                assert scaler.reconcile(client).ok
        finally:
            await model.stop()
            await scaler.stop()

    run(main())


def test_local_autoscaler_request_idx_mtoken_and_report_checks() -> None:
    async def main() -> None:
        scaler = await LocalAutoscaler(signing_key(), master_token="secret").start()
        try:
            worker = "http://127.0.0.1:9"
            # Wrong or missing mtoken: 401, recorded nowhere.
            for token in ("wrong", None):
                report = good_report(worker, "x")
                report["mtoken"] = token
                status, _ = await post_json(scaler.url, "/worker_status/", report)
                assert status == 401
                body: dict[str, Any] = {"worker_id": 1, "mtoken": token, "requests": []}
                status, _ = await post_json(scaler.url, "/delete_requests/", body)
                assert status == 401
            assert scaler.reports == [] and scaler.unauthorized == 4
            # No worker ready: a wait answer, with a request_idx to poll with.
            route = {"endpoint": "local", "api_key": "local-key", "cost": 1, "request_idx": 0}
            status, waiting = await post_json(scaler.url, "/route/", route)
            assert status == 200 and "url" not in waiting and waiting["request_idx"] >= 1
            # A good report: no fault; then the polled request keeps its request_idx.
            status, _ = await post_json(
                scaler.url, "/worker_status/", good_report(worker, "secret")
            )
            assert status == 200 and not scaler.faults
            polled = {**route, "request_idx": waiting["request_idx"]}
            status, answer = await post_json(scaler.url, "/route/", polled)
            assert answer["request_idx"] == waiting["request_idx"] and answer["url"] == worker
            idxs = [answer["request_idx"]]
            for _ in range(20):
                status, answer = await post_json(scaler.url, "/route/", route)
                idxs.append(answer["request_idx"])
            assert len(set(idxs)) == len(idxs)  # unique
            # A wrong report: a string where a number goes, a missing field, an extra one.
            bad = good_report(worker, "secret", cur_load="3", extra=1)
            del bad["disk_usage"]
            status, _ = await post_json(scaler.url, "/worker_status/", bad)
            assert len(scaler.faults) == 1
            fault = scaler.faults[0]
            assert "cur_load" in fault and "disk_usage" in fault and "extra" in fault
            # A bool is no number either; nor a list of strings a list of request_idx.
            bad = good_report(worker, "secret", max_perf=True, working_request_idxs=["1"])
            await post_json(scaler.url, "/worker_status/", bad)
            assert len(scaler.faults) == 2 and "max_perf" in scaler.faults[1]
            assert "working_request_idxs" in scaler.faults[1]
            # The start-failure report (SPEC 11.6) is not a fault.
            failed = {"id": 1, "mtoken": "secret", "version": "1.1.0", "url": worker}
            await post_json(scaler.url, "/worker_status/", {**failed, "error_msg": "no port"})
            assert len(scaler.faults) == 2
        finally:
            await scaler.stop()

    run(main())


def test_reconciliation_detects_duplicates_mismatches_and_missing() -> None:
    scaler = LocalAutoscaler(signing_key())
    scaler.routed = {1: "w", 2: "w", 3: "w", 4: "w"}

    def entry(idx: int, status: str) -> dict[str, Any]:
        return pyworker.completion(idx, status, 1.0)

    scaler.add_completions([entry(1, "Success"), entry(2, "Success"), entry(3, "Error")])
    scaler.add_completions([entry(1, "Success")])  # a duplicate
    scaler.add_completions([entry(9, "Success")])  # never routed
    client = {1: ("Success",), 2: ("Rejected",), 3: ("Error", "Cancelled"), 4: ("Success",)}
    result = scaler.reconcile(client)
    assert not result.ok
    assert result.twice == [1] and result.missing == [4] and result.unknown == [9]
    assert len(result.mismatches) == 1 and result.mismatches[0].startswith("2:")
    assert result.line() == (
        "routed 4, completed 3, missing 1, twice 1, status mismatches 1, unknown 1"
    )
    clean = LocalAutoscaler(signing_key())
    clean.routed = {1: "w"}
    clean.add_completions([entry(1, "Success")])
    assert clean.reconcile({1: ("Success",)}).line() == (
        "routed 1, completed 1, missing 0, twice 0, status mismatches 0"
    )
    # What the client saw -> the statuses a worker may report.
    assert test_load.expected_statuses(200, "ok") == ("Success",)
    for status in (401, 429, 503):
        assert test_load.expected_statuses(status, f"http_{status}") == ("Rejected",)
    assert test_load.expected_statuses(500, "http_500") == ("Error", "Cancelled")
    assert test_load.expected_statuses(None, "timeout") == ("Error", "Cancelled")


# --local end to end ##############################################################################


def test_local_run_reconciles_every_request(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    out = io.StringIO()
    argv = ["--local", *FAST_LOCAL, "--json", str(path)]
    status = run(test_load.amain(argv, out=out), timeout=90)
    text = out.getvalue()
    assert status == 0, text
    assert "reconciled  routed 12, completed 12, missing 0, twice 0, status mismatches 0" in text
    report = json.loads(path.read_text())
    reconciliation = report["reconciliation"]
    assert reconciliation["checked"] and reconciliation["ok"]
    assert reconciliation["report_faults"] == [] and reconciliation["unauthorized"] == 0
    # The worker sent today's reports, with its MASTER_TOKEN.
    last = report["local"]["workers"][0]["last_report"]
    assert last["version"] == "1.1.0" and last["mtoken"]


def test_local_run_fails_on_a_duplicate_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that reports a request twice: the autoscaler records it twice, and the run
    # fails with the reconciliation line saying so.
    original = LocalAutoscaler.add_completions

    def twice(self: LocalAutoscaler, entries: Any) -> None:
        entries = list(entries)
        original(self, entries)
        original(self, entries[:1])

    monkeypatch.setattr(LocalAutoscaler, "add_completions", twice)
    out = io.StringIO()
    status = run(test_load.amain(["--local", *FAST_LOCAL], out=out), timeout=90)
    text = out.getvalue()
    assert status == 1, text
    line = next(x for x in text.splitlines() if x.startswith("reconciled"))
    assert "missing 0" in line and "twice 0" not in line, line


def test_local_platform_2024() -> None:
    out = io.StringIO()
    status = run(test_load.amain(["--local", "--platform", "2024", *FAST_LOCAL], out=out), 90)
    text = out.getvalue()
    assert status == 0, text
    assert "reconciled  not checked: --platform 2024" in text
    assert "ok 12" in text


# -l alone ########################################################################################


def test_l_alone_uses_the_local_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> tuple[int, str, EchoWorker]:
        worker = await EchoWorker().start()
        scaler = await LocalAutoscaler(signing_key(), master_token="tok").start()
        monkeypatch.setattr(test_load, "LOCAL_SERVER", scaler.url)
        monkeypatch.delenv("API_KEY", raising=False)
        monkeypatch.delenv("ENDPOINT_NAME", raising=False)
        try:
            status, _ = await post_json(
                scaler.url, "/worker_status/", good_report(worker.url, "tok")
            )
            assert status == 200
            out = io.StringIO()
            code = await test_load.amain(["-l", "-n", "5", "-rps", "50", "-q"], out=out)
            # --server names another address; -l still gives the defaults.
            out2 = io.StringIO()
            argv = ["-l", "--server", scaler.url, "-n", "2", "-q"]
            assert await test_load.amain(argv, out=out2) == 0, out2.getvalue()
            return code, out.getvalue(), worker
        finally:
            await worker.server.shutdown(grace=0)
            await scaler.stop()

    code, text, worker = run(main())
    assert code == 0, text
    assert len(worker.bodies) == 7
    assert all(b["auth_data"]["endpoint"] == "local" for b in worker.bodies)


# --worker readiness ##############################################################################


def test_worker_mode_waits_for_readiness(tmp_path: Path) -> None:
    async def main() -> tuple[int, str]:
        model = await test_load.FakeModel().start()
        log = tmp_path / "model.log"
        log.write_text("")

        async def load_later() -> None:
            await asyncio.sleep(1.5)
            with open(log, "a") as f:
                f.write(test_load.FakeModel.LOADED_LINE + "\n")

        try:
            async with spawned_worker(tmp_path, **unsecured_vars(log, model.url)) as process:
                loader = asyncio.ensure_future(load_later())
                try:
                    out = io.StringIO()
                    argv = ["--worker", f"http://127.0.0.1:{process.port}", "-n", "10"]
                    argv += ["-rps", "50", "--ready-timeout", "40"]
                    code = await test_load.amain(argv, out=out)
                    return code, out.getvalue()
                finally:
                    loader.cancel()
        finally:
            await model.stop()

    code, text = run(main())
    assert code == 0, text
    assert "waiting for the worker to be ready ..." in text
    assert "worker ready after" in text
    assert "ok 10" in text and "HTTP 503" not in text


def test_worker_readiness_by_model_route_when_healthcheck_has_no_state() -> None:
    calls: list[str] = []

    async def healthcheck(request: Request) -> Response:
        calls.append("health")
        return pyworker.text_response("ok")  # a model's health relayed: no state

    async def generate(request: Request) -> Response:
        calls.append("generate")
        if calls.count("generate") <= 2:
            return error_response(503, "model not ready")
        return json_response({"response": "hi"})

    async def main() -> tuple[LoadResult, str]:
        server = HttpServer(
            [pyworker.get("/healthcheck", healthcheck), post("/generate", generate)]
        )
        port = await server.start("127.0.0.1", 0)
        try:
            opts = LoadOptions(
                total=3,
                rps=50,
                server=None,
                worker=f"http://127.0.0.1:{port}",
                ready_timeout=20,
                progress=True,
                progress_interval=5,
            )
            out = io.StringIO()
            result = await LoadTester(opts, hello_world.InputData.for_test, out).run()
            return result, out.getvalue()
        finally:
            await server.shutdown(grace=0)

    result, text = run(main())
    assert result.ok, result.render()
    assert "waiting for the worker to be ready ..." in text
    assert calls.count("generate") == 3 + 3  # two 503 probes, one ready probe, the load


# FakeModel: any route ############################################################################


def test_fake_model_answers_any_post_route_and_streams_on_request() -> None:
    async def main() -> None:
        model = await test_load.FakeModel(tokens=4).start()
        client = pyworker.HttpClient(model.url)
        try:
            body = pyworker.json_dumps({"model": "m", "messages": [], "max_tokens": 3})
            async with await client.request("POST", "/v1/chat/completions", body) as resp:
                assert resp.status == 200 and resp.content_type.startswith("application/json")
                assert (await resp.json())["tokens"] == 3
            stream = pyworker.json_dumps({"inputs": "x", "stream": True})
            for route in ("/v1/completions", "/my/stream"):
                data = stream if route == "/v1/completions" else b"{}"
                async with await client.request("POST", route, data) as resp:
                    assert resp.content_type.startswith("text/event-stream")
                    raw = b"".join([c async for c in resp.iter_chunks()])
                assert raw.count(b"data: {") == 4 and raw.endswith(b"data: [DONE]\n\n")
                counter = test_load._TokenCounter(sse=True)  # pyright: ignore[reportPrivateUsage]
                assert counter.feed(raw) == 4
            async with await client.request("GET", "/whatever/health") as resp:
                assert resp.status == 200
            assert len(model.requests) == 3
        finally:
            await client.close()
            await model.stop()

    run(main())


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_done_marker_is_not_a_token(size: int) -> None:
    data = (
        b'data: {"a": 1}\r\n\r\n'
        b"data: [DONE]\n\n"
        b"data:\n\n"  # an event without data
        b': keep-alive\n\ndata: {"b":\ndata: 2}\n\n'  # two lines, one event
    )
    counter = test_load._TokenCounter(sse=True)  # pyright: ignore[reportPrivateUsage]
    assert sum(counter.feed(data[i : i + size]) for i in range(0, len(data), size)) == 2


def test_local_with_a_worker_of_another_model_api(tmp_path: Path) -> None:
    worker_file = tmp_path / "my_worker.py"
    worker_file.write_text(
        """
import dataclasses
import pyworker
from pyworker import ApiPayload, Backend, EndpointHandler, LogAction, post


@dataclasses.dataclass
class Chat(ApiPayload):
    model: str
    prompt: str
    max_tokens: int = 8
    stream: bool = False

    @classmethod
    def for_test(cls):
        return cls(model="m", prompt="hello there", stream=True)

    def generate_payload_json(self):
        return dataclasses.asdict(self)

    def count_workload(self):
        return float(self.max_tokens)


class Completions(EndpointHandler[Chat]):
    endpoint = "/v1/completions"


backend = Backend(
    model_server_url="http://127.0.0.1:1",
    model_log_file=None,
    allow_parallel_requests=True,
    benchmark_handler=Completions(),
    log_actions=[(LogAction.ModelLoaded, "Application startup complete.")],
)
routes = [post("/v1/completions", backend.create_handler(Completions()))]

if __name__ == "__main__":
    pyworker.run(backend, routes)
"""
    )
    out = io.StringIO()
    argv = ["--local", "--worker-module", str(worker_file), *FAST_LOCAL]
    status = run(test_load.amain(argv, out=out), timeout=90)
    text = out.getvalue()
    assert status == 0, text
    assert "POST /v1/completions" in text  # the worker file's first route
    assert "12 streams" in text and "routed 12, completed 12, missing 0" in text


def test_module_helpers(tmp_path: Path) -> None:
    module = test_load.load_worker_module()[0]
    assert test_load.worker_first_route(module) == "/generate"
    assert test_load.worker_loaded_lines(module) == [test_load.FakeModel.LOADED_LINE]
    assert os.path.exists(ROOT / "hello_world.py")


# Regressions from the review of the load tester ##################################################


def test_a_2xx_the_client_did_not_read_whole_is_not_expected_as_success() -> None:
    # Guards: a 200 whose stream broke (or that the client gave up reading) was expected to
    # be reported Success, and the worker's correct Cancelled counted as its mismatch.
    assert test_load.expected_statuses(200, "ok") == ("Success",)
    assert test_load.expected_statuses(200, "timeout") == ("Error", "Cancelled")
    assert test_load.expected_statuses(200, "broken") == ("Error", "Cancelled")
    assert test_load.expected_statuses(429, "http_429") == ("Rejected",)


def test_l_takes_the_local_key_not_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: with API_KEY set (a real key), `-l` sent it to the local autoscaler: all 401.
    monkeypatch.setenv("API_KEY", "real-key")
    monkeypatch.setenv("ENDPOINT_NAME", "real-endpoint")
    args = test_load.parse_args(["-l"])
    assert (args.api_key, args.endpoint) == ("local-key", "local")
    args = test_load.parse_args(["-l", "-kmine", "--endpoint=ep"])
    assert (args.api_key, args.endpoint) == ("mine", "ep")


def test_a_faulty_report_does_not_break_routing() -> None:
    # Guards: a report with "max_perf": null, logged as the worker's fault, then crashed every
    # /route/ call (float(None)).
    view = test_load.WorkerView("http://w", {"url": "http://w", "max_perf": None, "cur_load": "x"})
    assert not view.ready
    assert view.load == 0.0


def test_a_session_left_open_fails_the_run() -> None:
    # Guards: a failed /session/end left the exit status at 0 against a real endpoint.
    async def main() -> LoadResult:
        options = LoadOptions(total=1, rps=10, server=None, worker="http://127.0.0.1:9")
        tester = LoadTester(options, hello_world.InputData.for_test)
        return LoadResult(tester)

    result = run(main())
    result.records = [test_load.RequestRecord(index=0, due=0.0, outcome="ok")]
    session = test_load.SessionRecord(0, opened=True, ended=True)
    result.sessions = [session]
    assert result.ok  # one request, ok, its session ended
    session.ended = False
    assert not result.ok
