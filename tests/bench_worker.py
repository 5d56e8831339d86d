"""bench_worker: how fast is the worker, beside the baselines, on this machine, in one run.

    python tests/bench_worker.py                      # full run, under ~10 minutes
    python tests/bench_worker.py --quick              # about 2 minutes
    python tests/bench_worker.py --json bench.json --peer-python /path/to/venv/bin/python
    python tests/bench_worker.py --quick --vast-python /tmp/vastvenv/bin/python

It starts a fast fake model (a raw asyncio protocol, in a subprocess of this script), then
`hello_world.py` as a subprocess in front of it, and drives load with `wrk` when it is
installed (else with pyworker's own HttpClient, and says so). One table at the end:

- requests/s, latency p50/p99 and CPU microseconds per request of the server process under
  test (utime + stime from /proc over the measured run: much less sensitive to other load on
  the machine than requests/s) for `/generate` unsigned (UNSECURED=true), signed (unique
  pre-signed requests in the seed layout, a fresh reqnum each), signed in the `url` layout
  (SPEC 11.2: ONE fixed body, the same signature on every request, as today's platform sends;
  its rate over the unsigned rate is issue 12's goal, >= 0.9), and `/generate_stream` (16
  chunks); `/generate` and `/generate_stream` also with today's request shape (auth_data with
  a `request_idx`, as `post_idx.lua`);
- the same against the fake model directly, the aiohttp peer and the thinnest asyncio-streams
  proxy (the baselines in ../shared/bench, run with --peer-python when that folder exists),
  and the ratios worker/direct, worker/peer, worker/ceiling;
- with --vast-python (a side venv holding `vastai` 1.9.1), the platform's own worker
  (../shared/bench/vast_sdk_peer.py, measured once it says the model is loaded) with today's
  request shape, and the ratios worker/vast peer, both with that shape; else "not run";
- the pure-Python signature verification rate (pyworker.RsaPublicKey.verify in a loop), and
  the signed rate as a fraction of it;
- per-token added latency at 200 concurrent streams pacing a token every 20 ms: the fake model
  puts its send time (CLOCK_MONOTONIC, shared by all processes) in each chunk, the client
  subtracts it from the time the chunk arrived;
- worker RSS idle, after 100k requests (20k with --quick) and with 1,000 open streams;
- time from spawn to the first `/ping` 200 (median of several runs).

All of it twice: with the accelerators the interpreter has (uvloop, orjson), and bare
(`python -S`, PYTHONPATH set to the repository: no site-packages, so neither can load; the run
checks it). `--json FILE` writes every figure.

The signing key is a 2048-bit RSA key with e = 65537 made of hundreds of small primes: this
script signs tens of thousands of unique requests in a few seconds in pure Python (a two-prime
key takes ~13 ms a signature), while the worker verifies exactly as it would for any 2048-bit
key (the same modulus size and exponent, so the same pow()).

Only loopback traffic. Every process started here is stopped and waited for at the end, also
on Ctrl-C. Not collected by pytest (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyworker  # noqa: E402

DEFAULT_BASELINES = REPO.parent / "shared" / "bench"
GENERATE_CHUNKS = 16  # tokens of an unpaced /generate_stream answer, as the baselines use
MODEL_JSON = json.dumps({"response": "hello " * 20, "tokens": 20}).encode()
PROMPT = "tell me about cats and dogs please"
PACE_RE = re.compile(rb"pace (\d+) (\d+)")
SENT_RE = re.compile(rb'"sent_ns":(\d+)\}')
CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
STREAM_BODY = (
    b"".join(
        b"%x\r\n%s\r\n" % (len(token), token)
        for token in (b'data: {"token": {"text": "tok%d"}}\n\n' % k for k in range(GENERATE_CHUNKS))
    )
    + b"0\r\n\r\n"
)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


# The fake model ##################################################################################
# `bench_worker.py --serve-model PORT`: the hello_world model API, as cheap as Python allows, so
# that the worker is what is measured. POST /generate answers a fixed JSON body; POST
# /generate_stream answers 16 chunks at once, or, when the request body holds "pace MS COUNT",
# COUNT chunks MS milliseconds apart, each carrying its send time. Anything else (GET /health,
# the worker's POST /worker_status/) answers the JSON body.


class _ModelProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streams: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.streams:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        transport = self.transport
        assert transport is not None
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            match = CONTENT_LENGTH_RE.search(head)
            length = int(match[1]) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            if not path.startswith(b"/generate_stream"):
                transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(MODEL_JSON), MODEL_JSON)
                )
                continue
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            pace = PACE_RE.search(body)
            if pace is None:  # the whole stream at once: the cheapest for the model
                transport.write(STREAM_BODY)
            else:
                task = asyncio.ensure_future(self.paced(int(pace[1]) / 1000, int(pace[2])))
                self.streams.add(task)
                task.add_done_callback(self.streams.discard)

    async def paced(self, interval: float, count: int) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        due = loop.time()
        for k in range(count):
            due += interval
            await asyncio.sleep(due - loop.time())
            token = b'data: {"token":{"text":"tok%d"},"sent_ns":%d}\n\n' % (
                k,
                time.monotonic_ns(),
            )
            transport.write(b"%x\r\n%s\r\n" % (len(token), token))
        transport.write(b"0\r\n\r\n")


def serve_model(port: int) -> None:
    pyworker.install_uvloop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_ModelProtocol, "127.0.0.1", port, backlog=4096)
        print("infer server has started", flush=True)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# Signing #########################################################################################


def _is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(32):
        x = pow(random.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


class MultiPrimeSigner:
    """A 2048-bit RSA key (e = 65537) whose modulus is the product of the odd primes up to
    ~1,400 and one ~24-bit prime: signing is, per small prime, a look-up in a table of
    x**d mod p, recombined by the CRT, well under 0.1 ms instead of ~13 ms for a two-prime key in
    pure Python. Verifying costs what it costs for any 2048-bit key: pow(s, 65537, n).
    Trivially factored, so only ever meant for benchmarks.
    """

    def __init__(self, bits: int = 2048, e: int = 65537) -> None:
        small: list[int] = []
        n = 1
        candidate = 3
        while n.bit_length() < bits - 24:
            if _is_probable_prime(candidate):
                small.append(candidate)
                n *= candidate
            candidate += 2
        low, high = -(-(1 << (bits - 1)) // n), ((1 << bits) - 1) // n
        while True:  # the last factor puts the modulus at exactly `bits` bits
            last = random.randrange(low, high) | 1
            if last <= high and (last - 1) % e and _is_probable_prime(last):
                break
        n *= last
        assert n.bit_length() == bits
        self.n, self.e = n, e
        self.size = (bits + 7) // 8

        def crt(p: int, modulus: int) -> int:  # 1 mod p, 0 mod the rest of `modulus`
            return (modulus // p) * pow(modulus // p, -1, p) % modulus

        # Small primes in groups of 8: per prime only small-number arithmetic, and one
        # 2048-bit product per group. e < p - 1 is never a multiple of 65537 here.
        self._groups: list[tuple[int, int, list[tuple[int, list[int], int]]]] = []
        for i in range(0, len(small), 8):
            group = small[i : i + 8]
            product = math.prod(group)
            members = [
                (p, [pow(x, pow(e, -1, p - 1), p) for x in range(p)], crt(p, product))
                for p in group
            ]
            self._groups.append((product, crt(product, n), members))
        self._last = (last, pow(e, -1, last - 1), crt(last, n))

    def public_pem(self) -> str:
        """PKCS#1 `BEGIN RSA PUBLIC KEY`, one of the two formats PUBKEY_FILE takes."""
        der = base64.b64encode(_der(0x30, _der_int(self.n) + _der_int(self.e))).decode()
        lines = [der[i : i + 64] for i in range(0, len(der), 64)]
        return (
            "-----BEGIN RSA PUBLIC KEY-----\n"
            + "\n".join(lines)
            + "\n-----END RSA PUBLIC KEY-----\n"
        )

    def sign(self, message: bytes) -> bytes:
        """EMSA-PKCS1-v1_5 over SHA-256 (RFC 8017 9.2), then m**d mod n by the CRT."""
        digest = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        block = b"\x00\x01" + b"\xff" * (self.size - len(digest) - 3) + b"\x00" + digest
        m = int.from_bytes(block, "big")
        last, d, c = self._last
        s = pow(m % last, d, last) * c
        for product, coefficient, members in self._groups:
            mg = m % product
            s += sum(table[mg % p] * c for p, table, c in members) % product * coefficient
        s %= self.n
        return s.to_bytes(self.size, "big")

    def signed_body(self, reqnum: int, payload: dict[str, Any]) -> bytes:
        """One client request body, {auth_data, payload}, as the autoscaler's client sends."""
        auth = pyworker.AuthData(
            signature="", cost="20", endpoint="bench", reqnum=reqnum, url="http://127.0.0.1"
        )
        auth.signature = base64.b64encode(self.sign(auth.message())).decode()
        return json.dumps({"auth_data": dataclasses.asdict(auth), "payload": payload}).encode()

    def url_signed_body(self, payload: dict[str, Any], url: str = "http://127.0.0.1") -> bytes:
        """A body as today's platform sends it: the whole /route/ answer as auth_data, signed
        in the `url` layout (SPEC 11.2, spelled here from the SPEC, not from pyworker): the
        signature covers only the worker's url, so it is the same on every request."""
        message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
        auth = {
            "cost": "20",
            "endpoint": "bench",
            "reqnum": 1,
            "url": url,
            "request_idx": 1,
            "signature": base64.b64encode(self.sign(message)).decode(),
        }
        return json.dumps({"auth_data": auth, "payload": payload}).encode()


def unsigned_body(payload: dict[str, Any], request_idx: int | None = None) -> bytes:
    """For UNSECURED servers; with `request_idx`, today's request shape (as post_idx.lua)."""
    auth: dict[str, Any] = {
        "signature": "x",
        "cost": "20",
        "endpoint": "e",
        "reqnum": 1,
        "url": "http://x",
    }
    if request_idx is not None:
        auth["request_idx"] = request_idx
    return json.dumps({"auth_data": auth, "payload": payload}).encode()


GENERATE_PAYLOAD: dict[str, Any] = {"prompt": PROMPT, "max_response_tokens": 20}


def measure_verify_rate(signer: MultiPrimeSigner, seconds: float) -> dict[str, float]:
    """pyworker.RsaPublicKey.verify in a loop: verifications per wall second and CPU us each."""
    key = pyworker.RsaPublicKey.from_pem(signer.public_pem())
    samples: list[tuple[bytes, bytes]] = []
    for i in range(32):
        message = f"bench message {i}".encode()
        samples.append((message, signer.sign(message)))
    assert all(key.verify(m, s) for m, s in samples)
    count = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        for message, signature in samples:
            key.verify(message, signature)
        count += len(samples)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"per_second": count / wall, "cpu_us": cpu / count * 1e6, "count": count}


# Processes #######################################################################################


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(offsets: Sequence[int]) -> int:
    """A free port P such that P + each offset is free too (vast_sdk_peer.py also listens on
    PORT+1000 and PORT+2000)."""
    for _ in range(100):
        port = free_port()
        if port + max(offsets) > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in offsets:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port P with P+{list(offsets)} free")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


class Processes:
    """Every subprocess this script starts; stop_all() ends and reaps them (SIGTERM, SIGKILL)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops them
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


def http_status(port: int, method: str, path: str, body: bytes | None = None) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
    except OSError:
        return None


def wait_until(
    proc: subprocess.Popen[bytes], check: Callable[[], bool], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode} (see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.01)


# Load: wrk, or pyworker's HttpClient ############################################################

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #bodies then i = 1 end
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), #bodies))
end
"""


@dataclasses.dataclass
class Load:
    """One closed-loop load run against one server."""

    requests: int  # answered 2xx
    seconds: float
    failed: int  # non-2xx, socket errors, timeouts
    p50_ms: float
    p99_ms: float
    cpu_us: float | None = None  # the server process's CPU per answered request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rps": round(self.rps, 1)}


class LoadDriver:
    def __init__(self, tmp: Path, connections: int, use_wrk: bool) -> None:
        self.tmp = tmp
        self.connections = connections
        self.wrk = shutil.which("wrk") if use_wrk else None
        self.lua = tmp / "bench.lua"
        self.lua.write_text(WRK_LUA)
        self._files = 0

    @property
    def name(self) -> str:
        return f"wrk -t1 -c{self.connections}" if self.wrk else "pyworker.HttpClient"

    def bodies_file(self, bodies: Sequence[bytes]) -> Path:
        self._files += 1
        path = self.tmp / f"bodies{self._files}.jsonl"
        path.write_bytes(b"\n".join(bodies) + b"\n")
        return path

    def run(
        self, port: int, path: str, bodies: Path, seconds: float, pid: int | None = None
    ) -> Load:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        if self.wrk:
            load = self._wrk(port, path, bodies, seconds)
        else:
            load = asyncio.run(_client_load(port, path, bodies, self.connections, seconds))
        if pid and load.requests:
            load.cpu_us = (cpu_seconds(pid) - cpu0) / load.requests * 1e6
        return load

    def _wrk(self, port: int, path: str, bodies: Path, seconds: float) -> Load:
        assert self.wrk is not None
        cmd = [self.wrk, "-t1", f"-c{self.connections}", f"-d{max(1, round(seconds))}s"]
        cmd += ["--timeout", "10s", "-s", str(self.lua), f"http://127.0.0.1:{port}{path}"]
        env = {**os.environ, "BENCH_BODIES": str(bodies)}
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        match = re.search(r"BENCH_RESULT ([\d ]+)", out.stdout)
        if match is None:
            raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
        total, micros, sock, timeouts, status, p50, p99, _ = map(int, match[1].split())
        return Load(total - status, micros / 1e6, sock + timeouts + status, p50 / 1e3, p99 / 1e3)


async def _client_load(
    port: int, path: str, bodies: Path, connections: int, seconds: float
) -> Load:
    """The fallback without wrk: closed loop with pyworker's HttpClient (slower than wrk)."""
    lines = bodies.read_bytes().splitlines()  # noqa: ASYNC240 - before the load starts
    client = pyworker.HttpClient(f"http://127.0.0.1:{port}", max_idle=connections)
    latencies: list[float] = []
    failed = 0
    next_body = iter(range(1 << 62))
    start = time.perf_counter()
    stop = start + seconds

    async def worker() -> None:
        nonlocal failed
        while (now := time.perf_counter()) < stop:
            body = lines[next(next_body) % len(lines)]
            try:
                response = await client.request("POST", path, body, timeout=10)
                async for _ in response.iter_chunks():
                    pass
            except pyworker.UpstreamError:
                failed += 1
                continue
            if 200 <= response.status < 300:
                latencies.append(time.perf_counter() - now)
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    await client.close()
    ordered = sorted(latencies) or [math.nan]
    p50 = ordered[len(ordered) // 2] * 1e3
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3
    return Load(len(latencies), elapsed, failed, p50, p99)


# Paced streams: per-token latency, and many open streams #########################################


class _StreamClient(asyncio.Protocol):
    """Sends one streaming request after another on one connection; for each chunk that
    carries the model's send time, records arrival minus send time (ns)."""

    def __init__(self, request: bytes, samples: list[int], measuring: list[bool]) -> None:
        self.request = request
        self.samples = samples
        self.measuring = measuring
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.head_seen = False
        self.tokens = 0
        self.streams_done = 0
        self.failed = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_token: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def send(self) -> None:
        assert self.transport is not None
        self.head_seen = False
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buffer = self.buffer + data
        if not self.head_seen:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                self.fail()
                return
            self.head_seen = True
            buffer = buffer[end + 4 :]
        last = 0
        for match in SENT_RE.finditer(buffer):
            if self.measuring[0]:
                self.samples.append(now - int(match[1]))
            self.tokens += 1
            last = match.end()
        if self.tokens and not self.first_token.done():
            self.first_token.set_result(None)
        buffer = buffer[last:]
        if buffer.endswith(b"\r\n0\r\n\r\n"):
            self.streams_done += 1
            buffer = b""
            if not self.done.done():
                self.done.set_result(None)
        self.buffer = buffer

    def fail(self) -> None:
        self.failed = True
        for future in (self.done, self.first_token):
            if not future.done():
                future.set_exception(ConnectionError("stream failed"))
                future.exception()  # awaited or not: no "never retrieved" warning

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.fail()


def _stream_request(port: int, path: str, interval_ms: int, tokens: int) -> bytes:
    body = unsigned_body({"prompt": f"pace {interval_ms} {tokens}", "max_response_tokens": tokens})
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _open_client(
    port: int, request: bytes, samples: list[int], measuring: list[bool]
) -> _StreamClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: _StreamClient(request, samples, measuring), "127.0.0.1", port
    )
    return client


def _percentiles_ms(samples: list[int]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan, "tokens": 0}
    ordered = sorted(samples)
    return {
        "p50_ms": ordered[len(ordered) // 2] / 1e6,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
        "max_ms": ordered[-1] / 1e6,
        "tokens": len(ordered),
    }


async def _paced_latency(
    port: int, path: str, streams: int, interval_ms: int, tokens: int, seconds: float
) -> dict[str, float]:
    """`streams` clients, each streaming again and again; starts are spread over one interval
    so that tokens arrive evenly, as from independent users. The first interval is not measured."""
    request = _stream_request(port, path, interval_ms, tokens)
    samples: list[int] = []
    measuring = [False]
    all_tokens = [0]
    stop = time.monotonic() + seconds + interval_ms / 1000
    failures = 0

    async def one(index: int) -> None:
        nonlocal failures
        await asyncio.sleep(index * interval_ms / 1000 / streams)
        client = await _open_client(port, request, samples, measuring)
        try:
            while time.monotonic() < stop:
                client.send()
                await client.done
        except ConnectionError:
            failures += 1
        finally:
            all_tokens[0] += client.tokens
            assert client.transport is not None
            client.transport.close()

    async def measure_later() -> None:
        await asyncio.sleep(interval_ms / 1000 * 2)
        measuring[0] = True

    await asyncio.gather(measure_later(), *(one(i) for i in range(streams)))
    return {**_percentiles_ms(samples), "failed_streams": failures, "all_tokens": all_tokens[0]}


async def _open_streams_rss(port: int, path: str, streams: int, pid: int) -> dict[str, float]:
    """Open `streams` slow streams at once; the worker's RSS once every one has a token."""
    request = _stream_request(port, path, 200, 100)  # 20 s each, far more than needed
    samples: list[int] = []
    clients: list[_StreamClient] = []
    try:
        for _ in range(streams):
            client = await _open_client(port, request, samples, [False])
            client.send()
            clients.append(client)
        await asyncio.wait_for(asyncio.gather(*(c.first_token for c in clients)), 30)
        await asyncio.sleep(0.5)
        return {"streams": streams, "rss_mb": rss_mb(pid)}
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()


def run_async(coro: typing.Coroutine[Any, Any, dict[str, float]]) -> dict[str, float]:
    return asyncio.run(coro)


# Start-up ########################################################################################


def time_to_ping(
    procs: Processes, cmd: Sequence[str], env: dict[str, str], cwd: Path, runs: int
) -> dict[str, float]:
    """Spawn the worker `runs` times; time to the first GET /ping 200, and RSS then."""
    times: list[float] = []
    rss: list[float] = []
    for _ in range(runs):
        port = free_port()
        start = time.perf_counter()
        proc = procs.start("startup", cmd, {**env, "WORKER_PORT": str(port)}, cwd)
        try:
            while True:
                with socket.socket() as s:
                    try:
                        s.connect(("127.0.0.1", port))
                        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                        if s.recv(64).startswith(b"HTTP/1.1 200"):
                            break
                    except OSError:
                        pass
                if proc.poll() is not None or time.perf_counter() - start > 20:
                    raise RuntimeError("the worker did not answer /ping")
                time.sleep(0.001)
            times.append((time.perf_counter() - start) * 1e3)
            rss.append(rss_mb(proc.pid))
        finally:
            procs.stop(proc)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "rss_mb": statistics.median(rss),
        "runs": runs,
    }


# The benchmark ###################################################################################


@dataclasses.dataclass
class Settings:
    seconds: float  # each measured load run
    warmup: float  # an unmeasured run before it
    paced_seconds: float
    many_requests: int  # RSS after this many /generate requests
    startup_runs: int
    verify_seconds: float


QUICK = Settings(
    seconds=2, warmup=1, paced_seconds=3, many_requests=20_000, startup_runs=5, verify_seconds=1
)
FULL = Settings(
    seconds=6, warmup=1, paced_seconds=6, many_requests=100_000, startup_runs=9, verify_seconds=3
)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.settings = QUICK if args.quick else FULL
        self.tmp = tmp
        self.procs = Processes(tmp)
        self.driver = LoadDriver(tmp, args.connections, not args.no_wrk)
        self.results: dict[str, Any] = {"loads": {}, "notes": []}
        self.loads: dict[str, Load] = self.results["loads"]
        self.model_log = tmp / "model.log"
        self.model_log.write_text("infer server has started\n")
        self.plain_request = unsigned_body(GENERATE_PAYLOAD)
        self.plain_body = self.driver.bodies_file([self.plain_request])
        self.idx_request = unsigned_body(GENERATE_PAYLOAD, request_idx=1)
        self.idx_body = self.driver.bodies_file([self.idx_request])

    def note(self, text: str) -> None:
        print("note:", text, flush=True)
        self.results["notes"].append(text)

    def measure(self, key: str, port: int, path: str, pid: int, bodies: Path | None = None) -> Load:
        s = self.settings
        bodies = bodies or self.plain_body
        self.driver.run(port, path, bodies, s.warmup, None)
        load = self.driver.run(port, path, bodies, s.seconds, pid)
        self.loads[key] = load
        print(
            f"  {key:<34} {load.rps:>9,.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
            f"p99 {load.p99_ms:6.2f} ms  {load.cpu_us or 0:6.0f} CPU us/req"
            + (f"  ({load.failed} failed)" if load.failed else ""),
            flush=True,
        )
        if load.failed > load.requests * 0.001:
            self.note(f"{key}: {load.failed} requests failed")
        return load

    def paced(self, key: str, port: int, path: str, pid: int) -> None:
        s = self.settings
        cpu0 = cpu_seconds(pid)
        result = run_async(_paced_latency(port, path, 200, 20, 50, s.paced_seconds))
        if result["all_tokens"]:
            result["cpu_us_per_token"] = (cpu_seconds(pid) - cpu0) / result["all_tokens"] * 1e6
        self.results.setdefault("token_latency", {})[key] = result
        print(
            f"  {key:<34} token latency p50 {result['p50_ms']:.3f} ms  p99 "
            f"{result['p99_ms']:.3f} ms  ({result['tokens']:.0f} tokens, "
            f"{result.get('cpu_us_per_token', math.nan):.0f} CPU us each)",
            flush=True,
        )

    # The pieces --------------------------------------------------------------------------------

    def start_model(self) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-model", str(port)]
        proc = self.procs.start("model", cmd)
        wait_until(proc, lambda: http_status(port, "GET", "/health") == 200, "fake model")
        return proc, port

    def worker_cmd_env(
        self, bare: bool, model_port: int, pubkey: Path | None
    ) -> tuple[list[str], dict[str, str], Path]:
        cwd = self.tmp / ("worker-bare" if bare else "worker")
        cwd.mkdir(exist_ok=True)
        (cwd / ".has_benchmark").write_text("1000")  # skip the start-up benchmark
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(
            PYTHONPATH=str(REPO),
            MODEL_SERVER_URL=f"http://127.0.0.1:{model_port}",
            MODEL_LOG=str(self.model_log),
            REPORT_ADDR=f"http://127.0.0.1:{model_port}",  # the fake model answers reports
            LOG_LEVEL=self.args.log_level,
        )
        if pubkey is None:
            env["UNSECURED"] = "true"
        else:
            env["PUBKEY_FILE"] = str(pubkey)
        cmd = [sys.executable, *(["-S"] if bare else []), str(REPO / "hello_world.py")]
        return cmd, env, cwd

    def start_worker(
        self, bare: bool, model_port: int, pubkey: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], int]:
        cmd, env, cwd = self.worker_cmd_env(bare, model_port, pubkey)
        port = free_port()
        env["WORKER_PORT"] = str(port)
        proc = self.procs.start("worker-bare" if bare else "worker", cmd, env, cwd)
        # 503 until the model log said "loaded"; then an empty body is refused with 422/401
        wait_until(
            proc,
            lambda: http_status(port, "POST", "/generate", b"{}") not in (None, 503),
            "worker",
        )
        return proc, port

    def accelerators(self, bare: bool) -> dict[str, bool]:
        code = (
            "import sys, pyworker; print(int('orjson' in sys.modules), pyworker.install_uvloop())"
        )
        cmd, env, cwd = self.worker_cmd_env(bare, 1, None)
        out = subprocess.run(
            [*cmd[:-1], "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.split()
        return {"orjson": out[0] == "1", "uvloop": out[1] == "True"}

    def peer_python(self) -> str | None:
        baselines = Path(self.args.baselines)
        if not (baselines / "aiohttp_peer.py").exists():
            self.note(f"no baselines at {baselines}: aiohttp peer and streams ceiling skipped")
            return None
        python = self.args.peer_python or sys.executable
        check = "import aiohttp, orjson"
        if (
            not shutil.which(python)
            or subprocess.run([python, "-c", check], check=False).returncode
        ):
            self.note(
                f"{python} cannot import aiohttp and orjson: aiohttp peer and streams ceiling "
                "skipped (pass --peer-python with a venv that has them)"
            )
            return None
        return python

    def vast_python(self) -> str | None:
        python = self.args.vast_python
        if python is None:
            self.results["vast_peer"] = "not run (no --vast-python)"
            return None
        script = Path(self.args.baselines) / "vast_sdk_peer.py"
        reason = None
        if not script.exists():
            reason = f"no {script}"
        elif not shutil.which(python):
            reason = f"{python} not found"
        else:
            check = "from vastai.serverless.server.worker import Worker"
            if subprocess.run([python, "-c", check], capture_output=True, check=False).returncode:
                reason = f"{python} cannot import vastai.serverless.server.worker"
        if reason is not None:
            self.results["vast_peer"] = f"not run ({reason})"
            self.note(f"vast peer not run: {reason}")
            return None
        version = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('vastai'))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        self.results["vast_peer"] = f"vastai {version or '?'}"
        return python

    def run_vast(self, python: str, model_port: int) -> None:
        """The platform's own worker (vast_sdk_peer.py) in front of the same fake model, with
        today's request shape (it refuses a request without request_idx). Measured once its log
        says the model is loaded (10 s after its start-up benchmark: it reports load every
        second from then on, as in production)."""
        script = Path(self.args.baselines) / "vast_sdk_peer.py"
        port = free_port_block((0, 1000, 2000))
        cmd = [python, str(script), str(port), str(model_port), str(self.model_log)]
        proc = self.procs.start("vast", cmd)
        log = self.tmp / "vast.log"
        loaded = re.compile(rb"(Wait complete|Healthcheck confirmed) - marking model as loaded")
        try:
            wait_until(
                proc,
                lambda: http_status(port, "POST", "/generate", self.idx_request) == 200,
                "vast peer",
            )
            try:
                wait_until(proc, lambda: bool(loaded.search(log.read_bytes())), "vast peer", 30)
            except RuntimeError as exc:
                if proc.poll() is not None:
                    raise
                self.note(f"{exc} (model loaded?): measured all the same")
            self.measure("vast /generate", port, "/generate", proc.pid, self.idx_body)
            self.measure("vast /generate_stream", port, "/generate_stream", proc.pid, self.idx_body)
        finally:
            self.procs.stop(proc)

    # The run -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s, r = self.settings, self.results
        r["settings"] = {**dataclasses.asdict(s), "quick": self.args.quick}
        r["load_driver"] = self.driver.name
        if not self.driver.wrk:
            self.note("wrk is not installed: load from pyworker.HttpClient (slower than wrk)")
        r["machine"] = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
        r["python"] = sys.version.split()[0]
        print(f"load: {self.driver.name}; {'quick' if self.args.quick else 'full'} run", flush=True)

        signer = MultiPrimeSigner()
        r["verify"] = verify = measure_verify_rate(signer, s.verify_seconds)
        print(
            f"  pure-Python RSA-2048 verify: {verify['per_second']:,.0f}/s "
            f"({verify['cpu_us']:.0f} CPU us each)",
            flush=True,
        )
        pubkey = self.tmp / "bench.pub.pem"
        pubkey.write_text(signer.public_pem())
        started = time.perf_counter()
        # enough unique requests for a warm-up and a run at 1.3x the rate of one idle core
        per_run = [int(1.3e6 / verify["cpu_us"] * t) + 1000 for t in (s.warmup, s.seconds)]
        signed = [signer.signed_body(i, GENERATE_PAYLOAD) for i in range(1, sum(per_run) + 1)]
        signed_files = (
            self.driver.bodies_file(signed[: per_run[0]]),
            self.driver.bodies_file(signed[per_run[0] :]),
        )
        print(f"  signed {len(signed):,} requests in {time.perf_counter() - started:.1f}s")
        self.url_request = signer.url_signed_body(GENERATE_PAYLOAD)
        self.url_body = self.driver.bodies_file([self.url_request])

        model, model_port = self.start_model()
        print("baselines:", flush=True)
        self.measure("direct /generate", model_port, "/generate", model.pid)
        self.measure("direct /generate_stream", model_port, "/generate_stream", model.pid)
        self.paced("direct", model_port, "/generate_stream", model.pid)
        python = self.peer_python()
        if python is not None:
            baselines = Path(self.args.baselines)
            for name, script, arg in (
                ("peer", "aiohttp_peer.py", f"http://127.0.0.1:{model_port}"),
                ("ceiling", "streams_ceiling.py", str(model_port)),
            ):
                port = free_port()
                proc = self.procs.start(name, [python, str(baselines / script), str(port), arg])
                wait_until(
                    proc,
                    lambda p=port: http_status(p, "POST", "/generate", self.plain_request) == 200,
                    name,
                )
                self.measure(f"{name} /generate", port, "/generate", proc.pid)
                self.measure(f"{name} /generate_stream", port, "/generate_stream", proc.pid)
                self.paced(name, port, "/generate_stream", proc.pid)
                if name == "peer":
                    r["peer_startup"] = self.peer_startup(python, baselines, arg)
                self.procs.stop(proc)
        vast = self.vast_python()
        if vast is not None:
            self.run_vast(vast, model_port)

        for bare in (False, True):
            self.worker_run(bare, model_port, pubkey, signed_files)
        self.procs.stop(model)
        r["machine"]["loadavg_end"] = os.getloadavg()
        return r

    def peer_startup(self, python: str, baselines: Path, model_url: str) -> dict[str, float]:
        times: list[float] = []
        for _ in range(3):
            port = free_port()
            start = time.perf_counter()
            cmd = [python, str(baselines / "aiohttp_peer.py"), str(port), model_url]
            proc = self.procs.start("peer-startup", cmd)
            try:
                wait_until(proc, lambda p=port: http_status(p, "GET", "/ping") == 200, "peer")
                times.append((time.perf_counter() - start) * 1e3)
            finally:
                self.procs.stop(proc)
        return {"median_ms": statistics.median(times)}

    def worker_run(
        self, bare: bool, model_port: int, pubkey: Path, signed_files: tuple[Path, Path]
    ) -> None:
        s = self.settings
        mode = "bare" if bare else "accelerated"
        accel = self.accelerators(bare)
        w: dict[str, Any] = {"accelerators": accel}
        self.results[mode] = w
        print(f"worker, {mode} (orjson={accel['orjson']}, uvloop={accel['uvloop']}):", flush=True)
        if bare and (accel["orjson"] or accel["uvloop"]):
            self.note("python -S still imports an accelerator: the bare run is not bare")

        proc, port = self.start_worker(bare, model_port)
        time.sleep(0.5)
        w["rss_idle_mb"] = rss_mb(proc.pid)
        served = 0
        for path in ("/generate", "/generate_stream"):
            load = self.measure(f"worker {mode} {path}", port, path, proc.pid)
            served += load.requests * (1 + s.warmup / s.seconds)  # roughly, warm-up included
        for path in ("/generate", "/generate_stream"):  # today's request shape
            key = f"worker {mode} idx {path}"
            load = self.measure(key, port, path, proc.pid, self.idx_body)
            served += load.requests * (1 + s.warmup / s.seconds)
        self.paced(f"worker {mode}", port, "/generate_stream", proc.pid)
        rate = max(self.loads[f"worker {mode} /generate"].rps, 100)
        while served < s.many_requests:
            load = self.driver.run(
                port, "/generate", self.plain_body, min(60, (s.many_requests - served) / rate + 1)
            )
            served += load.requests
        time.sleep(0.5)
        w["requests_served"] = served
        w["rss_after_requests_mb"] = rss_mb(proc.pid)
        w["rss_growth_mb"] = w["rss_after_requests_mb"] - w["rss_idle_mb"]
        many = run_async(_open_streams_rss(port, "/generate_stream", 1000, proc.pid))
        w["rss_1000_streams_mb"] = many["rss_mb"]
        w["rss_peak_mb"] = rss_mb(proc.pid, "VmHWM")
        print(
            f"  RSS idle {w['rss_idle_mb']:.1f} MB, after {served:,.0f} requests "
            f"{w['rss_after_requests_mb']:.1f} MB, 1,000 streams {w['rss_1000_streams_mb']:.1f} MB",
            flush=True,
        )
        self.procs.stop(proc)

        proc, port = self.start_worker(bare, model_port, pubkey)
        self.driver.run(port, "/generate", signed_files[0], s.warmup, None)
        load = self.driver.run(port, "/generate", signed_files[1], s.seconds, proc.pid)
        self.loads[f"worker {mode} signed /generate"] = load
        print(
            f"  {'worker ' + mode + ' signed /generate':<34} {load.rps:>9,.0f} req/s  "
            f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  {load.cpu_us or 0:6.0f} "
            "CPU us/req" + (f"  ({load.failed} failed)" if load.failed else ""),
            flush=True,
        )
        if load.failed > load.requests * 0.001:
            self.note(f"signed ({mode}): {load.failed} requests failed (ran out of bodies?)")
        status = http_status(port, "POST", "/generate", self.url_request)
        if status != 200:
            self.note(f"signed url ({mode}): the worker answered {status} to the url-signed body")
        self.measure(
            f"worker {mode} signed url /generate", port, "/generate", proc.pid, self.url_body
        )
        self.procs.stop(proc)

        cmd, env, cwd = self.worker_cmd_env(bare, model_port, None)
        w["startup"] = time_to_ping(self.procs, cmd, env, cwd, s.startup_runs)
        print(
            f"  spawn to /ping: median {w['startup']['median_ms']:.0f} ms "
            f"(RSS then {w['startup']['rss_mb']:.1f} MB)",
            flush=True,
        )


# Report ##########################################################################################


def _ratio(a: Load | None, b: Load | None) -> float | None:
    if a is None or b is None or not b.rps:
        return None
    return a.rps / b.rps


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """Ratios and the issue's targets, from the raw figures."""
    loads: dict[str, Load] = r["loads"]
    verify = r["verify"]
    out: dict[str, Any] = {"ratios": {}, "targets": {}}
    for mode in ("accelerated", "bare"):
        if mode not in r:
            continue
        for path in ("/generate", "/generate_stream"):
            worker = loads.get(f"worker {mode} {path}")
            for base in ("direct", "peer", "ceiling"):
                other = loads.get(f"{base} {path}")
                ratio = _ratio(worker, other)
                if ratio is not None:
                    out["ratios"][f"{mode} {path} / {base}"] = ratio
                if worker and other and worker.cpu_us and other.cpu_us:  # per CPU second
                    out["ratios"][f"{mode} {path} / {base} CPU"] = other.cpu_us / worker.cpu_us
            # the platform's worker, both with today's request shape (request_idx)
            worker, other = loads.get(f"worker {mode} idx {path}"), loads.get(f"vast {path}")
            ratio = _ratio(worker, other)
            if ratio is not None:
                out["ratios"][f"{mode} {path} / vast"] = ratio
            if worker and other and worker.cpu_us and other.cpu_us:
                out["ratios"][f"{mode} {path} / vast CPU"] = other.cpu_us / worker.cpu_us
        url = loads.get(f"worker {mode} signed url /generate")
        for base, key in (
            ("unsigned", f"worker {mode} /generate"),
            ("idx", f"worker {mode} idx /generate"),
        ):
            other = loads.get(key)
            ratio = _ratio(url, other)
            if ratio is not None:
                out["ratios"][f"{mode} signed url / {base}"] = ratio
            if url and other and url.cpu_us and other.cpu_us:
                out["ratios"][f"{mode} signed url / {base} CPU"] = other.cpu_us / url.cpu_us
        signed = loads.get(f"worker {mode} signed /generate")
        if signed is not None:
            out["ratios"][f"{mode} signed / verify rate"] = signed.rps / verify["per_second"]
            if signed.cpu_us:
                out["ratios"][f"{mode} signed CPU: verify share"] = verify["cpu_us"] / signed.cpu_us
    acc, bare = r.get("accelerated", {}), r.get("bare", {})
    ratios = out["ratios"]
    token = r.get("token_latency", {}).get("worker accelerated", {})

    def target(name: str, value: float | None, goal: str, met: bool | None, issue: int = 6) -> None:
        out["targets"][name] = {"value": value, "goal": goal, "met": met, "issue": issue}

    def at_least(name: str, key: str, goal: float, issue: int = 6) -> None:
        value = ratios.get(key)
        target(name, value, f">= {goal}", None if value is None else value >= goal, issue)

    at_least("/generate vs peer", "accelerated /generate / peer", 3.5)
    at_least("/generate vs ceiling", "accelerated /generate / ceiling", 0.5)
    # per CPU second rather than per wall second: the verification loop and the worker do not
    # get the same share of a machine that other work is also using
    at_least("signed vs verify rate (CPU)", "accelerated signed CPU: verify share", 0.8)
    at_least("/generate_stream vs peer", "accelerated /generate_stream / peer", 1.4)
    at_least("signed url (repeated) vs unsigned", "accelerated signed url / unsigned", 0.9, 12)
    p99 = token.get("p99_ms")
    target("token latency p99 (ms)", p99, "< 1", None if p99 is None else p99 < 1)
    if bare:
        idle = bare["rss_idle_mb"]
        target("RSS idle, bare (MB)", idle, "<= 20", idle <= 20)
        growth = max(acc.get("rss_growth_mb", 0), bare["rss_growth_mb"])
        target("RSS growth after requests (MB)", growth, "< 5", growth < 5)
        many = max(acc.get("rss_1000_streams_mb", 0), bare["rss_1000_streams_mb"])
        target("RSS 1,000 streams (MB)", many, "< 60", many < 60)
        start = max(acc.get("startup", {}).get("median_ms", 0), bare["startup"]["median_ms"])
        target("spawn to /ping (ms)", start, "< 150", start < 150)
        # CPU per request, bare over accelerated: requests/s swing with the machine's other load
        slow: list[float] = []
        for k in ("/generate", "/generate_stream", "signed /generate"):
            fast_load, bare_load = (
                loads.get(f"worker accelerated {k}"),
                loads.get(f"worker bare {k}"),
            )
            if fast_load and bare_load and fast_load.cpu_us and bare_load.cpu_us:
                slow.append(bare_load.cpu_us / fast_load.cpu_us)
        if slow:
            target("bare slowdown, CPU/request (x)", max(slow), "<= 2", max(slow) <= 2)
            out["bare_slowdown"] = slow
    return out


def render(r: dict[str, Any], summary: dict[str, Any]) -> str:
    loads: dict[str, Load] = r["loads"]
    ratios: dict[str, float] = summary["ratios"]
    lines = [
        "Ratios: requests/s of the worker over the other's, in the same run (in parentheses: "
        "the other's CPU us per request over the worker's). 'idx': today's request shape "
        "(auth_data with request_idx, as post_idx.lua), what the vast peer is measured with.",
        "",
        "| server | route | req/s | p50 ms | p99 ms | CPU us/req "
        "| vs direct | vs peer | vs ceiling | vs vast peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None or math.isnan(value) else format(value, spec)

    rows: list[tuple[str, str, str]] = []
    for base, label in (
        ("direct", "fake model, direct"),
        ("peer", "aiohttp peer"),
        ("ceiling", "streams ceiling"),
        ("vast", f"vast peer ({r['vast_peer']})" if "vast /generate" in loads else "vast peer"),
    ):
        route = "idx " if base == "vast" else ""
        rows += [(f"{base} {p}", label, route + p) for p in ("/generate", "/generate_stream")]
    for mode in ("accelerated", "bare"):
        label = "worker, uvloop+orjson" if mode == "accelerated" else "worker, bare (-S)"
        rows.append((f"worker {mode} /generate", label, "/generate"))
        rows.append((f"worker {mode} idx /generate", label, "idx /generate"))
        rows.append((f"worker {mode} signed /generate", label, "/generate signed (seed, unique)"))
        rows.append(
            (f"worker {mode} signed url /generate", label, "/generate signed (url, repeated)")
        )
        rows.append((f"worker {mode} /generate_stream", label, "/generate_stream"))
        rows.append((f"worker {mode} idx /generate_stream", label, "idx /generate_stream"))
    for key, label, route in rows:
        load = loads.get(key)
        if load is None:
            if key.startswith("vast"):  # the platform's worker is the peer of issue 12: say so
                lines.append(f"| {label} | {route} | not run |" + " - |" * 7)
            continue
        mode = key.split()[1] if key.startswith("worker") else ""
        path = "/generate_stream" if "stream" in route else "/generate"
        cells = [label, route, fmt(load.rps, ",.0f"), fmt(load.p50_ms, ".2f")]
        cells += [fmt(load.p99_ms, ".2f"), fmt(load.cpu_us, ".0f")]
        idx = " idx " in key
        for base in ("direct", "peer", "ceiling", "vast"):
            value = cpu = None
            if mode and "signed" not in key and idx == (base == "vast"):
                value = ratios.get(f"{mode} {path} / {base}")
                cpu = ratios.get(f"{mode} {path} / {base} CPU")
            cells.append(
                "-" if value is None else f"{value:.2f}x" + (f" ({cpu:.2f}x)" if cpu else "")
            )
        lines.append("| " + " | ".join(cells) + " |")

    lines.append("")
    for mode in ("accelerated", "bare"):
        unsigned = ratios.get(f"{mode} signed url / unsigned")
        if unsigned is not None:
            cpu = fmt(ratios.get(f"{mode} signed url / unsigned CPU"), ".2f")
            idx = fmt(ratios.get(f"{mode} signed url / idx"), ".2f")
            idx_cpu = fmt(ratios.get(f"{mode} signed url / idx CPU"), ".2f")
            lines.append(
                f"Signed /generate, url layout, one repeated body ({mode}): {unsigned:.2f}x the "
                f"unsigned /generate rate ({cpu}x per CPU second); {idx}x the unsigned rate "
                f"with request_idx, the same request shape ({idx_cpu}x per CPU second)."
            )
    for mode in ("accelerated", "bare"):
        vast = [ratios.get(f"{mode} {p} / vast") for p in ("/generate", "/generate_stream")]
        if vast[0] is not None or vast[1] is not None:
            lines.append(
                f"Worker ({mode}) / vast peer, request_idx bodies: /generate "
                f"{fmt(vast[0], '.2f')}x, /generate_stream {fmt(vast[1], '.2f')}x."
            )
    if "vast /generate" not in loads:
        lines.append(f"Worker / vast peer: {r.get('vast_peer', 'not run')}.")

    verify = r["verify"]
    lines.append("")
    lines.append(
        f"Pure-Python RSA-2048 verification (pyworker.RsaPublicKey.verify): "
        f"{verify['per_second']:,.0f}/s, {verify['cpu_us']:.0f} CPU us each."
    )
    for mode in ("accelerated", "bare"):
        if f"{mode} signed / verify rate" in ratios:
            share = ratios.get(f"{mode} signed CPU: verify share")
            lines.append(
                f"Signed /generate ({mode}): {ratios[f'{mode} signed / verify rate']:.0%} of the "
                f"verification rate per wall second; per CPU second {fmt(share, '.0%')} (the "
                "verification's share of the worker's CPU per signed request)."
            )
    lines.append("")
    lines.append(
        "Per-token latency at 200 streams, a token every 20 ms (arrival - model send; 'direct' "
        "is the floor of the measurement, client and kernel):"
    )
    token_latency: dict[str, dict[str, float]] = r.get("token_latency", {})
    floor = token_latency.get("direct", {}).get("p50_ms", math.nan)
    for key, value in token_latency.items():
        added = "" if key == "direct" else f"  (p50 {value['p50_ms'] - floor:+.3f} ms over direct)"
        lines.append(
            f"  {key:<22} p50 {value['p50_ms']:.3f} ms  p99 {value['p99_ms']:.3f} ms  "
            f"max {value['max_ms']:.2f} ms, {value.get('cpu_us_per_token', math.nan):.0f} CPU us "
            f"per token in the server{added}"
        )
    lines.append("")
    for mode in ("accelerated", "bare"):
        w = r.get(mode)
        if not w:
            continue
        lines.append(
            f"Worker {mode}: RSS idle {w['rss_idle_mb']:.1f} MB, after "
            f"{w['requests_served']:,.0f} requests {w['rss_after_requests_mb']:.1f} MB "
            f"({w['rss_growth_mb']:+.1f}), 1,000 open streams {w['rss_1000_streams_mb']:.1f} MB; "
            f"spawn to /ping {w['startup']['median_ms']:.0f} ms (median of {w['startup']['runs']})."
        )
    if "peer_startup" in r:
        lines.append(f"aiohttp peer: spawn to /ping {r['peer_startup']['median_ms']:.0f} ms.")
    if summary.get("bare_slowdown"):
        slow = ", ".join(f"{x:.2f}x" for x in summary["bare_slowdown"])
        lines.append(
            f"Bare vs accelerated, CPU per request (/generate, stream, signed): {slow} as much."
        )
    lines.append("")
    lines.append("Targets:")
    for name, t in summary["targets"].items():
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  {name:<34} {value:>8}  (goal {t['goal']}, issue {t['issue']})  {met}")
    for text in r["notes"]:
        lines.append("note: " + text)
    return "\n".join(lines)


# Main ############################################################################################


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 2 minutes instead of ~10")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument(
        "--peer-python",
        metavar="PATH",
        help="interpreter with aiohttp and orjson for the baselines (default: this one)",
    )
    parser.add_argument(
        "--baselines",
        default=str(DEFAULT_BASELINES),
        metavar="DIR",
        help="folder with aiohttp_peer.py and streams_ceiling.py (default: %(default)s)",
    )
    parser.add_argument(
        "--vast-python",
        metavar="PATH",
        help="interpreter of a side venv holding vastai (1.9.1): also run vast_sdk_peer.py, the "
        "platform's own worker, as a peer (default: not run)",
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument(
        "--log-level", default="INFO", help="the worker's LOG_LEVEL (default: its own, INFO)"
    )
    parser.add_argument("--no-wrk", action="store_true", help="load from pyworker.HttpClient")
    parser.add_argument("--logs", metavar="DIR", help="keep the processes' logs in DIR")
    parser.add_argument("--serve-model", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def _terminate_as_interrupt() -> Generator[None, None, None]:
    """SIGTERM unwinds like Ctrl-C, so that the subprocesses are stopped either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_model is not None:
        serve_model(args.serve_model)
        return 0
    _raise_fd_limit()  # 1,000 streams: 2,000 sockets in the worker; inherited by subprocesses
    pyworker.install_uvloop()  # the stream clients in this process
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        if args.logs:
            workdir = Path(args.logs)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_worker.")))
        bench = Bench(args, workdir)
        try:
            results = bench.run()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"bench_worker: {exc}", file=sys.stderr)
            for log in sorted(workdir.glob("*.log")):
                lines = [x for x in log.read_text().splitlines() if "pyworker.access" not in x]
                print(f"--- {log.name}:", *lines[-5:], sep="\n", file=sys.stderr)
            return 1
        finally:
            bench.procs.stop_all()
    summary = summarize(results)
    print()
    print(render(results, summary))
    if args.json:
        data = {**results, **summary}
        data["loads"] = {k: v.as_dict() for k, v in results["loads"].items()}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
