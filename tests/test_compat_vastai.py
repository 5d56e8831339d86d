"""Worker files of today's vastai form (`from vastai import Worker, WorkerConfig, ...` with that
line changed to pyworker) run as processes: tests/workers_vastai/*.py, written here.

Each worker is a child process, secured (it fetches the local autoscaler's key), before a fake
model and a local autoscaler in the test's event loop: it starts, benchmarks, answers a
url-signed request on every route (JSON, and streams that arrive chunk by chunk while the
model still holds the rest), refuses bad payloads with 4xx, and reports load with max_perf > 0.
A configuration mistake stops the worker at start with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    RawClient,
    Reply,
    Runner,
    WorkerProcess,
    child_env,
    encode_request,
    free_port,
    request,
    signing_key,
)

from pyworker import Request, Response
from test_load import FakeModel, LocalAutoscaler

run = Runner(timeout=90.0)

WORKERS = Path(__file__).resolve().parent / "workers_vastai"
TOKEN = "vastai-form-token"


class GatedModel(FakeModel):
    """A FakeModel whose streams, while `gated`, send their first token and then wait for
    `gate`: what the client has by then came before the model finished. While `holding`,
    JSON answers wait for `release`."""

    active: int

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gated = False
        self.gate = asyncio.Event()
        self.streams_done = 0
        self.holding = False
        self.release = asyncio.Event()
        self.health_asked = 0

    async def _health(self, request: Request) -> Response:
        self.health_asked += 1
        return await super()._health(request)

    async def _generate_json(self, payload: dict[str, Any]) -> Response:
        if self.holding:
            self.active += 1  # held at the model: in progress there
            try:
                await self.release.wait()
            finally:
                self.active -= 1
        return await super()._generate_json(payload)

    async def _tokens(
        self, payload: dict[str, Any], *, done_marker: bool = False
    ) -> AsyncIterator[bytes]:
        first = True
        async for token in super()._tokens(payload, done_marker=done_marker):
            yield token
            if first and self.gated:
                first = False
                await self.gate.wait()
        self.streams_done += 1


class Child:
    """A worker file running as a process, and what it talks to."""

    def __init__(self, proc: WorkerProcess, scaler: LocalAutoscaler, model: GatedModel) -> None:
        self.proc = proc
        self.scaler = scaler
        self.model = model
        self.url = f"http://127.0.0.1:{proc.port}"
        self.idx = 0

    def body(self, payload: Any, **extra: Any) -> dict[str, Any]:
        """A client body with today's auth_data: the `url` layout, a fresh request_idx."""
        self.idx += 1
        auth = self.scaler.key.sign_url_auth(
            cost="10", endpoint="local", reqnum=self.idx, url=self.url, request_idx=self.idx
        )
        return {"auth_data": auth, "payload": payload, **extra}

    async def post(self, route: str, payload: Any) -> Reply:
        return await request(self.proc.port, "POST", route, self.body(payload), timeout=20.0)

    def ready_reports(self) -> list[dict[str, Any]]:
        return [r for r in self.scaler.reports if r.get("url") == self.url and r["max_perf"] > 0]

    async def wait_ready(self, timeout: float = 40.0) -> None:
        async def reported() -> bool:
            return bool(self.ready_reports())

        await self.proc.until(reported, timeout, "a load report with max_perf > 0")


@contextlib.asynccontextmanager
async def child_worker(
    tmp_path: Path,
    name: str,
    *,
    log: bool = True,
    model_url_in: str = "MODEL_SERVER_URL",
    **env: str,
) -> AsyncGenerator[Child, None]:
    """tests/workers_vastai/`name` as a process in tmp_path, secured, before a GatedModel (its
    URL in the variable `model_url_in`, or its port if that name ends in _PORT) and a
    LocalAutoscaler; killed and reaped on the way out. WORKER_PORT is in `env` or picked;
    `log` False: no MODEL_LOG."""
    model_log = tmp_path / "model.log"
    model = GatedModel(log_path=str(model_log) if log else None)
    scaler = LocalAutoscaler(signing_key(), master_token=TOKEN)
    await model.start()
    await scaler.start()
    port = int(env.get("WORKER_PORT") or env.get("TEST_WORKER_PORT") or free_port())
    variables = {
        "REPORT_ADDR": scaler.url,
        "MASTER_TOKEN": TOKEN,
        "PUBLIC_IPADDR": "127.0.0.1",
        model_url_in: str(model.port) if model_url_in.endswith("_PORT") else model.url,
        **({"MODEL_LOG": str(model_log)} if log else {}),
        **env,
    }
    if "WORKER_PORT" not in env and "TEST_WORKER_PORT" not in env:
        variables["WORKER_PORT"] = str(port)
    out = tmp_path / "worker.out"
    try:
        with open(out, "wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKERS / name),
                cwd=str(tmp_path),
                env=child_env(**variables),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(proc, port, out)
        try:
            yield Child(worker, scaler, model)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    finally:
        model.gate.set()
        model.release.set()
        await model.stop()
        await scaler.stop()


async def stream_chunk_by_chunk(child: Child, route: str, payload: dict[str, Any]) -> bytes:
    """POST a stream request with the model gated after its first token: the first chunk must
    reach the client while the model holds the rest; then the rest, to the last chunk."""
    model = child.model
    model.gated, done_before = True, model.streams_done
    model.gate.clear()
    client = await RawClient.connect(child.proc.port, timeout=20.0)
    try:
        await client.send(encode_request("POST", route, child.body(payload), close=True))
        status, headers = await client.head()
        assert status == 200, (status, headers)
        assert (headers.get("transfer-encoding") or "").lower() == "chunked", headers
        first = await client.chunk()
        assert first.startswith(b"data: "), first
        assert model.streams_done == done_before  # the model has not finished yet
        model.gate.set()
        rest = await client.chunked_body()  # to the last chunk: not cut
    finally:
        model.gated = False
        await client.close()
    assert model.streams_done == done_before + 1
    return first + rest


async def failed_start(
    tmp_path: Path, name: str, **env: str
) -> tuple[int, str, list[dict[str, Any]]]:
    """tests/workers_vastai/`name` run with `env` where it cannot start: its exit status, its
    output, and the failed-start reports a local autoscaler got."""
    scaler = await LocalAutoscaler(signing_key()).start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKERS / name),
            cwd=str(tmp_path),
            env=child_env(REPORT_ADDR=scaler.url, MASTER_TOKEN="tok", **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, output.decode(errors="replace"), scaler.reports
    finally:
        await scaler.stop()


# Tests ###########################################################################################


def test_config_worker_serves_every_route(tmp_path: Path) -> None:
    # config_worker.py: dataset benchmark, the default relay (JSON and SSE), a request_parser
    # raising JsonDataException and ValueError, calculators that raise / give NaN / negative,
    # WORKER_PORT set by the file before its import, MODEL_LOG winning over the file's value,
    # the model at http://0.0.0.0:<port> as the file writes it.
    async def main() -> None:
        port = free_port()
        async with child_worker(
            tmp_path, "config_worker.py", model_url_in="TEST_MODEL_PORT", TEST_WORKER_PORT=str(port)
        ) as c:
            assert c.proc.port == port
            await c.wait_ready()
            report = c.ready_reports()[-1]
            assert report["version"] == "1.1.0" and report["mtoken"] == TOKEN

            reply = await c.post("/generate", {"prompt": "hello there world"})
            assert reply.status == 200, reply
            assert isinstance(reply.json()["response"], str)
            body = await stream_chunk_by_chunk(
                c, "/generate_stream", {"prompt": "tell me", "max_response_tokens": 5}
            )
            assert body.count(b"data: ") == 5, body
            # A response_generator writing a web.StreamResponse: relayed as it is written.
            body = await stream_chunk_by_chunk(
                c, "/v1/tokens_stream", {"prompt": "go", "max_response_tokens": 3}
            )
            assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n"), body
            reply = await c.post("/v1/wrapped", {"prompt": "wrap it"})
            assert reply.status == 200, reply
            assert isinstance(reply.json()["wrapped"]["response"], str), reply
            for route in ("/v1/parsed", "/v1/nan", "/v1/negative"):
                payload = {"text": "hi"} if route == "/v1/parsed" else {"prompt": "hi"}
                for _ in range(2):  # twice: a bad calculator is logged once per route
                    reply = await c.post(route, payload)
                    assert reply.status == 200, (route, reply)
            sent = c.model.requests[-1]
            assert sent == {"prompt": "hi"}, sent  # the payload as the client sent it

            # Bad payloads: 4xx, never 5xx.
            reply = await c.post("/v1/parsed", {"tokens": 3})
            assert reply.status == 422, reply
            assert reply.json()["payload"] == {"text": "missing parameter"}
            # What it guards (review L4): the parser's exception text (here the client's value)
            # was sent back; now a generic message, and one WARNING with the traceback.
            for _ in range(2):
                reply = await c.post("/v1/parsed", {"text": 7654321})
                assert reply.status == 422, reply
                assert reply.json()["payload"] == {"request_parser": "could not read this payload"}
                assert (
                    "7654321" not in reply.body.decode() and "ValueError" not in reply.body.decode()
                )
            for route in ("/generate", "/v1/nan"):
                reply = await c.post(route, ["not", "an", "object"])
                assert reply.status == 422, (route, reply)
            reply = await c.post("/generate", {"no prompt": 1})  # the calculator raises: 100
            assert reply.status in (200, 422), reply  # the model's own answer on a bad payload

            output = c.proc.output()
            for route in ("/v1/parsed", "/v1/nan", "/v1/negative"):
                assert output.count(f"workload_calculator of {route} ") == 1, output
            warned = "/v1/parsed: the worker's request_parser raised ValueError; answered 422"
            assert output.count(warned) == 1, output

            async def served_reported() -> bool:
                return any(r["cur_perf"] > 0 for r in c.scaler.reports if r["url"] == c.url)

            await c.proc.until(served_reported, 20.0, "a report of the requests served")

            async def all_completed() -> bool:  # every request_idx sent, reported once ended
                return all(i in c.scaler.completions for i in range(1, c.idx + 1))

            await c.proc.until(all_completed, 20.0, "the completion reports")
            first = c.scaler.completions[1]  # the first /generate: a success
            assert [e["status"] for e in first] == ["Success"], first
            assert not c.scaler.faults, c.scaler.faults

    run(main())


async def metric(child: Child, name: str) -> float:
    reply = await request(child.proc.port, "GET", "/metrics")
    for line in reply.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_serial_routes_share_one_queue_and_parallel_ones_pass_it(tmp_path: Path) -> None:
    # config_worker.py's routes without allow_parallel_requests take the model one at a time
    # among them (one FIFO); /generate (parallel) goes straight to the model meanwhile.
    async def main() -> None:
        async with child_worker(tmp_path, "config_worker.py", model_url_in="TEST_MODEL_PORT") as c:
            await c.wait_ready()
            model = c.model
            model.holding = True
            model.release.clear()
            serial = [
                asyncio.ensure_future(c.post(route, {"prompt": "one at a time"}))
                for route in ("/v1/nan", "/v1/negative", "/v1/wrapped")
            ]

            async def two_queued() -> bool:
                return model.active == 1 and await metric(c, "pyworker_requests_queued") == 2

            await c.proc.until(two_queued, 20.0, "one serial request at the model, two queued")
            parallel = [
                asyncio.ensure_future(c.post("/generate", {"prompt": "at once"})) for _ in range(2)
            ]

            async def parallel_in() -> bool:
                return model.active == 3

            await c.proc.until(parallel_in, 20.0, "the parallel requests past the queue")
            assert await metric(c, "pyworker_requests_queued") == 2
            model.holding = False
            model.release.set()
            replies = await asyncio.gather(*serial, *parallel)
            assert [r.status for r in replies] == [200] * 5, replies

    run(main())


def test_class_worker_with_lifecycle_and_run_async(tmp_path: Path) -> None:
    # class_worker.py: payload_class, handler_class, a generator benchmark, a lifecycle
    # context (entered once the worker serves, exited at the stop), no model log (ready once the
    # lifecycle is entered and the model's /health answered), run_async in the file's loop,
    # MODEL_SERVER_URL set by the file after its import, from TEST_MODEL_URL.
    async def main() -> None:
        marks = tmp_path / "marks"
        marks.mkdir()
        async with child_worker(
            tmp_path,
            "class_worker.py",
            log=False,
            model_url_in="TEST_MODEL_URL",
            TEST_MARKS=str(marks),
        ) as c:
            await c.wait_ready()
            assert (marks / "entered").exists()
            assert not (marks / "exited").exists()
            reply = await c.post("/generate", {"prompt": "a cat", "max_response_tokens": 3})
            assert reply.status == 200, reply
            reply = await c.post("/echo", {"prompt": "a dog"})
            assert reply.status == 200, reply
            assert isinstance(reply.json()["echo"]["response"], str)
            body = await stream_chunk_by_chunk(
                c, "/echo_stream", {"prompt": "a fox", "max_response_tokens": 4}
            )
            assert body.count(b"data: ") == 4, body
            reply = await c.post("/generate", {"max_response_tokens": 3})
            assert reply.status == 422, reply
            assert reply.json()["payload"] == {"prompt": "missing parameter"}
            # The file's max_sessions=2: a third session is refused.
            created = [await c.post("/session/create", {"lifetime": 60}) for _ in range(3)]
            assert [r.status for r in created] == [201, 201, 429], created
            c.proc.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(c.proc.proc.wait(), 20) == 0, c.proc.tail()
            assert (marks / "exited").exists(), c.proc.tail()

    run(main())


class Gate:
    """The test's end of lifecycle_worker.py's __aenter__: `entering` is set when it has
    connected (it is blocked on the gate from then on); say() gives it its word."""

    def __init__(self) -> None:
        self.entering = asyncio.Event()
        self.word: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Gate:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            assert await reader.readline() == b"entering\n"
            self.entering.set()
            writer.write(await self.word + b"\n")
            await writer.drain()
        writer.close()

    def say(self, word: str) -> None:
        self.word.set_result(word.encode())

    async def stop(self) -> None:
        if not self.word.done():
            self.word.set_result(b"")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def gated_lifecycle(tmp_path: Path) -> AsyncGenerator[tuple[Child, Gate, Path], None]:
    """lifecycle_worker.py as a process (no model log), its __aenter__ blocked on a Gate until
    the test says; yields it with the gate (entered) and the directory of its marks."""
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = await Gate().start()
    try:
        async with child_worker(
            tmp_path,
            "lifecycle_worker.py",
            log=False,
            TEST_GATE_PORT=str(gate.port),
            TEST_MARKS=str(marks),
        ) as c:
            await c.proc.until(gate_entered(gate), 30, "the lifecycle's __aenter__ to begin")
            yield c, gate, marks
    finally:
        await gate.stop()


def gate_entered(gate: Gate) -> Callable[[], Awaitable[bool]]:
    async def entered() -> bool:
        return gate.entering.is_set()

    return entered


def health_asked(model: GatedModel) -> Callable[[], Awaitable[bool]]:
    async def asked() -> bool:
        return model.health_asked > 0

    return asked


def reported(c: Child, check: Callable[[dict[str, Any]], bool]) -> Callable[[], Awaitable[bool]]:
    async def seen() -> bool:
        return any(r.get("url") == c.url and check(r) for r in c.scaler.reports)

    return seen


async def stop_child(c: Child) -> str:
    """SIGTERM; the worker exits 0; its output."""
    c.proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(c.proc.proc.wait(), 20) == 0, c.proc.tail()
    return c.proc.output()


def test_lifecycle_is_entered_while_the_worker_answers_and_reports(tmp_path: Path) -> None:
    # Guards a worker silent while its lifecycle starts the model (minutes without /ping or a
    # load report: the platform takes it for dead). __aenter__ is blocked on the test's gate:
    # /ping answers, a report says "loading", a request gets 503 loading (the health route's
    # 200 does not count as loaded: the lifecycle says when). Then it returns: ready, served;
    # __aexit__ runs once, at SIGTERM.
    async def main() -> None:
        async with gated_lifecycle(tmp_path) as (c, gate, marks):
            ping = await request(c.proc.port, "GET", "/ping", timeout=10.0)
            assert (ping.status, ping.body) == (200, b"pong"), ping
            loading = reported(c, lambda r: r["max_perf"] == 0 and r["error_msg"] == "")
            await c.proc.until(loading, 30, "a load report while the lifecycle is entered")
            await c.proc.until(health_asked(c.model), 30, "the model's health route asked")
            reply = await c.post("/generate", {"prompt": "hi"})
            assert reply.status == 503 and reply.json()["state"] == "loading", reply
            assert not gate.word.done()  # still blocked in __aenter__ all along
            gate.say("go")
            await c.wait_ready()
            reply = await c.post("/generate", {"prompt": "hi", "max_response_tokens": 2})
            assert reply.status == 200, reply
            assert not (marks / "exited").exists()
            await stop_child(c)
            assert (marks / "exited").read_text() == "None\n"  # once, as a normal exit

    run(main())


def test_lifecycle_that_raises_errors_the_worker_which_stays_up(tmp_path: Path) -> None:
    # Guards an __aenter__ that raises: the worker is errored (one line, no traceback), the
    # autoscaler is told why, clients get 503 with the reason, /ping still answers; the
    # context was never entered, so __aexit__ does not run.
    message = "the lifecycle context failed: RuntimeError('no model server binary')"

    async def main() -> None:
        async with gated_lifecycle(tmp_path) as (c, gate, marks):
            gate.say("fail")
            errored = reported(c, lambda r: r["error_msg"] == message)
            await c.proc.until(errored, 30, "a load report with the lifecycle's error")
            reply = await c.post("/generate", {"prompt": "hi"})
            assert reply.status == 503, reply
            assert reply.json() == {"error": message, "state": "errored"}, reply
            assert (await request(c.proc.port, "GET", "/ping", timeout=10.0)).status == 200
            output = await stop_child(c)
            said = [line for line in output.splitlines() if "no model server binary" in line]
            assert len(said) == 1 and "Traceback" not in output, output
            assert not (marks / "exited").exists(), output

    run(main())


def test_sigterm_while_the_lifecycle_is_entered_cancels_it_and_exits_it(tmp_path: Path) -> None:
    # Guards a stop that comes while __aenter__ still runs (the model never came up): it is
    # cancelled, __aexit__ runs once to undo what it began, and the worker exits 0, bounded.
    async def main() -> None:
        async with gated_lifecycle(tmp_path) as (c, gate, marks):
            output = await stop_child(c)
            assert not gate.word.done()  # it was never answered: cancelled while blocked
            assert "still being entered; cancelled" in output, output
            assert (marks / "exited").read_text() == "None\n", output

    run(main())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("two_benchmarks", "exactly one HandlerConfig needs a benchmark_config (found: /a, /b)"),
        ("no_benchmark", "exactly one HandlerConfig needs a benchmark_config (found: none)"),
        ("no_handlers", "exactly one HandlerConfig needs a benchmark_config (found: none)"),
        ("remote_function", "remote_function / is_remote_dispatch"),
        ("remote_dispatch", "remote_function / is_remote_dispatch"),
        ("empty_benchmark", "BenchmarkConfig has no dataset or generator"),
    ],
)
def test_configuration_mistake_stops_with_one_line(
    tmp_path: Path, case: str, expected: str
) -> None:
    worker_port = str(free_port())
    code, output, reports = run(
        failed_start(tmp_path, "bad_config.py", BAD_CASE=case, WORKER_PORT=worker_port)
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0, output
    assert len(lines) == 1, output
    assert expected in lines[0], output
    assert [r["error_msg"] for r in reports] == [lines[0].removeprefix("pyworker: ")], reports


def test_run_async_with_a_bad_environment_reports_and_exits(tmp_path: Path) -> None:
    # Guards the environment read inside a running loop (run_async): one line, exit 1, and the
    # failed-start report sent all the same (run() outside a loop always sent it).
    env = {"TEST_MODEL_URL": "http://127.0.0.1:9", "TEST_MARKS": str(tmp_path)}
    code, output, reports = run(failed_start(tmp_path, "class_worker.py", WORKER_PORT="abc", **env))
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1, output
    assert len(lines) == 1 and "WORKER_PORT" in lines[0], output
    assert len(reports) == 1 and "WORKER_PORT" in reports[0]["error_msg"], reports
    assert not (tmp_path / "entered").exists()  # the lifecycle is not entered
