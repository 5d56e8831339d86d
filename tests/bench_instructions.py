"""bench_instructions: where the worker's time goes, in instructions per request.

    python tests/bench_instructions.py [--requests N]
    python tests/bench_instructions.py --steps       # the worker's steps one by one, timeit

Timing a change on a shared machine moves by more than most changes are worth; instruction
counts do not. This runs one process per setup under valgrind's callgrind, holding a fake
model, the server under test and 8 keep-alive clients on loopback, once with no measured
requests and once with N (1,600 by default): the difference over N is the instructions one
request costs, all three parties together. Setups, from the bare floor up:

    direct     the clients talk to the fake model (client + model: subtract it from the rest)
    streams    a minimal asyncio-streams server answering a canned response
    server     pyworker's HttpServer answering the same canned response
    ceiling    a minimal asyncio-streams proxy: split the head, parse the JSON, forward
    worker     the whole worker: hello_world's /generate handler, UNSECURED, access log on

Needs valgrind (`apt-get install -y valgrind`); uses uvloop and orjson when importable, as the
worker does. Kernel time is not counted: the numbers are the Python side only. Not collected
by pytest (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_worker import (  # noqa: E402 - the same fake model and bodies as bench_worker's
    CONTENT_LENGTH_RE,
    GENERATE_PAYLOAD,
    MODEL_JSON,
    unsigned_body,
)
from bench_worker import _ModelProtocol as FakeModel  # noqa: E402  # pyright: ignore[reportPrivateUsage]

import hello_world  # noqa: E402
import pyworker  # noqa: E402

SETUPS = ("direct", "streams", "server", "ceiling", "worker")
CLIENTS = 8
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(MODEL_JSON),
    MODEL_JSON,
)
REQUEST_BODY = unsigned_body(GENERATE_PAYLOAD)
REQUEST = (
    b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(REQUEST_BODY), REQUEST_BODY)
)


def content_length(head: bytes) -> int:
    match = CONTENT_LENGTH_RE.search(head)
    return int(match[1]) if match else 0


async def streams_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(content_length(head))
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def streams_proxy(model_port: int) -> Callable[..., Awaitable[None]]:
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                body = await reader.readexactly(content_length(head))
                payload = pyworker.json_dumps(pyworker.json_loads(body)["payload"])
                up = pool.pop() if pool else await asyncio.open_connection("127.0.0.1", model_port)
                up[1].write(
                    b"POST %s HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (path, len(payload), payload)
                )
                answer_head = await up[0].readuntil(b"\r\n\r\n")
                answer = await up[0].readexactly(content_length(answer_head))
                pool.append(up)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return serve


async def client(port: int, requests: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(requests):
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected answer: {head!r}")
        await reader.readexactly(content_length(head))
    writer.close()


async def canned(request: pyworker.Request) -> pyworker.Response:
    return pyworker.Response(200, MODEL_JSON)


async def child(setup: str, requests: int) -> None:
    """One setup, 20 warm-up requests per client, then `requests` measured ones."""
    loop = asyncio.get_running_loop()
    model = await loop.create_server(FakeModel, "127.0.0.1", 0)
    model_port = int(model.sockets[0].getsockname()[1])
    stop: Callable[[], Awaitable[None]] | None = None
    if setup == "direct":
        port = model_port
    elif setup in ("streams", "ceiling"):
        handler = streams_server if setup == "streams" else streams_proxy(model_port)
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
    elif setup == "server":
        http_server = pyworker.HttpServer([pyworker.post("/generate", canned)])
        port = await http_server.start()
        stop = http_server.shutdown
    else:
        log_handler = pyworker._LogHandler()  # pyright: ignore[reportPrivateUsage]
        logging.basicConfig(level="INFO", handlers=[log_handler])
        pyworker._access_log_line.direct = log_handler.access  # pyright: ignore[reportPrivateUsage]
        url = f"http://127.0.0.1:{model_port}"
        generate = hello_world.GenerateHandler()
        backend = pyworker.Backend(url, None, True, generate, [])
        routes = [pyworker.post("/generate", backend.create_handler(generate))]
        config = pyworker.Config(
            host="127.0.0.1",
            unsecured=True,
            report_addrs=["http://127.0.0.1:9"],
            model_server_url=url,
            report_check_interval=3600,
        )
        worker = await pyworker.start_worker(backend, routes, config, port=0)
        backend.state = pyworker.State.READY  # no model log, no benchmark: ready at once
        backend.max_perf = 1000.0
        port = worker.port
        stop = worker.stop
    await asyncio.gather(*(client(port, 20) for _ in range(CLIENTS)))
    if requests:
        await asyncio.gather(*(client(port, requests // CLIENTS) for _ in range(CLIENTS)))
    if stop is not None:
        await stop()


def steps() -> None:
    """Microseconds per call of each step the worker adds to a /generate request, and of
    the ceiling's whole parse-and-forward work, on the same request (best of 5 timeit runs)."""
    import timeit

    sys.stdout, out = open(os.devnull, "w"), sys.stdout  # noqa: SIM115 - the access log's sink
    log_handler = pyworker._LogHandler()  # pyright: ignore[reportPrivateUsage]
    logging.basicConfig(level="INFO", handlers=[log_handler])
    pyworker._access_log_line.direct = log_handler.access  # pyright: ignore[reportPrivateUsage]
    backend = pyworker.Backend("http://127.0.0.1:1", None, True, hello_world.GenerateHandler(), [])
    backend.config = pyworker.Config(unsecured=True)
    request_head = REQUEST[: REQUEST.index(b"\r\n\r\n") + 4]
    answer_head = ANSWER[: ANSWER.index(b"\r\n\r\n") + 4]

    def parse() -> tuple[pyworker.ApiPayload, pyworker.AuthData | None]:
        msg = pyworker.decode_client_json(REQUEST_BODY)
        return pyworker.parse_client_request(hello_world.InputData.from_json_msg, msg, None)

    payload, _ = parse()

    def bookkeeping() -> None:
        job = pyworker._Job(backend.metrics, "/generate", 7.0)  # pyright: ignore[reportPrivateUsage]
        backend.metrics.queue_wait.observe(0.0)
        job.finish("served", 200)

    def ceiling() -> None:
        content_length(request_head)
        pyworker.json_dumps(pyworker.json_loads(REQUEST_BODY)["payload"])
        content_length(answer_head)
        _ = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(MODEL_JSON), MODEL_JSON)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("strict request head parse", lambda: pyworker.parse_request_head(request_head)),
        ("strict model-answer head parse", lambda: pyworker.parse_response_head(answer_head)),
        ("JSON body and payload fields", parse),
        ("hello_world token count", payload.count_workload),
        ("model request body", lambda: pyworker.json_dumps(payload.generate_payload_json())),
        ("bookkeeping, histograms, access line", bookkeeping),
        (
            "response head",
            lambda: pyworker.response_head(
                200,
                [("Content-Type", "application/json")],
                content_length=len(MODEL_JSON),
                keep_alive=True,
            ),
        ),
        ("the ceiling's whole parse-and-forward", ceiling),
    ]
    total = 0.0
    for name, call in cases:
        runs = timeit.repeat(call, number=50_000, repeat=5)
        us = min(runs) / 50_000 * 1e6
        if not name.startswith("the ceiling"):
            total += us
        print(f"  {name:<40} {us:6.2f} us", file=out, flush=True)
    print(f"  {'the worker steps together':<40} {total:6.2f} us", file=out)
    log_handler.flush()  # into /dev/null, then stdout is stdout again
    logging.getLogger().removeHandler(log_handler)
    sys.stdout = out


def instructions(setup: str, requests: int) -> int:
    """Instructions the whole child process ran, counted by callgrind."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            setup,
            "--requests",
            str(requests),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or found is None:
        raise SystemExit(f"{setup}: the child failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=1600, help="measured requests (1,600)")
    parser.add_argument("--steps", action="store_true", help="time the worker's steps apart")
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 0 or args.requests % CLIENTS or not (args.requests or args.child):
        parser.error(f"--requests must be a positive multiple of {CLIENTS}")
    if args.child:
        pyworker.install_uvloop()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the worker's log, for the process's life
        asyncio.run(child(args.child, args.requests))
        return 0
    if args.steps:
        pyworker.install_uvloop()
        steps()
        return 0
    if shutil.which("valgrind") is None:
        print("bench_instructions needs valgrind: apt-get install -y valgrind", file=sys.stderr)
        return 2
    print(f"instructions per request, {args.requests} requests, {CLIENTS} clients (callgrind):")
    floor = 0
    for setup in SETUPS:
        per_request = (instructions(setup, args.requests) - instructions(setup, 0)) // args.requests
        if setup == "direct":
            floor = per_request
            print(f"  {setup:<8} {per_request:>9,}  (client + fake model)", flush=True)
        else:
            print(
                f"  {setup:<8} {per_request:>9,}  server alone {per_request - floor:,}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
