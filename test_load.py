"""test_load: load-test a PyWorker endpoint, or a whole PyWorker setup on loopback.

    python test_load.py --local                         # fake models, workers, autoscaler: all here
    python test_load.py --local --workers 3 --route /generate_stream -n 300 -rps 30
    python test_load.py -k $API_KEY -e my-endpoint -n 200 -rps 5     # the Vast.ai autoscaler
    python test_load.py -l -k local-key -e local        # `test_load.py autoscaler` on :8081
    python test_load.py --worker http://127.0.0.1:3000  # one worker, UNSECURED=true, unsigned
    python test_load.py fake-model --port 5001 --log /tmp/model.log   # a fake LLM server

Each request is two calls, as a real client makes them:

    POST {server}/route/ {"endpoint", "api_key", "cost": workload}
        -> {"url", "signature", "cost", "endpoint", "reqnum", ...}
    POST {url}{route} {"auth_data": {signature, cost, endpoint, reqnum, url}, "payload": ...}

Requests leave on an open-loop schedule (request i at start + i / rps, however slow the
answers are), with a bound on those in flight; all of it on one asyncio loop with pyworker's
own HttpClient, one keep-alive pool per worker URL. Payloads come from the worker file's
ApiPayload.for_test() (hello_world.py by default, --worker-module for another). While it runs a
progress line is redrawn (a plain line every few seconds in a log); at the end a report gives
the outcomes, latency percentiles, achieved rate, stream timings and the workers seen
(LoadResult.report() documents the --json schema). The exit status is 1 when any request
failed.

--local starts everything on loopback: a LocalAutoscaler (serves /pubkey/, signs /route/
answers, records /worker_status/), and per worker a FakeModel in this process plus the worker
itself as a real `python hello_world.py` subprocess with its own working directory, secured by
the autoscaler's key. It waits until every worker reported itself ready, runs the load through
the autoscaler, prints the report and each worker's last load report, and stops it all
(SIGTERM, then SIGKILL) also on Ctrl-C.

This module also holds the stand-ins that the local setup and the test suite use: an RSA
signer, a fake LLM server with the hello_world model API, and a local autoscaler. Importing it
starts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hmac
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any

import pyworker
from pyworker import (
    ApiPayload,
    AuthData,
    ClientResponse,
    EndpointHandler,
    HttpClient,
    HttpServer,
    Request,
    Response,
    UpstreamError,
    UpstreamTimeout,
    get,
    json_dumps,
    json_loads,
    json_response,
    post,
)

_HERE = os.path.dirname(os.path.abspath(__file__))

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
        signature = base64.b64encode(self.sign(auth.seed_message())).decode()
        return {
            "signature": signature,
            "cost": cost,
            "endpoint": endpoint,
            "reqnum": reqnum,
            "url": url,
        }

    def sign_url(self, url: str) -> str:
        """Today's signature (SPEC 11.2, layout `url`): base64 of the signed
        json.dumps({"url": url}, indent=4, sort_keys=True)."""
        import base64

        message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
        return base64.b64encode(self.sign(message)).decode()

    def sign_url_auth(
        self, *, cost: str | int | float, endpoint: str, reqnum: int, url: str, request_idx: int
    ) -> dict[str, Any]:
        """auth_data as today's /route/ hands it out: the `url` layout signed."""
        return {
            "cost": cost,
            "endpoint": endpoint,
            "reqnum": reqnum,
            "request_idx": request_idx,
            "signature": self.sign_url(url),
            "url": url,
        }


# A fake LLM server: the hello_world model API ###################################################


class FakeModel:
    """An LLM server stand-in on loopback, with the hello_world model API (SPEC section 9).

    POST /generate answers JSON; POST /generate_stream answers one token per chunk (SSE);
    GET /health answers 200 (503 once `healthy` is False). It writes its log like a real model
    server: a download line, then "infer server has started" after `load_time` seconds.

    Pacing: `json_delay` delays a JSON answer; `token_delay` paces a stream's tokens, after
    `first_token_delay` (the prompt's prefill). `paced_json` makes /generate take as long as the
    stream would (first token + every token), as a real LLM does; `jitter` varies each delay
    by up to that fraction either way. `FakeModel.realistic()` sets all of them.

    Fault modes: `crash_after` tokens, a stream is cut (connection aborted mid-stream);
    `one_at_a_time` answers 500 when a second request arrives while one is in progress;
    `fail_status` answers every request with that status.

    Any other POST route answers too, for workers whose model API is not hello_world's: any
    JSON body (no `prompt` needed), answered JSON, or as a paced SSE stream ending with an
    OpenAI-style `data: [DONE]` when the route's path contains "stream" or the body asks
    `"stream": true`. Any other GET path answers 200 (a health route). `loaded_lines` are the
    lines the log gets once loaded (a worker file's ModelLoaded texts; default LOADED_LINE).
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
        first_token_delay: float = 0.0,
        paced_json: bool = False,
        jitter: float = 0.0,
        loaded_lines: Sequence[str] = (),
    ) -> None:
        self.log_path = log_path
        self.loaded_lines = list(loaded_lines)
        self.load_time = load_time
        self.json_delay = json_delay
        self.token_delay = token_delay
        self.tokens = tokens
        self.crash_after = crash_after
        self.one_at_a_time = one_at_a_time
        self.fail_status = fail_status
        self.first_token_delay = first_token_delay
        self.paced_json = paced_json
        self.jitter = jitter
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
        self._server.routes = _AnyRoute(self._server.routes, self._any_post, self._health)
        self._log_task: asyncio.Task[None] | None = None

    @classmethod
    def realistic(
        cls,
        *,
        log_path: str | None = None,
        load_time: float = 1.0,
        tokens: int = 16,
        first_token_delay: float = 0.05,
        token_delay: float = 0.015,
        jitter: float = 0.25,
        loaded_lines: Sequence[str] = (),
    ) -> FakeModel:
        """A model paced like a small LLM on a GPU: 50 ms prefill, then about 65 tokens/s.

        Answers are short (`tokens`) so that a worker's benchmark (9 rounds of requests)
        takes seconds, not minutes.
        """
        return cls(
            log_path=log_path,
            load_time=load_time,
            tokens=tokens,
            first_token_delay=first_token_delay,
            token_delay=token_delay,
            paced_json=True,
            jitter=jitter,
            loaded_lines=loaded_lines,
        )

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
        for line in self.loaded_lines or [self.LOADED_LINE]:
            self.write_log(f"{line} on port {self.port}\n")

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
        for name in ("max_response_tokens", "max_tokens", "max_new_tokens"):
            limit = payload.get(name)
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                return min(self.tokens, limit)
        return self.tokens

    def _jittered(self, seconds: float) -> float:
        if not self.jitter or seconds <= 0:
            return seconds
        return seconds * random.uniform(1 - self.jitter, 1 + self.jitter)

    async def _generate(self, request: Request) -> Response:
        payload, refusal = self._accept(request)
        if refusal is not None:
            return refusal
        return await self._generate_json(payload)

    async def _generate_json(self, payload: dict[str, Any]) -> Response:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            count = self._count(payload)
            delay = self.json_delay
            if self.paced_json:
                delay += self.first_token_delay + count * self.token_delay
            if delay:
                await asyncio.sleep(self._jittered(delay))
            words = random.choices(("cats", "dogs", "and", "the", "sun", "runs"), k=count)
            return json_response({"response": " ".join(words), "tokens": len(words)})
        finally:
            self.active -= 1

    async def _generate_stream(self, request: Request) -> Response:
        payload, refusal = self._accept(request)
        if refusal is not None:
            return refusal
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        stream = _ModelStream(self, self._tokens(payload))
        return Response(content_type="text/event-stream", stream=stream)

    async def _any_post(self, request: Request) -> Response:
        """Any other POST route: JSON, or a paced SSE stream when asked for one."""
        try:
            payload: Any = pyworker.json_loads(request.body) if request.body else {}
        except (ValueError, RecursionError):
            return pyworker.error_response(422, "expected JSON")
        body = typing.cast(dict[str, Any], payload) if isinstance(payload, dict) else {}
        self.requests.append(body)
        if self.fail_status is not None:
            return pyworker.error_response(self.fail_status, "model failure (fake)")
        if self.one_at_a_time and self.active:
            return pyworker.error_response(500, "busy: one request at a time")
        if "stream" in request.path.lower() or body.get("stream") is True:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            stream = _ModelStream(self, self._tokens(body, done_marker=True))
            return Response(content_type="text/event-stream", stream=stream)
        return await self._generate_json(body)

    async def _tokens(
        self, payload: dict[str, Any], *, done_marker: bool = False
    ) -> AsyncIterator[bytes]:
        for i in range(self._count(payload)):
            if self.crash_after is not None and i == self.crash_after:
                raise ConnectionResetError("fake model crashed mid-stream")
            delay = self.token_delay + (self.first_token_delay if i == 0 else 0.0)
            if delay:
                await asyncio.sleep(self._jittered(delay))
            sent = time.time()
            yield b'data: {"token": "tok%d", "sent": %.6f}\n\n' % (i, sent)
        if done_marker:
            yield b"data: [DONE]\n\n"

    async def _health(self, request: Request) -> Response:
        if not self.healthy:
            return pyworker.error_response(503, "unhealthy")
        return pyworker.text_response("ok")


class _AnyRoute(dict[str, dict[str, pyworker.Handler]]):
    """A server's route table that answers every path: the known routes, else `fallback` for
    POST and `health` for GET (FakeModel's stand-in for any model API)."""

    def __init__(
        self,
        routes: dict[str, dict[str, pyworker.Handler]],
        fallback: pyworker.Handler,
        health: pyworker.Handler,
    ) -> None:
        super().__init__(routes)
        self._other = {"POST": fallback, "GET": health}

    def get(self, key: str, default: Any = None) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        found = super().get(key)
        return self._other if found is None else found


class _ModelStream:
    """A fake model's token stream that settles the model's `active` count exactly once.

    An async generator's `finally` never runs when the generator is closed before its first
    step (a client that left before the first token): counting there leaked `active`, and
    with `one_at_a_time` every later request was refused.
    """

    def __init__(self, model: FakeModel, tokens: AsyncIterator[bytes]) -> None:
        self._model = model
        self._tokens = tokens
        self._settled = False

    def __aiter__(self) -> _ModelStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._tokens.__anext__()
        except StopAsyncIteration:
            self._settle(finished=True)
            raise
        except BaseException:
            self._settle(finished=False)
            raise

    async def aclose(self) -> None:
        self._settle(finished=False)
        aclose = getattr(self._tokens, "aclose", None)
        if aclose is not None:
            await aclose()

    def _settle(self, *, finished: bool) -> None:
        if self._settled:
            return
        self._settled = True
        self._model.active -= 1
        if not finished:
            self._model.cancelled += 1


# A local autoscaler ##############################################################################


def _workload(cost: Any) -> float:
    """A route call's cost as a number (it is signed as sent, string or number)."""
    if isinstance(cost, bool) or not isinstance(cost, (str, int, float)):
        return 0.0
    try:
        value = float(cost)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


@dataclasses.dataclass
class WorkerView:
    """What the local autoscaler knows of a worker: its last load report."""

    url: str
    report: dict[str, Any]
    reports: int = 0
    routed: int = 0  # requests routed here since the last report
    routed_workload: float = 0.0  # and their workload

    @property
    def ready(self) -> bool:
        # _workload: a number however the report spelled it (a faulty one must not crash this)
        return not self.report.get("error_msg") and _workload(self.report.get("max_perf")) > 0

    @property
    def load(self) -> float:
        """Reported load relative to capacity, plus what was routed since that report.

        The routed workload counts as one second's worth (reports come about every second
        under load). Without it a worker that reported a little less load than the others
        got every request until its next report (the herd), since a routed request added
        only a tie-breaking 1e-3.
        """
        max_perf = _workload(self.report.get("max_perf")) or 1.0
        reported = _workload(self.report.get("cur_load"))
        return (reported + self.routed_workload) / max_perf + self.routed * 1e-3


PLATFORMS = ("today", "2024")  # what a LocalAutoscaler and the load tester speak (SPEC 11, 1-10)

# Load report format "1.1.0" (SPEC 11.3): exactly these fields, of these types.
_NUMBER = (int, float)
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,),
    "mtoken": (str,),
    "version": (str,),
    "loadtime": _NUMBER,
    "cur_load": _NUMBER,
    "rej_load": _NUMBER,
    "new_load": _NUMBER,
    "error_msg": (str,),
    "max_perf": _NUMBER,
    "cur_perf": _NUMBER,
    "cur_capacity": _NUMBER,
    "max_capacity": _NUMBER,
    "num_requests_working": (int,),
    "num_requests_recieved": (int,),  # sic: the wire's spelling
    "additional_disk_usage": _NUMBER,
    "disk_usage": _NUMBER,
    "working_request_idxs": (list,),
    "url": (str,),
}
# A worker that cannot start reports only why (SPEC 11.6), with a non-empty error_msg.
START_FAILURE_FIELDS = {"id", "mtoken", "version", "error_msg", "url"}
COMPLETION_FIELDS: dict[str, tuple[type, ...]] = {
    "request_idx": (int,),
    "success": (bool,),
    "status": (str,),
    "entered_queue_at": _NUMBER,
    "work_started_at": _NUMBER,
    "work_completed_at": _NUMBER,
}
COMPLETION_STATUSES = ("Success", "Error", "Cancelled", "Rejected")


def _type_faults(body: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> list[str]:
    """What is wrong with `body` against `fields` (exact key set; bool is not a number)."""
    faults: list[str] = []
    missing = sorted(set(fields) - set(body))
    extra = sorted(set(body) - set(fields))
    if missing:
        faults.append(f"missing {', '.join(missing)}")
    if extra:
        faults.append(f"unexpected {', '.join(extra)}")
    for name, kinds in fields.items():
        if name not in body:
            continue
        value = body[name]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            faults.append(f"{name}: {type(value).__name__} {value!r:.40}, expected {names}")
    return faults


def report_faults(report: dict[str, Any]) -> list[str]:
    """What is wrong with a "1.1.0" load report against SPEC 11.3 (none: an empty list)."""
    if set(report) == START_FAILURE_FIELDS and report.get("error_msg"):
        return _type_faults(report, {k: REPORT_FIELDS[k] for k in START_FAILURE_FIELDS})
    faults = _type_faults(report, REPORT_FIELDS)
    if report.get("version") != "1.1.0":
        faults.append(f"version {report.get('version')!r}, expected '1.1.0'")
    idxs: Any = report.get("working_request_idxs")
    if isinstance(idxs, list):
        items = typing.cast(list[Any], idxs)
        if not all(type(i) is int for i in items):
            faults.append("working_request_idxs: expected a list of int")
    return faults


def completion_faults(body: dict[str, Any]) -> list[str]:
    """What is wrong with a /delete_requests/ body against SPEC 11.4."""
    faults = _type_faults(body, {"worker_id": (int,), "mtoken": (str,), "requests": (list,)})
    for entry in typing.cast(list[Any], body.get("requests") or []):
        if not isinstance(entry, dict):
            faults.append(f"a request entry is {type(entry).__name__}, expected an object")
            continue
        fields = typing.cast(dict[str, Any], entry)
        faults += [
            f"entry {fields.get('request_idx')!r}: {f}"
            for f in _type_faults(fields, COMPLETION_FIELDS)
        ]
        status = fields.get("status")
        if status not in COMPLETION_STATUSES:
            faults.append(f"entry {fields.get('request_idx')!r}: status {status!r}")
        elif fields.get("success") is not (status in ("Success", "Cancelled")):
            faults.append(f"entry {fields.get('request_idx')!r}: success does not match {status}")
    return faults


def expected_statuses(status: int | None, outcome: str) -> tuple[str, ...]:
    """The completion statuses a worker may report for a request the client saw end so:
    2xx read whole -> Success; 401, 429, 503 -> Rejected; another failure -> Error or
    Cancelled (a 2xx whose stream broke, or that the client gave up reading, included)."""
    if outcome == "ok":
        return ("Success",)
    if status in (401, 429, 503):
        return ("Rejected",)
    return ("Error", "Cancelled")


@dataclasses.dataclass
class Reconciliation:
    """Each request_idx the autoscaler routed against the completion reports it got."""

    routed: int = 0
    completed: int = 0  # routed requests reported completed at least once
    missing: list[int] = dataclasses.field(default_factory=list[int])
    twice: list[int] = dataclasses.field(default_factory=list[int])  # reported more than once
    mismatches: list[str] = dataclasses.field(
        default_factory=list[str]
    )  # "idx: got X, client saw Y"
    unknown: list[int] = dataclasses.field(default_factory=list[int])  # reported, never routed

    @property
    def ok(self) -> bool:
        return not (self.missing or self.twice or self.mismatches or self.unknown)

    def line(self) -> str:
        text = (
            f"routed {self.routed}, completed {self.completed}, missing {len(self.missing)}, "
            f"twice {len(self.twice)}, status mismatches {len(self.mismatches)}"
        )
        return text + (f", unknown {len(self.unknown)}" if self.unknown else "")

    def report(self) -> dict[str, Any]:
        return {
            "checked": True,
            "ok": self.ok,
            "line": self.line(),
            "routed": self.routed,
            "completed": self.completed,
            "missing": self.missing[:ERROR_SAMPLES_LOCAL],
            "twice": self.twice[:ERROR_SAMPLES_LOCAL],
            "mismatches": self.mismatches[:ERROR_SAMPLES_LOCAL],
            "unknown": self.unknown[:ERROR_SAMPLES_LOCAL],
            "counts": {
                "missing": len(self.missing),
                "twice": len(self.twice),
                "mismatches": len(self.mismatches),
                "unknown": len(self.unknown),
            },
        }


ERROR_SAMPLES_LOCAL = 10  # request_idxs listed per kind in the reconciliation's JSON
_log = logging.getLogger("test_load")


class LocalAutoscaler:
    """The autoscaler's routes on loopback, for a local setup and the tests.

    platform "today" (default, SPEC 11): POST /route/ hands out a fresh `request_idx` per
    request and signs the `url` layout; an answer without `url` (no worker ready yet) says
    wait, and the client polls with the same request_idx. POST /worker_status/ and POST
    /delete_requests/ answer 401 unless their `mtoken` is `master_token` (when one is set:
    None accepts any, for tests whose in-process workers have none). Each "1.1.0" report and
    each completion report is checked field by field (SPEC 11.3, 11.4): a wrong one is logged
    as the worker's fault and counted in `faults`. `reconcile()` compares the requests routed
    with the completions reported.

    platform "2024" (SPEC 1-10): the seed's autoscaler: the four-field `seed` signature, no
    request_idx, load reports recorded as they come, no completion reports.

    GET /pubkey/ serves the public key; /route/ picks the ready worker with the lowest
    reported load.
    """

    def __init__(
        self,
        key: RsaPrivateKey | None = None,
        *,
        api_key: str = "local-key",
        endpoint: str = "local",
        platform: str = "today",
        master_token: str | None = None,
    ) -> None:
        if platform not in PLATFORMS:
            raise ValueError(f"platform: expected one of {PLATFORMS}, not {platform!r}")
        self.key = key or RsaPrivateKey.generate()
        self.api_key = api_key
        self.endpoint = endpoint
        self.platform = platform
        self.master_token = master_token
        self.reports: list[dict[str, Any]] = []  # every accepted /worker_status/ body, in order
        self.report_times: list[float] = []  # time.monotonic() of each
        self.workers: dict[str, WorkerView] = {}
        self.reqnum = 0
        self.request_idx = 0  # the last one handed out
        self.routed: dict[int, str] = {}  # request_idx -> the worker url it was routed to
        self.completions: dict[int, list[dict[str, Any]]] = {}  # request_idx -> its entries
        self.completion_bodies = 0  # /delete_requests/ calls accepted
        self.faults: list[str] = []  # wrong reports: the worker's fault
        self.unauthorized = 0  # reports refused for their mtoken
        self._url_signatures: dict[str, str] = {}
        self.port = 0
        self._server = HttpServer(
            [
                get("/pubkey/", self._pubkey),
                post("/route/", self._route),
                post("/worker_status/", self._worker_status),
                post("/delete_requests/", self._delete_requests),
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

    def _fault(self, what: str) -> None:
        self.faults.append(what)
        _log.warning("worker fault: %s", what)

    def _authorized(self, body: dict[str, Any]) -> bool:
        if self.platform != "today" or self.master_token is None:
            return True
        token = body.get("mtoken")
        if isinstance(token, str) and hmac.compare_digest(token, self.master_token):
            return True
        self.unauthorized += 1
        return False

    def _authorized_body(self, request: Request) -> dict[str, Any] | Response:
        """A report's JSON object with the right mtoken, or the answer refusing it."""
        data: Any = pyworker.json_loads(request.body)
        if not isinstance(data, dict):
            return pyworker.error_response(422, "expected a JSON object")
        body = typing.cast(dict[str, Any], data)
        if not self._authorized(body):
            return pyworker.error_response(401, "bad mtoken")
        return body

    async def _worker_status(self, request: Request) -> Response:
        body = self._authorized_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("url"), str):
            self._fault(f"a load report without url: {body!r:.200}")
            return pyworker.error_response(422, "the report has no url")
        if self.platform == "today" and ("version" in body or self.master_token is not None):
            faults = report_faults(body)
            if faults:
                self._fault(f"load report from {body['url']}: " + "; ".join(faults))
        self.reports.append(body)
        self.report_times.append(time.monotonic())
        view = self.workers.setdefault(body["url"], WorkerView(body["url"], body))
        view.report = body
        view.reports += 1
        view.routed = 0
        view.routed_workload = 0.0
        return json_response({"ok": True})

    async def _delete_requests(self, request: Request) -> Response:
        if self.platform != "today":
            return pyworker.error_response(404, "not found")
        body = self._authorized_body(request)
        if isinstance(body, Response):
            return body
        faults = completion_faults(body)
        if faults:
            self._fault(
                f"completion report of worker {body.get('worker_id')!r}: " + "; ".join(faults)
            )
        self.completion_bodies += 1
        self.add_completions(body.get("requests") or [])
        return json_response({"ok": True})

    def add_completions(self, entries: Iterable[Any]) -> None:
        """Record completion entries as /delete_requests/ does."""
        for entry in entries:
            if isinstance(entry, dict):
                fields = typing.cast(dict[str, Any], entry)
                idx = fields.get("request_idx")
                if type(idx) is int:
                    self.completions.setdefault(idx, []).append(fields)

    def pending_completions(self) -> list[int]:
        """The request_idxs routed and not yet reported completed."""
        return [idx for idx in self.routed if idx not in self.completions]

    def reconcile(self, client: dict[int, tuple[str, ...]]) -> Reconciliation:
        """Every routed request_idx reported completed exactly once, with a status among those
        `client` (request_idx -> statuses allowed by what the client saw) allows; a routed
        request the client has no word on is checked for being reported once only."""
        result = Reconciliation(routed=len(self.routed))
        for idx in sorted(self.routed):
            entries = self.completions.get(idx, [])
            if not entries:
                result.missing.append(idx)
                continue
            result.completed += 1
            if len(entries) > 1:
                result.twice.append(idx)
            allowed = client.get(idx)
            got = [str(e.get("status")) for e in entries]
            if allowed is not None and any(status not in allowed for status in got):
                result.mismatches.append(
                    f"{idx}: reported {'/'.join(got)}, client saw {' or '.join(allowed)}"
                )
        result.unknown = sorted(idx for idx in self.completions if idx not in self.routed)
        return result

    async def _route(self, request: Request) -> Response:
        msg: Any = pyworker.json_loads(request.body)
        if not isinstance(msg, dict):
            return pyworker.error_response(422, "invalid JSON")
        route = typing.cast(dict[str, Any], msg)
        bearer = request.headers.get("authorization")
        if bearer is not None and bearer != f"Bearer {self.api_key}":
            return pyworker.error_response(401, "bad Authorization")
        if route.get("api_key") != self.api_key:
            return pyworker.error_response(401, "bad api_key")
        if route.get("endpoint") != self.endpoint:
            return pyworker.error_response(404, f"no endpoint named {route.get('endpoint')!r}")
        idx: int | None = None
        if self.platform == "today":
            asked = route.get("request_idx")
            if type(asked) is int and 0 < asked <= self.request_idx and asked not in self.routed:
                idx = asked  # a poll: the same request
            else:
                self.request_idx += 1
                idx = self.request_idx
        ready = [w for w in self.workers.values() if w.ready]
        if not ready:
            waiting: dict[str, Any] = {"error": "no worker ready yet", "status": "loading"}
            if idx is not None:
                waiting["request_idx"] = idx
            return json_response(waiting)
        cost = route.get("cost", 0)
        worker = min(ready, key=lambda w: w.load)
        worker.routed += 1
        worker.routed_workload += _workload(cost)
        self.reqnum += 1
        if idx is None:  # the seed's: four signed fields
            auth = self.key.sign_auth(
                cost=cost, endpoint=self.endpoint, reqnum=self.reqnum, url=worker.url
            )
        else:
            self.routed[idx] = worker.url
            # The `url` layout signs the same bytes for every request to a worker: signed once.
            signature = self._url_signatures.get(worker.url)
            if signature is None:
                signature = self._url_signatures[worker.url] = self.key.sign_url(worker.url)
            auth = {
                "cost": cost,
                "endpoint": self.endpoint,
                "reqnum": self.reqnum,
                "request_idx": idx,
                "signature": signature,
                "url": worker.url,
            }
        auth["__request_id"] = secrets.token_hex(8)
        return json_response(auth)


# The load tester ################################################################################
# Open loop: request i is due at start + i / rps whatever happened to the ones before it, so a
# slow worker shows up as latency and in-flight requests, not as a quietly lower rate (the
# "coordinated omission" of closed-loop testers). Only the in-flight cap holds the sender back,
# and the report says how often it did.

DEFAULT_SERVER = "https://run.vast.ai"
LOCAL_SERVER = "http://localhost:8081"  # -l: an autoscaler run on this machine
DEFAULT_TOTAL = 120  # with DEFAULT_RPS, 6 seconds of load: --local takes about 15 s in all
DEFAULT_RPS = 20.0
DEFAULT_TIMEOUT = 60.0  # seconds for one request, route call and worker call together
DEFAULT_MAX_IN_FLIGHT = 256  # each in-flight request holds a socket (ulimit -n is often 1024)
PROGRESS_TTY_INTERVAL = 0.25  # seconds between redraws of the progress line on a terminal
PROGRESS_PLAIN_INTERVAL = 5.0  # seconds between progress lines in a log or a pipe
ERROR_SAMPLES = 10  # failed requests described in the report, the first ones
ERROR_KINDS = 20  # distinct failures (outcome, stage, message) counted in the report
MAX_ERROR_BODY = 200  # characters of a failed answer kept in its description

# Outcomes every report lists, even at 0; HTTP statuses add "http_<status>" keys.
OUTCOMES = ("ok", "route_error", "connect_error", "timeout", "broken", "cancelled")
_OUTCOME_LABELS = {
    "ok": "ok",
    "route_error": "route error",
    "connect_error": "connect error",
    "timeout": "timeout",
    "broken": "broken off",
    "cancelled": "cancelled",
}
_AUTH_FIELDS = ("signature", "cost", "endpoint", "reqnum", "url")
ROUTE_POLL_FIRST = 0.25  # seconds before the first poll of an answer without url; doubles
ROUTE_POLL_MAX = 5.0  # the longest pause between polls (SPEC 11.6)
ROUTE_REPLAY_TIMEOUT = 60.0  # sent in each route call, as today's client does
READY_POLL = 0.5  # seconds between readiness checks of a worker (--worker)
READY_REFUSED_GRACE = 5.0  # a worker unreachable this long is not there: send anyway


def outcome_label(outcome: str) -> str:
    if outcome.startswith("http_"):
        return "HTTP " + outcome[5:]
    return _OUTCOME_LABELS.get(outcome, outcome)


@dataclasses.dataclass
class LoadOptions:
    """What to load and how hard. Exactly one of `server` (an autoscaler) and `worker`."""

    total: int = DEFAULT_TOTAL
    rps: float = DEFAULT_RPS
    route: str = "/generate"
    server: str | None = DEFAULT_SERVER
    worker: str | None = None  # call this worker directly, unsigned (it must run UNSECURED)
    api_key: str = ""
    endpoint: str = ""
    timeout: float = DEFAULT_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    progress: bool = True
    progress_interval: float | None = None  # None: by whether the output is a terminal
    ssl_context: ssl.SSLContext | None = None  # for https workers and autoscalers
    session: int = 0  # > 0: each client opens a session, sends this many requests in it, ends it
    session_lifetime: float = 60.0  # seconds, asked at /session/create
    platform: str = "today"  # "today": SPEC 11 route calls and bodies; "2024": the seed's
    ready_timeout: float | None = None  # worker mode: wait this long for it to be ready first


@dataclasses.dataclass
class RequestRecord:
    """One request's story. Times are time.monotonic() values; durations are seconds."""

    index: int
    due: float  # when the schedule wanted it sent
    started: float = 0.0
    finished: float = 0.0
    outcome: str = ""  # one of OUTCOMES or "http_<status>"
    stage: str = ""  # where a failure happened: "route" or "worker"
    message: str = ""
    status: int | None = None  # the worker's HTTP status, when it answered
    worker: str | None = None
    route_time: float | None = None  # the route call, answer read (polls and pauses included)
    route_wait: float = 0.0  # of which paused between polls (answers without a url)
    route_polls: int = 0  # route calls answered without a url
    request_idx: int | None = None  # the platform's id of this request, from the route answer
    worker_time: float | None = None  # the worker call, whole answer read
    total_time: float | None = None  # both
    stream: bool = False  # the worker answered a stream (chunked or SSE)
    ttft: float | None = None  # worker call sent -> first token
    first_token: float | None = None
    tokens: int = 0
    gaps: list[float] = dataclasses.field(default_factory=list[float])  # between token chunks
    last_token: float | None = None


@dataclasses.dataclass
class SessionRecord:
    """One simulated client's session: opened, `requests` sent in it, ended."""

    index: int
    worker: str | None = None
    session_id: str | None = None
    open_time: float | None = None  # the /session/create call, answer read
    end_time: float | None = None  # the /session/end call
    opened: bool = False
    ended: bool = False
    message: str = ""  # why it failed to open or to end
    request_idx: int | None = None  # the routed request the session was opened with
    create_status: int | None = None  # /session/create's answer status


class _TokenCounter:
    """Counts the tokens of a stream: SSE events that carry data, else one per chunk.

    An SSE event is counted when the blank line that ends it arrives, once however many
    `data:` lines it has, and only when its data is not empty and not OpenAI's end marker
    `[DONE]`. Comments and events without data are not tokens.
    """

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self._partial = b""
        self._data: list[bytes] = []  # the data lines of the event being read

    def feed(self, data: bytes) -> int:
        if not self.sse:
            return 1 if data else 0
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > 64 * 1024:
            self._partial = self._partial[:16]  # only a line's start matters; memory stays bounded
        events = 0
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:  # the end of an event
                text = b"\n".join(self._data).strip()
                if text and text != b"[DONE]":
                    events += 1
                self._data = []
            elif line.startswith(b"data:") and len(self._data) < 4:
                # A few lines are enough to tell data from [DONE]; memory stays bounded.
                self._data.append(line[5:][:64])
        return events


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated between ranks (numpy's default)."""
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """{count, mean, min, p50, p90, p99, max} of the values; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": ordered[0],
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def payload_json(payload: ApiPayload) -> dict[str, Any]:
    """A payload as a client sends it: its fields, which the worker's from_json_msg reads.

    Not generate_payload_json(): that is what the worker sends the model, which may differ.
    """
    if dataclasses.is_dataclass(payload):
        return dataclasses.asdict(payload)
    return payload.generate_payload_json()


class LoadTester:
    """Sends `options.total` requests at `options.rps`, each through the autoscaler's /route/
    (or straight to one worker), and records what happened to each.

    Usage: `result = await LoadTester(options, make_payload).run()`. `interrupt()` stops it
    early (Ctrl-C): no new requests, the ones in flight are cancelled, the result is partial.
    """

    def __init__(
        self,
        options: LoadOptions,
        make_payload: Callable[[], ApiPayload],
        out: typing.TextIO | None = None,
    ) -> None:
        if (options.server is None) == (options.worker is None):
            raise ValueError("give exactly one of server and worker")
        if options.total < 1 or not options.rps > 0 or not options.timeout > 0:
            raise ValueError("total, rps and timeout must be positive")
        self.options = options
        self.make_payload = make_payload
        self.out = out if out is not None else sys.stdout
        self.records: list[RequestRecord] = []
        self.sessions: list[SessionRecord] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.held_back = 0  # times the sender waited for a free slot (--max-in-flight)
        self.started = 0.0
        self.send_ended: float | None = None
        self.interrupted = False
        self._route_client: HttpClient | None = None
        self._clients: dict[str, HttpClient] = {}  # one pool per worker URL
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.max_in_flight)
        self._sender: asyncio.Task[None] | None = None
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    # Running ----------------------------------------------------------------------------------

    async def run(self) -> LoadResult:
        loop = asyncio.get_running_loop()
        if self.options.server is not None:
            self._route_client = self._new_client(self.options.server)
        progress: asyncio.Task[None] | None = None
        try:
            if self.options.worker is not None and self.options.ready_timeout:
                await self.wait_ready(self.options.worker, self.options.ready_timeout)
            if self.options.progress:
                progress = loop.create_task(self._progress())
            self.started = time.monotonic()
            self._sender = loop.create_task(self._send_all())
            await asyncio.wait({self._sender})  # returns when it is done or cancelled
            if self.send_ended is None:
                self.send_ended = time.monotonic()
            while self._tasks:  # the stragglers (the cap keeps their number bounded)
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            if self._sender is not None:
                self._sender.cancel()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
                self._write_progress(final=True)
            for client in [self._route_client, *self._clients.values()]:
                if client is not None:
                    await client.close()
        return LoadResult(self)

    async def wait_ready(self, url: str, timeout: float) -> bool:
        """Until the worker at `url` is ready: GET /healthcheck says state "ready", or (when
        it says no state: a model's health relayed, an older worker) the model route answers
        anything but 503. Said on the progress line; False after `timeout` seconds (the load
        is sent anyway, and the report shows what a worker not ready answers)."""
        client = self._client_for(url)
        started = time.monotonic()
        deadline = started + timeout
        why = "no answer yet"
        shown = -math.inf
        answered = False
        while not self.interrupted:
            why, reached = await self._readiness(client, deadline)
            answered = answered or reached
            now = time.monotonic()
            if not why:
                self._say_waiting(f"worker ready after {now - started:.1f}s", final=True)
                return True
            if not answered and now - started >= READY_REFUSED_GRACE:
                # A PyWorker listens at once, loading or not: nothing there is no worker.
                self._say_waiting(f"no worker answers ({why}): sending anyway", final=True)
                return False
            if now >= deadline:
                self._say_waiting(
                    f"worker not ready after {timeout:g}s ({why}): sending anyway", final=True
                )
                return False
            interval = PROGRESS_TTY_INTERVAL if self._tty else PROGRESS_PLAIN_INTERVAL
            if now - shown >= interval:
                shown = now
                self._say_waiting(
                    f"waiting for the worker to be ready ... {now - started:.1f}s ({why})",
                    final=False,
                )
            await asyncio.sleep(min(READY_POLL, max(deadline - now, 0.0)))
        return False

    async def _readiness(self, client: HttpClient, deadline: float) -> tuple[str, bool]:
        """("", True) when the worker is ready, else why not and whether it answered."""
        timeout = max(min(5.0, deadline - time.monotonic()), 0.05)
        try:
            async with await client.request("GET", "/healthcheck", timeout=timeout) as resp:
                body = await resp.read()
        except UpstreamError as exc:
            return str(exc)[:120], False
        state: Any = None
        with contextlib.suppress(ValueError, RecursionError):
            answer: Any = json_loads(body)
            if isinstance(answer, dict):
                state = typing.cast(dict[str, Any], answer).get("state")
        if isinstance(state, str):
            return ("" if state == "ready" else f"state {state}"), True
        # No state (a model's health relayed, another worker): ask the model route itself.
        payload = payload_json(self.make_payload())
        auth = {"signature": "", "cost": 0, "endpoint": "ready-check", "reqnum": 0}
        probe = json_dumps({"auth_data": {**auth, "url": client.base_url}, "payload": payload})
        try:
            timeout = max(deadline - time.monotonic(), 0.05)
            async with await client.request(
                "POST", self.options.route, probe, timeout=timeout
            ) as resp:
                await resp.read()
        except UpstreamError as exc:
            return str(exc)[:120], True
        return (f"{self.options.route} answers 503" if resp.status == 503 else ""), True

    def _say_waiting(self, text: str, *, final: bool) -> None:
        if not self.options.progress:
            return
        if self._tty:
            self.out.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def interrupt(self) -> None:
        """Stop sending and cancel the requests in flight; run() then returns what it has."""
        self.interrupted = True
        if self._sender is not None:
            self._sender.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def _send_all(self) -> None:
        if self.interrupted:  # while waiting for the worker
            return
        if self.options.session > 0:
            await self._send_sessions()
            return
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.options.rps
        for i in range(self.options.total):
            due = self.started + i * interval  # absolute: a late send does not delay the next
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind schedule: still let answers be read
            if self._slots.locked():
                self.held_back += 1
            await self._slots.acquire()
            record = RequestRecord(index=i, due=due)
            self.records.append(record)
            task = loop.create_task(self._one(record))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self.send_ended = time.monotonic()

    async def _send_sessions(self) -> None:
        """Session mode: a client every `session / rps` seconds (so requests still leave at
        about rps), each holding one in-flight slot for its whole session."""
        loop = asyncio.get_running_loop()
        per = self.options.session
        interval = per / self.options.rps
        clients = math.ceil(self.options.total / per)
        clients_started: list[asyncio.Task[None]] = []
        for c in range(clients):
            due = self.started + c * interval
            delay = due - time.monotonic()
            await asyncio.sleep(max(delay, 0.0))
            if self._slots.locked():
                self.held_back += 1
            await self._slots.acquire()
            count = min(per, self.options.total - c * per)
            task = loop.create_task(self._session_client(c, due, count))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            clients_started.append(task)
        # The sending goes on inside the sessions: it ends when the last one has sent all.
        await asyncio.gather(*clients_started, return_exceptions=True)
        self.send_ended = time.monotonic()

    async def _session_client(self, index: int, due: float, count: int) -> None:
        """Route once, open a session, send `count` requests in it one after the other, end
        it. The route call is timed in the first request's record."""
        session = SessionRecord(index)
        self.sessions.append(session)
        first = RequestRecord(index=index * self.options.session, due=due)
        self.records.append(first)
        first.started = time.monotonic()
        deadline = first.started + self.options.timeout
        target = await self._target_for(first, self.make_payload().count_workload(), deadline)
        if target is None:
            first.finished = time.monotonic()
            self.counts[first.outcome] += 1
            return
        url, auth = target
        session.worker = url
        session.request_idx = first.request_idx
        sid = await self._session_call(session, url, "/session/create", auth, deadline)
        for i in range(count):
            record = first
            if i:  # made when it is sent (an interrupted run has no unsent records)
                record = RequestRecord(index=first.index + i, due=time.monotonic())
                self.records.append(record)
            if sid is None:
                record.started = record.started or time.monotonic()
                record.worker = url
                self._fail(record, "route_error", "session", f"no session: {session.message}")
                record.finished = time.monotonic()
                self.counts[record.outcome] += 1
                continue
            await self._one(record, target=target, session_id=sid, routed=i == 0)
        if sid is not None:
            end_deadline = time.monotonic() + self.options.timeout
            await self._session_call(session, url, "/session/end", auth, end_deadline, sid)

    async def _session_call(
        self,
        session: SessionRecord,
        url: str,
        path: str,
        auth: dict[str, Any],
        deadline: float,
        session_id: str | None = None,
    ) -> str | None:
        """/session/create (the new id, or None) or /session/end (the id, or None)."""
        if session_id is None:
            lifetime = self.options.session_lifetime
            body: dict[str, Any] = {"auth_data": auth, "payload": {"lifetime": lifetime}}
        else:
            body = {"session_id": session_id, "session_auth": auth}
        sent = time.monotonic()
        try:
            client = self._client_for(url)
            response = await client.request(
                "POST", path, json_dumps(body), timeout=max(deadline - sent, 0.001)
            )
            async with response:
                answer = await response.read()
        except (UpstreamError, ValueError) as exc:
            session.message = f"{path}: {exc}"
            return None
        took = time.monotonic() - sent
        text = answer[:MAX_ERROR_BODY].decode("utf-8", "replace")
        try:
            fields: Any = json_loads(answer)
        except (ValueError, RecursionError):
            fields = None
        if session_id is None:
            session.open_time = took
            session.create_status = response.status
            answer_fields = typing.cast(dict[str, Any], fields) if isinstance(fields, dict) else {}
            new_id = answer_fields.get("session_id")
            if response.status != 201 or not isinstance(new_id, str):
                session.message = f"{path}: HTTP {response.status}: {text}"
                return None
            session.opened, session.session_id = True, new_id
            return new_id
        session.end_time = took
        if response.status != 200:
            session.message = f"{path}: HTTP {response.status}: {text}"
            return None
        session.ended = True
        return session_id

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    def _new_client(self, base_url: str) -> HttpClient:
        return HttpClient(base_url, ssl_context=self.options.ssl_context)

    def _client_for(self, url: str) -> HttpClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = self._new_client(url)  # ValueError: a bad URL
        return client

    async def _one(
        self,
        record: RequestRecord,
        *,
        target: tuple[str, dict[str, Any]] | None = None,
        session_id: str | None = None,
        routed: bool = False,
    ) -> None:
        if not routed:  # a session's first request was started by its route call
            record.started = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            deadline = time.monotonic() + self.options.timeout
            await self._request(record, deadline, target, session_id)
        except asyncio.CancelledError:
            self._fail(record, "cancelled", record.stage or "route", "interrupted")
        except Exception as exc:  # a bug here must not hang the run: count it and go on
            self._fail(record, "broken", record.stage or "route", f"load tester error: {exc!r}")
        finally:
            record.finished = time.monotonic()
            self.in_flight -= 1
            self.counts[record.outcome] += 1

    @staticmethod
    def _fail(record: RequestRecord, outcome: str, stage: str, message: str) -> None:
        if not record.outcome:  # the first failure is the one that counts
            record.outcome, record.stage, record.message = outcome, stage, message

    async def _target_for(
        self, record: RequestRecord, cost: float, deadline: float
    ) -> tuple[str, dict[str, Any]] | None:
        """The worker's url and the auth_data to send it: routed, or made up for a direct
        worker; None when routing failed (the record says why)."""
        options = self.options
        if options.worker is not None:
            # A complete but unsigned auth_data: a worker running UNSECURED ignores it, and
            # PyWorkers that parse it even then (the 2024 public one) find every field.
            auth: dict[str, Any] = {
                "signature": "",
                "cost": cost,
                "endpoint": options.endpoint or "direct",
                "reqnum": record.index + 1,
                "url": options.worker,
            }
            return options.worker, auth
        answer = await self._route(record, cost, deadline)
        if answer is None:
            return None
        if options.platform == "2024":  # the seed's client sent the five signed fields
            auth = {name: answer[name] for name in _AUTH_FIELDS}
        else:  # today's sends the whole answer (SPEC 11.1)
            auth = dict(answer)
        return typing.cast(str, answer["url"]), auth

    async def _request(
        self,
        record: RequestRecord,
        deadline: float,
        target: tuple[str, dict[str, Any]] | None = None,
        session_id: str | None = None,
    ) -> None:
        options = self.options
        payload = self.make_payload()
        cost = payload.count_workload()
        if target is None:
            target = await self._target_for(record, cost, deadline)
            if target is None:
                return
        url, auth = target
        record.stage = "worker"
        record.worker = url
        try:
            client = self._client_for(url)
        except ValueError as exc:
            self._fail(record, "route_error", "route", f"unusable worker url: {exc}")
            return
        message: dict[str, Any] = {"auth_data": auth}
        if session_id is not None or (options.platform == "today" and options.worker is None):
            message["session_id"] = session_id
        message["payload"] = payload_json(payload)
        body = json_dumps(message)
        sent = time.monotonic()
        if deadline - sent <= 0:
            self._fail(record, "timeout", "worker", "no time left after the route call")
            return
        try:
            response = await client.request("POST", options.route, body, timeout=deadline - sent)
        except UpstreamTimeout as exc:
            self._fail(record, "timeout", "worker", str(exc))
            return
        except UpstreamError as exc:
            self._fail(record, "connect_error", "worker", str(exc))
            return
        record.status = response.status
        try:
            if not 200 <= response.status < 300:
                self._fail(record, f"http_{response.status}", "worker", "")
                body = await response.read()  # keeps the connection usable, and says why
                record.message = body.decode("utf-8", "replace")[:MAX_ERROR_BODY]
                return
            if self._is_stream(response):
                await self._read_stream(record, response, sent)
            else:
                await response.read()
        except UpstreamTimeout as exc:
            self._fail(record, "timeout", "worker", str(exc))
            return
        except UpstreamError as exc:
            self._fail(record, "broken", "worker", str(exc))
            return
        finally:
            response.close()
        now = time.monotonic()
        record.worker_time = now - sent
        record.total_time = now - record.started
        record.outcome = "ok"

    async def _route(
        self, record: RequestRecord, cost: float, deadline: float
    ) -> dict[str, Any] | None:
        """POST /route/: the signed auth_data and the worker's url, or None (record failed)."""
        record.stage = "route"
        options = self.options
        today = options.platform == "today"
        request_idx = 0
        pause = ROUTE_POLL_FIRST
        while True:
            fields = await self._route_call(record, cost, deadline, request_idx)
            if fields is None:
                return None
            if fields.get("url"):
                break
            text = json_dumps(fields)[:MAX_ERROR_BODY].decode("utf-8", "replace")
            idx = fields.get("request_idx")
            if not today or type(idx) is not int:
                # The seed's autoscaler (or an answer with nothing to poll with): no url is a
                # failure, not a wait.
                self._fail(record, "route_error", "route", f"no worker url: {text}")
                return None
            # Today's: wait and ask again for the same request (SPEC 11.6), a jittered pause
            # of at most ROUTE_POLL_MAX seconds, within the request's deadline.
            request_idx = idx
            record.route_polls += 1
            delay = min(pause * random.uniform(0.5, 1.0), ROUTE_POLL_MAX)
            left = deadline - time.monotonic()
            if left <= delay:
                record.route_wait += max(left, 0.0)
                await asyncio.sleep(max(left, 0.0))
                record.route_time = time.monotonic() - record.started
                self._fail(record, "timeout", "route", f"still no worker url: {text}")
                return None
            await asyncio.sleep(delay)
            record.route_wait += delay
            pause = min(pause * 2, ROUTE_POLL_MAX)
        text = json_dumps(fields)[:MAX_ERROR_BODY].decode("utf-8", "replace")
        missing = [name for name in _AUTH_FIELDS if name not in fields]
        if missing or not isinstance(fields["url"], str):
            self._fail(record, "route_error", "route", f"answer lacks {missing}: {text}")
            return None
        idx = fields.get("request_idx")
        record.request_idx = idx if type(idx) is int else None
        return fields

    async def _route_call(
        self, record: RequestRecord, cost: float, deadline: float, request_idx: int
    ) -> dict[str, Any] | None:
        """One POST /route/: its answer as a JSON object, or None (the record failed)."""
        options = self.options
        assert self._route_client is not None
        message: dict[str, Any] = {
            "endpoint": options.endpoint,
            "api_key": options.api_key,
            "cost": cost,
        }
        headers: list[tuple[str, str]] = []
        if options.platform == "today":
            message["request_idx"] = request_idx
            message["replay_timeout"] = ROUTE_REPLAY_TIMEOUT
            headers.append(("Authorization", f"Bearer {options.api_key}"))
        try:
            response = await self._route_client.request(
                "POST",
                "/route/",
                json_dumps(message),
                headers=headers,
                timeout=max(deadline - time.monotonic(), 0.001),
            )
            async with response:
                body = await response.read()
        except UpstreamTimeout as exc:
            self._fail(record, "timeout", "route", str(exc))
            return None
        except UpstreamError as exc:
            self._fail(record, "connect_error", "route", str(exc))
            return None
        record.route_time = time.monotonic() - record.started
        text = body[:MAX_ERROR_BODY].decode("utf-8", "replace")
        if not 200 <= response.status < 300:
            self._fail(record, "route_error", "route", f"HTTP {response.status}: {text}")
            return None
        try:
            answer: Any = json_loads(body)
        except (ValueError, RecursionError):  # orjson's JSONDecodeError is a ValueError
            answer = None
        if not isinstance(answer, dict):
            self._fail(record, "route_error", "route", f"not a JSON object: {text}")
            return None
        return typing.cast(dict[str, Any], answer)

    @staticmethod
    def _is_stream(response: ClientResponse) -> bool:
        coding = (response.headers.get("transfer-encoding") or "").lower()
        return "chunked" in coding or response.content_type.startswith("text/event-stream")

    @staticmethod
    async def _read_stream(record: RequestRecord, response: ClientResponse, sent: float) -> None:
        record.stream = True
        counter = _TokenCounter(response.content_type.startswith("text/event-stream"))
        async for data in response.iter_chunks():
            tokens = counter.feed(data)
            if not tokens:
                continue
            now = time.monotonic()
            if record.first_token is None:
                record.first_token = now
                record.ttft = now - sent
            elif record.last_token is not None:
                record.gaps.append(now - record.last_token)
            record.last_token = now
            record.tokens += tokens

    # Progress ---------------------------------------------------------------------------------

    def progress_line(self) -> str:
        """sent, done, in flight, errors by kind, achieved rate, elapsed."""
        now = time.monotonic()
        elapsed = now - self.started if self.started else 0.0
        sent = len(self.records)
        done = sent - self.in_flight
        failures = [(k, v) for k, v in sorted(self.counts.items()) if k != "ok" and v]
        errors = ", ".join(f"{outcome_label(k)} {v}" for k, v in failures) or "none"
        span = (self.send_ended or now) - self.started
        rate = (sent - 1) / span if sent > 1 and span > 0 else 0.0
        return (
            f"sent {sent}/{self.options.total}  done {done}  in flight {self.in_flight}  "
            f"errors: {errors}  rate {rate:.1f}/s (asked {self.options.rps:g})  "
            f"elapsed {elapsed:.1f}s"
        )

    async def _progress(self) -> None:
        interval = self.options.progress_interval
        if interval is None:
            interval = PROGRESS_TTY_INTERVAL if self._tty else PROGRESS_PLAIN_INTERVAL
        while True:
            await asyncio.sleep(interval)
            self._write_progress(final=False)

    def _write_progress(self, *, final: bool) -> None:
        if self._tty:  # one line, redrawn in place; cleared to its end for shorter redraws
            self.out.write("\r" + self.progress_line() + "\x1b[K" + ("\n" if final else ""))
        elif not final:
            self.out.write(self.progress_line() + "\n")
        self.out.flush()


class LoadResult:
    """A finished (or interrupted) load test: `report()` as JSON-ready data, `render()` text.

    report()'s schema (durations in seconds, rates per second; a summary is
    {"count", "mean", "min", "p50", "p90", "p99", "max"}, or null when nothing was measured):

        schema         "pyworker-load-test/1"
        target         {"mode": "autoscaler" | "worker" | "local", "server": URL | null,
                        "worker": URL | null, "route": str, "endpoint": str}
        requests       {"asked": int, "sent": int, "finished": int, "failed": int,
                        "interrupted": bool}
        outcomes       {"ok", "route_error", "connect_error", "timeout", "broken",
                        "cancelled": int, always present; "http_<status>": int for each
                        non-2xx status a worker answered}
        http_status    {"<status>": int}: every answer a worker gave, by status
        rate           {"asked": float, "sent": float | null (between the first and the
                        last send), "completed": float | null (finished requests over
                        elapsed)}
        elapsed        float: first send to last finish
        in_flight      {"limit": int, "max": int, "held_back": int (sends delayed by the
                        limit), "max_send_lag": float (latest send behind schedule)}
        latency        {"route": summary (route calls answered), "worker": summary
                        (ok requests: worker call sent -> answer read), "total": summary
                        (ok requests: route call sent -> answer read)}
        route_wait     null (--worker), or {"requests": int (route calls answered "wait",
                        without a url, at least once), "polls": int (such answers),
                        "wait": summary (per such request: the pauses before polling
                        again, part of its route time)}
        stream         null, or for ok requests answered as a stream:
                       {"requests": int, "tokens": int, "tokens_per_s": float (all tokens
                        over elapsed), "ttft": summary (worker call sent -> first token),
                        "itl": summary (inter-token latency: between successive chunks
                        carrying tokens), "stream_tokens_per_s": summary (per request,
                        after its first token)}
        workers        {"<url>": {"requests": int, "ok": int}}: the workers seen
        errors         [{"index": int, "outcome": str, "stage": "route" | "worker",
                         "worker": URL | null, "message": str}]: the first failures
        error_kinds    [{"outcome": str, "stage": str, "message": str, "count": int}]:
                       failures grouped by the three, most frequent first (20 at most)
        sessions       null, or with --session N: {"per_session": N, "clients": int,
                        "opened": int, "ended": int, "open": summary (/session/create
                        calls answered), "end": summary (/session/end calls answered),
                        "failures": [str]: the first reasons a session failed}
        local          only with --local: {"directory": str, "autoscaler": URL,
                        "workers": [{"index", "url", "pid", "log", "model_log",
                        "reports": int, "loadtime": float | null,
                        "under_load_report": {...} | null (the last one received
                        before the test stopped sending), "last_report": {...} | null}]}
                       where a report is the worker's /worker_status/ body (SPEC 7)
        reconciliation only with --local: {"checked": false, "reason": str} (--platform
                        2024), or {"checked": true, "ok": bool, "line": str, "routed": int,
                        "completed": int, "missing", "twice", "unknown": [request_idx]
                        (the first ones), "mismatches": [str], "counts": {"missing",
                        "twice", "mismatches", "unknown": int}, "report_faults": [str]
                        (wrong load or completion reports), "unauthorized": int}"""

    def __init__(self, tester: LoadTester) -> None:
        self.options = tester.options
        self.records = list(tester.records)
        self.started = tester.started
        self.send_ended = tester.send_ended or time.monotonic()
        self.max_in_flight = tester.max_in_flight
        self.held_back = tester.held_back
        self.interrupted = tester.interrupted
        self.sessions = list(tester.sessions)
        self.extra: dict[str, Any] = {}  # more top-level keys for report(), e.g. "local"

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r.outcome != "ok")

    @property
    def ok(self) -> bool:
        """Every asked request was sent and succeeded, and every session opened was ended:
        the exit status is 0."""
        sessions_ended = all(s.ended for s in self.sessions if s.opened)
        return not self.failed and len(self.records) == self.options.total and sessions_ended

    def report(self) -> dict[str, Any]:
        """The report as JSON-ready data (schema: the class docstring); `--json FILE`
        writes exactly this."""
        records = self.records
        ok = [r for r in records if r.outcome == "ok"]
        failed = [r for r in records if r.outcome != "ok"]
        starts = sorted(r.started for r in records)
        finished = sum(1 for r in records if r.finished)
        elapsed = self._elapsed(starts)
        return {
            "schema": "pyworker-load-test/1",
            "target": self._target(),
            "requests": {
                "asked": self.options.total,
                "sent": len(records),
                "finished": finished,
                "failed": len(failed),
                "interrupted": self.interrupted,
            },
            "outcomes": self._outcomes(),
            "http_status": self._http_status(),
            "rate": self._rate(starts, finished, elapsed),
            "elapsed": elapsed,
            "in_flight": self._in_flight(),
            "latency": self._latency(ok),
            "route_wait": self._route_wait(),
            "stream": self._stream(ok, elapsed),
            "workers": self._workers(),
            "errors": self._errors(failed),
            "error_kinds": self._error_kinds(failed),
            "sessions": self._sessions(),
            **self.extra,
        }

    # The report's sections, in its order; each returns its part of the JSON.

    def _elapsed(self, starts: Sequence[float]) -> float:
        # First send to last finish; an interrupted test with nothing finished ends when the
        # sending stopped.
        end = max((r.finished for r in self.records if r.finished), default=self.send_ended)
        return max(end - starts[0], 0.0) if starts else 0.0

    def _target(self) -> dict[str, Any]:
        options = self.options
        if options.worker is not None:
            mode = "worker"
        else:
            mode = "local" if "local" in self.extra else "autoscaler"
        return {
            "mode": mode,
            "server": options.server,
            "worker": options.worker,
            "route": options.route,
            "endpoint": options.endpoint,
        }

    def _outcomes(self) -> dict[str, int]:
        # Every known outcome is present, zero or not, so that a reader of the JSON need not
        # guess; "http_<status>" ones follow in the order they first happened.
        outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        for r in self.records:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        return outcomes

    def _http_status(self) -> dict[str, int]:
        statuses = collections.Counter(str(r.status) for r in self.records if r.status is not None)
        return dict(sorted(statuses.items()))

    def _rate(self, starts: Sequence[float], finished: int, elapsed: float) -> dict[str, Any]:
        # The achieved send rate spans the first to the last send: n sends, n - 1 intervals.
        send_span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        return {
            "asked": self.options.rps,
            "sent": (len(starts) - 1) / send_span if send_span > 0 else None,
            "completed": finished / elapsed if elapsed > 0 else None,
        }

    def _in_flight(self) -> dict[str, Any]:
        return {
            "limit": self.options.max_in_flight,
            "max": self.max_in_flight,
            "held_back": self.held_back,
            "max_send_lag": max((r.started - r.due for r in self.records), default=0.0),
        }

    def _latency(self, ok: Sequence[RequestRecord]) -> dict[str, Any]:
        # A route call is timed whenever it was answered; worker and total times only for
        # successes, lest fast failures (a 503, a refused connection) flatter the percentiles.
        return {
            "route": summarize(r.route_time for r in self.records if r.route_time is not None),
            "worker": summarize(r.worker_time for r in ok if r.worker_time is not None),
            "total": summarize(r.total_time for r in ok if r.total_time is not None),
        }

    def _route_wait(self) -> dict[str, Any] | None:
        # Today's /route/ may answer "wait" (no url): the pauses before asking again are part
        # of the route time, and shown on their own here.
        if self.options.server is None:
            return None
        polled = [r for r in self.records if r.route_polls]
        return {
            "requests": len(polled),
            "polls": sum(r.route_polls for r in polled),
            "wait": summarize(r.route_wait for r in polled),
        }

    def client_statuses(self) -> dict[int, tuple[str, ...]]:
        """request_idx -> the completion statuses the worker may report, by what this client
        saw (expected_statuses); with --session, a session is one request, ended as a
        success once it opened."""
        view: dict[int, tuple[str, ...]] = {}
        if self.options.session:
            for session in self.sessions:
                if session.request_idx is not None:
                    allowed = ("Success",) if session.opened else None
                    view[session.request_idx] = allowed or expected_statuses(
                        session.create_status, ""
                    )
            return view
        for r in self.records:
            if r.request_idx is not None:
                view[r.request_idx] = expected_statuses(r.status, r.outcome)
        return view

    @staticmethod
    def _stream(ok: Sequence[RequestRecord], elapsed: float) -> dict[str, Any] | None:
        streams = [r for r in ok if r.stream]
        if not streams:
            return None
        tokens = sum(r.tokens for r in streams)
        # A stream's own rate counts the tokens after its first one, over the time they took;
        # a stream of one chunk has no such time.
        rates = [
            (r.tokens - 1) / (r.last_token - r.first_token)
            for r in streams
            if r.first_token is not None
            and r.last_token is not None
            and r.last_token > r.first_token
        ]
        return {
            "requests": len(streams),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "ttft": summarize(r.ttft for r in streams if r.ttft is not None),
            "itl": summarize(g for r in streams for g in r.gaps),
            "stream_tokens_per_s": summarize(rates),
        }

    def _sessions(self) -> dict[str, Any] | None:
        if not self.options.session:
            return None
        sessions = self.sessions
        return {
            "per_session": self.options.session,
            "clients": len(sessions),
            "opened": sum(1 for s in sessions if s.opened),
            "ended": sum(1 for s in sessions if s.ended),
            "open": summarize(s.open_time for s in sessions if s.open_time is not None),
            "end": summarize(s.end_time for s in sessions if s.end_time is not None),
            "failures": [s.message for s in sessions if s.message][:ERROR_SAMPLES],
        }

    def _workers(self) -> dict[str, dict[str, int]]:
        workers: dict[str, dict[str, int]] = {}
        for r in self.records:
            if r.worker is not None:
                seen = workers.setdefault(r.worker, {"requests": 0, "ok": 0})
                seen["requests"] += 1
                seen["ok"] += r.outcome == "ok"
        return dict(sorted(workers.items()))

    @staticmethod
    def _errors(failed: Sequence[RequestRecord]) -> list[dict[str, Any]]:
        return [
            {
                "index": r.index,
                "outcome": r.outcome,
                "stage": r.stage,
                "worker": r.worker,
                "message": r.message,
            }
            for r in failed[:ERROR_SAMPLES]
        ]

    @staticmethod
    def _error_kinds(failed: Sequence[RequestRecord]) -> list[dict[str, Any]]:
        # A thousand timeouts are one line, not a thousand: grouped, most frequent first.
        kinds = collections.Counter((r.outcome, r.stage, r.message) for r in failed)
        return [
            {"outcome": outcome, "stage": stage, "message": message, "count": count}
            for (outcome, stage, message), count in kinds.most_common(ERROR_KINDS)
        ]

    def render(self) -> str:
        """The report for people: a few aligned lines, latencies in milliseconds."""
        report = self.report()
        lines = [*self._render_head(report), *self._render_rate(report)]
        lines += self._render_latency(report)
        lines += self._render_tokens(report["stream"])
        lines += self._render_sessions(report["sessions"])
        lines += self._render_workers(report["workers"])
        lines += self._render_reconciliation(report.get("reconciliation"))
        lines += self._render_errors(report)
        return "\n".join(lines)

    # The text's sections, in its order; each takes report() and returns its lines.

    @staticmethod
    def _render_head(report: dict[str, Any]) -> list[str]:
        target = report["target"]
        requests = report["requests"]
        if target["mode"] == "worker":
            via = f"worker {target['worker']} directly (unsigned)"
        elif target["mode"] == "local":
            via = f"the local autoscaler {target['server']}"
        else:
            via = f"autoscaler {target['server']}"
        interrupted = " (interrupted)" if requests["interrupted"] else ""
        # ok first even when zero (the figure people look for), then the most frequent failures.
        counts = [(k, v) for k, v in report["outcomes"].items() if v or k == "ok"]
        counts.sort(key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
        return [
            f"== load test: POST {target['route']} via {via}{interrupted}",
            f"requests    {requests['sent']} sent of {requests['asked']}, "
            f"{requests['failed']} failed: "
            + ", ".join(f"{outcome_label(k)} {v}" for k, v in counts),
        ]

    @staticmethod
    def _render_rate(report: dict[str, Any]) -> list[str]:
        rate = report["rate"]
        flight = report["in_flight"]
        sent_rate = "-" if rate["sent"] is None else f"{rate['sent']:.2f}/s"
        completed = "-" if rate["completed"] is None else f"{rate['completed']:.2f}/s"
        held = f", held back {flight['held_back']} times" if flight["held_back"] else ""
        return [
            f"rate        asked {rate['asked']:g}/s, sent {sent_rate}, completed {completed}"
            f" over {report['elapsed']:.2f}s",
            f"in flight   max {flight['max']} (limit {flight['limit']}{held}), "
            f"latest send {flight['max_send_lag'] * 1000:.1f} ms behind schedule",
        ]

    @staticmethod
    def _render_latency(report: dict[str, Any]) -> list[str]:
        latency = report["latency"]
        table = [("route", latency["route"])]
        if report.get("route_wait") is not None:
            table.append(("route wait", report["route_wait"]["wait"]))
        table += [("worker", latency["worker"]), ("total", latency["total"])]
        stream = report["stream"]
        if stream is not None:
            table += [("first token", stream["ttft"]), ("inter-token", stream["itl"])]
        lines = [f"{'latency ms':<16}{'count':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"]
        for name, summary in table:
            if summary is None:
                lines.append(f"  {name:<14}{0:>7}{'-':>9}{'-':>9}{'-':>9}{'-':>9}")
                continue
            cells = "".join(f"{summary[k] * 1000:>9.1f}" for k in ("p50", "p90", "p99", "max"))
            lines.append(f"  {name:<14}{summary['count']:>7}{cells}")
        return lines

    @staticmethod
    def _render_tokens(stream: dict[str, Any] | None) -> list[str]:
        if stream is None:
            return []
        per = stream["stream_tokens_per_s"]
        per_text = "" if per is None else f", {per['p50']:.1f}/s per stream (p50)"
        total_rate = stream["tokens_per_s"] or 0.0
        return [
            f"tokens      {stream['tokens']} in {stream['requests']} streams: "
            f"{total_rate:.1f}/s in all{per_text}"
        ]

    @staticmethod
    def _render_sessions(sessions: dict[str, Any] | None) -> list[str]:
        if sessions is None:
            return []

        def ms(summary: dict[str, float] | None) -> str:
            if summary is None:
                return "-"
            return f"p50 {summary['p50'] * 1000:.1f} ms, max {summary['max'] * 1000:.1f} ms"

        lines = [
            f"sessions    {sessions['opened']} opened of {sessions['clients']} "
            f"({sessions['per_session']} requests each), {sessions['ended']} ended",
            f"  open      {ms(sessions['open'])}",
            f"  end       {ms(sessions['end'])}",
        ]
        lines += [f"  failed:   {message[:160]}" for message in sessions["failures"][:3]]
        return lines

    @staticmethod
    def _render_workers(workers: dict[str, dict[str, int]]) -> list[str]:
        lines = [f"workers     {len(workers)} seen"]
        for url, seen in workers.items():
            lines.append(f"  {url:<32} {seen['requests']:>6} requests, {seen['ok']} ok")
        return lines

    @staticmethod
    def _render_reconciliation(reconciliation: dict[str, Any] | None) -> list[str]:
        if reconciliation is None:
            return []
        if not reconciliation["checked"]:
            return [f"reconciled  not checked: {reconciliation['reason']}"]
        lines = [f"reconciled  {reconciliation['line']}"]
        for kind in ("missing", "twice", "unknown"):
            if reconciliation[kind]:
                shown = ", ".join(str(i) for i in reconciliation[kind])
                lines.append(f"  {kind}: request_idx {shown}")
        lines += [f"  mismatch: {m}" for m in reconciliation["mismatches"][:5]]
        faults: list[Any] = reconciliation.get("report_faults") or []
        if faults:
            lines.append(f"  wrong reports from the workers: {len(faults)}")
            lines += [f"    {' '.join(str(f).split())[:200]}" for f in faults[:5]]
        if reconciliation.get("unauthorized"):
            lines.append(f"  reports refused (wrong mtoken): {reconciliation['unauthorized']}")
        return lines

    @staticmethod
    def _render_errors(report: dict[str, Any]) -> list[str]:
        if not report["error_kinds"]:
            return []
        lines = [f"errors      {report['requests']['failed']}, by kind:"]
        for kind in report["error_kinds"]:
            where = "route call" if kind["stage"] == "route" else "worker call"
            # One line per kind: a multi-line traceback or a long body would bury the rest.
            message = " ".join(str(kind["message"]).split())[:160]
            lines.append(
                f"  {kind['count']:>6} x {outcome_label(kind['outcome'])} ({where}): {message}"
            )
        return lines


# Payloads from a worker file ######################################################################


def load_worker_module(spec: str | None = None) -> tuple[types.ModuleType, str, str]:
    """A worker's module, imported once, from `FILE.py`, `FILE.py:Class` or a module name
    (default hello_world.py beside this file): (module, its path or name, the Class part)."""
    spec = spec or os.path.join(_HERE, "hello_world.py")
    path, class_name = spec, ""
    if not os.path.exists(spec) and ":" in spec:
        path, _, class_name = spec.rpartition(":")
    if path.endswith(".py") or os.sep in path:
        if not os.path.isfile(path):
            raise ValueError(f"no worker file {path!r}")
        name = os.path.splitext(os.path.basename(path))[0]
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if module is None or origin is None or not os.path.samefile(origin, path):
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in sys.path:
                sys.path.append(directory)  # the worker's own imports, beside it
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ValueError(f"cannot import {path!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(path)
    return module, path, class_name


def worker_first_route(module: types.ModuleType) -> str | None:
    """The path of the first POST route in a worker module's `routes` list."""
    routes: list[Any] = list(getattr(module, "routes", None) or [])
    for route in routes:
        if isinstance(route, pyworker.Route) and route.method == "POST":
            return route.path
    return None


def worker_loaded_lines(module: types.ModuleType) -> list[str]:
    """The texts a worker module's backend takes, in its model log, for "model loaded"."""
    actions: Any = getattr(getattr(module, "backend", None), "log_actions", None) or []
    lines: list[str] = []
    for action in typing.cast(list[Any], actions):
        if isinstance(action, tuple) and len(typing.cast(tuple[Any, ...], action)) == 2:
            kind, text = typing.cast(tuple[Any, Any], action)
            if kind is pyworker.LogAction.ModelLoaded and isinstance(text, str):
                lines.append(text)
    return lines


def load_payload_class(spec: str | None = None) -> type[ApiPayload]:
    """The ApiPayload subclass of a worker: `FILE.py`, `FILE.py:Class` or a module name.

    Default: hello_world.py beside this file. When the file defines several payload classes,
    the one its backend benchmarks with is taken, unless `:Class` names one.
    """
    module, path, class_name = load_worker_module(spec)
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, ApiPayload)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
    classes: list[type[ApiPayload]] = found
    if class_name:
        for cls in classes:
            if cls.__name__ == class_name:
                return cls
        raise ValueError(f"{path}: no ApiPayload subclass named {class_name!r}")
    if len(classes) == 1:
        return classes[0]
    backend = getattr(module, "backend", None)
    handler = getattr(backend, "benchmark_handler", None)
    if isinstance(handler, EndpointHandler):  # the class the worker benchmarks with
        chosen = typing.cast(EndpointHandler[Any], handler).payload_cls()
        if chosen in classes or not classes:  # not classes: it imports its payload
            return chosen
    if not classes:
        raise ValueError(f"{path}: no ApiPayload subclass")
    names = ", ".join(c.__name__ for c in classes)
    raise ValueError(f"{path}: several ApiPayload subclasses ({names}); pick one: {path}:Class")


# Local mode: a whole setup on loopback ###########################################################
# The fake models run in this process (asyncio); each worker is a real `python hello_world.py`
# subprocess, and a secured one: no UNSECURED, it fetches /pubkey/ from the local autoscaler
# and checks the signature of every request, as on a GPU box.

READY_TIMEOUT = 60.0  # seconds for a worker to load and benchmark before the setup gives up
STOP_GRACE = 10.0  # seconds a worker gets after SIGTERM before SIGKILL
LAST_REPORT_WAIT = 2.5  # seconds to wait after the test for each worker's next load report
COMPLETION_WAIT = 5.0  # seconds to wait after the test for the completion reports (1-2 s late)
LOG_TAIL_LINES = 15  # lines of a failed worker's log shown in the error
# The environment a local worker gets is the user's minus these, so that a shell exporting
# UNSECURED or another worker's settings cannot change what the local setup tests.
_WORKER_VARIABLES = (
    "WORKER_PORT",
    "MODEL_LOG",
    "MODEL_SERVER_URL",
    "REPORT_ADDR",
    "CONTAINER_ID",
    "PUBLIC_IPADDR",
    "USE_SSL",
    "WORKER_SSL_CERT",
    "WORKER_SSL_KEY",
    "UNSECURED",
    "PUBKEY_FILE",
    "MAX_BODY_BYTES",
    "MASTER_TOKEN",
    "REPORT_FORMAT",
    "SIGNATURE_LAYOUTS",
    "WORKER_HTTP_PORT",
)


class SetupError(Exception):
    """The local setup could not start; the message names the worker and its log file."""


def reserve_port() -> int:
    """A port free now, that nobody else is handed before the worker binds it: a port merely
    free a moment ago (bind to 0, close) can go to another program's socket first.

    It is held by a connection to it, accepted and closed by the accepting side first: that
    side's end waits in TIME_WAIT, and Linux hands a port with a TIME_WAIT socket to no bind(0)
    and no outgoing connection, while the worker (which sets SO_REUSEADDR) binds it at once,
    on 0.0.0.0 too."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5.0):
            accepted, _ = listener.accept()
            accepted.close()  # this end first: it is the one left in TIME_WAIT
    return port


def _worker_failed(worker: LocalWorker, what: str, lines: int = LOG_TAIL_LINES) -> SetupError:
    """A SetupError naming the worker and its log file, with the log's last lines."""
    try:
        with open(worker.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 16 * 1024, 0))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        text = f"(cannot read it: {exc})"
    tail = text.splitlines()[-lines:] or ["(empty)"]
    return SetupError(
        f"worker {worker.index} {what}; its log is {worker.log_path}:\n"
        + "\n".join("    | " + line for line in tail)
    )


@dataclasses.dataclass
class LocalWorker:
    """One worker of the local setup: its fake model, its process and its files."""

    index: int
    directory: str  # its working directory: its own .has_benchmark
    port: int
    model: FakeModel
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "worker.log")

    @property
    def model_log(self) -> str:
        return os.path.join(self.directory, "model.log")


def _realistic_model(log_path: str) -> FakeModel:
    return FakeModel.realistic(log_path=log_path)


class LocalSetup:
    """N fake models, N worker subprocesses and one LocalAutoscaler, all on loopback.

    `await start()`, `await wait_ready()`, run load against `autoscaler.url`, then always
    `await stop()`: SIGTERM to the workers, a wait, SIGKILL for any still running.
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        directory: str,
        worker_file: str | None = None,
        model_factory: Callable[[str], FakeModel] | None = None,
        api_key: str = "local-key",
        endpoint: str = "local",
        key_bits: int = 1024,
        out: typing.TextIO | None = None,
        platform: str = "today",
    ) -> None:
        if platform not in PLATFORMS:
            raise ValueError(f"platform: expected one of {PLATFORMS}, not {platform!r}")
        self.platform = platform
        # Today's platform gives each worker a MASTER_TOKEN; its reports must carry it.
        self.master_token = secrets.token_hex(16) if platform == "today" else None
        self.count = workers
        self.key_bits = key_bits
        self.directory = directory
        self.worker_file = os.path.abspath(worker_file or os.path.join(_HERE, "hello_world.py"))
        self.model_factory = model_factory or _realistic_model
        self.api_key = api_key
        self.endpoint = endpoint
        self.out = out if out is not None else sys.stdout
        self.autoscaler: LocalAutoscaler | None = None
        self.workers: list[LocalWorker] = []
        self._started = 0.0

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def start(self) -> None:
        """Start the autoscaler, then each fake model and worker process (not yet ready)."""
        self._started = time.monotonic()
        # The autoscaler signs in this process, on the loop that times the requests: a
        # 2048-bit pure-Python signature blocks it about 9 ms per route call, which showed up
        # as inter-token jitter; 1024 bits take about 1 ms. The worker verifies either (it
        # takes 1024-8192 bits), the same way. A local, throwaway key.
        key = RsaPrivateKey.generate(self.key_bits)
        self.autoscaler = await LocalAutoscaler(
            key,
            api_key=self.api_key,
            endpoint=self.endpoint,
            platform=self.platform,
            master_token=self.master_token,
        ).start()
        platform = "today's platform" if self.platform == "today" else "the 2024 platform"
        self._say(
            f"local setup in {self.directory}: autoscaler {self.autoscaler.url} ({platform}), "
            f"{self.count} worker(s) running {os.path.basename(self.worker_file)}"
        )
        for index in range(1, self.count + 1):
            directory = os.path.join(self.directory, f"worker-{index}")
            os.makedirs(directory, exist_ok=True)
            model = self.model_factory(os.path.join(directory, "model.log"))
            worker = LocalWorker(index, directory, reserve_port(), model)
            self.workers.append(worker)
            await model.start()
            worker.process = await self._spawn(worker)
            self._say(
                f"  worker {index}: pid {worker.pid}, {worker.url}, "
                f"fake model {model.url}, log {worker.log_path}"
            )

    async def _spawn(self, worker: LocalWorker) -> asyncio.subprocess.Process:
        assert self.autoscaler is not None
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in _WORKER_VARIABLES and not name.startswith("VAST_TCP_PORT_")
        }
        env.update(
            WORKER_PORT=str(worker.port),
            MODEL_LOG=worker.model_log,
            MODEL_SERVER_URL=worker.model.url,
            REPORT_ADDR=self.autoscaler.url,
            CONTAINER_ID=str(worker.index),
            PYTHONUNBUFFERED="1",
        )
        if self.master_token is not None:
            env["MASTER_TOKEN"] = self.master_token
        # pyworker.py beside this file, for a worker file kept elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _HERE]))
        # A bare interpreter (-S, no site-packages) runs its workers bare too.
        flags = ["-S"] if sys.flags.no_site else []
        with open(worker.log_path, "ab") as log_file:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                *flags,
                self.worker_file,
                cwd=worker.directory,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every worker reported itself ready (benchmark done); SetupError otherwise."""
        assert self.autoscaler is not None
        self._say("waiting for the workers: model load, public key, benchmark ...")
        deadline = time.monotonic() + timeout
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                view = self.autoscaler.workers.get(worker.url)
                process = worker.process
                if view is not None and view.report.get("error_msg"):
                    raise _worker_failed(worker, f"reported an error: {view.report['error_msg']}")
                if view is not None and view.ready:
                    pending.remove(worker)
                    self._say(
                        f"  worker {worker.index} ready after "
                        f"{time.monotonic() - self._started:.1f}s "
                        f"(max_perf {float(view.report.get('max_perf', 0)):.0f} workload/s)"
                    )
                elif process is not None and process.returncode is not None:
                    status = process.returncode
                    raise _worker_failed(worker, f"exited with status {status} before it was ready")
            if pending and time.monotonic() > deadline:
                raise _worker_failed(pending[0], f"was not ready after {timeout:g}s")
            if pending:
                await asyncio.sleep(0.1)

    async def settle_reports(self, timeout: float = LAST_REPORT_WAIT) -> None:
        """Wait (bounded) for one more load report from each worker: the one about the end."""
        assert self.autoscaler is not None
        views = self.autoscaler.workers
        before = {w.url: views[w.url].reports for w in self.workers if w.url in views}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(views[url].reports > count for url, count in before.items()):
                return
            await asyncio.sleep(0.1)

    async def settle_completions(self, timeout: float = COMPLETION_WAIT) -> None:
        """Wait (bounded) until every routed request was reported completed: completion
        reports leave a worker about every second."""
        assert self.autoscaler is not None
        deadline = time.monotonic() + timeout
        while self.autoscaler.pending_completions() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Then a quiet spell longer than a worker's batch interval (one a second), so that a
        # request reported twice, in a later batch, is seen as twice.
        seen, quiet_since = self.autoscaler.completion_bodies, time.monotonic()
        while time.monotonic() - quiet_since < 1.2 and time.monotonic() < deadline + 1.2:
            await asyncio.sleep(0.1)
            if self.autoscaler.completion_bodies != seen:
                seen, quiet_since = self.autoscaler.completion_bodies, time.monotonic()

    def reconciliation(self, client: dict[int, tuple[str, ...]]) -> dict[str, Any]:
        """The "reconciliation" part of the report: what the autoscaler routed against the
        completion reports, with `client` (LoadResult.client_statuses()) for the statuses;
        plus the wrong reports the autoscaler saw."""
        assert self.autoscaler is not None
        if self.platform == "2024":
            return {
                "checked": False,
                "reason": "--platform 2024: the seed's autoscaler hands out no request_idx "
                "and takes no completion reports",
            }
        result = self.autoscaler.reconcile(client).report()
        result["report_faults"] = self.autoscaler.faults[:ERROR_SAMPLES_LOCAL]
        result["unauthorized"] = self.autoscaler.unauthorized
        return result

    def describe(self, under_load_until: float | None = None) -> dict[str, Any]:
        """The "local" part of the JSON report. `under_load_until` (a time.monotonic() value,
        when the test stopped sending) picks each worker's last report sent under load."""
        assert self.autoscaler is not None
        reports = list(zip(self.autoscaler.report_times, self.autoscaler.reports))
        workers: list[dict[str, Any]] = []
        for worker in self.workers:
            view = self.autoscaler.workers.get(worker.url)
            mine = [(t, r) for t, r in reports if r.get("url") == worker.url]
            loadtimes = [
                _workload(r.get("loadtime")) for _, r in mine if _workload(r.get("loadtime"))
            ]
            under_load = [
                r for t, r in mine if under_load_until is not None and t <= under_load_until
            ]
            workers.append(
                {
                    "index": worker.index,
                    "url": worker.url,
                    "pid": worker.pid,
                    "log": worker.log_path,
                    "model_log": worker.model_log,
                    "reports": 0 if view is None else view.reports,
                    "loadtime": loadtimes[0] if loadtimes else None,
                    "under_load_report": under_load[-1] if under_load else None,
                    "last_report": None if view is None else dict(view.report),
                }
            )
        return {"directory": self.directory, "autoscaler": self.autoscaler.url, "workers": workers}

    @staticmethod
    def render_reports(local: dict[str, Any]) -> str:
        """Each worker's load reports (POST /worker_status/) from describe(), as a table:
        the last one sent while the load was on, and the very last one."""
        head = ("received", "working", "cur_load", "cur_perf", "max_perf")
        lines = [
            "load reports of each worker (POST /worker_status/; cur_load: in flight in format"
            " 1.1.0, per second in 2024's):",
            f"  {'worker':<8}{'report':<12}"
            + "".join(f"{h:>10}" for h in head)
            + f"{'loadtime':>10}  error",
        ]
        for worker in local["workers"]:
            rows: list[tuple[str, dict[str, Any]]] = []
            under_load, last = worker["under_load_report"], worker["last_report"]
            if under_load is not None and under_load != last:
                rows.append(("under load", under_load))
            rows.append(("last", last or {}))
            loadtime = "-" if worker["loadtime"] is None else f"{worker['loadtime']:.1f}s"
            for label, report in rows:
                cells: list[Any] = [
                    report.get("num_requests_recieved", "-"),
                    report.get("num_requests_working", "-"),
                ]
                cells += [
                    f"{float(report[k]):.0f}" if k in report else "-"
                    for k in ("cur_load", "cur_perf", "max_perf")
                ]
                error = str(report.get("error_msg") or "-")
                lines.append(
                    f"  {worker['index']!s:<8}{label:<12}"
                    + "".join(f"{c!s:>10}" for c in cells)
                    + f"{loadtime:>10}  {error}"
                )
        return "\n".join(lines)

    def kill(self) -> None:
        """SIGKILL every worker still running (a second Ctrl-C)."""
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the workers (each sends a last load report as it stops), wait up to
        `grace` seconds, SIGKILL what is left; then stop the fake models and the autoscaler."""
        processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        if processes:
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), grace)
            except asyncio.TimeoutError:
                for worker in self.workers:
                    if worker.process is not None and worker.process.returncode is None:
                        self._say(f"worker {worker.index} ignored SIGTERM for {grace:g}s: killed")
                self.kill()
                await asyncio.gather(*(p.wait() for p in processes))
        for worker in self.workers:
            await worker.model.stop()
        if self.autoscaler is not None:
            await self.autoscaler.stop()


# Command line #####################################################################################


class _Interrupts:
    """SIGINT / SIGTERM while running: the first stops the current phase gently (the report
    of what finished is still printed), a second one hurries (SIGKILL to local workers)."""

    def __init__(self) -> None:
        self.count = 0
        self.gentle: Callable[[], object] | None = None
        self.hurry: Callable[[], object] | None = None

    def __call__(self) -> None:
        self.count += 1
        action = self.gentle if self.count == 1 else self.hurry
        if action is not None:
            action()

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        signals: list[signal.Signals] = []
        if enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self)
                    signals.append(sig)
                except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                    pass
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _url(text: str) -> str:
    try:
        pyworker.split_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.rstrip("/")


class _ArgumentAdder(typing.Protocol):
    """An argparse parser or argument group: where options are added."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


# The fake model's pacing, declared once for `--local` (as --model-*) and for `fake-model`; each
# option is the FakeModel.realistic() keyword of its name: (name, type, default, metavar, help).
_FAKE_MODEL_OPTIONS: tuple[tuple[str, Callable[[str], Any], float, str, str], ...] = (
    ("load-time", _non_negative, 1.0, "S", "seconds before a fake model logs that it is loaded"),
    ("tokens", _positive(int), 16, "N", "tokens in each fake answer"),
    ("token-delay", _non_negative, 0.015, "S", "seconds per token"),
    ("first-token-delay", _non_negative, 0.05, "S", "seconds before the first token"),
)


def _add_fake_model_options(parser: _ArgumentAdder, prefix: str = "") -> None:
    for name, kind, default, metavar, text in _FAKE_MODEL_OPTIONS:
        parser.add_argument(
            f"--{prefix}{name}",
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{text} (default {default:g})",
        )


def _fake_model(
    args: argparse.Namespace,
    prefix: str = "",
    log_path: str | None = None,
    loaded_lines: Sequence[str] = (),
) -> FakeModel:
    """A realistic FakeModel paced as the options of `_add_fake_model_options` ask."""
    pacing = {
        name.replace("-", "_"): getattr(args, (prefix + name).replace("-", "_"))
        for name, *_ in _FAKE_MODEL_OPTIONS
    }
    return FakeModel.realistic(log_path=log_path, loaded_lines=loaded_lines, **pacing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="test_load.py",
        description="Load-test a PyWorker endpoint, or a whole PyWorker setup on loopback "
        "(--local). Subcommands: `fake-model` (a fake LLM server), `autoscaler` (a local "
        "autoscaler on port 8081 for -l); see `test_load.py fake-model -h`.",
        epilog="Exit status: 0 every request succeeded; 1 some failed; 2 bad usage; "
        "3 the local setup did not start; 130 interrupted.",
        allow_abbrev=False,
    )
    _add_load_options(parser)
    _add_target_options(parser)
    _add_local_options(parser)
    return parser


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument(
        "-n",
        type=_positive(int),
        default=DEFAULT_TOTAL,
        metavar="N",
        help=f"total requests (default {DEFAULT_TOTAL})",
    )
    load.add_argument(
        "-rps",
        type=_positive(float),
        default=DEFAULT_RPS,
        metavar="RATE",
        help=f"requests sent per second, open loop (default {DEFAULT_RPS:g})",
    )
    load.add_argument(
        "--route",
        default=None,
        help="the worker route to call, e.g. /generate_stream (default: the worker file's "
        "first POST route, /generate for hello_world.py)",
    )
    load.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds one request may take, route and answer (default {DEFAULT_TIMEOUT:g})",
    )
    load.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help="requests in flight at most; the sender waits beyond "
        f"(default {DEFAULT_MAX_IN_FLIGHT})",
    )
    load.add_argument(
        "--session",
        type=_positive(int),
        default=0,
        metavar="N",
        help="each simulated client opens a session, sends N requests in it, ends it",
    )
    load.add_argument(
        "--worker-module",
        metavar="FILE[:CLASS]",
        help="the worker file whose ApiPayload.for_test() makes the payloads "
        "(default hello_world.py)",
    )
    load.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    load.add_argument("-q", "--quiet", action="store_true", help="no progress line")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target (one of; default the Vast.ai autoscaler)")
    where = target.add_mutually_exclusive_group()
    where.add_argument(
        "--server",
        type=_url,
        metavar="URL",
        help=f"the autoscaler's base URL (default {DEFAULT_SERVER})",
    )
    target.add_argument(
        "-l",
        "--local-autoscaler",
        action="store_true",
        help=f"an autoscaler at {LOCAL_SERVER} (see `test_load.py autoscaler`; --server "
        "for another address), key and endpoint by default local-key and local",
    )
    where.add_argument(
        "--worker",
        type=_url,
        metavar="URL",
        help="call this one worker directly, unsigned (it must run UNSECURED)",
    )
    where.add_argument(
        "--local",
        action="store_true",
        help="start fake models, workers and an autoscaler on loopback and load them",
    )
    target.add_argument(
        "-k",
        "--api-key",
        default=os.environ.get("API_KEY", ""),
        help="API key for /route/ (default $API_KEY)",
    )
    target.add_argument(
        "-e",
        "--endpoint",
        default=os.environ.get("ENDPOINT_NAME", ""),
        help="endpoint name (default $ENDPOINT_NAME)",
    )
    target.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="today",
        help="the autoscaler's protocol: today's (SPEC 11: request_idx, polling, completion "
        "reports; default), or 2024, the seed's; with --local the local autoscaler and the "
        "workers speak it too",
    )
    target.add_argument(
        "--ready-timeout",
        type=_positive(float),
        default=READY_TIMEOUT,
        metavar="S",
        help="--local: seconds for the workers to get ready; --worker: seconds to wait for "
        f"the worker to be ready before sending (default {READY_TIMEOUT:g})",
    )
    target.add_argument("--cafile", metavar="PEM", help="also trust this CA (https workers)")
    target.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")


def _add_local_options(parser: argparse.ArgumentParser) -> None:
    local = parser.add_argument_group("--local")
    local.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        metavar="N",
        help="worker processes, each with its own fake model (default 1)",
    )
    local.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (logs) even when all went well",
    )
    _add_fake_model_options(local, prefix="model-")


def _given(argv: Sequence[str], short: str, long: str) -> bool:
    """Whether the command line itself names this option (-kKEY, -k KEY, --api-key=KEY ...)."""
    return any(
        a == long or a.startswith(long + "=") or (a.startswith(short) and not a.startswith("--"))
        for a in argv
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The load tester's arguments; exits with status 2 and a message on bad ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.route is not None and not args.route.startswith("/"):
        parser.error(f"--route must start with /: {args.route!r}")
    if args.workers > 64:
        parser.error("--workers: 64 at most")
    if args.local_autoscaler and (args.local or args.worker):
        parser.error("-l: not with --local or --worker")
    if args.local_autoscaler:  # `test_load.py autoscaler`'s defaults, not $API_KEY (a real key)
        if not _given(argv, "-k", "--api-key"):
            args.api_key = "local-key"
        if not _given(argv, "-e", "--endpoint"):
            args.endpoint = "local"
    if not (args.local or args.worker):
        if not args.api_key:
            parser.error("no API key: give -k KEY or set API_KEY")
        if not args.endpoint:
            parser.error("no endpoint name: give -e NAME or set ENDPOINT_NAME")
    return args


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.cafile or args.insecure):
        return None
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


async def run_cli(
    args: argparse.Namespace, *, out: typing.TextIO | None = None, handle_signals: bool = False
) -> int:
    """Run the load tester as the command line asked; returns the exit status."""
    stream: typing.TextIO = out if out is not None else sys.stdout
    try:
        payload_cls = load_payload_class(args.worker_module)
        module = load_worker_module(args.worker_module)[0]
    except Exception as exc:  # the worker file's own import errors included
        stream.write(f"test_load.py: --worker-module: {exc}\n")
        return 2
    route = args.route or worker_first_route(module) or "/generate"
    server = args.server or (LOCAL_SERVER if args.local_autoscaler else DEFAULT_SERVER)
    options = LoadOptions(
        total=args.n,
        rps=args.rps,
        route=route,
        server=None if args.worker else server,
        worker=args.worker,
        api_key=args.api_key,
        endpoint=args.endpoint,
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        progress=not args.quiet,
        ssl_context=_ssl_context(args),
        session=args.session,
        platform=args.platform,
        ready_timeout=args.ready_timeout if args.worker else None,
    )
    interrupts = _Interrupts()
    with interrupts.installed(handle_signals):
        if args.local:
            loaded = worker_loaded_lines(module)
            return await _run_local(args, options, payload_cls, interrupts, stream, loaded)
        tester = LoadTester(options, payload_cls.for_test, stream)
        interrupts.gentle = interrupts.hurry = tester.interrupt
        result = await tester.run()
        return _finish(args, result, stream)


def _finish(args: argparse.Namespace, result: LoadResult, out: typing.TextIO) -> int:
    out.write(result.render() + "\n")
    if args.json:
        _write_json(args.json, result.report())
    out.flush()
    if result.interrupted:
        return 130
    return 0 if result.ok else 1


async def _run_local(
    args: argparse.Namespace,
    options: LoadOptions,
    payload_cls: type[ApiPayload],
    interrupts: _Interrupts,
    out: typing.TextIO,
    loaded_lines: Sequence[str] = (),
) -> int:
    directory = tempfile.mkdtemp(prefix="pyworker-local-")

    def model(log_path: str) -> FakeModel:
        return _fake_model(args, prefix="model-", log_path=log_path, loaded_lines=loaded_lines)

    setup = LocalSetup(
        args.workers,
        directory=directory,
        worker_file=args.worker_module,
        model_factory=model,
        api_key=args.api_key or "local-key",
        endpoint=args.endpoint or "local",
        out=out,
        platform=args.platform,
    )
    options.server = None  # known once the autoscaler listens
    options.api_key, options.endpoint = setup.api_key, setup.endpoint
    status = 3
    interrupts.hurry = setup.kill
    try:
        starting = asyncio.get_running_loop().create_task(_start_local(setup, args.ready_timeout))
        interrupts.gentle = starting.cancel
        try:
            await starting
        except asyncio.CancelledError:
            if not interrupts.count:
                raise
            out.write("interrupted while starting: shutting down\n")
            status = 130
            return status
        except SetupError as exc:
            out.write(f"test_load.py --local: {exc}\n")
            return status
        assert setup.autoscaler is not None
        options.server = setup.autoscaler.url
        tester = LoadTester(options, payload_cls.for_test, out)
        interrupts.gentle = tester.interrupt
        result = await tester.run()
        if not result.interrupted:
            await setup.settle_completions()
            await setup.settle_reports()  # and any completion report sent twice
        local = result.extra["local"] = setup.describe(under_load_until=result.send_ended)
        reconciled: dict[str, Any]
        if result.interrupted:
            reconciled = {"checked": False, "reason": "interrupted"}
        else:
            reconciled = setup.reconciliation(result.client_statuses())
        result.extra["reconciliation"] = reconciled
        status = _finish(args, result, out)
        out.write(setup.render_reports(local) + "\n")
        failed = not reconciled.get("ok") or reconciled.get("report_faults")
        if status == 0 and reconciled["checked"] and failed:
            status = 1  # the workers' reports disagree with what the client saw
        return status
    finally:
        interrupts.gentle = setup.kill  # Ctrl-C while stopping: do not wait for them
        out.write(f"stopping {len(setup.workers)} worker(s) ...\n")
        out.flush()
        await setup.stop()
        if status in (0, 130) and not args.keep:  # logs are kept when something failed
            shutil.rmtree(directory, ignore_errors=True)
            out.write("stopped\n")
        else:
            out.write(f"stopped; logs kept in {directory}\n")
        out.flush()


async def _start_local(setup: LocalSetup, ready_timeout: float) -> None:
    try:
        await setup.start()
    except OSError as exc:  # a port, a directory, the interpreter
        raise SetupError(f"cannot start: {exc}") from None
    await setup.wait_ready(ready_timeout)


async def amain(argv: Sequence[str], *, out: typing.TextIO | None = None) -> int:
    """The command line inside a running event loop (the tests use it): the exit status."""
    return await run_cli(parse_args(argv), out=out)


# Subcommands: the stand-ins on their own ##########################################################


def _serve_until_signalled(start: Callable[[], Awaitable[Callable[[], Awaitable[None]]]]) -> int:
    async def main() -> None:
        stop = await start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, done.set)
        try:
            await done.wait()
        finally:
            await stop()

    asyncio.run(main())
    return 0


def fake_model_main(argv: Sequence[str]) -> int:
    """`test_load.py fake-model`: a fake LLM server with the hello_world API, until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="test_load.py fake-model",
        description="A fake LLM server with the hello_world model API (POST /generate, "
        "POST /generate_stream, GET /health), paced like a small LLM. It writes its log "
        "like a real model server: the loaded line comes after --load-time seconds.",
        allow_abbrev=False,
    )
    parser.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    parser.add_argument("--log", metavar="FILE", help="the log to write (the worker's MODEL_LOG)")
    _add_fake_model_options(parser)
    args = parser.parse_args(argv)

    async def start() -> Callable[[], Awaitable[None]]:
        model = _fake_model(args, log_path=args.log)
        await model.start(args.port)
        print(f"fake model on {model.url}" + (f", log {args.log}" if args.log else ""), flush=True)
        return model.stop

    return _serve_until_signalled(start)


def autoscaler_main(argv: Sequence[str]) -> int:
    """`test_load.py autoscaler`: a local autoscaler for `-l`, until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="test_load.py autoscaler",
        description="A local autoscaler: GET /pubkey/, POST /route/ (signed auth_data), "
        "POST /worker_status/. Point a worker's REPORT_ADDR at it and load it with -l.",
        allow_abbrev=False,
    )
    parser.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    parser.add_argument("-k", "--api-key", default="local-key")
    parser.add_argument("-e", "--endpoint", default="local")
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="today",
        help="today's platform (request_idx, `url` signatures, MASTER_TOKEN, completion "
        "reports; default) or the seed's 2024 one",
    )
    parser.add_argument(
        "--master-token",
        metavar="TOKEN",
        help="the MASTER_TOKEN workers must report with (default: a new random one, printed)",
    )
    args = parser.parse_args(argv)

    async def start() -> Callable[[], Awaitable[None]]:
        token = None
        if args.platform == "today":
            token = args.master_token or secrets.token_hex(16)
        autoscaler = LocalAutoscaler(
            api_key=args.api_key,
            endpoint=args.endpoint,
            platform=args.platform,
            master_token=token,
        )
        await autoscaler.start(args.port)
        env = f"MASTER_TOKEN={token} " if token else ""
        defaults = args.api_key == "local-key" and args.endpoint == "local"
        load = "-l" if defaults else f"-l -k {args.api_key} -e {args.endpoint}"
        if args.port != 8081:
            load += f" --server {autoscaler.url}"
        if args.platform == "2024":
            load += " --platform 2024"
        print(
            f"local autoscaler on {autoscaler.url} ({args.platform})\n"
            f"  a worker:  {env}REPORT_ADDR={autoscaler.url} MODEL_LOG=... "
            "python hello_world.py\n"
            f"  load it:   python test_load.py {load}",
            flush=True,
        )
        loop = asyncio.get_running_loop()
        watch = loop.create_task(_print_reports(autoscaler))

        async def stop() -> None:
            watch.cancel()
            await autoscaler.stop()

        return stop

    return _serve_until_signalled(start)


async def _print_reports(autoscaler: LocalAutoscaler) -> None:
    seen = faults = 0
    while True:
        await asyncio.sleep(1.0)
        for report in autoscaler.reports[seen:]:
            print(
                f"report from {report.get('url')}: cur_load {report.get('cur_load', 0):.1f} "
                f"max_perf {report.get('max_perf', 0):.1f} "
                f"working {report.get('num_requests_working')} "
                f"error {report.get('error_msg') or '-'}",
                flush=True,
            )
        seen = len(autoscaler.reports)
        for fault in autoscaler.faults[faults:]:
            print(f"worker fault: {fault}", flush=True)
        faults = len(autoscaler.faults)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fake-model":
        return fake_model_main(argv[1:])
    if argv and argv[0] == "autoscaler":
        return autoscaler_main(argv[1:])
    args = parse_args(argv)
    pyworker.install_uvloop()
    return asyncio.run(run_cli(args, handle_signals=True))


if __name__ == "__main__":
    sys.exit(main())
