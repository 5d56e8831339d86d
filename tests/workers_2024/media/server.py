"""A 2024-lib worker for an audio model server taking one request at a time: two handlers on
the model's one /inference route (transcribe, translate), a stream of segments, and routes of
its own: a /view proxy to the model's files, a language check forwarded with
backend.session.post, and an /echo of what a client sent."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from pyworker import Backend, ClientResponse, EndpointHandler, LogAction, start_server, web

from .data_types import AudioData

MODEL_SERVER_URL = "http://0.0.0.0:18188"

logging.basicConfig(
    level=logging.DEBUG,
    format="%(asctime)s[%(levelname)-5s] %(name)s: %(message)s",
    datefmt="%Y-%m-%d %H:%M:%S",
)
log = logging.getLogger("media")


async def segments_response(
    request: web.Request, response: ClientResponse
) -> web.Response | web.StreamResponse:
    match response.status:
        case 200:
            res = web.StreamResponse()
            res.content_type = "application/x-ndjson"
            await res.prepare(request)
            async for piece in response.content.iter_chunked(4096):
                await res.write(piece)
            await res.write_eof()
            return res
        case code:
            reason = await response.text()
            return web.Response(text=reason, status=code, content_type="text/plain")


async def text_response(
    request: web.Request, response: ClientResponse
) -> web.Response | web.StreamResponse:
    _ = request
    match response.status:
        case 200:
            res = await response.json()
            if "text" not in res:
                return web.json_response(data={"error": "the model gave no text"}, status=422)
            return web.json_response(data={"text": res["text"], "task": res.get("task")})
        case code:
            reason = await response.text()
            return web.Response(text=reason, status=code, content_type="text/plain")


@dataclasses.dataclass
class TranscribeHandler(EndpointHandler[AudioData]):
    benchmark_audio_duration_s: int = 30

    @property
    def endpoint(self) -> str:
        return "/inference"

    @property
    def healthcheck_endpoint(self) -> str | None:
        return f"{MODEL_SERVER_URL}/health"

    @classmethod
    def payload_cls(cls) -> type[AudioData]:
        return AudioData

    def make_benchmark_payload(self) -> AudioData:
        return AudioData.of_duration(self.benchmark_audio_duration_s)

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        return await text_response(client_request, model_response)


@dataclasses.dataclass
class TranslateHandler(TranscribeHandler):
    """The same model route; the task is the worker route's (the model reads it from the
    payload's options.language: "en" means translate to English)."""

    def make_benchmark_payload(self) -> AudioData:
        payload = super().make_benchmark_payload()
        payload.options.language = "en"
        return payload


@dataclasses.dataclass
class SegmentsHandler(TranscribeHandler):
    @property
    def endpoint(self) -> str:
        return "/inference_stream"

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        return await segments_response(client_request, model_response)


backend = Backend(
    model_server_url=MODEL_SERVER_URL,
    model_log_file=os.environ["MODEL_LOG"],
    allow_parallel_requests=False,
    max_wait_time=600.0,
    benchmark_handler=TranscribeHandler(benchmark_runs=2, benchmark_audio_duration_s=5),
    log_actions=[
        (LogAction.ModelLoaded, "audio server ready"),
        (LogAction.ModelError, "CUDA out of memory"),
        (LogAction.Info, "loading weights"),
    ],
)


async def handle_ping(_: web.Request) -> web.Response:
    return web.Response(body="pong")


async def handle_view(request: web.Request) -> web.Response:
    """The model server's files (its outputs), fetched by name."""
    if "filename" not in request.query:
        return web.Response(text="filename is required", status=400, content_type="text/plain")
    async with backend.session.get(f"/view?{request.query_string}") as resp:
        if resp.status == 200:
            content = await resp.read()
            return web.Response(
                body=content,
                status=200,
                content_type=resp.content_type or "application/octet-stream",
                headers={"Cache-Control": "no-store"},
            )
        text = await resp.text()
        return web.Response(text=text, status=resp.status, content_type="text/plain")


async def handle_language(request: web.Request) -> web.Response:
    body: Any = await request.json()
    res = await backend.session.post("/detect", json={"audio_url": body.get("audio_url")})
    return web.json_response(data=await res.json(), status=res.status)


async def handle_echo(request: web.Request) -> web.Response:
    raw = await request.read()
    text = await request.text()
    return web.json_response(
        data={
            "bytes": len(raw),
            "text": text,
            "agent": request.headers.get("User-Agent"),
            "query": dict(request.query),
        }
    )


routes = [
    web.post("/transcribe", backend.create_handler(TranscribeHandler())),
    web.post("/translate", backend.create_handler(TranslateHandler())),
    web.post("/segments", backend.create_handler(SegmentsHandler())),
    web.get("/view", handle_view),
    web.post("/language", handle_language),
    web.post("/echo", handle_echo),
    web.get("/ping", handle_ping),
]

if __name__ == "__main__":
    start_server(backend, routes)
