"""A 2024-lib worker for an OpenAI-compatible server (vLLM, TGI, Ollama ...): its two routes
relay JSON or a stream as the model answers, through the handlers in data_types."""

from __future__ import annotations

import logging
import os

from pyworker import Backend, LogAction, start_server, web

from .data_types import ChatCompletionsHandler, CompletionsHandler

MODEL_SERVER_START_LOG_MSG = [
    "Application startup complete.",  # vLLM
    "llama runner started",  # Ollama
]
MODEL_SERVER_ERROR_LOG_MSGS = ["RuntimeError: Engine", "Error: pull model manifest:"]

logging.basicConfig(
    level=logging.DEBUG,
    format="%(asctime)s[%(levelname)-5s] %(name)s: %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
)
log = logging.getLogger("openai")

backend = Backend(
    model_server_url=os.environ["MODEL_SERVER_URL"],
    model_log_file=os.environ["MODEL_LOG"],
    allow_parallel_requests=True,
    max_wait_time=600.0,
    benchmark_handler=CompletionsHandler(benchmark_runs=3, benchmark_words=256),
    log_actions=[
        *[(LogAction.ModelLoaded, message) for message in MODEL_SERVER_START_LOG_MSG],
        (LogAction.Info, '"message":"Download'),
        *[(LogAction.ModelError, message) for message in MODEL_SERVER_ERROR_LOG_MSGS],
    ],
)


async def handle_ping(_: web.Request) -> web.Response:
    return web.Response(body="pong")


routes = [
    web.post("/v1/completions", backend.create_handler(CompletionsHandler())),
    web.post("/v1/chat/completions", backend.create_handler(ChatCompletionsHandler())),
    web.get("/ping", handle_ping),
]

if __name__ == "__main__":
    start_server(backend, routes)
