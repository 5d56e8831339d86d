"""Helpers shared by the test files (and tests/soak.py): bounded event loops and polling, keys,
an in-process worker rig, a `python hello_world.py` child process, and a raw HTTP/1.1 client.

Not a test module (pytest collects only test_*.py); the test files import it as `support`,
the way they import test_load and each other (tests/ is on sys.path).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import hello_world
import pyworker
from pyworker import Backend, Config, State
from test_load import FakeModel, RsaPrivateKey

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
WORKER_FILE = ROOT / "hello_world.py"
UNUSED_URL = "http://127.0.0.1:9"  # nothing listens on the discard port


# Event loops and polling #########################################################################


class Runner:
    """`run(coro)`: the coroutine on a fresh event loop, failing after `timeout` seconds (the
    default each test file picks) so that a hang fails the test instead of stalling CI."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __call__(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        limit = self.timeout if timeout is None else timeout

        async def main() -> T:
            return await asyncio.wait_for(coro, limit)

        return asyncio.run(main())


async def until(
    cond: Callable[[], object], timeout: float, what: str, *, interval: float = 0.02
) -> None:
    """Poll `cond` every `interval` seconds until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A loopback port free a moment ago (nobody listens on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


# Keys ############################################################################################


def _pem_der(text: str) -> bytes:
    """The DER inside the first PEM block of `text`."""
    lines = text.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN"))
    end = next(i for i, line in enumerate(lines) if line.startswith("-----END"))
    return base64.b64decode("".join(lines[start + 1 : end]))


def _der_integers(der: bytes) -> list[int]:
    """The INTEGERs of a DER SEQUENCE of INTEGERs, e.g. a PKCS#1 RSAPrivateKey."""

    def header(pos: int) -> tuple[int, int, int]:
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(der[pos : pos + count], "big")
            pos += count
        return tag, pos, length

    tag, pos, length = header(0)
    assert tag == 0x30
    end = pos + length
    values: list[int] = []
    while pos < end:
        tag, pos, length = header(pos)
        assert tag == 0x02
        values.append(int.from_bytes(der[pos : pos + length], "big"))
        pos += length
    return values


def load_private_key(name: str) -> RsaPrivateKey:
    """A PKCS#1 `RSA PRIVATE KEY` PEM from tests/data as test_load's signer."""
    _version, n, e, d, p, q, *_crt = _der_integers(_pem_der((DATA / name).read_text()))
    return RsaPrivateKey(n, e, d, p, q)


@functools.cache
def generated_key(name: str) -> RsaPrivateKey:
    """A fresh 2048-bit RSA key per name per test run (pure-Python generation takes about a
    second); different names give different keys."""
    del name
    return RsaPrivateKey.generate(2048)


def signing_key() -> RsaPrivateKey:
    """The autoscaler's key, where a test file needs only one."""
    return generated_key("signer")


# The worker in-process ###########################################################################


class FastGenerateHandler(hello_world.GenerateHandler):
    benchmark_runs = 1  # the benchmark is not what these tests measure


def loaded_model_log(directory: Path) -> Path:
    """directory/model.log, holding the line that marks the model loaded."""
    path = directory / "model.log"
    path.write_text(FakeModel.LOADED_LINE + "\n")
    return path


def make_backend(
    handler: pyworker.EndpointHandler[Any],
    log_actions: list[tuple[pyworker.LogAction, str]],
    *,
    model_url: str = UNUSED_URL,  # Config.model_server_url overrides it
    parallel: bool = True,
    max_queue_time: float | None = None,
) -> Backend:
    """A Backend benchmarking with `handler`; the model log is read by the worker's Config."""
    return Backend(
        model_server_url=model_url,
        model_log_file=None,
        allow_parallel_requests=parallel,
        benchmark_handler=handler,
        log_actions=log_actions,
        max_queue_time=max_queue_time,
    )


def hello_world_routes(
    backend: Backend, generate: pyworker.EndpointHandler[Any]
) -> list[pyworker.Route]:
    """/generate with `generate`, /generate_stream with hello_world's stream handler."""
    return [
        pyworker.post("/generate", backend.create_handler(generate)),
        pyworker.post(
            "/generate_stream", backend.create_handler(hello_world.GenerateStreamHandler())
        ),
    ]


def worker_config(
    tmp: Path,
    model_url: str,
    report_addrs: list[str],
    /,
    *,
    base: Config | None = None,
    **settings: Any,
) -> Config:
    """A Config on 127.0.0.1 with tmp/model.log and tmp/.has_benchmark; `settings` (or, under
    them, `base`) fill in the rest."""
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "model_server_url": model_url,
        "model_log": str(tmp / "model.log"),
        "benchmark_cache": str(tmp / ".has_benchmark"),
        "report_addrs": report_addrs,
        **settings,
    }
    return dataclasses.replace(base if base is not None else Config(), **fields)


async def wait_ready(backend: Backend, timeout: float, interval: float = 0.02) -> None:
    await until(
        lambda: backend.state is State.READY, timeout, "the worker to be ready", interval=interval
    )


async def stop_worker(worker: pyworker.Worker, grace: float = 1.0, stack_limit: int = 6) -> None:
    """Worker.stop, bounded: a stop that hangs fails the test and shows what it waits on."""
    stopping = asyncio.ensure_future(worker.stop(grace=grace))
    done, _ = await asyncio.wait([stopping], timeout=grace + 8.0)
    if not done:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.print_stack(limit=stack_limit, file=stacks)
        stopping.cancel()
        raise AssertionError("Worker.stop() hung; pending tasks:\n" + stacks.getvalue())
    stopping.result()


@contextlib.asynccontextmanager
async def started_worker(
    backend: Backend,
    routes: list[pyworker.Route],
    config: Config,
    *,
    ready_within: float | None = None,
    ready_interval: float = 0.02,
    bounded_stop: bool = True,
    stack_limit: int = 6,
) -> AsyncGenerator[pyworker.Worker, None]:
    """A worker on port 0; ready first when `ready_within` is given; stopped on the way out
    (with stop_worker's bound when `bounded_stop`, else a plain Worker.stop(grace=1.0))."""
    worker = await pyworker.start_server(backend, routes, config, port=0)
    try:
        if ready_within is not None:
            await wait_ready(backend, ready_within, ready_interval)
        yield worker
    finally:
        if bounded_stop:
            await stop_worker(worker, stack_limit=stack_limit)
        else:
            await worker.stop(grace=1.0)


class WorkerAddress:
    """`port` and `url` of the `worker` attribute, for the dataclasses around a worker."""

    worker: pyworker.Worker

    @property
    def port(self) -> int:
        return self.worker.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def signed_auth(
    signer: RsaPrivateKey, cost: str, reqnum: int, url: str, /, **fields: Any
) -> dict[str, Any]:
    """auth_data for the "hello" endpoint as the autoscaler signs it; `fields` override any."""
    values: dict[str, Any] = {"cost": cost, "endpoint": "hello", "reqnum": reqnum, "url": url}
    values.update(fields)
    return signer.sign_auth(**values)


async def fetch(
    url: str, method: str, route: str, body: bytes | None = None, *, timeout: float
) -> tuple[int, bytes]:
    """One request with pyworker.HttpClient on a new connection; (status, body)."""
    client = pyworker.HttpClient(url)
    try:
        async with await client.request(method, route, body, timeout=timeout) as resp:
            return resp.status, await resp.read()
    finally:
        await client.close()


# The worker as a process #########################################################################


def unsecured_env(port: int, model_log: Path, model_url: str, **extra: str) -> dict[str, str]:
    """This process's environment for an UNSECURED `python hello_world.py` on `port`, whose
    load reports go nowhere (they fail, quietly); `extra` adds or replaces variables."""
    return {
        **os.environ,
        "WORKER_PORT": str(port),
        "MODEL_LOG": str(model_log),
        "MODEL_SERVER_URL": model_url,
        "UNSECURED": "true",
        "REPORT_ADDR": UNUSED_URL,
        "PYTHONPATH": str(ROOT),
        **extra,
    }


async def launch_hello_world(
    workdir: Path,
    env: Mapping[str, str],
    *,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None,
    stdin: int | IO[Any] | None = None,
) -> asyncio.subprocess.Process:
    """`python hello_world.py` in `workdir` with exactly `env`."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_FILE),
        cwd=str(workdir),
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


# A raw HTTP/1.1 client: the client side owes nothing to the code under test ######################


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool = True  # a chunked body ended with its last chunk (always so for a sized one)

    def json(self) -> Any:
        return json.loads(self.body)


def encode_request(method: str, path: str, body: Any = None, *, close: bool = True) -> bytes:
    """A request with `body` as JSON (none when None), asking for Connection: close."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + data


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and the headers (names in lower case) of a response."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes | None:
    """One chunk's data; b"" for the last chunk; None if the stream was cut."""
    try:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b""
        return (await reader.readexactly(size + 2))[:-2]
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    status, headers = await read_head(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            chunk = await read_chunk(reader)
            if not chunk:
                return Reply(status, headers, b"".join(parts), chunk == b"")
            parts.append(chunk)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body, True)


async def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Reply:
    """One request on a new connection to 127.0.0.1:`port`; the reply within `timeout`."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_context, server_hostname="127.0.0.1" if ssl_context else None
    )
    try:
        writer.write(encode_request(method, path, body))
        return await asyncio.wait_for(read_reply(reader), timeout)
    finally:
        writer.close()


def generate(prompt: str = "hello there world") -> dict[str, Any]:
    """An unsigned client body for the hello_world routes (for a worker running UNSECURED)."""
    return {"payload": {"prompt": prompt, "max_response_tokens": 4}}


async def stalled_server() -> tuple[asyncio.Server, list[asyncio.StreamWriter]]:
    """An 'autoscaler' that accepts connections, reads, and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    return await asyncio.start_server(swallow, "127.0.0.1", 0), writers
