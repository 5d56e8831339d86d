"""A 2024-lib worker for an LLM with /generate (JSON) and /generate_stream (SSE): the model's
answer shaped in generate_client_response, the stream relayed through a web.StreamResponse,
and the worker's own /ping and /healthcheck (forwarded to the model with backend.session)."""

from __future__ import annotations

import dataclasses
import logging
import os

from pyworker import Backend, ClientResponse, EndpointHandler, LogAction, start_server, web

from .data_types import InputData

MODEL_SERVER_URL = "http://0.0.0.0:5001"  # where the model listens (MODEL_SERVER_URL wins)

MODEL_SERVER_START_LOG_MSG = "infer server has started"
MODEL_SERVER_ERROR_LOG_MSGS = ["Exception: corrupted model file"]

logging.basicConfig(
    level=logging.DEBUG,
    format="%(asctime)s[%(levelname)-5s] %(name)s: %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
)
log = logging.getLogger("hello")


@dataclasses.dataclass
class GenerateHandler(EndpointHandler[InputData]):
    @property
    def endpoint(self) -> str:
        return "/generate"

    @property
    def healthcheck_endpoint(self) -> str | None:
        return None

    @classmethod
    def payload_cls(cls) -> type[InputData]:
        return InputData

    def make_benchmark_payload(self) -> InputData:
        return InputData.for_test()

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        _ = client_request
        match model_response.status:
            case 200:
                log.debug("model answered /generate")
                data = await model_response.json()
                return web.json_response(data=data)
            case code:
                return web.Response(status=code)


class GenerateStreamHandler(EndpointHandler[InputData]):
    @property
    def endpoint(self) -> str:
        return "/generate_stream"

    @property
    def healthcheck_endpoint(self) -> str | None:
        return None

    @classmethod
    def payload_cls(cls) -> type[InputData]:
        return InputData

    def make_benchmark_payload(self) -> InputData:
        return InputData.for_test()

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        match model_response.status:
            case 200:
                res = web.StreamResponse()
                res.content_type = "text/event-stream"
                await res.prepare(client_request)
                async for chunk in model_response.content:
                    await res.write(chunk)
                await res.write_eof()
                return res
            case code:
                return web.Response(status=code)


backend = Backend(
    model_server_url=MODEL_SERVER_URL,
    model_log_file=os.environ["MODEL_LOG"],
    allow_parallel_requests=True,
    benchmark_handler=GenerateHandler(benchmark_runs=3, benchmark_words=256),
    log_actions=[
        (LogAction.ModelLoaded, MODEL_SERVER_START_LOG_MSG),
        (LogAction.Info, '"message":"Download'),
        *[(LogAction.ModelError, message) for message in MODEL_SERVER_ERROR_LOG_MSGS],
    ],
)


async def handle_ping(_: web.Request) -> web.Response:
    return web.Response(body="pong")


async def handle_healthcheck(_: web.Request) -> web.Response:
    healthcheck_res = await backend.session.get("/healthcheck")
    return web.Response(body=healthcheck_res.content, status=healthcheck_res.status)


routes = [
    web.post("/generate", backend.create_handler(GenerateHandler())),
    web.post("/generate_stream", backend.create_handler(GenerateStreamHandler())),
    web.get("/ping", handle_ping),
    web.get("/healthcheck", handle_healthcheck),
]

if __name__ == "__main__":
    start_server(backend, routes)
