"""A worker file of today's vastai form whose lifecycle context starts "the model": its
__aenter__ connects to the test (TEST_GATE_PORT), says so, and waits for the test's word:
"go" returns (the model is up), anything else raises. Its __aexit__ leaves a mark in TEST_MARKS,
with what it was told. Used by tests/test_compat_vastai.py, which runs it as a process."""

import asyncio
import os
from pathlib import Path
from types import TracebackType

from pyworker import BenchmarkConfig, HandlerConfig, Worker, WorkerConfig

MARKS = Path(os.environ["TEST_MARKS"])


class ModelServer:
    """Starts the model: as long as the test wants, as a real model's start takes minutes."""

    async def __aenter__(self) -> "ModelServer":
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(os.environ["TEST_GATE_PORT"])
        )
        writer.write(b"entering\n")
        await writer.drain()
        word = (await reader.readline()).strip()
        writer.close()
        if word != b"go":
            raise RuntimeError("no model server binary")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with open(MARKS / "exited", "a") as mark:  # appended: a second exit would show
            mark.write(f"{exc_type!r}\n")


Worker(
    WorkerConfig(
        model_server_url="http://127.0.0.1",
        model_server_port=9,  # MODEL_SERVER_URL (the test's fake model) wins
        model_healthcheck_url="/health",  # answers 200 at once: not "loaded" before __aenter__
        lifecycle=ModelServer(),
        handlers=[
            HandlerConfig(
                route="/generate",
                benchmark_config=BenchmarkConfig(
                    dataset=[{"prompt": "hi", "max_response_tokens": 2}], runs=1
                ),
            )
        ],
    )
).run()
