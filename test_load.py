"""test_load: load-test a PyWorker endpoint, or a whole PyWorker setup on loopback.

This module also holds the stand-ins that a local setup needs and that the test suite
uses: an RSA signer, a fake LLM server with the hello_world model API, and a local
autoscaler (/pubkey/, /route/, /worker_status/).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
import time
import typing
from collections.abc import AsyncIterator
from typing import Any

import pyworker
from pyworker import AuthData, HttpServer, Request, Response, get, json_response, post

# RSA signing (the autoscaler's side) #############################################################
# pyworker only verifies; a local autoscaler must sign. Pure Python: key generation takes about
# a second, a signature about 5 ms with the CRT.

_SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, int(p**0.5) + 1, 2))]


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases (error below 4**-rounds)."""
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits: int, e: int) -> int:
    while True:
        # Top two bits set so that the product of two such primes has exactly 2 * bits bits.
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if _is_probable_prime(candidate) and (candidate - 1) % e != 0:
            return candidate


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pem(label: str, der: bytes) -> str:
    import base64

    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


@dataclasses.dataclass(frozen=True)
class RsaPrivateKey:
    """An RSA key pair that signs PKCS#1 v1.5 SHA-256, as the autoscaler does."""

    n: int
    e: int
    d: int
    p: int
    q: int

    @classmethod
    def generate(cls, bits: int = 2048, e: int = 65537) -> RsaPrivateKey:
        while True:
            p, q = _random_prime(bits // 2, e), _random_prime(bits // 2, e)
            if p != q:
                break
        phi = (p - 1) * (q - 1)
        return cls(p * q, e, pow(e, -1, phi), p, q)

    @property
    def public_key(self) -> pyworker.RsaPublicKey:
        return pyworker.RsaPublicKey(self.n, self.e)

    def public_pem(self) -> str:
        """SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`), what /pubkey/ serves."""
        rsa_key = _der(0x30, _der_int(self.n) + _der_int(self.e))
        algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
        return _pem("PUBLIC KEY", _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_key)))

    def private_pem(self) -> str:
        """PKCS#1 `BEGIN RSA PRIVATE KEY`, readable by `openssl`."""
        fields = [0, self.n, self.e, self.d, self.p, self.q]
        fields += [self.d % (self.p - 1), self.d % (self.q - 1), pow(self.q, -1, self.p)]
        return _pem("RSA PRIVATE KEY", _der(0x30, b"".join(_der_int(f) for f in fields)))

    def sign(self, message: bytes) -> bytes:
        """EMSA-PKCS1-v1_5 with SHA-256 (RFC 8017 9.2), then m**d mod n by the CRT."""
        import hashlib

        k = (self.n.bit_length() + 7) // 8
        digest = bytes.fromhex("3031300d060960864801650304020105000420")
        digest += hashlib.sha256(message).digest()
        block = b"\x00\x01" + b"\xff" * (k - len(digest) - 3) + b"\x00" + digest
        m = int.from_bytes(block, "big")
        sp = pow(m, self.d % (self.p - 1), self.p)
        sq = pow(m, self.d % (self.q - 1), self.q)
        h = (pow(self.q, -1, self.p) * (sp - sq)) % self.p
        return (sq + h * self.q).to_bytes(k, "big")

    def sign_auth(
        self, *, cost: str | int | float, endpoint: str, reqnum: int, url: str
    ) -> dict[str, Any]:
        """A signed auth_data object, as /route/ hands it to a client."""
        import base64

        auth = AuthData(signature="", cost=cost, endpoint=endpoint, reqnum=reqnum, url=url)
        auth.signature = base64.b64encode(self.sign(auth.message())).decode()
        return dataclasses.asdict(auth)


# A fake LLM server: the hello_world model API ###################################################


class FakeModel:
    """An LLM server stand-in on loopback, with the hello_world model API (SPEC section 9).

    POST /generate answers JSON; POST /generate_stream answers one token per chunk (SSE);
    GET /health answers 200 (503 once `healthy` is False). It writes its log like a real model
    server: a download line, then "infer server has started" after `load_time` seconds.

    Fault modes: `json_delay` / `token_delay` pace the answers; `crash_after` tokens, a stream
    is cut (connection aborted mid-stream); `one_at_a_time` answers 500 when a second request
    arrives while one is in progress; `fail_status` answers every request with that status.
    """

    LOADED_LINE = "infer server has started"

    def __init__(
        self,
        *,
        log_path: str | None = None,
        load_time: float = 0.0,
        json_delay: float = 0.0,
        token_delay: float = 0.0,
        tokens: int = 16,
        crash_after: int | None = None,
        one_at_a_time: bool = False,
        fail_status: int | None = None,
    ) -> None:
        self.log_path = log_path
        self.load_time = load_time
        self.json_delay = json_delay
        self.token_delay = token_delay
        self.tokens = tokens
        self.crash_after = crash_after
        self.one_at_a_time = one_at_a_time
        self.fail_status = fail_status
        self.healthy = True
        self.requests: list[dict[str, Any]] = []  # every payload received, in order
        self.active = 0
        self.max_active = 0
        self.cancelled = 0  # streams whose client (the worker) went away before the end
        self.port = 0
        self._server = HttpServer(
            [
                post("/generate", self._generate),
                post("/generate_stream", self._generate_stream),
                get("/health", self._health),
            ]
        )
        self._log_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeModel:
        self.port = await self._server.start("127.0.0.1", port)
        if self.log_path is not None:
            self._log_task = asyncio.get_running_loop().create_task(self._write_startup_log())
        return self

    async def stop(self) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
        await self._server.shutdown(grace=0.0)

    def write_log(self, text: str) -> None:
        """Append raw text (no newline added) to the model log."""
        assert self.log_path is not None
        with open(self.log_path, "a") as f:
            f.write(text)

    async def _write_startup_log(self) -> None:
        self.write_log('{"level":"info","message":"Downloading model shards"}\n')
        await asyncio.sleep(self.load_time)
        self.write_log(f"{self.LOADED_LINE} on port {self.port}\n")

    def _accept(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        payload: Any = pyworker.json_loads(request.body)
        if not isinstance(payload, dict):
            return {}, pyworker.error_response(422, "expected a JSON object")
        body = typing.cast(dict[str, Any], payload)
        if not isinstance(body.get("prompt"), str):
            return {}, pyworker.error_response(422, "prompt: expected a string")
        self.requests.append(body)
        if self.fail_status is not None:
            return body, pyworker.error_response(self.fail_status, "model failure (fake)")
        if self.one_at_a_time and self.active:
            return body, pyworker.error_response(500, "busy: one request at a time")
        return body, None

    def _count(self, payload: dict[str, Any]) -> int:
        limit = payload.get("max_response_tokens")
        return min(self.tokens, limit) if isinstance(limit, int) and limit > 0 else self.tokens

    async def _generate(self, request: Request) -> Response:
        payload, refusal = self._accept(request)
        if refusal is not None:
            return refusal
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.json_delay:
                await asyncio.sleep(self.json_delay)
            words = random.choices(
                ("cats", "dogs", "and", "the", "sun", "runs"), k=self._count(payload)
            )
            return json_response({"response": " ".join(words), "tokens": len(words)})
        finally:
            self.active -= 1

    async def _generate_stream(self, request: Request) -> Response:
        payload, refusal = self._accept(request)
        if refusal is not None:
            return refusal
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        return Response(content_type="text/event-stream", stream=self._tokens(payload))

    async def _tokens(self, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        finished = False
        try:
            for i in range(self._count(payload)):
                if self.crash_after is not None and i == self.crash_after:
                    raise ConnectionResetError("fake model crashed mid-stream")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                sent = time.time()
                yield b'data: {"token": "tok%d", "sent": %.6f}\n\n' % (i, sent)
            finished = True
        finally:
            self.active -= 1
            if not finished:
                self.cancelled += 1

    async def _health(self, request: Request) -> Response:
        if not self.healthy:
            return pyworker.error_response(503, "unhealthy")
        return pyworker.text_response("ok")


# A local autoscaler ##############################################################################


@dataclasses.dataclass
class WorkerView:
    """What the local autoscaler knows of a worker: its last load report."""

    url: str
    report: dict[str, Any]
    reports: int = 0
    routed: int = 0

    @property
    def ready(self) -> bool:
        return not self.report.get("error_msg") and float(self.report.get("max_perf", 0)) > 0

    @property
    def load(self) -> float:
        """Reported load relative to capacity, plus what was routed since."""
        max_perf = float(self.report.get("max_perf", 0)) or 1.0
        return float(self.report.get("cur_load", 0)) / max_perf + self.routed * 1e-3


class LocalAutoscaler:
    """The autoscaler's three routes on loopback, for a local setup and the tests.

    GET /pubkey/ serves the public key; POST /route/ picks the ready worker with the lowest
    reported load and answers signed auth_data; POST /worker_status/ records each report.
    """

    def __init__(
        self,
        key: RsaPrivateKey | None = None,
        *,
        api_key: str = "local-key",
        endpoint: str = "local",
    ) -> None:
        self.key = key or RsaPrivateKey.generate()
        self.api_key = api_key
        self.endpoint = endpoint
        self.reports: list[dict[str, Any]] = []  # every /worker_status/ body, in order
        self.report_times: list[float] = []  # time.monotonic() of each
        self.workers: dict[str, WorkerView] = {}
        self.reqnum = 0
        self.port = 0
        self._server = HttpServer(
            [
                get("/pubkey/", self._pubkey),
                post("/route/", self._route),
                post("/worker_status/", self._worker_status),
            ]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> LocalAutoscaler:
        self.port = await self._server.start("127.0.0.1", port)
        return self

    async def stop(self) -> None:
        await self._server.shutdown(grace=0.0)

    async def _pubkey(self, request: Request) -> Response:
        return pyworker.text_response(self.key.public_pem())

    async def _worker_status(self, request: Request) -> Response:
        report: Any = pyworker.json_loads(request.body)
        if not isinstance(report, dict):
            return pyworker.error_response(422, "expected a report object")
        body = typing.cast(dict[str, Any], report)
        if not isinstance(body.get("url"), str):
            return pyworker.error_response(422, "the report has no url")
        self.reports.append(body)
        self.report_times.append(time.monotonic())
        view = self.workers.setdefault(body["url"], WorkerView(body["url"], body))
        view.report = body
        view.reports += 1
        view.routed = 0
        return json_response({"ok": True})

    async def _route(self, request: Request) -> Response:
        msg: Any = pyworker.json_loads(request.body)
        if not isinstance(msg, dict):
            return pyworker.error_response(422, "invalid JSON")
        route = typing.cast(dict[str, Any], msg)
        if route.get("api_key") != self.api_key:
            return pyworker.error_response(401, "bad api_key")
        if route.get("endpoint") != self.endpoint:
            return pyworker.error_response(404, f"no endpoint named {route.get('endpoint')!r}")
        ready = [w for w in self.workers.values() if w.ready]
        if not ready:
            return json_response({"error": "no worker ready yet", "status": "loading"})
        worker = min(ready, key=lambda w: w.load)
        worker.routed += 1
        self.reqnum += 1
        auth = self.key.sign_auth(
            cost=route.get("cost", 0), endpoint=self.endpoint, reqnum=self.reqnum, url=worker.url
        )
        auth["__request_id"] = secrets.token_hex(8)
        return json_response(auth)


if __name__ == "__main__":  # pragma: no cover - the load tester's CLI comes here
    raise SystemExit(f"{os.path.basename(__file__)}: the load tester is not written yet")
