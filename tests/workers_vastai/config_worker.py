"""A worker file of today's vastai form (configuration only), as its authors write them, with
the one import line changed to pyworker. Its environment is set before the import, as such
files do. Used by tests/test_compat_vastai.py, which runs it as a process."""

import math
import os
from typing import Any

os.environ.setdefault("WORKER_PORT", os.environ.get("TEST_WORKER_PORT", "8000"))

from pyworker import (  # the environment first, as today's worker files do
    BenchmarkConfig,
    HandlerConfig,
    JsonDataException,
    LogActionConfig,
    Worker,
    WorkerConfig,
    web,
)

PROMPTS = ["tell me about cats", "a poem about the sea", "why is the sky blue"]


def prompt_words(payload: dict[str, Any]) -> float:
    return float(len(payload["prompt"].split()))


def parse_text(payload: dict[str, Any]) -> dict[str, Any]:
    """/v1/parsed takes {"text": ...}: the model gets a prompt."""
    if "text" not in payload:
        raise JsonDataException({"text": "missing parameter"})
    if not isinstance(payload["text"], str):
        # not a JsonDataException: still a 422; its text (the client's value) is not sent back
        raise ValueError(f"text must be a string, not {payload['text']!r}")
    return {"prompt": payload["text"], "max_response_tokens": payload.get("tokens", 4)}


async def relay_tokens(client_request: Any, model_response: Any) -> Any:
    """The model's stream, relayed as today's files write it: aiohttp's StreamResponse."""
    res = web.StreamResponse(status=model_response.status)
    res.content_type = model_response.content_type
    await res.prepare(client_request)
    async for line in model_response.content:
        await res.write(line)
    await res.write_eof()
    return res


async def wrap_answer(client_request: Any, model_response: Any) -> Any:
    if model_response.status != 200:
        return web.Response(status=model_response.status)
    return web.json_response(data={"wrapped": await model_response.json()}, status=200)


worker_config = WorkerConfig(
    model_server_url="http://0.0.0.0",  # as the platform's examples write it: this host
    model_server_port=int(os.environ["TEST_MODEL_PORT"]),
    model_log_file="/nonexistent/model.log",  # MODEL_LOG (set by the test) wins
    handlers=[
        HandlerConfig(
            route="/generate",
            allow_parallel_requests=True,
            max_queue_time=60.0,
            benchmark_config=BenchmarkConfig(
                dataset=[{"prompt": p, "max_response_tokens": 8} for p in PROMPTS],
                runs=2,
                concurrency=4,
            ),
            workload_calculator=prompt_words,
        ),
        HandlerConfig(
            route="/generate_stream",
            allow_parallel_requests=True,
            max_queue_time=None,
            workload_calculator=lambda p: p["max_response_tokens"],
        ),
        HandlerConfig(
            route="/v1/parsed",
            request_parser=parse_text,
            workload_calculator=lambda p: p["missing key"],  # raises: counts 100
        ),
        HandlerConfig(route="/v1/nan", workload_calculator=lambda p: math.nan),
        HandlerConfig(
            route="/v1/tokens_stream",
            allow_parallel_requests=True,
            response_generator=relay_tokens,
            workload_calculator=lambda p: 10,
        ),
        HandlerConfig(route="/v1/wrapped", response_generator=wrap_answer),
        HandlerConfig(route="/v1/negative", workload_calculator=lambda p: -5),
    ],
    log_action_config=LogActionConfig(
        on_load=["infer server has started"],
        on_error=["Exception: corrupted model file"],
        on_info=['"message":"Download'],
    ),
)

Worker(worker_config).run()
