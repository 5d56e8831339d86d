"""The openai worker's payloads: an abstract payload taking any `input` object, with
completions and chat completions as its concrete kinds, and the handlers' abstract base."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from abc import ABC, abstractmethod
from typing import Any

from pyworker import ApiPayload, ClientResponse, EndpointHandler, JsonDataException, web

log = logging.getLogger("openai")

TOPICS = "tides glaciers comets lichens volcanoes reefs auroras dunes".split()


@dataclasses.dataclass
class GenericData(ApiPayload, ABC):
    input: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenericData:
        return cls(input=data["input"])

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> GenericData:
        if "input" not in json_msg:
            raise JsonDataException({"input": "missing parameter"})
        try:
            cls.check_input(json_msg["input"])
        except JsonDataException as e:
            raise JsonDataException({"input": e.message}) from None
        return cls.from_dict({"input": json_msg["input"]})

    @staticmethod
    def check_input(value: Any) -> None:
        if not isinstance(value, dict):
            raise JsonDataException("expected an object with the model API's fields")

    @classmethod
    @abstractmethod
    def for_test(cls) -> GenericData:
        pass

    def generate_payload_json(self) -> dict[str, Any]:
        return self.input

    def count_workload(self) -> float:
        return float(self.input.get("max_tokens", 0))


@dataclasses.dataclass
class CompletionsData(GenericData):
    @classmethod
    def for_test(cls) -> CompletionsData:
        question = " ".join(random.choices(TOPICS, k=12))
        model = os.environ.get("MODEL_NAME", "test-model")
        return cls(input={"model": model, "prompt": f"Tell me about {question}", "max_tokens": 50})


@dataclasses.dataclass
class ChatCompletionsData(GenericData):
    @classmethod
    def for_test(cls) -> ChatCompletionsData:
        question = " ".join(random.choices(TOPICS, k=12))
        messages = [{"role": "user", "content": f"Tell me about {question}"}]
        return cls(input={"model": "test-model", "messages": messages, "max_tokens": 50})


@dataclasses.dataclass
class GenericHandler(EndpointHandler[GenericData], ABC):
    @property
    @abstractmethod
    def endpoint(self) -> str:
        pass

    @property
    def healthcheck_endpoint(self) -> str | None:
        return os.environ.get("MODEL_HEALTH_ENDPOINT")

    @classmethod
    def payload_cls(cls) -> type[GenericData]:
        return GenericData

    @abstractmethod
    def make_benchmark_payload(self) -> GenericData:
        pass

    async def generate_client_response(
        self, client_request: web.Request, model_response: ClientResponse
    ) -> web.Response | web.StreamResponse:
        match model_response.status:
            case 200:
                streaming = (
                    model_response.content_type in ("text/event-stream", "application/x-ndjson")
                    or model_response.headers.get("Transfer-Encoding") == "chunked"
                    or "stream" in model_response.content_type.lower()
                )
                if streaming:
                    log.debug("streaming the model's answer")
                    res = web.StreamResponse()
                    res.content_type = model_response.content_type
                    await res.prepare(client_request)
                    async for chunk in model_response.content.iter_any():
                        await res.write(chunk)
                    await res.write_eof()
                    return res
                content = await model_response.read()
                return web.Response(
                    body=content, status=200, content_type=model_response.content_type
                )
            case code:
                return web.Response(status=code)


@dataclasses.dataclass
class CompletionsHandler(GenericHandler):
    @property
    def endpoint(self) -> str:
        return "/v1/completions"

    @classmethod
    def payload_cls(cls) -> type[CompletionsData]:
        return CompletionsData

    def make_benchmark_payload(self) -> CompletionsData:
        return CompletionsData.for_test()


@dataclasses.dataclass
class ChatCompletionsHandler(GenericHandler):
    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions"

    @classmethod
    def payload_cls(cls) -> type[ChatCompletionsData]:
        return ChatCompletionsData

    def make_benchmark_payload(self) -> ChatCompletionsData:
        return ChatCompletionsData.for_test()
