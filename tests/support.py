"""Helpers shared by the test files (and tests/soak.py): bounded event loops and polling, keys,
the one in-process worker rig (worker_rig, Rig), a `python hello_world.py` child process
(spawned_worker), and the one raw HTTP/1.1 client (RawClient, request, request_bytes,
exchange).

Not a test module (pytest collects only test_*.py); the test files import it as `support`,
the way they import test_load and each other (tests/ is on sys.path: pyproject.toml's
pytest `pythonpath`).
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
import struct
import subprocess
import sys
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import IO, Any, TypeVar

import hello_world
import pyworker
from pyworker import Backend, Config, State
from test_load import FakeModel, LocalAutoscaler, RsaPrivateKey, reserve_port

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
    """A loopback port nobody listens on, and that nobody else gets for a minute or so: a
    port merely free a moment ago (bind to 0, close) can be handed to another test's socket
    before the child process binds it (issue 18: test_tls_ping's WORKER_PORT + 1 was).

    The port is reserved by a connection to it, accepted and closed by the accepting side
    first: that side's end waits in TIME_WAIT, and Linux hands a port with a TIME_WAIT socket
    to no bind(0) and no outgoing connection, while a server setting SO_REUSEADDR (asyncio's
    do, the worker's does) binds it at once."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports reserved as free_port() reserves one (a worker's WORKER_PORT
    and WORKER_HTTP_PORT: pass both, never count on WORKER_PORT + 1 being free)."""
    ports: list[int] = []
    while len(ports) < count:
        port = reserve_port()
        if port not in ports:
            ports.append(port)
    return ports


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
def signing_key() -> RsaPrivateKey:
    """The autoscaler's key, where a test file needs only one: tests/data/test_key.pem (a
    pure-Python 2048-bit key generation would take about a second)."""
    return load_private_key("test_key.pem")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 made by the openssl command (tests needing it skip
    where it is missing)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


# The seed's load report (SPEC section 7): exactly these fields
SEED_REPORT_FIELDS = frozenset(
    {
        "id",
        "loadtime",
        "cur_load",
        "error_msg",
        "max_perf",
        "cur_perf",
        "cur_capacity",
        "max_capacity",
        "num_requests_working",
        "num_requests_recieved",
        "additional_disk_usage",
        "url",
    }
)


# The worker in-process: the rig ##################################################################

REPORT_BACKOFF = 0.01  # the rig's Config.report_backoff: a last load report to an autoscaler
# that is gone (a test stopped it, or there never was one) fails in milliseconds, not 1.5 s

MODEL_ERROR = "Exception: corrupted model file"  # hello_world's model-error line
LOG_ACTIONS = [  # hello_world's, written out: the rig's default
    (pyworker.LogAction.ModelLoaded, FakeModel.LOADED_LINE),
    (pyworker.LogAction.ModelError, MODEL_ERROR),
    (pyworker.LogAction.Info, '"message":"Download'),
]


class FastGenerateHandler(hello_world.GenerateHandler):
    benchmark_runs = 1  # the benchmark is not what these tests measure


def model_log(directory: Path) -> Path:
    """Where the rig's worker reads its model log: directory/model.log."""
    return directory / "model.log"


def loaded_model_log(directory: Path) -> Path:
    """directory/model.log, holding the line that marks the model loaded."""
    path = model_log(directory)
    path.write_text(FakeModel.LOADED_LINE + "\n")
    return path


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


async def stop_worker(
    worker: pyworker.RunningWorker, grace: float = 1.0, stack_limit: int = 6
) -> None:
    """RunningWorker.stop, bounded: a stop that hangs fails the test and shows what it waits on."""
    stopping = asyncio.ensure_future(worker.stop(grace=grace))
    done, _ = await asyncio.wait([stopping], timeout=grace + 8.0)
    if not done:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.print_stack(limit=stack_limit, file=stacks)
        stopping.cancel()
        raise AssertionError("RunningWorker.stop() hung; pending tasks:\n" + stacks.getvalue())
    stopping.result()


async def _let_closed_connections_go(worker: pyworker.RunningWorker, bound: float = 0.05) -> None:
    """Wait (`bound` at most) for the connections the test closed to leave the server: a
    close takes a few loop steps to arrive, and RunningWorker.stop finding none left spares every
    test its 50 ms shutdown poll. Connections still open are RunningWorker.stop's business."""
    deadline = time.monotonic() + bound
    while worker.server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def signed_auth(
    signer: RsaPrivateKey, cost: str, reqnum: int, url: str, /, **fields: Any
) -> dict[str, Any]:
    """auth_data for the "hello" endpoint as the autoscaler signs it; `fields` override any."""
    values: dict[str, Any] = {"cost": cost, "endpoint": "hello", "reqnum": reqnum, "url": url}
    values.update(fields)
    return signer.sign_auth(**values)


@dataclasses.dataclass
class Rig:
    """A worker running in this event loop on 127.0.0.1, and what surrounds it (worker_rig)."""

    backend: Backend
    worker: pyworker.RunningWorker
    fake: FakeModel  # the rig's model server (the worker may be pointed elsewhere: model_url)
    autoscaler: LocalAutoscaler | None  # None when the test named report_addrs itself
    client: pyworker.HttpClient  # keep-alive connections to the worker
    log: Path  # the model log the worker tails
    cache: Path  # the benchmark cache (max_perf)
    signer: RsaPrivateKey | None  # the autoscaler's key, for auth()
    cost: str = "100"  # what auth() signs as the request's cost
    reqnum: int = 0  # the last reqnum auth() signed

    @property
    def port(self) -> int:
        return self.worker.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def reports(self) -> list[dict[str, Any]]:
        """The load reports the rig's autoscaler received."""
        assert self.autoscaler is not None
        return self.autoscaler.reports

    def auth(self, signer: RsaPrivateKey | None = None, **fields: Any) -> dict[str, Any]:
        """auth_data as the autoscaler's /route/ hands it out, with a fresh reqnum (and the
        __request_id /route/ adds, which the worker ignores); `fields` override what is signed."""
        key = signer or self.signer
        assert key is not None, "the rig has no signer"
        self.reqnum += 1
        auth = signed_auth(key, self.cost, self.reqnum, self.url, **fields)
        auth["__request_id"] = f"req-{self.reqnum}"
        return auth

    def body(self, prompt: str = "tell me about cats", **payload: Any) -> bytes:
        """A signed request body for the hello_world routes."""
        request = {"auth_data": self.auth(), "payload": {"prompt": prompt, **payload}}
        return json.dumps(request).encode()

    async def post(
        self, route: str, body: bytes | dict[str, Any], *, timeout: float = 20.0
    ) -> Reply:
        """POST with pyworker.HttpClient (keep-alive); a dict body is sent as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with await self.client.request("POST", route, data, timeout=timeout) as resp:
            return Reply(resp.status, Fields(resp.headers.items()), await resp.read())

    async def get(self, route: str, *, timeout: float = 20.0) -> Reply:
        async with await self.client.request("GET", route, timeout=timeout) as resp:
            return Reply(resp.status, Fields(resp.headers.items()), await resp.read())

    @property
    def tls(self) -> ssl.SSLContext | None:
        """A client TLS context trusting the worker's certificate when it serves TLS
        (Config.use_ssl); None when it serves plain HTTP."""
        config = self.backend.config
        if not config.use_ssl:
            return None
        return ssl.create_default_context(cafile=config.ssl_cert)

    async def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 10.0
    ) -> Reply:
        """One request with the raw client (support.request: Connection: close, on a new
        connection), over TLS when the worker serves TLS; a bytes body is sent as it is."""
        return await request(self.port, method, path, body, timeout=timeout, ssl_context=self.tls)

    async def wait_ready(self, timeout: float = 10.0, *, pubkey: bool = True) -> None:
        """Until the worker serves: ready, and holding the public key unless UNSECURED (or
        `pubkey` is False: a worker whose key never comes is ready all the same)."""
        backend = self.backend
        await until(
            lambda: (
                backend.state is State.READY
                and (not pubkey or backend.config.unsecured or backend.pubkey is not None)
            ),
            timeout,
            "the worker to be ready",
            interval=0.01,
        )

    def settled(self) -> bool:
        """Nothing in flight, and every request in exactly one outcome."""
        metrics = self.backend.metrics
        return metrics.in_flight.requests == 0 and metrics.consistent()


@contextlib.asynccontextmanager
async def worker_rig(
    tmp: Path,
    *,
    fake: FakeModel | None = None,
    model_url: str | None = None,
    autoscaler: LocalAutoscaler | None = None,
    report_addrs: list[str] | None = None,
    signer: RsaPrivateKey | None = None,
    cost: str = "100",
    handler: pyworker.EndpointHandler[Any] | None = None,
    routes: list[pyworker.Route] | Callable[[Backend], list[pyworker.Route]] | None = None,
    log_actions: list[tuple[pyworker.LogAction, str]] | None = None,
    parallel: bool = True,
    max_queue_time: float | None = None,
    healthcheck_endpoint: str | None = None,
    benchmark_runs: int | None = None,
    max_sessions: int = 10,
    backend: Backend | None = None,
    cached_max_perf: float | None = None,
    ready: bool = True,
    base: Config | None = None,
    **settings: Any,
) -> AsyncGenerator[Rig, None]:
    """A worker on port 0 with a FakeModel and a LocalAutoscaler; all stopped on the way out.

    fake            the model server, started and stopped here; by default one that writes
                    tmp/model.log (the model is loaded at once)
    model_url       the worker's model URL instead of the fake's
    autoscaler      the report target, started and stopped here; by default a LocalAutoscaler
                    with `signer` (signing_key() if none)
    report_addrs    the report targets instead of an autoscaler (the rig starts none)
    signer, cost    what Rig.auth() signs with
    handler         the benchmark handler (FastGenerateHandler: one round)
    routes          the model routes: a list, or a function of the Backend giving them
                    (hello_world's, /generate with `handler`, unless given)
    log_actions     LOG_ACTIONS (hello_world's) unless given
    parallel, max_queue_time, healthcheck_endpoint, benchmark_runs, max_sessions
                    the Backend's arguments (allow_parallel_requests for `parallel`)
    backend         an existing Backend (e.g. a worker file's module-level one, with that
                    file's `routes`) instead of the rig's: handler, log_actions and the
                    Backend's arguments above are its own then
    cached_max_perf a benchmark cache written first, as the backend's benchmark handler
                    would have written it: the benchmark is not run
    ready           wait until the worker serves (Rig.wait_ready) before yielding
    base, settings  Config fields: `settings` over `base` over the rig's: host 127.0.0.1,
                    tmp/model.log, tmp/.has_benchmark, the report targets, REPORT_BACKOFF
    """
    log, cache = model_log(tmp), tmp / ".has_benchmark"
    fake = fake if fake is not None else FakeModel(log_path=str(log))
    handler = handler or FastGenerateHandler()
    if report_addrs is None and autoscaler is None:
        autoscaler = LocalAutoscaler(signer or signing_key())
    started: list[FakeModel | LocalAutoscaler] = []
    try:
        started.append(await fake.start())
        if backend is None:
            backend = Backend(
                model_server_url=model_url or fake.url,  # Config.model_server_url overrides it
                model_log_file=None,  # Config.model_log gives it
                allow_parallel_requests=parallel,
                benchmark_handler=handler,
                log_actions=LOG_ACTIONS if log_actions is None else log_actions,
                max_queue_time=max_queue_time,
                healthcheck_endpoint=healthcheck_endpoint,
                benchmark_runs=benchmark_runs,
                max_sessions=max_sessions,
            )
        if cached_max_perf is not None:  # as this very worker would have cached it
            model = pyworker.HttpClient(model_url or fake.url)
            bench = pyworker.Benchmark(
                model, backend.benchmark_handler, runs=1, concurrency=1, cache_path=str(cache)
            )
            bench.save(cached_max_perf)
        if autoscaler is not None:
            started.append(await autoscaler.start())
            report_addrs = [autoscaler.url]
        assert report_addrs is not None
        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "model_server_url": model_url or fake.url,
            "model_log": str(log),
            "benchmark_cache": str(cache),
            "report_addrs": report_addrs,
            "report_backoff": REPORT_BACKOFF,
            **settings,
        }
        config = dataclasses.replace(base if base is not None else Config(), **fields)
        if routes is None:
            model_routes = hello_world_routes(backend, handler)
        else:
            model_routes = routes(backend) if callable(routes) else routes
        worker = await pyworker.start_worker(backend, model_routes, config, port=0)
        client = pyworker.HttpClient(f"http://127.0.0.1:{worker.port}")
        key = signer or (autoscaler.key if autoscaler is not None else None)
        rig = Rig(backend, worker, fake, autoscaler, client, log, cache, key, cost)
        try:
            if ready:
                await rig.wait_ready()
            yield rig
        finally:
            await client.close()
            await _let_closed_connections_go(worker)
            await stop_worker(worker)
    finally:
        for server in started:
            await server.stop()


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


class StalledServer:
    """An 'autoscaler' on loopback that accepts connections, reads, and never answers."""

    def __init__(self) -> None:
        self.conns: list[asyncio.StreamWriter] = []  # every connection it accepted
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> StalledServer:
        self._server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def close(self) -> None:
        """Stop listening and close every connection (again: a no-op)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for writer in self.conns:
                writer.close()
            await server.wait_closed()


# The worker as a process #########################################################################

# Variables a developer's shell may have set that would change the child's behaviour.
WORKER_VARS = (
    "WORKER_PORT",
    "MODEL_LOG",
    "MODEL_SERVER_URL",
    "REPORT_ADDR",
    "PUBKEY_FILE",
    "UNSECURED",
    "USE_SSL",
    "WORKER_SSL_CERT",
    "WORKER_SSL_KEY",
    "CONTAINER_ID",
    "PUBLIC_IPADDR",
    "LOG_LEVEL",
    "MAX_BODY_BYTES",
    "WORKER_HTTP_PORT",
    "MODEL_API_WAIT",
    "MASTER_TOKEN",
    "REPORT_FORMAT",
    "SIGNATURE_LAYOUTS",
    "MODEL_HEALTH_ENDPOINT",
    "BENCHMARK_CACHE",
)


def child_env(**env: str) -> dict[str, str]:
    """This process's environment without the worker's variables, pyworker importable,
    output unbuffered; `env` adds or replaces variables."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in WORKER_VARS and not k.startswith("VAST_TCP_PORT_")
    }
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env)
    return base


def unsecured_vars(
    model_log: Path | str, model_url: str, report_addr: str = UNUSED_URL, **extra: str
) -> dict[str, str]:
    """The variables of an UNSECURED `python hello_world.py` (load reports to nowhere by
    default: they fail, quietly); `extra` adds or replaces variables."""
    return {
        "MODEL_LOG": str(model_log),
        "MODEL_SERVER_URL": model_url,
        "REPORT_ADDR": report_addr,
        "UNSECURED": "true",
        **extra,
    }


def unsecured_env(port: int, model_log: Path, model_url: str, **extra: str) -> dict[str, str]:
    """The whole child_env of an UNSECURED `python hello_world.py` on `port`."""
    return child_env(WORKER_PORT=str(port), **unsecured_vars(model_log, model_url, **extra))


async def launch_hello_world(
    workdir: Path,
    env: Mapping[str, str],
    *,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None,
    stdin: int | IO[Any] | None = None,
    program: Sequence[str] = (),
) -> asyncio.subprocess.Process:
    """`python hello_world.py` (or `python *program`) in `workdir` with exactly `env`."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *(program or [str(WORKER_FILE)]),
        cwd=str(workdir),
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


@dataclasses.dataclass
class WorkerProcess:
    """A `python hello_world.py` child (spawned_worker), its output in `log_file`."""

    proc: asyncio.subprocess.Process
    port: int
    log_file: Path

    def output(self) -> str:
        """All the child's output so far: for presence and count checks (a line that scrolled
        out of the last few KiB is still there)."""
        return self.log_file.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        """The end of its output: for an assertion's message."""
        return self.output()[-chars:]

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
        """Poll `check` until it is true; the seconds it took. Fails early if the child died."""
        start = time.monotonic()
        while not await check():
            if self.proc.returncode is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"waited {timeout}s for {what}:\n{self.tail()}")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def ping(self) -> bool:
        try:
            reply = await request(self.port, "GET", "/ping", timeout=2.0)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        return reply.status == 200 and reply.body == b"pong"

    async def is_ready(self) -> bool:
        reply = await request(self.port, "POST", "/generate", generate())
        assert reply.status in (200, 503), reply
        return reply.status == 200

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until /ping answers, then until an UNSECURED /generate is served."""
        await self.until(self.ping, timeout, "/ping")
        await self.until(self.is_ready, timeout, "ready")


@contextlib.asynccontextmanager
async def spawned_worker(
    workdir: Path, program: Sequence[str] = (), **env: str
) -> AsyncGenerator[WorkerProcess, None]:
    """`python hello_world.py` (or `python *program`, e.g. ["-m", "workers_2024.hello.server"])
    in `workdir` with child_env(**env) (WORKER_PORT and WORKER_HTTP_PORT are picked, free
    together, if absent), its output (stdout and stderr) in workdir/worker.out; killed and
    reaped on the way out."""
    os.makedirs(workdir, exist_ok=True)
    if "WORKER_PORT" not in env:
        port, side = free_ports(2)
        env["WORKER_PORT"] = str(port)
        env.setdefault("WORKER_HTTP_PORT", str(side))
    log_file = workdir / "worker.out"
    with open(log_file, "wb") as out:
        proc = await launch_hello_world(
            workdir,
            child_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            program=program,
        )
    try:
        yield WorkerProcess(proc, int(env["WORKER_PORT"]), log_file)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# A raw HTTP/1.1 client: the client side owes nothing to the code under test ######################

READ_TIMEOUT = 5.0  # seconds each read of a RawClient may take by default


class Fields:
    """Header fields as they arrived: (name, value) pairs in order. `[name]` and `get(name)`
    find the first by name in any case; `in` takes a name (any case) or an exact pair."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self.pairs = list(pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.pairs if k.lower() == lower), default)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return self.get(item) is not None
        return item in self.pairs

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"Fields({self.pairs!r})"


@dataclasses.dataclass
class Reply:
    status: int
    headers: Fields
    body: bytes
    complete: bool = True  # a chunked body ended with its last chunk (always so for a sized one)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def parse_head(head: bytes) -> tuple[int, Fields]:
    """The status and the header fields of a response head (CRLF CRLF included)."""
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = [*lines[0].split(" ", 2), ""]
    if version != "HTTP/1.1" or not (status.isascii() and status.isdigit()):
        raise ValueError(f"not an HTTP/1.1 status line: {lines[0]!r}")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return int(status), Fields(fields)


def encode_request(
    method: str, path: str, body: Any = None, *, close: bool = True, host: str = "127.0.0.1"
) -> bytes:
    """A request with `body` (bytes as they are, anything else as JSON; none when None),
    asking for Connection: close unless `close` is False."""
    if body is None:
        data = b""
    else:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + data


class RawClient:
    """One connection to 127.0.0.1 speaking raw bytes; each read is bounded by `timeout`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        timeout: float = READ_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            limit=1 << 20,
            ssl=ssl_context,
            server_hostname="127.0.0.1" if ssl_context else None,
        )
        return cls(reader, writer, timeout)

    async def send(self, data: bytes, *, pace: float = 0.0) -> None:
        """Write `data` (one byte every `pace` seconds when pace > 0) and drain."""
        if not pace:
            self.writer.write(data)
            await self.writer.drain()
            return
        for i in range(len(data)):
            self.writer.write(data[i : i + 1])
            await self.writer.drain()
            await asyncio.sleep(pace)

    async def send_request(
        self, method: str, path: str, body: Any = None, *, close: bool = False
    ) -> None:
        await self.send(encode_request(method, path, body, close=close))

    async def _bounded(self, step: Awaitable[T]) -> T:
        return await asyncio.wait_for(step, self.timeout)

    async def head_bytes(self) -> bytes:
        """The next response head as it arrived, up to and with its CRLF CRLF."""
        return await self._bounded(self.reader.readuntil(b"\r\n\r\n"))

    async def head(self) -> tuple[int, Fields]:
        return parse_head(await self.head_bytes())

    async def chunk(self) -> bytes:
        """One chunk's data, b"" for the last chunk (its empty trailer section read too);
        asyncio.IncompleteReadError when the connection ends before it is whole."""
        size = int((await self._bounded(self.reader.readuntil(b"\r\n"))).split(b";")[0], 16)
        if size == 0:
            assert await self._bounded(self.reader.readuntil(b"\r\n")) == b"\r\n"
            return b""
        data = await self._bounded(self.reader.readexactly(size + 2))
        assert data.endswith(b"\r\n")
        return data[:-2]

    async def chunk_or_none(self) -> bytes | None:
        """chunk(), or None when the connection ended (EOF or reset) before it was whole."""
        try:
            return await self.chunk()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def chunked_body(self) -> bytes:
        """A chunked body to its last chunk; a cut raises (asyncio.IncompleteReadError)."""
        parts: list[bytes] = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def response(self) -> Reply:
        """The next final response (1xx skipped), its body read by its framing; a chunked
        body cut before its last chunk gives complete=False."""
        status, headers = await self.head()
        while 100 <= status < 200:
            status, headers = await self.head()
        if status in (204, 304):
            return Reply(status, headers, b"")
        if (headers.get("transfer-encoding") or "").lower() == "chunked":
            parts: list[bytes] = []
            while chunk := await self.chunk_or_none():
                parts.append(chunk)
            return Reply(status, headers, b"".join(parts), chunk == b"")
        length = headers.get("content-length")
        if length is not None:
            body = await self._bounded(self.reader.readexactly(int(length)))
        else:
            body = await self.read_to_eof()
        return Reply(status, headers, body)

    async def read_to_eof(self) -> bytes:
        """Everything until the peer closes; a timeout if it does not."""
        return await self._bounded(self.reader.read())

    async def until_closed(self, timeout: float) -> tuple[bytes, bool]:
        """What arrives until the peer closes (or resets) or `timeout` passes; the bytes, and
        whether it closed."""
        received = bytearray()
        closed = False

        async def receive() -> None:
            nonlocal closed
            try:
                while chunk := await self.reader.read(65536):
                    received.extend(chunk)
            except (ConnectionError, OSError):
                pass
            closed = True

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(receive(), timeout)
        return bytes(received), closed

    async def closed_by_peer(self, timeout: float | None = None) -> bool:
        """Whether the peer closed the connection (EOF or reset) within `timeout`, with
        nothing more sent."""
        try:
            data = await asyncio.wait_for(
                self.reader.read(1 << 20), self.timeout if timeout is None else timeout
            )
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            return True
        return data == b""

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes and all."""
        self.writer.transport.abort()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a killed client or a proxy timeout does."""
        sock: socket.socket = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """An ordinary close (FIN)."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_client(port: int, **options: Any) -> AsyncGenerator[RawClient, None]:
    """RawClient.connect(port, **options), closed on the way out."""
    client = await RawClient.connect(port, **options)
    try:
        yield client
    finally:
        await client.close()


async def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Reply:
    """One request (Connection: close) on a new connection; the reply within `timeout`."""
    data = encode_request(method, path, body, close=True)
    return await request_bytes(port, data, timeout=timeout, ssl_context=ssl_context)


async def request_bytes(
    port: int,
    data: bytes,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Reply:
    """`data` sent as it is (a request written by hand) on a new connection; the reply
    (RawClient.response) within `timeout`."""
    client = await RawClient.connect(port, timeout=timeout, ssl_context=ssl_context)
    try:
        await client.send(data)
        return await asyncio.wait_for(client.response(), timeout)
    finally:
        client.writer.close()


@dataclasses.dataclass
class Exchange:
    data: bytes  # everything the peer sent
    closed: bool  # the peer closed (or reset) the connection

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])


async def exchange(
    port: int, data: bytes, *, pace: float = 0.0, timeout: float = READ_TIMEOUT
) -> Exchange:
    """Send raw bytes (one byte per `pace` seconds when pace > 0) on a new connection while
    reading until the peer closes or `timeout` passes. Write errors are expected: the peer
    may close mid-send."""
    client = await RawClient.connect(port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await client.send(data, pace=pace)

    sender = asyncio.ensure_future(send())
    try:
        received, closed = await client.until_closed(timeout)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        client.abort()
    return Exchange(received, closed)


def generate(prompt: str = "hello there world") -> dict[str, Any]:
    """An unsigned client body for the hello_world routes (for a worker running UNSECURED)."""
    return {"payload": {"prompt": prompt, "max_response_tokens": 4}}
