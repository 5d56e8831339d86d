"""The worker-author API (issue 11 item 3): the short handler form, the default relay of the
model's answer, the benchmark handler's settings as Backend arguments, the 2024 form still
working (tests/worker_2024.py, a worker file in the 2024 library's style), and __all__.

End to end on loopback: real workers on port 0, test_load.FakeModel or a raw model server
written here (fixed bytes on the wire) behind them, a raw client in front (support.request).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import random
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import worker_2024
from support import (
    ROOT,
    UNUSED_URL,
    Rig,
    Runner,
    fetch,
    generate,
    loaded_model_log,
    request,
    until,
    worker_rig,
)

import hello_world
import pyworker
from pyworker import (
    ApiPayload,
    Backend,
    EndpointHandler,
    HttpClient,
    LogAction,
    State,
    post,
)
from test_load import FakeModel

run = Runner(timeout=30.0)  # one test's event loop, bounded: a hang fails, CI does not stall

LOADED = [(LogAction.ModelLoaded, FakeModel.LOADED_LINE)]


# worker_rig's options for an UNSECURED worker whose load reports go nowhere, quietly
QUIET: dict[str, Any] = {
    "report_addrs": [UNUSED_URL],
    "unsecured": True,
    "report_check_interval": 60.0,
    "report_max_interval": 60.0,
    "log_poll_interval": 0.02,
}


def backend_for(handler: EndpointHandler[Any]) -> Backend:
    """A Backend benchmarking with `handler`, for create_handler (no worker is started)."""
    return Backend(UNUSED_URL, None, True, handler, LOADED)


# Payloads and handlers in the new form ###########################################################


@dataclasses.dataclass
class Prompt(ApiPayload):
    prompt: str

    @classmethod
    def for_test(cls) -> Prompt:
        return cls(prompt="a test prompt")

    def generate_payload_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt}

    def count_workload(self) -> float:
        return float(len(self.prompt))


@dataclasses.dataclass
class Other(Prompt):
    @classmethod
    def for_test(cls) -> Other:
        return cls(prompt="another")


class Short(EndpointHandler[Prompt]):
    endpoint = "/x"


class ShortChild(Short):
    pass


PayloadT = TypeVar("PayloadT", bound=ApiPayload)


class GenericBase(EndpointHandler[PayloadT]):
    """A worker's own generic base class."""

    model_timeout = 30.0


class Leaf(GenericBase[Prompt]):
    endpoint = "/leaf"


# The 2024 form: worker_2024.py ###################################################################


@pytest.fixture
def w2024() -> Any:
    """worker_2024 imported afresh: its module-level Backend starts once per test."""
    return importlib.reload(worker_2024)


def test_2024_worker_settings_from_handler_class_attributes(w2024: Any) -> None:
    # what it guards: benchmark_runs / healthcheck_endpoint on the benchmark handler's class
    # (where the 2024 library kept them) still reach the Backend
    backend: Backend = w2024.backend
    assert backend.benchmark_runs == 1
    assert backend.healthcheck_endpoint == "/health"
    assert w2024.GenerateHandler.payload_cls() is w2024.InputData


def test_2024_worker_serves_generate_and_stream(tmp_path: Path, w2024: Any) -> None:
    """worker_2024's routes, unchanged, in a real worker: /generate answers the model's JSON,
    /generate_stream the model's whole stream, chunked; the benchmark ran one round and the
    health check polls the class attribute's route."""

    async def main() -> None:
        fake = FakeModel(tokens=6)
        loaded_model_log(tmp_path)
        backend: Backend = w2024.backend
        async with worker_rig(
            tmp_path,
            fake=fake,
            backend=backend,
            routes=w2024.routes,
            healthcheck_interval=0.05,
            **QUIET,
        ) as w:
            # benchmark_runs = 1: one warm-up and one round of 10 (parallel) requests
            assert len(fake.requests) == 11, len(fake.requests)
            assert backend.health is not None
            assert backend.health.endpoint == "/health"
            health = await request(w.port, "GET", "/healthcheck")
            assert (health.status, health.body) == (200, b"ok")  # the model's answer

            random.seed(1234)  # the fake model picks its words with `random`
            reply = await request(w.port, "POST", "/generate", generate("cats and dogs"))
            random.seed(1234)
            body = json.dumps({"prompt": "cats and dogs", "max_response_tokens": 4})
            status, direct = await fetch(fake.url, "POST", "/generate", body.encode(), timeout=5.0)
            assert reply.status == status == 200
            assert reply.headers["content-type"] == "application/json"
            assert reply.json() == json.loads(direct)
            assert reply.json()["tokens"] == 4

            stream = await request(w.port, "POST", "/generate_stream", generate())
            assert stream.status == 200
            assert stream.headers.get("transfer-encoding") == "chunked"
            assert stream.headers.get("content-type") == "text/event-stream"
            assert stream.complete
            events = [e for e in stream.body.split(b"\n\n") if e]
            assert [json.loads(e.removeprefix(b"data: "))["token"] for e in events] == [
                f"tok{i}" for i in range(4)
            ]
            assert fake.requests[-1] == {"prompt": "hello there world", "max_response_tokens": 4}
            assert backend.state is State.READY

    run(main())


def test_2024_worker_overridden_response_is_used(tmp_path: Path, w2024: Any) -> None:
    """The 2024 handler's own answer on a model error (the status, no body), not the default
    relay's (which would pass the model's error body on)."""

    async def main() -> None:
        loaded_model_log(tmp_path)
        async with worker_rig(
            tmp_path,
            fake=FakeModel(fail_status=503),
            backend=w2024.backend,
            routes=w2024.routes,
            cached_max_perf=100.0,  # the failing model: no rounds
            **QUIET,
        ) as w:
            for route in ("/generate", "/generate_stream"):
                reply = await request(w.port, "POST", route, generate())
                assert (reply.status, reply.body) == (503, b""), (route, reply)

    run(main())


# The new form: endpoint and payload class as class attributes ####################################


def test_payload_class_from_brackets_and_inherited() -> None:
    # what it guards: EndpointHandler[P] alone names the payload class, for a subclass too
    backend = backend_for(Short())
    assert Short.payload_cls() is Prompt
    assert ShortChild.payload_cls() is Prompt
    assert Short.payload_class is Prompt
    assert callable(backend.create_handler(Short()))
    assert callable(backend.create_handler(ShortChild()))
    assert isinstance(Short().make_benchmark_payload(), Prompt)
    assert hello_world.GenerateHandler.payload_cls() is hello_world.InputData


def test_payload_class_through_a_generic_intermediate_base() -> None:
    # what it guards: a worker's own generic base (class Base(EndpointHandler[P])) passes
    # the payload class of Base[Prompt] on
    assert Leaf.payload_cls() is Prompt
    backend_for(Leaf()).create_handler(Leaf())


def test_payload_class_attribute() -> None:
    class Plain(EndpointHandler[Any]):
        endpoint = "/plain"
        payload_class = Prompt

    class Overrides(EndpointHandler[Prompt]):  # the attribute wins over the brackets
        endpoint = "/overrides"
        payload_class = Other

    assert Plain.payload_cls() is Prompt
    assert Overrides.payload_cls() is Other
    backend_for(Plain()).create_handler(Plain())


class Narrowed(Short):  # EndpointHandler[Prompt] above it; Other is a Prompt
    payload_class = Other


class NarrowedChild(Narrowed):
    pass


def test_payload_class_attribute_is_inherited() -> None:
    # what it guards: a subclass of a handler that set payload_class keeps that class
    assert Narrowed.payload_cls() is Other
    assert NarrowedChild.payload_cls() is Other


def test_no_payload_class_is_refused_at_create_handler() -> None:
    class Nameless(EndpointHandler[Any]):
        endpoint = "/nameless"

    backend = backend_for(Short())
    with pytest.raises(TypeError) as caught:
        backend.create_handler(Nameless())
    message = str(caught.value)
    assert "Nameless" in message
    assert "EndpointHandler[MyPayload]" in message
    assert "payload_class" in message


class NoSlash(EndpointHandler[Prompt]):
    endpoint = "generate"


class NoEndpoint(EndpointHandler[Prompt]):
    pass


class NotAString(EndpointHandler[Prompt]):
    endpoint = b"/generate"


class PropertyNoSlash(EndpointHandler[Prompt]):
    @property
    def endpoint(self) -> str:
        return "generate"


@pytest.mark.parametrize("cls", [NoSlash, NoEndpoint, NotAString, PropertyNoSlash])
def test_bad_endpoint_is_refused_at_create_handler(cls: type[EndpointHandler[Prompt]]) -> None:
    # what it guards: a mistake in a route stops the worker at start, not at the first request
    backend = backend_for(Short())
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.endpoint must be a path"):
        backend.create_handler(cls())


# The default relay: fixed bytes from a raw model server ##########################################


def answer(status: str, content_type: str, body: bytes, *, chunked: bool = False) -> bytes:
    """A raw HTTP/1.1 response: sized, or chunked in two chunks split mid-body."""
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
    if not chunked:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p)
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"


JSON_BODY = b'{"response": "cats and dogs", "tokens": 3}'
SSE_BODY = b'data: {"token": "a"}\n\ndata: {"token": "b"}\n\ndata: [DONE]\n\n'
NDJSON_BODY = b'{"token": "a"}\n{"token": "b"}\n'

# route -> the model's answer on it, byte for byte
ANSWERS = {
    "/json": answer("201 Created", "application/json", JSON_BODY),
    "/text-422": answer("422 Unprocessable Entity", "text/plain; charset=utf-8", b"no prompt"),
    "/chunked": answer("200 OK", "application/json", JSON_BODY, chunked=True),
    "/sse-sized": answer("200 OK", "text/event-stream; charset=utf-8", SSE_BODY),
    "/sse-upper": answer("200 OK", "Text/Event-Stream ; charset=utf-8", SSE_BODY),
    "/ndjson-sized": answer("202 Accepted", "application/x-ndjson", NDJSON_BODY),
    "/sse-chunked": answer("200 OK", "text/event-stream", SSE_BODY, chunked=True),
    "/health": answer("200 OK", "text/plain", b"ok"),
    "/bench": answer("200 OK", "application/json", b"{}"),  # the benchmark's warm-up
}


class RawModel:
    """A model server answering each request with ANSWERS[path]'s fixed bytes, keeping the
    connection open (keep-alive) and recording (method, path) of every request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str, path: str) -> int:
        return self.seen.count((method, path))

    async def __aenter__(self) -> RawModel:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method, path, _ = head.split("\r\n", 1)[0].split(" ", 2)
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.seen.append((method, path))
                writer.write(ANSWERS.get(path, answer("404 Not Found", "text/plain", b"?")))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Relayed(EndpointHandler[Prompt]):
    """A handler in the short form whose model route is given per instance."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def relay_worker(tmp: Path, model: RawModel) -> AbstractAsyncContextManager[Rig]:
    """The rig, ready, whose route R forwards to the raw model's route R (for each of
    ANSWERS), answering with the default generate_client_response."""
    loaded_model_log(tmp)
    return worker_rig(
        tmp,
        model_url=model.url,
        handler=Relayed("/bench"),
        routes=lambda backend: [post(p, backend.create_handler(Relayed(p))) for p in ANSWERS],
        log_actions=LOADED,
        cached_max_perf=100.0,  # a warm-up request (to /bench) only
        **QUIET,
    )


# route, status, content type, streamed (chunked) to the client, body
RELAY_CASES = [
    ("/json", 201, "application/json", False, JSON_BODY),
    ("/text-422", 422, "text/plain; charset=utf-8", False, b"no prompt"),
    ("/chunked", 200, "application/json", True, JSON_BODY),
    ("/sse-sized", 200, "text/event-stream; charset=utf-8", True, SSE_BODY),
    ("/sse-upper", 200, "Text/Event-Stream ; charset=utf-8", True, SSE_BODY),
    ("/ndjson-sized", 202, "application/x-ndjson", True, NDJSON_BODY),
    ("/sse-chunked", 200, "text/event-stream", True, SSE_BODY),
]


def test_default_relay_keeps_status_type_body_and_framing(tmp_path: Path) -> None:
    """What a handler with no generate_client_response answers: the model's status, content
    type and body; with Content-Length when the model's answer is a sized non-stream, chunked
    when the model streams (chunked, or an event-stream / ndjson type even when sized)."""

    async def main() -> None:
        async with RawModel() as model, relay_worker(tmp_path, model) as rig:
            for route, status, content_type, streamed, body in RELAY_CASES:
                reply = await request(rig.port, "POST", route, {"payload": {"prompt": "hi"}})
                where = (route, reply)
                assert reply.status == status, where
                assert reply.headers.get("content-type") == content_type, where
                assert reply.body == body, where
                assert reply.complete, where
                if streamed:
                    assert reply.headers.get("transfer-encoding") == "chunked", where
                    assert "content-length" not in reply.headers, where
                else:
                    assert reply.headers.get("content-length") == str(len(body)), where
                    assert "transfer-encoding" not in reply.headers, where
                assert model.count("POST", route) == 1, where

    run(main())


@pytest.mark.parametrize(
    ("route", "streaming", "body"),
    [(route, streamed, body) for route, _, _, streamed, body in RELAY_CASES]
    + [("/missing", False, b"?")],
)
def test_client_response_streaming(route: str, streaming: bool, body: bytes) -> None:
    # what it guards: the one decision the default relay makes, on the model's head alone
    async def main() -> None:
        async with RawModel() as model:
            client = HttpClient(model.url)
            try:
                async with await client.request("POST", route, b"{}", timeout=5.0) as resp:
                    assert resp.streaming is streaming
                    assert await resp.read() == body
            finally:
                await client.close()

    run(main())


# Settings of the benchmark handler as Backend arguments ##########################################


class OldSettings(EndpointHandler[Prompt]):
    endpoint = "/json"
    benchmark_runs = 5
    healthcheck_endpoint = "/old-health"


def test_backend_healthcheck_argument_wins_and_the_handlers_benchmark_runs() -> None:
    # What it guards (README truth): Backend(healthcheck_endpoint=) wins over the benchmark
    # handler's attribute (the 2024 place); benchmark_runs is a handler setting, and as every
    # handler setting, the handler's own wins over the Backend's, which is the default.
    given = Backend(
        UNUSED_URL,
        None,
        True,
        OldSettings(),
        LOADED,
        healthcheck_endpoint="/health",
        benchmark_runs=2,
    )
    assert (given.healthcheck_endpoint, given.benchmark_runs) == ("/health", 5)
    old = Backend(UNUSED_URL, None, True, OldSettings(), LOADED)
    assert (old.healthcheck_endpoint, old.benchmark_runs) == ("/old-health", 5)
    neither = Backend(UNUSED_URL, None, True, Short(), LOADED)
    assert (neither.healthcheck_endpoint, neither.benchmark_runs) == (None, 8)
    assert Backend(UNUSED_URL, None, True, Short(), LOADED, benchmark_runs=2).benchmark_runs == 2
    keyword = Backend(UNUSED_URL, None, True, Short(benchmark_runs=3), LOADED, benchmark_runs=2)
    assert keyword.benchmark_runs == 3


def test_backend_arguments_are_what_the_worker_uses(tmp_path: Path) -> None:
    """End to end: the health check polls the Backend argument's route, not the handler's
    class attribute; the benchmark sends at most the handler's own benchmark_runs (5, one at a
    time: too few to stop early), not the Backend's 2."""

    async def main() -> None:
        loaded_model_log(tmp_path)
        async with (
            RawModel() as model,
            worker_rig(
                tmp_path,
                model_url=model.url,
                parallel=False,  # one at a time: a benchmark round is one request
                handler=OldSettings(),
                log_actions=LOADED,
                healthcheck_endpoint="/health",
                benchmark_runs=2,
                routes=lambda backend: [post("/json", backend.create_handler(OldSettings()))],
                healthcheck_interval=0.02,
                **QUIET,
            ) as rig,
        ):
            assert model.count("POST", "/json") == 1 + 5  # warm-up, then five rounds of one
            await until(lambda: model.count("GET", "/health") >= 2, 5.0, "health polls")
            assert model.count("GET", "/old-health") == 0
            assert rig.backend.state is State.READY

    run(main())


# A worker's own code raising #####################################################################


SECRET = "the client's private words"  # in the payload; never in an answer


@dataclasses.dataclass
class BadRead(Prompt):
    """A from_json_msg with a bug: int() of a text field (the ValueError quotes the text)."""

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> BadRead:
        int(json_msg["prompt"])
        return cls(prompt=json_msg["prompt"])


@dataclasses.dataclass
class BadWeight(Prompt):
    def count_workload(self) -> float:
        return {"words": 1.0}[self.prompt]  # KeyError, quoting the prompt


@dataclasses.dataclass
class BadBody(Prompt):
    def generate_payload_json(self) -> dict[str, Any]:
        return {"prompt": {"a": 1}[self.prompt]}  # KeyError, quoting the prompt


class BadReadHandler(EndpointHandler[BadRead]):
    endpoint = "/generate"


class BadWeightHandler(EndpointHandler[BadWeight]):
    endpoint = "/generate"


class BadBodyHandler(EndpointHandler[BadBody]):
    endpoint = "/generate"


@pytest.mark.parametrize(
    ("route", "status", "what"),
    [
        ("/read", 422, "from_json_msg"),
        ("/weigh", 422, "count_workload"),
        ("/body", 500, "handler"),
    ],
)
def test_worker_code_errors_warn_once_per_route_and_tell_the_client_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str, status: int, what: str
) -> None:
    # What it guards (review L4): a bug in a worker's from_json_msg or count_workload was a
    # silent 422 (an INFO line with the exception's repr, which quotes the client's data), and
    # one in generate_payload_json an ERROR traceback on every request. Now: the client gets
    # 422 "invalid payload" (the payload could not be read) or 500 "internal error" (it was
    # read, then the worker failed), never the exception's text; the operator one WARNING
    # with the traceback per route, however many requests meet it.
    async def main() -> None:
        async with worker_rig(
            tmp_path,
            cached_max_perf=100.0,
            routes=lambda backend: [
                post("/read", backend.create_handler(BadReadHandler())),
                post("/weigh", backend.create_handler(BadWeightHandler())),
                post("/body", backend.create_handler(BadBodyHandler())),
            ],
            **QUIET,
        ) as rig:
            expected = (
                {"payload": "invalid payload"} if status == 422 else {"error": "internal error"}
            )
            for _ in range(3):
                reply = await request(rig.port, "POST", route, {"payload": {"prompt": SECRET}})
                assert reply.status == status, reply
                assert reply.json() == expected, reply
            await until(rig.settled, 5.0, "settled")

    with caplog.at_level(logging.INFO, logger="pyworker"):
        run(main())
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    (record,) = tracebacks
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"{route}: the worker's ") and what in record.getMessage()
    assert f"answered {status}" in record.getMessage()
    others = [r.getMessage() for r in caplog.records if r.exc_info is None]
    assert not any(SECRET in line for line in others), others


# __all__: the names a worker file needs ##########################################################


def pyworker_names(path: Path) -> set[str]:
    """The pyworker names a file uses: `from pyworker import X` and `pyworker.X`."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pyworker":
            names.update(alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "pyworker"
        ):
            names.add(node.attr)
    return names


def test_all_names_resolve() -> None:
    assert len(set(pyworker.__all__)) == len(pyworker.__all__)
    for name in pyworker.__all__:
        assert getattr(pyworker, name, None) is not None, name
    namespace: dict[str, Any] = {}
    exec("from pyworker import *", namespace)
    assert set(pyworker.__all__) <= set(namespace)


def test_all_is_listed_in_the_module_docstring() -> None:
    # what it guards: the docstring's index for worker authors and __all__ say the same
    doc = pyworker.__doc__ or ""
    index = doc.split("For worker authors", 1)[1].split("Everything else", 1)[0]
    for name in pyworker.__all__:
        assert name in index, name


@pytest.mark.parametrize(
    "path", [ROOT / "hello_world.py", Path(__file__).parent / "worker_2024.py"]
)
def test_worker_files_use_only_all(path: Path) -> None:
    used = pyworker_names(path)
    assert used, "no pyworker name found: the check itself is broken"
    assert used <= set(pyworker.__all__), sorted(used - set(pyworker.__all__))
