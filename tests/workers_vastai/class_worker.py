"""A worker file of today's vastai form using its classes: payload_class, handler_class, a
lifecycle context and a generator benchmark, run with run_async in the file's own event loop.
Its environment is set after the import and before Worker(): pyworker reads it when the
worker runs. Used by tests/test_compat_vastai.py, which runs it as a process."""

import asyncio
import contextlib
import dataclasses
import os
import random
from collections.abc import AsyncGenerator
from typing import Any

from pyworker import (
    ApiPayload,
    BenchmarkConfig,
    ClientResponse,
    EndpointHandler,
    HandlerConfig,
    Request,
    Response,
    Worker,
    WorkerConfig,
    json_response,
    web,
)

os.environ["MODEL_SERVER_URL"] = os.environ["TEST_MODEL_URL"]  # read when the worker runs
MARKS = os.environ["TEST_MARKS"]  # a directory: the lifecycle leaves a file per step


@dataclasses.dataclass
class Completion(ApiPayload):
    prompt: str
    max_response_tokens: int = 8

    @classmethod
    def for_test(cls) -> "Completion":
        return cls(prompt=" ".join(random.choices(["cat", "dog", "sun"], k=6)))

    def generate_payload_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count_workload(self) -> float:
        return float(self.max_response_tokens)


class EchoHandler(EndpointHandler[Completion]):
    """/echo on the worker: /generate on the model, its answer wrapped."""

    endpoint = "/generate"
    has_benchmark = False  # vastai's handler classes count as benchmarked unless they say so

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        return json_response({"echo": await model_response.json()}, model_response.status)


class StreamHandler(EndpointHandler[Completion]):
    """/echo_stream: the model's /generate_stream, relayed by the handler itself with
    aiohttp's names, as the platform's vllm example does."""

    endpoint = "/generate_stream"
    has_benchmark = False
    allow_parallel_requests = True

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        streaming = (
            model_response.content_type == "text/event-stream"
            or model_response.headers.get("Transfer-Encoding") == "chunked"
        )
        if model_response.status != 200 or not streaming:
            return web.Response(status=502, text="not a stream")
        res = web.StreamResponse()
        res.content_type = model_response.content_type
        await res.prepare(client_request)
        async for chunk in model_response.content.iter_any():
            await res.write(chunk)
        await res.write_eof()
        return res


@contextlib.asynccontextmanager
async def model_lifecycle() -> AsyncGenerator[None, None]:
    with open(os.path.join(MARKS, "entered"), "w"):
        pass
    yield
    with open(os.path.join(MARKS, "exited"), "w"):
        pass


def sample() -> dict[str, Any]:
    return {"prompt": "hello there", "max_response_tokens": 4}


worker_config = WorkerConfig(
    model_server_url="http://127.0.0.1",
    model_server_port=9,
    model_healthcheck_url="/health",
    max_sessions=2,
    lifecycle=model_lifecycle(),
    handlers=[
        HandlerConfig(
            route="/generate",
            allow_parallel_requests=True,
            payload_class=Completion,
            benchmark_config=BenchmarkConfig(generator=sample, runs=1, concurrency=2),
        ),
        HandlerConfig(route="/echo", handler_class=EchoHandler),
        HandlerConfig(route="/echo_stream", handler_class=StreamHandler),
    ],
)

asyncio.run(Worker(worker_config).run_async())
