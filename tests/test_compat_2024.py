"""Worker files of the platform's 2024 `lib/` form on pyworker (issue 17): tests/workers_2024's
three workers run as processes (`python -m workers_2024.<name>.server`) against a fake model
server with their model APIs and a local autoscaler; and, in-process on the rig, what the
compatibility rests on: per-route settings (one FIFO shared by the serial routes, each
route's max_queue_time, the benchmark at its handler's concurrency), web.StreamResponse
relayed as it is written and cut when the model breaks, aiohttp's names on the core's
objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest
from support import (
    ROOT,
    UNUSED_URL,
    Rig,
    Runner,
    WorkerProcess,
    parse_head,
    raw_client,
    request,
    signing_key,
    spawned_worker,
    until,
    worker_rig,
)
from test_author_api import QUIET, Prompt, RawModel

import hello_world
import pyworker
from pyworker import (
    Backend,
    ClientResponse,
    EndpointHandler,
    HttpClient,
    HttpServer,
    JsonDataException,
    Request,
    Response,
    get,
    json_response,
    post,
    text_response,
    web,
)
from test_load import FakeModel, LocalAutoscaler

run = Runner(timeout=60.0)

TESTS = Path(__file__).resolve().parent
MASTER_TOKEN = "compat-2024-token"


# A fake model server with the three workers' model APIs #########################################


class ModelApis:
    """The model APIs of tests/workers_2024 on loopback: hello's /generate and
    /generate_stream, openai's /v1/completions and /v1/chat/completions, media's /inference,
    /inference_stream, /detect and /view, GET /health and /healthcheck; and POST /hold/...,
    which answers once `release` is set (for the in-process tests of the queue); GET /bytes
    (?size= bytes, chunked if ?chunked=1) and /latin (Latin-1 text) for backend.session's.

    A stream holds after its first piece while `gate` is set to an Event that is not set yet
    (and sets `holding`): a client that has the first piece then has it while the model still
    holds the rest."""

    FILES = {"out.png": b"\x89PNG fake image bytes"}

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self.arrivals: list[str] = []  # /hold/... paths, in arrival order
        self.release = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.holding = asyncio.Event()
        self.port = 0
        self._server = HttpServer(
            [
                post("/generate", self._generate),
                post("/generate_stream", self._generate_stream),
                post("/v1/completions", self._completions),
                post("/v1/chat/completions", self._completions),
                post("/inference", self._inference),
                post("/inference_stream", self._inference_stream),
                post("/detect", self._detect),
                get("/view", self._view),
                get("/health", self._text("ok")),
                get("/healthcheck", self._text("model is healthy")),
                get("/bytes", self._bytes),
                get("/latin", self._latin),
                *[post(f"/hold/{name}", self._hold) for name in "abcslx"],
            ]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ModelApis:
        self.port = await self._server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        if self.gate is not None:
            self.gate.set()
        await self._server.shutdown(grace=0.0)

    def _body(self, request: Request) -> dict[str, Any]:
        self.seen.append((request.method, request.path))
        data: Any = json.loads(request.body) if request.body else {}
        assert isinstance(data, dict), data
        return typing.cast(dict[str, Any], data)

    def _text(self, text: str) -> pyworker.Handler:
        async def answer(request: Request) -> Response:
            self.seen.append((request.method, request.path))
            return text_response(text)

        return answer

    def _stream(self, pieces: Iterable[bytes], content_type: str) -> Response:
        gate, self.gate = self.gate, None

        async def chunks() -> AsyncIterator[bytes]:
            for i, piece in enumerate(pieces):
                yield piece
                if i == 0 and gate is not None:
                    self.holding.set()
                    await gate.wait()

        return Response(content_type=content_type, stream=chunks())

    async def _generate(self, request: Request) -> Response:
        body = self._body(request)
        count = min(int(body["max_response_tokens"]), 8)
        return json_response({"response": " ".join(["cats"] * count), "tokens": count})

    async def _generate_stream(self, request: Request) -> Response:
        count = min(int(self._body(request)["max_response_tokens"]), 8)
        events = [b'data: {"token": "tok%d"}\n\n' % i for i in range(count)]
        return self._stream(events, "text/event-stream; charset=utf-8")

    async def _completions(self, request: Request) -> Response:
        body = self._body(request)
        count = min(int(body.get("max_tokens", 4)), 8)
        if body.get("stream") is True:
            events = [b'data: {"choices": [{"text": "w%d"}]}\n\n' % i for i in range(count)]
            return self._stream([*events, b"data: [DONE]\n\n"], "text/event-stream")
        text = " ".join(["word"] * count)
        return json_response({"choices": [{"text": text}], "usage": {"completion_tokens": count}})

    async def _inference(self, request: Request) -> Response:
        body = self._body(request)
        if body["audio_url"].endswith("/missing.wav"):
            return Response(404, b"no such clip", content_type="text/plain")
        task = "translate" if body["options"]["language"] == "en" else "transcribe"
        return json_response({"text": f"{body['duration_s']:g} seconds of speech", "task": task})

    async def _inference_stream(self, request: Request) -> Response:
        self._body(request)
        lines = [b'{"segment": %d, "text": "part %d"}\n' % (i, i) for i in range(4)]
        return self._stream(lines, "application/x-ndjson")

    async def _detect(self, request: Request) -> Response:
        body = self._body(request)
        return json_response({"language": "fr", "audio_url": body.get("audio_url")})

    async def _view(self, request: Request) -> Response:
        self.seen.append((request.method, request.target))
        name = request.query.get("filename", "")
        if name not in self.FILES:
            return Response(404, f"no such file: {name}".encode(), content_type="text/plain")
        return Response(200, self.FILES[name], content_type="image/png")

    async def _bytes(self, request: Request) -> Response:
        self.seen.append((request.method, request.target))
        data = b"x" * int(request.query["size"])
        if request.query.get("chunked") == "1":
            return self._stream([data[:1], data[1:]], "application/octet-stream")
        return Response(200, data, content_type="application/octet-stream")

    async def _latin(self, request: Request) -> Response:
        self.seen.append((request.method, request.target))
        return Response(
            200, "caf\u00e9".encode("latin-1"), content_type="text/plain; charset=latin-1"
        )

    async def _hold(self, request: Request) -> Response:
        self._body(request)
        self.arrivals.append(request.path)
        await self.release.wait()
        return json_response({"path": request.path})


# The worker files as processes ###################################################################


@dataclasses.dataclass
class Case:
    """What one request to a worker should get."""

    method: str
    path: str
    payload: Any  # the client's `payload` (signed); None: the body below as it is
    status: int
    check: str = ""  # text the body must hold
    body: Any = None  # an unsigned body for the worker's own routes
    stream: bool = False  # a stream the model holds after its first piece


@dataclasses.dataclass
class WorkerFile:
    module: str
    loaded_line: str  # a ModelLoaded text of the worker file
    cases: list[Case]
    env: dict[str, str] = dataclasses.field(default_factory=dict[str, str])
    output: list[str] = dataclasses.field(default_factory=list[str])  # in its output
    not_output: list[str] = dataclasses.field(default_factory=list[str])  # never in it


HELLO = WorkerFile(
    "workers_2024.hello.server",
    "infer server has started",
    [
        Case("POST", "/generate", {"prompt": "a b c", "max_response_tokens": 3}, 200, "cats"),
        Case(
            "POST",
            "/generate_stream",
            {"prompt": "a b", "max_response_tokens": 3},
            200,
            '"tok2"',
            stream=True,
        ),
        Case("POST", "/generate", {"prompt": "a"}, 422, '"max_response_tokens"'),
        Case("POST", "/generate", {"prompt": 5, "max_response_tokens": 3}, 422, "invalid"),
        Case("POST", "/generate", "not an object", 422, "expected a JSON object"),
        Case("GET", "/ping", None, 200, "pong"),
        Case("GET", "/healthcheck", None, 200, "model is healthy"),  # the worker's own route
    ],
    env={"LOG_LEVEL": "INFO"},
    output=[
        "INFO pyworker: worker ready",  # pyworker's line, in pyworker's format
        "INFO pyworker.access: /generate 200",  # its access log
        "[DEBUG] hello: model answered /generate",  # the worker's own line, its own format
        "GET /ping: the worker file's own route serves it",
        "GET /healthcheck: the worker file's own route serves it",
    ],
    not_output=["] worker ready", "] pyworker"],  # pyworker's lines once, not also the root's
)

OPENAI = WorkerFile(
    "workers_2024.openai.server",
    "Application startup complete.",
    [
        Case("POST", "/v1/completions", {"input": {"prompt": "hi", "max_tokens": 3}}, 200, "word"),
        Case(
            "POST",
            "/v1/chat/completions",
            {"input": {"messages": [], "max_tokens": 3, "stream": True}},
            200,
            "[DONE]",
            stream=True,
        ),
        Case("POST", "/v1/completions", {"input": "hi"}, 422, "expected an object"),
        Case("POST", "/v1/completions", {"prompt": "hi"}, 422, '"input"'),
        Case("GET", "/ping", None, 200, "pong"),
        Case("GET", "/healthcheck", None, 200, "ok"),  # pyworker's: MODEL_HEALTH_ENDPOINT's
    ],
    env={"LOG_LEVEL": "WARNING", "MODEL_HEALTH_ENDPOINT": "/health"},
    output=["[DEBUG] openai: streaming the model's answer"],
    not_output=["pyworker.access", "worker ready"],  # LOG_LEVEL=WARNING holds for pyworker
)

MEDIA = WorkerFile(
    "workers_2024.media.server",
    "audio server ready",
    [
        Case("POST", "/transcribe", {"audio_url": "u.wav", "duration_s": 3}, 200, "transcribe"),
        Case(
            "POST",
            "/translate",  # the same model route, another handler
            {"audio_url": "u.wav", "duration_s": 2, "options": {"language": "en"}},
            200,
            '"translate"',
        ),
        Case(
            "POST", "/segments", {"audio_url": "u.wav", "duration_s": 2}, 200, "part 3", stream=True
        ),
        Case("POST", "/transcribe", {"audio_url": "u.wav"}, 422, '"duration_s"'),
        Case(
            "POST",
            "/transcribe",
            {"audio_url": "u.wav", "duration_s": 2, "options": {"speed": 2}},
            422,
            "invalid payload",
        ),
        Case("POST", "/transcribe", {"audio_url": "/missing.wav", "duration_s": 1}, 404, "no such"),
        Case("GET", "/view?filename=out.png&type=output", None, 200, "PNG fake image"),
        Case("GET", "/view?filename=gone.png", None, 404, "no such file: gone.png"),
        Case("GET", "/view", None, 400, "filename is required"),
        Case("POST", "/language", None, 200, '"fr"', body={"audio_url": "u.wav"}),
        Case("POST", "/echo?x=1&x=2", None, 200, '"query":{"x":"1"}', body={"hello": "there"}),
        Case("GET", "/ping", None, 200, "pong"),
        Case("GET", "/healthcheck", None, 200, "ok"),  # pyworker's: the handler's full URL's
    ],
)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, worker: WorkerFile
) -> AsyncGenerator[tuple[WorkerProcess, ModelApis, LocalAutoscaler], None]:
    """The worker file as a process, its model and the autoscaler, until it has benchmarked
    and reported a max_perf."""
    log = tmp_path / "model.log"
    log.write_text(f"{worker.loaded_line} (fake)\n")
    scaler = LocalAutoscaler(signing_key(), master_token=MASTER_TOKEN)
    async with ModelApis() as model:
        await scaler.start()
        try:
            env = {
                "MODEL_LOG": str(log),
                "MODEL_SERVER_URL": model.url,  # over the files' http://0.0.0.0:...
                "REPORT_ADDR": scaler.url,
                "MASTER_TOKEN": MASTER_TOKEN,
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
                **worker.env,
            }
            async with spawned_worker(tmp_path / "w", ["-m", worker.module], **env) as process:

                async def reported() -> bool:
                    return any(r["max_perf"] > 0 for r in scaler.reports)

                await process.until(reported, 30.0, "a load report with max_perf > 0")
                yield process, model, scaler
        finally:
            await scaler.stop()


def signed(scaler: LocalAutoscaler, port: int, payload: Any, reqnum: int) -> dict[str, Any]:
    """A client's body with auth_data as today's /route/ signs it (the `url` layout)."""
    url = f"http://127.0.0.1:{port}"
    auth = {"cost": "10", "endpoint": "local", "reqnum": reqnum, "url": url}
    auth["signature"] = scaler.key.sign_url(url)
    return {"auth_data": auth, "payload": payload}


async def held_stream(port: int, path: str, body: Any, model: ModelApis) -> tuple[int, bytes]:
    """A stream whose model holds after its first piece: the first piece must reach the
    client while the model holds the rest (else this waits, and times out)."""
    gate = model.gate = asyncio.Event()
    model.holding.clear()
    async with raw_client(port, timeout=10.0) as client:
        await client.send_request("POST", path, body)
        status, headers = await client.head()
        assert status == 200, (status, headers)
        assert headers.get("transfer-encoding") == "chunked", headers
        first = await client.chunk()
        assert first, "the stream ended at once"
        assert model.holding.is_set() and not gate.is_set()  # the model still holds the rest
        gate.set()
        rest = await client.chunked_body()  # to the last chunk: a cut raises
    return status, first + rest


@pytest.mark.parametrize("worker", [HELLO, OPENAI, MEDIA], ids=lambda w: w.module.split(".")[1])
def test_worker_file_runs_on_pyworker(tmp_path: Path, worker: WorkerFile) -> None:
    """A 2024-lib worker file with only its imports changed: it starts, benchmarks, reports
    max_perf > 0, answers a url-signed request on every route (JSON, and streams whose first
    piece arrives while the model holds the rest), refuses bad payloads with 4xx, serves its
    own routes; its own log lines and pyworker's both print as documented."""

    async def main() -> None:
        async with running(tmp_path, worker) as (process, model, scaler):
            for reqnum, case in enumerate(worker.cases, 1):
                where = (case.method, case.path, case.payload)
                body = case.body
                if case.payload is not None:
                    body = signed(scaler, process.port, case.payload, reqnum)
                if case.stream:
                    status, data = await held_stream(process.port, case.path, body, model)
                else:
                    reply = await request(process.port, case.method, case.path, body)
                    status, data = reply.status, reply.body
                    assert reply.complete, where
                assert status == case.status, (where, status, data)
                assert case.check.encode() in data, (where, data)
            # the load it reports counts the signed requests that reached the model
            served = sum(1 for c in worker.cases if c.payload is not None and c.status != 422)

            async def counted() -> bool:
                return any(r["num_requests_recieved"] >= served for r in scaler.reports)

            await process.until(counted, 15.0, f"a report counting {served} requests")
            assert scaler.faults == []  # every report well-formed, with the right mtoken
            for text in worker.output:  # pyworker's INFO lines wait up to 0.5 s in its buffer

                async def printed(text: str = text) -> bool:
                    return text in process.output()

                await process.until(printed, 5.0, repr(text))
        output = process.output()
        for text in worker.not_output:
            assert text not in output, (text, output)

    run(main())


def test_media_worker_details(tmp_path: Path) -> None:
    """What the media worker's answers and model requests hold beyond the status: the /view
    proxy's content type and headers and the query passed on; the health check rebased from
    the file's http://0.0.0.0:18188 onto MODEL_SERVER_URL; one request at a time (FIFO)."""

    async def main() -> None:
        async with running(tmp_path, MEDIA) as (process, model, _scaler):
            view = await request(process.port, "GET", "/view?filename=out.png&type=output")
            assert view.status == 200
            assert view.headers.get("content-type") == "image/png"
            assert view.headers.get("cache-control") == "no-store"
            assert view.body == ModelApis.FILES["out.png"]
            assert ("GET", "/view?filename=out.png&type=output") in model.seen
            assert ("GET", "/health") in model.seen  # the worker was not ready before it
            echo = await request(process.port, "POST", "/echo?x=1", {"a": 1})
            assert echo.json() == {
                "bytes": len(json.dumps({"a": 1})),
                "text": json.dumps({"a": 1}),
                "agent": None,
                "query": {"x": "1"},
            }
            # the benchmark: 2 rounds of 1 request (a serial backend), and a warm-up
            assert model.seen.count(("POST", "/inference")) >= 3

    run(main())


# Per-route settings, in-process ##################################################################


class Held(EndpointHandler[Prompt]):
    """A route to the model's /hold/<name> (answered once ModelApis.release is set)."""

    def __init__(self, name: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.endpoint = f"/hold/{name}"


class Unlimited(Held):
    max_queue_time = math.inf  # the vastai layer's "no limit"


class WarmUp(EndpointHandler[Prompt]):
    endpoint = "/generate"  # answered at once: the warm-up of a cached benchmark

    def make_benchmark_payload(self) -> Prompt:
        return Prompt(prompt="warm")

    def model_body(self, payload: Prompt) -> dict[str, Any]:
        return {"prompt": payload.prompt, "max_response_tokens": 1}


def post_unsigned(rig: Rig, route: str, prompt: str = "x") -> asyncio.Task[Any]:
    async def send() -> Any:
        return await request(rig.port, "POST", route, {"payload": {"prompt": prompt}})

    return asyncio.ensure_future(send())


def test_serial_routes_share_one_fifo_and_parallel_routes_skip_it(tmp_path: Path) -> None:
    """Two routes that take one request at a time (allow_parallel_requests=False on their
    handlers, over a parallel Backend) wait in one FIFO between them; a parallel route goes
    to the model while they wait."""

    async def main() -> None:
        async with (
            ModelApis() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                handler=WarmUp(),
                cached_max_perf=100.0,
                routes=lambda backend: [
                    post("/a", backend.create_handler(Held("a", allow_parallel_requests=False))),
                    post("/b", backend.create_handler(Held("b", allow_parallel_requests=False))),
                    post("/c", backend.create_handler(Held("c"))),
                ],
                **QUIET,
            ) as rig,
        ):
            metrics = rig.backend.metrics
            first = post_unsigned(rig, "/a")
            await until(lambda: model.arrivals == ["/hold/a"], 5.0, "a at the model")
            second = post_unsigned(rig, "/b")
            await until(lambda: metrics.queued == 1, 5.0, "b queued")
            third = post_unsigned(rig, "/a")
            await until(lambda: metrics.queued == 2, 5.0, "a queued behind b")
            parallel = post_unsigned(rig, "/c")
            await until(lambda: "/hold/c" in model.arrivals, 5.0, "c at the model")
            assert model.arrivals == ["/hold/a", "/hold/c"]  # b and the second a wait
            model.release.set()
            replies = await asyncio.gather(first, second, third, parallel)
            assert [r.status for r in replies] == [200] * 4
            assert model.arrivals == ["/hold/a", "/hold/c", "/hold/b", "/hold/a"]  # FIFO
            await until(rig.settled, 5.0, "settled")

    run(main())


def test_each_route_holds_its_own_max_queue_time(tmp_path: Path) -> None:
    """With 100 workload in flight and max_perf 10 (an estimated wait of 10 s): the route whose
    handler says max_queue_time=0.5 answers 429; the Backend's (None: no limit) and an
    explicit math.inf serve."""

    async def main() -> None:
        async with (
            ModelApis() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                handler=WarmUp(),
                cached_max_perf=10.0,
                routes=lambda backend: [
                    post("/strict", backend.create_handler(Held("s", max_queue_time=0.5))),
                    post("/loose", backend.create_handler(Held("l"))),
                    post("/inf", backend.create_handler(Unlimited("x"))),
                ],
                **QUIET,
            ) as rig,
        ):
            busy = post_unsigned(rig, "/loose", "y" * 100)
            await until(lambda: model.arrivals == ["/hold/l"], 5.0, "the load at the model")
            strict = await request(rig.port, "POST", "/strict", {"payload": {"prompt": "z"}})
            assert strict.status == 429, strict
            assert strict.headers.get("retry-after") is not None
            unlimited = post_unsigned(rig, "/inf")
            loose = post_unsigned(rig, "/loose")
            await until(lambda: len(model.arrivals) == 3, 5.0, "inf and loose at the model")
            model.release.set()
            assert [r.status for r in await asyncio.gather(busy, unlimited, loose)] == [200] * 3
            await until(rig.settled, 5.0, "settled")

    run(main())


def test_the_fifo_and_the_parallel_routes_are_estimated_apart(tmp_path: Path) -> None:
    """What it guards (review M8): the estimated wait was all the workload in flight over
    max_perf, whatever the route. With max_perf 10: 100 workload at the model on a parallel
    route leaves the FIFO empty, and a serial route's request (max_queue_time 0.5) goes to
    the model; then 100 workload in the FIFO does not hold up a parallel route's, while a
    serial one waits behind it (10 s): 429."""

    async def main() -> None:
        async with (
            ModelApis() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                handler=WarmUp(),
                cached_max_perf=10.0,
                routes=lambda backend: [
                    post("/big_p", backend.create_handler(Held("l"))),
                    post(
                        "/big_s", backend.create_handler(Held("a", allow_parallel_requests=False))
                    ),
                    post("/p", backend.create_handler(Held("c", max_queue_time=0.5))),
                    post(
                        "/s",
                        backend.create_handler(
                            Held("s", allow_parallel_requests=False, max_queue_time=0.5)
                        ),
                    ),
                ],
                **QUIET,
            ) as rig,
        ):
            metrics = rig.backend.metrics
            busy = post_unsigned(rig, "/big_p", "y" * 100)
            await until(lambda: model.arrivals == ["/hold/l"], 5.0, "100 at the model, parallel")
            serial = post_unsigned(rig, "/s", "z")
            await until(lambda: "/hold/s" in model.arrivals, 5.0, "the serial one at the model")
            model.release.set()
            assert [r.status for r in await asyncio.gather(busy, serial)] == [200, 200]
            await until(rig.settled, 5.0, "settled")
            model.release.clear()
            model.arrivals.clear()

            busy = post_unsigned(rig, "/big_s", "y" * 100)
            await until(lambda: model.arrivals == ["/hold/a"], 5.0, "100 in the FIFO")
            assert metrics.serial.workload == 100.0
            parallel = post_unsigned(rig, "/p", "z")
            await until(lambda: "/hold/c" in model.arrivals, 5.0, "the parallel one at the model")
            refused = await request(rig.port, "POST", "/s", {"payload": {"prompt": "z"}})
            assert refused.status == 429, refused
            assert refused.json()["estimated_wait"] == 10.0
            model.release.set()
            assert [r.status for r in await asyncio.gather(busy, parallel)] == [200, 200]
            await until(rig.settled, 5.0, "settled")
            assert metrics.serial.requests == 0 and metrics.serial.workload == 0.0

    run(main())


@dataclasses.dataclass
class Claimed(Prompt):
    """A workload the client chooses (the README's vastai example counts max_new_tokens)."""

    tokens: float = 1.0
    exponent: int = 0

    def count_workload(self) -> float:
        return self.tokens * 10**self.exponent  # OverflowError past a float's range


class HeldClaim(Held):
    payload_class = Claimed


def test_a_workload_past_max_workload_is_refused(tmp_path: Path) -> None:
    """What it guards (review H1): two requests claiming 1e308 on a route without a queue
    limit made the workload in flight infinite for good (inf - x = inf), and every route
    with a limit then answered 500 (an OverflowError at Retry-After). Now a workload that is
    not a number from 0 to MAX_WORKLOAD is a 422 naming the limit, and a count_workload that
    overflows a 422 too; nothing is left in flight, and the limited route serves."""

    async def main() -> None:
        async with (
            ModelApis() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                handler=WarmUp(),
                cached_max_perf=10.0,
                routes=lambda backend: [
                    post("/inf", backend.create_handler(HeldClaim("x", max_queue_time=math.inf))),
                    post("/strict", backend.create_handler(Held("s", max_queue_time=30.0))),
                ],
                **QUIET,
            ) as rig,
        ):
            metrics = rig.backend.metrics
            for claim in ({"tokens": 1e308}, {"tokens": 2e9}, {"tokens": -5.0}):
                body = {"payload": {"prompt": "x", **claim}}
                replies = await asyncio.gather(
                    *(request(rig.port, "POST", "/inf", body) for _ in "ab")
                )
                for reply in replies:
                    assert reply.status == 422, reply
                    assert "MAX_WORKLOAD" in reply.json()["payload"], reply
            body = {"payload": {"prompt": "x", "exponent": 400}}
            reply = await request(rig.port, "POST", "/inf", body)
            assert reply.status == 422 and reply.json() == {"payload": "invalid payload"}, reply
            assert metrics.in_flight.workload == 0.0 and metrics.in_flight.requests == 0
            model.release.set()
            reply = await request(rig.port, "POST", "/strict", {"payload": {"prompt": "z"}})
            assert reply.status == 200, reply
            reply = await request(
                rig.port, "POST", "/inf", {"payload": {"prompt": "x", "tokens": 1e9}}
            )
            assert reply.status == 200, reply  # MAX_WORKLOAD itself is accepted
            await until(rig.settled, 5.0, "settled")

    run(main())


def test_retry_after_is_at_most_a_day(tmp_path: Path) -> None:
    """What it guards (review H1): Retry-After was the estimated wait past the limit,
    however large: 1e9 workload in flight at max_perf 1e-6 said to retry in 1e15 s."""

    async def main() -> None:
        async with (
            ModelApis() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                handler=WarmUp(),
                cached_max_perf=1e-6,
                routes=lambda backend: [
                    post("/big", backend.create_handler(HeldClaim("l"))),
                    post("/strict", backend.create_handler(Held("s", max_queue_time=0.5))),
                ],
                **QUIET,
            ) as rig,
        ):
            body = {"payload": {"prompt": "x", "tokens": 1e9}}
            busy = asyncio.ensure_future(request(rig.port, "POST", "/big", body))
            await until(lambda: model.arrivals == ["/hold/l"], 5.0, "1e9 at the model")
            reply = await request(rig.port, "POST", "/strict", {"payload": {"prompt": "z"}})
            assert reply.status == 429, reply
            assert 1 <= int(reply.headers["retry-after"]) <= 24 * 3600  # MAX_RETRY_AFTER
            assert reply.json()["estimated_wait"] <= 24 * 3600
            model.release.set()
            assert (await busy).status == 200
            await until(rig.settled, 5.0, "settled")

    run(main())


def test_max_wait_time_is_max_queue_time() -> None:
    # what it guards: the 2025 lib's Backend(max_wait_time=) spelling reaches the routes
    backend = Backend(UNUSED_URL, None, True, WarmUp(), [], max_wait_time=600.0)
    assert backend.max_queue_time == 600.0
    assert Backend(UNUSED_URL, None, True, WarmUp(), [], 5.0, max_wait_time=9.0).max_queue_time == 5


class Bench(hello_world.GenerateHandler):
    concurrency = 3
    benchmark_runs = 2
    do_warmup_benchmark = False


@pytest.mark.parametrize(
    ("handler", "parallel", "requests"),
    [
        (Bench(), True, 2 * 3),  # class attributes: no warm-up, 2 rounds of 3
        (hello_world.GenerateHandler(benchmark_runs=1, allow_parallel_requests=True), False, 11),
        (hello_world.GenerateHandler(benchmark_runs=2, concurrency=2), False, 1 + 2 * 2),
        (hello_world.GenerateHandler(benchmark_runs=1), False, 1 + 1),  # the Backend's: serial
    ],
)
def test_benchmark_runs_at_its_handlers_settings(
    tmp_path: Path, handler: EndpointHandler[Any], parallel: bool, requests: int
) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"))
        async with worker_rig(
            tmp_path, fake=fake, handler=handler, parallel=parallel, **QUIET
        ) as rig:
            assert len(fake.requests) == requests, fake.requests
            assert rig.backend.max_perf > 0

    run(main())


# The handler as a dataclass ######################################################################


@dataclasses.dataclass
class AudioHandler(EndpointHandler[Prompt]):
    benchmark_audio_duration_s: int = 30
    allow_parallel_requests = True  # a plain class attribute beside the fields

    @property
    def endpoint(self) -> str:
        return "/inference"


@dataclasses.dataclass
class OwnPostInit(AudioHandler):
    max_queue_time = 7.0

    def __post_init__(self) -> None:  # does not call EndpointHandler's
        self.ready = True


class NativeForm(EndpointHandler[Prompt]):
    endpoint = "/generate"
    allow_parallel_requests = False
    concurrency = 4


def test_handler_settings_as_keywords_fields_and_class_attributes() -> None:
    # what it guards: the 2024 form's keywords and @dataclass fields, without hiding the
    # native form's class attributes under a field's default
    assert AudioHandler().benchmark_audio_duration_s == 30
    audio = AudioHandler(benchmark_runs=3, benchmark_words=256, benchmark_audio_duration_s=5)
    assert (audio.benchmark_runs, audio.benchmark_words) == (3, 256)
    assert audio.benchmark_audio_duration_s == 5
    assert audio.allow_parallel_requests is True
    assert AudioHandler(allow_parallel_requests=False).allow_parallel_requests is False
    native = NativeForm()
    assert (native.allow_parallel_requests, native.concurrency) == (False, 4)
    assert NativeForm(concurrency=2).concurrency == 2
    assert (native.max_queue_time, native.benchmark_runs, native.do_warmup_benchmark) == (
        None,
        None,
        True,
    )
    own = OwnPostInit()
    assert pyworker.handler_setting(own, "max_queue_time") == 7.0
    assert pyworker.handler_setting(own, "concurrency") is None
    backend = Backend(UNUSED_URL, None, True, audio, [])
    assert backend.benchmark_runs == 3
    assert Backend(UNUSED_URL, None, True, AudioHandler(), []).benchmark_runs == 8
    assert AudioHandler(4).benchmark_audio_duration_s == 4  # its own field, positional
    with pytest.raises(TypeError):
        NativeForm(3)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


# web.StreamResponse in-process: cut when the model breaks ########################################


class StreamRelay(EndpointHandler[hello_world.InputData]):
    """The 2024 form's stream relay; `fail_after` pieces, it raises itself."""

    endpoint = "/generate_stream"
    fail_after: int | None = None

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        res = web.StreamResponse()
        res.content_type = "text/event-stream"
        await res.prepare(client_request)
        written = 0
        async for chunk in model_response.content:
            await res.write(chunk)
            written += 1
            if written == self.fail_after:
                raise RuntimeError("the handler's own bug")
        await res.write_eof()
        return res


class FailingRelay(StreamRelay):
    fail_after = 2


async def _settled_errored_and_free(rig: Rig, body: dict[str, Any]) -> None:
    """The request just cut on /s was settled once, as errored; the FIFO's turn was given
    back (/g, on the same queue, is served)."""
    await until(rig.settled, 5.0, "settled")
    metrics = rig.backend.metrics
    assert (metrics.errored.requests, metrics.served.requests) == (1, 0)
    assert not rig.backend.queue.lock.locked()
    after = await request(rig.port, "POST", "/g", body)
    assert after.status == 200, after


@pytest.mark.parametrize("failing", ["model", "handler"])
def test_stream_response_is_cut_when_the_stream_breaks(tmp_path: Path, failing: str) -> None:
    """The model breaks off mid-stream (or the handler raises mid-stream): the client's
    chunked stream is cut, without its last chunk; the request is settled once, as errored,
    and the serial route's FIFO turn is freed (the next request is served)."""

    async def main() -> None:
        crash = 3 if failing == "model" else None
        fake = FakeModel(log_path=str(tmp_path / "model.log"), crash_after=crash)
        handler = StreamRelay() if failing == "model" else FailingRelay()
        async with worker_rig(
            tmp_path,
            fake=fake,
            parallel=False,
            cached_max_perf=100.0,
            routes=lambda backend: [
                post("/s", backend.create_handler(handler)),
                post("/g", backend.create_handler(hello_world.GenerateHandler())),
            ],
            **QUIET,
        ) as rig:
            body = {"payload": {"prompt": "hello", "max_response_tokens": 8}}
            cut = await request(rig.port, "POST", "/s", body)
            assert cut.status == 200
            assert cut.headers.get("transfer-encoding") == "chunked"
            assert not cut.complete, cut
            assert b'"tok0"' in cut.body and b'"tok7"' not in cut.body
            await _settled_errored_and_free(rig, body)

    run(main())


def test_stream_response_served_whole_in_process(tmp_path: Path) -> None:
    # what it guards: a StreamResponse that ends well ends with its last chunk, served once
    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"), tokens=5)
        async with worker_rig(
            tmp_path,
            fake=fake,
            cached_max_perf=100.0,
            routes=lambda backend: [post("/s", backend.create_handler(StreamRelay()))],
            **QUIET,
        ) as rig:
            body = {"payload": {"prompt": "hello", "max_response_tokens": 5}}
            reply = await request(rig.port, "POST", "/s", body)
            assert reply.status == 200 and reply.complete
            assert reply.headers.get("content-type") == "text/event-stream"
            assert reply.body.count(b"data: ") == 5
            await until(rig.settled, 5.0, "settled")
            assert rig.backend.metrics.served.requests == 1

    run(main())


# aiohttp's names on the core's objects ###########################################################


def test_client_response_has_aiohttps_names() -> None:
    """content_type without parameters (aiohttp's), the whole field in headers (any case);
    content iterated by lines, iter_any(), iter_chunked(n); text(); and the default relay
    still passing the whole field on (test_author_api checks that end to end)."""

    async def main() -> None:
        async with RawModel() as model:
            client = HttpClient(model.url)
            try:

                async def fetch(route: str) -> ClientResponse:
                    return await client.request("POST", route, b"{}", timeout=5.0)

                async with await fetch("/sse-upper") as resp:
                    assert resp.content_type == "text/event-stream"
                    assert resp.headers.get("Content-Type") == "Text/Event-Stream ; charset=utf-8"
                    assert resp.headers["CONTENT-TYPE"] == resp.headers["content-type"]
                    lines = [line async for line in resp.content]
                assert lines == [
                    b'data: {"token": "a"}\n',
                    b"\n",
                    b'data: {"token": "b"}\n',
                    b"\n",
                    b"data: [DONE]\n",
                    b"\n",
                ]
                async with await fetch("/sse-chunked") as resp:
                    assert resp.headers.get("Transfer-Encoding") == "chunked"
                    pieces = [p async for p in resp.content.iter_chunked(7)]
                assert all(len(p) <= 7 for p in pieces) and b"".join(pieces).endswith(b"[DONE]\n\n")
                async with await fetch("/chunked") as resp:
                    whole = b"".join([p async for p in resp.content.iter_any()])
                assert json.loads(whole)["tokens"] == 3
                async with await fetch("/text-422") as resp:
                    assert (resp.status, await resp.text()) == (422, "no prompt")
                    assert resp.content_type == "text/plain"
            finally:
                await client.close()

    run(main())


def test_web_answers_take_aiohttps_arguments() -> None:
    pong = web.Response(body="pong")
    assert (pong.status, pong.body, pong.content_type) == (
        200,
        b"pong",
        "text/plain; charset=utf-8",
    )
    empty = web.Response(status=404)
    assert (empty.status, empty.body, empty.content_type) == (404, b"", "application/octet-stream")
    html = web.Response(text="<p>", status=201, content_type="text/html")
    assert (html.body, html.content_type) == (b"<p>", "text/html; charset=utf-8")
    raw = web.Response(body=b"\x00", headers={"Content-Type": "image/png", "X-Seen": "1"})
    assert (raw.content_type, list(raw.headers)) == ("image/png", [("X-Seen", "1")])
    refused = web.json_response(data={"error": "bad"}, status=422)
    assert (refused.status, json.loads(refused.body)) == (422, {"error": "bad"})
    assert refused.content_type == "application/json"
    with pytest.raises(ValueError):
        web.Response(body=b"x", text="y")
    assert JsonDataException("one message").message == "one message"
    assert JsonDataException({"a": "missing parameter"}).message == {"a": "missing parameter"}
    assert web.RouteDef is pyworker.Route and web.Request is Request
    route = web.get("/x", _ping)
    assert (route.method, route.path) == ("GET", "/x")


async def _ping(request: Request) -> Response:
    return web.Response(body="pong")


def test_request_has_aiohttps_names() -> None:
    async def main() -> None:
        head = b"POST /echo?a=1&b=two%20words&a=3 HTTP/1.1\r\nHost: x\r\nX-Token: t\r\n\r\n"
        req = pyworker.parse_request_head(head)
        req.body = b'{"k": 1}'
        assert req.query_string == "a=1&b=two%20words&a=3"
        assert req.query == {"a": "1", "b": "two words"}
        assert req.headers.get("X-Token") == req.headers["x-token"] == "t"
        assert (await req.json(), await req.read(), await req.text()) == (
            {"k": 1},
            b'{"k": 1}',
            '{"k": 1}',
        )
        req.body = b"{"
        with pytest.raises(pyworker.HttpError):
            await req.json()

    run(main())


def test_zero_address_connects_to_loopback() -> None:
    # what it guards: worker files' http://0.0.0.0:5001 model URL is a listening address
    assert HttpClient("http://0.0.0.0:5001").host == "127.0.0.1"
    assert HttpClient("http://10.0.0.2:5001").host == "10.0.0.2"


def test_worker_files_use_only_the_compat_names() -> None:
    # what it guards: the test workers import nothing from pyworker but __all__'s names
    from test_author_api import pyworker_names

    for path in sorted((TESTS / "workers_2024").rglob("*.py")):
        used = pyworker_names(path)
        assert used <= set(pyworker.__all__), (path, sorted(used - set(pyworker.__all__)))


# A StreamResponse's mistakes and its client's departures #########################################


class BeganThenReturned(EndpointHandler[hello_world.InputData]):
    """Prepares a StreamResponse, then returns a streaming Response anyway."""

    endpoint = "/generate_stream"

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> Response:
        res = web.StreamResponse()
        res.content_type = "text/event-stream"
        await res.prepare(client_request)
        return await pyworker.relay_stream(model_response)


class ClientDropped(EndpointHandler[hello_world.InputData]):
    """Writes one piece, then the client's connection is aborted (as the server's sweeper
    aborts a client that stopped reading past WRITE_TIMEOUT), then writes again."""

    endpoint = "/generate_stream"

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        res = web.StreamResponse()
        res.content_type = "text/event-stream"
        await res.prepare(client_request)
        await res.write(b"data: first\n\n")
        proto = client_request.connection
        assert proto is not None and proto.conn_transport is not None
        transport = typing.cast(asyncio.Transport, proto.conn_transport)
        transport.abort()  # closing at once; connection_lost comes a step later
        await res.write(b"data: second\n\n")
        return res


def _serial_rig(tmp_path: Path, handler: EndpointHandler[Any]) -> Any:
    """A rig with `handler` on /s and hello_world's /generate on /g, one FIFO for both."""
    return worker_rig(
        tmp_path,
        fake=FakeModel(log_path=str(tmp_path / "model.log"), tokens=3),
        parallel=False,
        cached_max_perf=100.0,
        routes=lambda backend: [
            post("/s", backend.create_handler(handler)),
            post("/g", backend.create_handler(hello_world.GenerateHandler())),
        ],
        **QUIET,
    )


def test_answer_begun_and_another_returned_is_cut_and_settled(tmp_path: Path) -> None:
    """Guards a FIFO held for good: a handler that prepared a StreamResponse and returned
    another (streaming) answer left its job unsettled and the model's turn taken, so every
    later request on a serial route waited forever. Now the begun answer is cut (the client
    sees an error, not an empty success), the request is settled errored, the turn freed."""

    async def main() -> None:
        async with _serial_rig(tmp_path, BeganThenReturned()) as rig:
            body = {"payload": {"prompt": "hi", "max_response_tokens": 3}}
            cut = await request(rig.port, "POST", "/s", body)
            assert cut.status == 200 and not cut.complete, cut
            await _settled_errored_and_free(rig, body)

    run(main())


def test_client_gone_under_the_handlers_writes_is_cancelled(tmp_path: Path) -> None:
    """Guards the accounting: a StreamResponse.write that fails because the client's
    connection is closing (ConnectionResetError, before connection_lost cancels the task)
    is the client gone, a cancelled request (499), not a worker error (500)."""

    async def main() -> None:
        async with _serial_rig(tmp_path, ClientDropped()) as rig:
            body = {"payload": {"prompt": "hi", "max_response_tokens": 3}}
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
                await request(rig.port, "POST", "/s", body)  # the connection is aborted
            await until(rig.settled, 5.0, "settled")
            metrics = rig.backend.metrics
            assert (metrics.cancelled.requests, metrics.errored.requests) == (1, 0)
            assert not rig.backend.queue.lock.locked()

    run(main())


# web's answers: what they refuse and what they send ##############################################


def test_web_answers_refuse_fields_no_head_can_hold() -> None:
    """Guards an unanswered request: a header field, content type or reason that no response
    head can hold (CR, LF, NUL, beyond Latin-1, a name that is no token) is a ValueError
    where the answer is made, as aiohttp has it, so the handler's error boundary answers
    500 and settles the request; it used to surface only as the head was written, after
    the request was counted served, and closed the connection without a status line."""
    bad: list[Callable[[], object]] = [
        lambda: web.Response(text="x", content_type="text/plain\r\nSet-Cookie: evil=1"),
        lambda: web.Response(text="x", headers={"X-A": "a\r\nSet-Cookie: evil=1"}),
        lambda: web.Response(text="x", headers={"X-A": "\u20ac"}),
        lambda: web.Response(text="x", headers={"Bad Name": "1"}),
        lambda: web.Response(text="x", reason="OK\r\nX-Evil: 1"),
        lambda: web.json_response({"a": 1}, headers={"X-A": "\x00"}),
        lambda: web.StreamResponse(headers={"X-A": "a\nb"}),
        lambda: web.StreamResponse(reason="\u20ac"),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()
    fine = web.Response(text="x", headers={"X-A": "caf\u00e9\tok"}, reason="Fine")
    assert (fine.headers, fine.reason) == ([("X-A", "caf\u00e9\tok")], "Fine")


class UnsendableAnswer(EndpointHandler[hello_world.InputData]):
    endpoint = "/generate"

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        await model_response.read()
        return web.Response(text="x", headers={"X-Price": "5 \u20ac"})


def test_unsendable_web_answer_on_a_model_route_is_a_500_settled_errored(tmp_path: Path) -> None:
    # what it guards: the request was counted served 200, then its connection closed unanswered
    async def main() -> None:
        async with _serial_rig(tmp_path, UnsendableAnswer()) as rig:
            body = {"payload": {"prompt": "hi", "max_response_tokens": 3}}
            reply = await request(rig.port, "POST", "/s", body)
            assert (reply.status, reply.json()) == (500, {"error": "internal error"})
            await until(rig.settled, 5.0, "settled")
            metrics = rig.backend.metrics
            assert (metrics.errored.requests, metrics.served.requests) == (1, 0)

    run(main())


def test_web_answers_send_their_reason() -> None:
    # what it guards: reason= of web.Response, json_response and StreamResponse was dropped
    async def plain(request: Request) -> Response:
        return web.Response(text="x", status=404, reason="Nothing Here")

    async def as_json(request: Request) -> Response:
        return web.json_response({"made": True}, status=201, reason="Made It")

    async def streamed(request: Request) -> Response:
        res = web.StreamResponse(reason="Flowing")
        await res.prepare(request)
        await res.write(b"piece")
        return res

    async def main() -> None:
        server = HttpServer([get("/p", plain), get("/j", as_json), get("/s", streamed)])
        port = await server.start("127.0.0.1", 0)
        try:
            async with raw_client(port) as client:
                for path, line in (
                    ("/p", b"HTTP/1.1 404 Nothing Here\r\n"),
                    ("/j", b"HTTP/1.1 201 Made It\r\n"),
                    ("/s", b"HTTP/1.1 200 Flowing\r\n"),
                ):
                    await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    head = await client.head_bytes()
                    assert head.startswith(line), head
                    if path == "/s":
                        assert await client.chunked_body() == b"piece"
                    else:
                        await client.reader.readexactly(int(parse_head(head)[1]["content-length"]))
        finally:
            await server.shutdown(grace=0)

    run(main())


def _done(step: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never waits (a StreamResponse outside a server does not)."""
    try:
        step.send(None)
    except StopIteration:
        return
    raise AssertionError("it waited")


def test_stream_response_outside_a_server_joins_its_body_once() -> None:
    """Guards quadratic work: prepared outside a server (a Request with no connection), a
    StreamResponse keeps its writes as pieces and joins them once, when its body is read;
    each write used to re-join every piece so far. Counted as calls of bytes.join."""
    joins = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal joins
        if event == "c_call" and getattr(arg, "__name__", "") == "join":
            joins += isinstance(getattr(arg, "__self__", None), bytes)

    res = web.StreamResponse()
    _done(res.prepare(pyworker.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")))
    pieces = [b"%d," % i for i in range(200)]
    sys.setprofile(count)
    try:
        for piece in pieces:
            _done(res.write(piece))
    finally:
        sys.setprofile(None)
    assert joins == 0
    assert res.body == b"".join(pieces)
    assert res.body == b"".join(pieces)  # read twice: the same


def test_header_membership_takes_any_case() -> None:
    # what it guards: a 2024 file's `if "Authorization" not in request.headers:` (aiohttp's
    # `in` ignores case, as get() and [] here do) took the wrong branch
    req = pyworker.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n\r\n")
    for name in ("Authorization", "authorization", "AUTHORIZATION"):
        assert name in req.headers
    assert "X-Missing" not in req.headers and "x-missing" not in req.headers
    assert 3 not in req.headers


# backend.session: bounded, on the model server only ##############################################


def test_session_answers_are_read_at_most_max_body() -> None:
    """Guards memory: backend.session read every answer whole up to 256 MiB (a /view proxy
    on an unsigned route: N clients held N times that). Now at most the worker's max body
    (MAX_BODY_BYTES, 16 MiB), sized or chunked, past it an UpstreamError naming the limit,
    which a worker's own route answers 502; and the seed's web.Response(body=resp.content)
    of a session answer still sends it."""

    async def main() -> None:
        async with ModelApis() as model:
            client = HttpClient(model.url)
            session = pyworker.ModelSession(lambda: client, 4096)

            async def proxy(request: Request) -> Response:
                resp = await session.get("/bytes", params={"size": request.query["size"]})
                return web.Response(body=resp.content, status=resp.status)

            server = HttpServer([get("/proxy", proxy)])
            port = await server.start("127.0.0.1", 0)
            try:
                whole = await session.get("/bytes", params={"size": "4096", "chunked": "1"})
                assert await whole.read() == b"x" * 4096
                for chunked in ("0", "1"):
                    with pytest.raises(pyworker.UpstreamError, match="larger than 4,096 bytes"):
                        await session.get("/bytes", params={"size": "4097", "chunked": chunked})
                small = await request(port, "GET", "/proxy?size=10")
                assert (small.status, small.body) == (200, b"x" * 10)
                big = await request(port, "GET", "/proxy?size=5000")
                assert (big.status, big.json()) == (502, {"error": "the model server failed"})
            finally:
                await server.shutdown(grace=0)
                await client.close()
        backend = Backend(UNUSED_URL, None, True, hello_world.GenerateHandler(), [])
        backend.config = dataclasses.replace(backend.config, max_body=2048)
        assert backend.session.max_body == 2048

    run(main())


def test_session_url_is_the_model_servers_own() -> None:
    """Guards two things: a whole URL given to backend.session reached any host (its
    docstring says the model server; a worker's unsigned route built from client input
    could be pointed anywhere), and a query or params= on a whole URL raised ValueError.
    Now a whole URL must be on the model server (scheme, host, port, under its path),
    else a ValueError saying so, and queries and params= work on paths and URLs alike."""

    async def main() -> None:
        async with ModelApis() as model:
            client = HttpClient(model.url)
            session = pyworker.ModelSession(lambda: client)
            try:
                resp = await session.get(f"{model.url}/view?filename=out.png", params={"t": "o"})
                assert (resp.status, await resp.read()) == (200, ModelApis.FILES["out.png"])
                assert model.seen[-1] == ("GET", "/view?filename=out.png&t=o")
                await session.get("/view?filename=out.png", params={"type": "x y"})
                assert model.seen[-1] == ("GET", "/view?filename=out.png&type=x+y")
                elsewhere = [
                    "http://127.0.0.1:9/view",
                    f"https://127.0.0.1:{model.port}/view",
                    f"http://localhost:{model.port}/view",
                    f"http://user@127.0.0.1:{model.port}/view",
                    "view",
                ]
                for url in elsewhere:
                    with pytest.raises(ValueError, match="asks the model server"):
                        await session.get(url)
                under = HttpClient(f"{model.url}/v1")  # a model URL with a path
                prefixed = pyworker.ModelSession(lambda: under)
                done = await prefixed.post(f"{model.url}/v1/completions", json={"max_tokens": 2})
                assert done.status == 200 and model.seen[-1] == ("POST", "/v1/completions")
                with pytest.raises(ValueError, match="asks the model server"):
                    await prefixed.get(f"{model.url}/view")
                await under.close()
            finally:
                await client.close()

    run(main())


def test_text_is_decoded_with_the_charset_it_names() -> None:
    """Guards one decoding for every text(): a request's and a session answer's ignored the
    charset their Content-Type names (only ClientResponse.text() read it). A body that is
    not JSON stays the sender's fault: 400 for a client's, UpstreamError for the model's."""

    async def main() -> None:
        req = pyworker.parse_request_head(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n"
        )
        req.body = "caf\u00e9".encode("latin-1")
        assert await req.text() == "caf\u00e9"
        with pytest.raises(pyworker.HttpError):
            await req.json()
        async with ModelApis() as model:
            client = HttpClient(model.url)
            try:
                answer = await pyworker.ModelSession(lambda: client).get("/latin")
                assert await answer.text() == "caf\u00e9"
                with pytest.raises(pyworker.UpstreamError):
                    await answer.json()
                async with await client.request("GET", "/latin", timeout=5.0) as raw:
                    assert await raw.text() == "caf\u00e9"
            finally:
                await client.close()

    run(main())
