"""A worker file in the style of the platform's public 2024 PyWorker `lib/` hello_world
(workers/hello_world/server.py and data_types.py), ported to pyworker.

It is the 2024 form with pyworker's native names (web.json_response -> json_response,
web.Response -> Response, web.post -> post, start_server -> run, a web.StreamResponse ->
relay_stream(model_response)): a worker ported by hand. The 2024 files themselves, with
aiohttp's names and only their imports changed, are tests/workers_2024/ (README, "Bring your
worker"). The forms are the 2024 ones:

  - `endpoint` is a property, `payload_cls` a classmethod;
  - generate_client_response(client_request, model_response) is overridden and matches on
    model_response.status;
  - benchmark_runs and healthcheck_endpoint are class attributes of the benchmark handler;
  - InputData gets from_json_msg from ApiPayload (the 2024 file wrote its own).

tests/test_author_api.py runs it against test_load.FakeModel (which serves /health):

    MODEL_LOG=/var/log/model.log python tests/worker_2024.py
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from pyworker import (
    ApiPayload,
    Backend,
    ClientResponse,
    EndpointHandler,
    LogAction,
    Request,
    Response,
    json_response,
    post,
    relay_stream,
    run,
)

# the url and port of the model API
MODEL_SERVER_URL = "http://127.0.0.1:5001"

# the log line the model server writes once it has started, and the one meaning it failed
MODEL_SERVER_START_LOG_MSG = "infer server has started"
MODEL_SERVER_ERROR_LOG_MSGS = ["Exception: corrupted model file"]

WORD_LIST = "the quick brown fox jumps over a lazy dog while cats and dogs watch".split()


@dataclasses.dataclass
class InputData(ApiPayload):
    prompt: str
    max_response_tokens: int

    @classmethod
    def for_test(cls) -> InputData:
        prompt = " ".join(random.choices(WORD_LIST, k=250))
        return cls(prompt=prompt, max_response_tokens=300)

    def generate_payload_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def count_workload(self) -> float:
        return float(len(self.prompt.split()))


class GenerateHandler(EndpointHandler[InputData]):
    """The model API's /generate: the answer is JSON."""

    benchmark_runs = 1  # rounds of the benchmark
    healthcheck_endpoint = "/health"  # the model's health route

    @property
    def endpoint(self) -> str:
        return "/generate"

    @classmethod
    def payload_cls(cls) -> type[InputData]:
        return InputData

    def make_benchmark_payload(self) -> InputData:
        return InputData.for_test()

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        _ = client_request
        match model_response.status:
            case 200:
                data = await model_response.json()
                return json_response(data)
            case code:
                return Response(status=code)


class GenerateStreamHandler(EndpointHandler[InputData]):
    """The model API's /generate_stream: the answer is streamed back to the client."""

    @property
    def endpoint(self) -> str:
        return "/generate_stream"

    @classmethod
    def payload_cls(cls) -> type[InputData]:
        return InputData

    def make_benchmark_payload(self) -> InputData:
        return InputData.for_test()

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        _ = client_request
        match model_response.status:
            case 200:
                return await relay_stream(model_response)
            case code:
                return Response(status=code)


backend = Backend(
    model_server_url=MODEL_SERVER_URL,
    model_log_file=None,  # taken from MODEL_LOG (the 2024 file read os.environ["MODEL_LOG"])
    allow_parallel_requests=True,
    benchmark_handler=GenerateHandler(),
    log_actions=[
        (LogAction.ModelLoaded, MODEL_SERVER_START_LOG_MSG),
        (LogAction.Info, '"message":"Download'),
        *[(LogAction.ModelError, error_msg) for error_msg in MODEL_SERVER_ERROR_LOG_MSGS],
    ],
)

routes = [
    post("/generate", backend.create_handler(GenerateHandler())),
    post("/generate_stream", backend.create_handler(GenerateStreamHandler())),
]

if __name__ == "__main__":
    run(backend, routes)
