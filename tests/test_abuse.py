"""Hostile clients against a live worker: request smuggling, oversized and malformed framing,
slow clients, thousands of idle connections, forged signatures and poisonous payloads.

Each test runs a real worker (hello_world's handlers, secured with a PUBKEY_FILE) in front of
a FakeModel that records every payload it receives. Every hostile request carries a prompt
marked SMUGGLED inside a correctly signed body, so if any framing trick got it through, the
model would record it. For each case: the documented status (or a close), the model never
sees the marked prompt, and a valid request on a fresh connection is still served promptly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import resource
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    RawClient,
    Rig,
    Runner,
    exchange,
    fetch,
    load_private_key,
    loaded_model_log,
    model_log,
    spawned_worker,
    unsecured_vars,
    worker_rig,
)

import pyworker
from test_load import FakeModel

MARK = "SMUGGLED"  # in the prompt of every hostile request: the model must never see it
MAX_BODY = 256 * 1024  # the worker's body limit in these tests (the default is 16 MiB)
PROMPT_SERVE = 2.0  # seconds a valid request may take while the worker is under abuse
READ_TIMEOUT = 5.0  # seconds to wait for an answer or a close

WORKER_KEY = load_private_key("test_key.pem")  # the autoscaler's, which the worker trusts
OTHER_KEY = load_private_key("other_key.pem")  # the wrong key
run = Runner(timeout=60.0)


# The live worker #################################################################################


def live_worker(tmp: Path, *, max_body: int = MAX_BODY) -> AbstractAsyncContextManager[Rig]:
    """The rig, secured with a PUBKEY_FILE of WORKER_KEY, in front of a FakeModel."""
    pem = tmp / "pubkey.pem"
    pem.write_text(WORKER_KEY.public_pem())
    return worker_rig(
        tmp,
        fake=FakeModel(tokens=4, log_path=str(model_log(tmp))),
        signer=WORKER_KEY,
        pubkey_file=str(pem),
        max_body=max_body,
        # Load reports are not what these tests are about.
        report_check_interval=60.0,
        report_max_interval=60.0,
        log_poll_interval=0.05,
    )


def marked(live: Rig, prompt: str = MARK) -> bytes:
    """A correctly signed body whose prompt (by default) carries the mark."""
    return live.body(prompt, max_response_tokens=4)


def smuggled(live: Rig) -> list[str]:
    """Prompts with the mark that reached the model (must stay empty)."""
    return [str(r.get("prompt")) for r in live.fake.requests if MARK in str(r.get("prompt"))]


async def post(
    live: Rig, body: bytes, route: str = "/generate", timeout: float = READ_TIMEOUT
) -> tuple[int, bytes]:
    """POST on a new connection; (status, body)."""
    return await fetch(live.url, "POST", route, body, timeout=timeout)


async def assert_still_serving(live: Rig) -> float:
    """A valid request on a fresh connection is served, promptly; returns its time."""
    before = len(live.fake.requests)
    started = time.monotonic()
    status, body = await post(live, marked(live, prompt="a valid prompt"))
    elapsed = time.monotonic() - started
    assert status == 200, (status, body)
    assert json.loads(body)["tokens"] == 4
    assert len(live.fake.requests) == before + 1
    assert elapsed < PROMPT_SERVE, elapsed
    return elapsed


def consistent(live: Rig) -> None:
    assert live.backend.metrics.consistent()


# Framing abuse ###################################################################################


def chunked(data: bytes, size: int = 100) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    )
    return out + b"0\r\n\r\n"


def head(*fields: str, line: str = "POST /generate HTTP/1.1") -> bytes:
    return ("\r\n".join([line, "Host: worker", *fields]) + "\r\n\r\n").encode("latin-1")


def inner_request(body: bytes) -> bytes:
    """A complete, valid request, smuggled inside another one's body."""
    return head("Content-Type: application/json", f"Content-Length: {len(body)}") + body


@dataclasses.dataclass(frozen=True)
class Abuse:
    name: str
    build: Callable[[bytes], bytes]  # the signed, marked body -> the bytes on the wire
    statuses: tuple[int, ...]  # the documented answers
    may_just_close: bool = False  # when the client may see only a close (it was still sending)


def _cl(body: bytes) -> str:
    return f"Content-Length: {len(body)}"


ABUSES = [
    Abuse(
        "CL+TE",
        lambda b: head(_cl(chunked(b)), "Transfer-Encoding: chunked") + chunked(b),
        (400,),
    ),
    Abuse(
        "TE+CL",
        lambda b: head("Transfer-Encoding: chunked", _cl(chunked(b))) + chunked(b),
        (400,),
    ),
    Abuse(
        "TE+CL hiding a request after a short chunked body",
        lambda b: (
            head("Transfer-Encoding: chunked", "Content-Length: 4")
            + b"0\r\n\r\n"
            + inner_request(b)
        ),
        (400,),
    ),
    Abuse(
        "CL.CL differing",
        lambda b: head(_cl(b), f"Content-Length: {len(b) + 5}") + b + b"XXXXX",
        (400,),
    ),
    Abuse(
        "CL list differing",
        lambda b: head(f"Content-Length: {len(b)}, {len(b) - 1}") + b,
        (400,),
    ),
    Abuse("CL with sign", lambda b: head(f"Content-Length: +{len(b)}") + b, (400,)),
    Abuse("CL huge", lambda b: head("Content-Length: " + "9" * 30) + b, (400,)),
    Abuse(
        "TE: chunked, chunked",
        lambda b: head("Transfer-Encoding: chunked, chunked") + chunked(b),
        (501,),
    ),
    Abuse("TE: gzip", lambda b: head("Transfer-Encoding: gzip") + chunked(b), (501,)),
    Abuse("TE: xchunked", lambda b: head("Transfer-Encoding: xchunked") + chunked(b), (501,)),
    Abuse(
        "TE chunked then identity",
        lambda b: head("Transfer-Encoding: chunked", "Transfer-Encoding: identity") + chunked(b),
        (400,),
    ),
    Abuse(
        "TE in HTTP/1.0",
        lambda b: head("Transfer-Encoding: chunked", line="POST /generate HTTP/1.0") + chunked(b),
        (400,),
    ),
    Abuse(
        "TE with space before colon",
        lambda b: head("Transfer-Encoding : chunked", _cl(b)) + b,
        (400,),
    ),
    Abuse(
        "chunk size of 17 hex digits (overflow)",
        lambda b: head("Transfer-Encoding: chunked") + b"1" + b"0" * 16 + b"\r\n" + b,
        (400,),
    ),
    Abuse(
        "chunk size of 2**64 - 1",
        lambda b: head("Transfer-Encoding: chunked") + b"ffffffffffffffff\r\n" + b,
        (413,),
    ),
    Abuse(
        "chunk size 0x",
        lambda b: head("Transfer-Encoding: chunked") + b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "chunk size +",
        lambda b: head("Transfer-Encoding: chunked") + b"+%x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "chunk size with _",
        lambda b: (
            head("Transfer-Encoding: chunked")
            + b"%s_%s\r\n" % (b"%x" % len(b), b"0")
            + b
            + b"\r\n0\r\n\r\n"
        ),
        (400,),
    ),
    Abuse(
        "chunk size negative",
        lambda b: head("Transfer-Encoding: chunked") + b"-1\r\n" + b + b"\r\n0\r\n\r\n",
        (400,),
    ),
    Abuse(
        "chunk size with leading space",
        lambda b: head("Transfer-Encoding: chunked") + b" %x\r\n%s\r\n0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "chunk data not followed by CRLF",
        lambda b: head("Transfer-Encoding: chunked") + b"%x\r\n%sXX0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "bare LF after chunk data",
        lambda b: head("Transfer-Encoding: chunked") + b"%x\r\n%s\n0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "bare CR in chunk extension",
        lambda b: head("Transfer-Encoding: chunked") + b"%x;a\rb\r\n%s\r\n0\r\n\r\n" % (len(b), b),
        (400,),
    ),
    Abuse(
        "bare LF line ends in the head",
        lambda b: head(_cl(b)).replace(b"\r\n", b"\n", 2) + b,
        (400,),
    ),
    Abuse(
        "bare LF head ending (no CRLF CRLF)",
        lambda b: head(_cl(b)).replace(b"\r\n", b"\n") + b + b"\r\n\r\n",
        (400,),
    ),
    Abuse("obs-fold", lambda b: head("X-Long: a", " folded", _cl(b)) + b, (400,)),
    Abuse(
        "obs-fold hiding Transfer-Encoding",
        lambda b: head("X-Long: a", " Transfer-Encoding: chunked", _cl(b)) + b,
        (400,),
    ),
    Abuse("NUL in a header value", lambda b: head("X-A: a\x00b", _cl(b)) + b, (400,)),
    Abuse("NUL in a header name", lambda b: head("X-\x00A: b", _cl(b)) + b, (400,)),
    Abuse("two Host headers", lambda b: head("Host: other", _cl(b)) + b, (400,)),
    Abuse(
        "absolute-form target",
        lambda b: head(_cl(b), line="POST http://x/generate HTTP/1.1") + b,
        (400,),
    ),
    Abuse("HTTP/2.0", lambda b: head(_cl(b), line="POST /generate HTTP/2.0") + b, (505,)),
    Abuse("unknown Expect", lambda b: head("Expect: 200-ok", _cl(b)) + b, (417,)),
    Abuse(
        "header line of 70 KB",
        lambda b: head("X-Big: " + "a" * 70_000, _cl(b)) + b,
        (431,),
        may_just_close=True,
    ),
    Abuse(
        "head of 70 KB in 64 fields",
        lambda b: head(*[f"X-F{i}: " + "b" * 1100 for i in range(64)], _cl(b)) + b,
        (431,),
        may_just_close=True,
    ),
    Abuse(
        "101 small header fields",
        lambda b: head(*[f"X-{i}: 1" for i in range(101)], _cl(b)) + b,
        (431,),
    ),
    Abuse(
        "request line of 10 KB",
        lambda b: head(_cl(b), line="POST /generate?" + "q" * 10_000 + " HTTP/1.1") + b,
        (414,),
    ),
    Abuse(
        "request line of 1 MB",
        lambda b: head(_cl(b), line="POST /generate?" + "q" * 1_000_000 + " HTTP/1.1") + b,
        (414,),
        may_just_close=True,
    ),
    Abuse(
        "Content-Length over the body limit",
        lambda b: head(f"Content-Length: {MAX_BODY + 1}") + b,
        (413,),
    ),
    Abuse(
        "chunked body over the body limit",
        lambda b: (
            head("Transfer-Encoding: chunked") + chunked(b + b" " * (MAX_BODY + 10), size=8192)
        ),
        (413,),
        may_just_close=True,
    ),
]


@pytest.mark.parametrize("abuse", ABUSES, ids=[a.name for a in ABUSES])
def test_framing_abuse_is_refused(abuse: Abuse, tmp_path: Path) -> None:
    """Guards against request smuggling and unbounded buffering: each malformed or ambiguous
    framing gets its documented status (or a close while the client was still sending),
    the connection is closed, the signed request inside never reaches the model, and the
    worker keeps serving."""

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            received = live.backend.metrics.received.requests
            reply = await exchange(live.port, abuse.build(marked(live)))
            assert reply.closed, reply
            if reply.status is None:
                assert abuse.may_just_close and not reply.data, reply
            else:
                assert reply.status in abuse.statuses, reply.data[:300]
                assert reply.data.count(b"HTTP/1.1 ") == 1, reply.data[:300]  # no 2nd answer
            assert smuggled(live) == []
            assert live.backend.metrics.received.requests == received
            await assert_still_serving(live)
            consistent(live)

    run(main())


def test_valid_framings_of_the_same_body_are_served(tmp_path: Path) -> None:
    """The control for the table above: the same marked body framed correctly (by
    Content-Length, chunked, chunked in 1-byte chunks, equal duplicate lengths) does reach
    the model, so a refusal there is the framing's fault, not the body's."""

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            framings: list[Callable[[bytes], bytes]] = [
                lambda b: head(_cl(b), "Connection: close") + b,
                lambda b: head("Transfer-Encoding: chunked", "Connection: close") + chunked(b),
                lambda b: (
                    head("Transfer-Encoding: chunked", "Connection: close") + chunked(b, size=1)
                ),
                lambda b: head(_cl(b), _cl(b), "Connection: close") + b,
            ]
            for i, frame in enumerate(framings):
                reply = await exchange(live.port, frame(marked(live, prompt=f"{MARK} {i}")))
                assert reply.status == 200, reply.data[:300]
            assert len(smuggled(live)) == len(framings)

    run(main())


# Slow clients ####################################################################################


def test_slow_loris_head_is_cut_and_others_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against slow-loris: 50 clients dribbling a head one byte every 0.1 s are cut
    after HEAD_TIMEOUT with no answer, while a valid request is served promptly."""
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 0.6)
    monkeypatch.setattr(pyworker, "SWEEP_INTERVAL", 0.05)

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            data = head(_cl(marked(live))) + marked(live)
            started = time.monotonic()
            loris = [
                asyncio.ensure_future(exchange(live.port, data, pace=0.1, timeout=5.0))
                for _ in range(50)
            ]
            await asyncio.sleep(0.2)
            await assert_still_serving(live)
            replies = await asyncio.gather(*loris)
            elapsed = time.monotonic() - started
            assert all(r.closed and r.data == b"" for r in replies), replies[:3]
            assert elapsed < 0.6 + 2.0, elapsed  # cut at the head timeout, not at the end
            assert smuggled(live) == []
            assert live.worker.server.connections == 0
            await assert_still_serving(live)

    run(main())


def test_body_slower_than_body_timeout_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against a client that holds a worker slot by sending its body slowly: cut after
    BODY_TIMEOUT, the partial request never reaches the model."""
    monkeypatch.setattr(pyworker, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(pyworker, "SWEEP_INTERVAL", 0.05)

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            body = marked(live)
            client = await RawClient.connect(live.port, timeout=3.0)
            try:
                await client.send(head(_cl(body)))
                started = time.monotonic()
                with contextlib.suppress(ConnectionError, OSError):
                    for i in range(len(body)):
                        await client.send(body[i : i + 1])
                        await asyncio.sleep(0.05)
                        if client.reader.at_eof() or client.writer.transport.is_closing():
                            break
                try:
                    data = await client.read_to_eof()
                except (ConnectionError, OSError):
                    data = b""  # reset by the worker: also a close
                elapsed = time.monotonic() - started
            finally:
                client.abort()
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
            assert 0.4 < elapsed < 2.5, elapsed
            assert smuggled(live) == []
            assert live.backend.metrics.received.requests == 0
            await assert_still_serving(live)

    run(main())


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit toward `wanted` (up to the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return wanted if soft == resource.RLIM_INFINITY else soft


IDLE_CONNECTIONS = 5000


def test_thousands_of_idle_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against connection exhaustion: 5,000 connections that send nothing (each costs
    two descriptors here, client and worker side) do not stop a valid request from being
    served promptly, and all are closed by the head timeout without leaking descriptors."""
    limit = _raise_fd_limit(2 * IDLE_CONNECTIONS + 512)
    count = min(IDLE_CONNECTIONS, (limit - 512) // 2)  # scaled down only if the limit forces it
    assert count >= 500, f"RLIMIT_NOFILE {limit} is too low for this test"
    monkeypatch.setattr(pyworker, "HEAD_TIMEOUT", 6.0)
    monkeypatch.setattr(pyworker, "SWEEP_INTERVAL", 0.1)

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            fds_before = len(os.listdir("/proc/self/fd"))
            conns: list[RawClient] = []
            try:
                for start in range(0, count, 250):
                    batch = min(250, count - start)
                    conns += await asyncio.gather(
                        *(RawClient.connect(live.port) for _ in range(batch))
                    )
                for _ in range(100):
                    if live.worker.server.connections >= count:
                        break
                    await asyncio.sleep(0.05)
                assert live.worker.server.connections >= count
                # Each fresh connection is served while all of them are held open.
                for _ in range(3):
                    await assert_still_serving(live)
                # The head timeout closes every idle one.
                eofs = await asyncio.wait_for(
                    asyncio.gather(*(client.reader.read() for client in conns)), 15.0
                )
                assert all(e == b"" for e in eofs)
                for _ in range(100):
                    if live.worker.server.connections == 0:
                        break
                    await asyncio.sleep(0.05)
                assert live.worker.server.connections == 0
            finally:
                for client in conns:
                    client.abort()
            await asyncio.sleep(0.1)
            assert len(os.listdir("/proc/self/fd")) <= fds_before + 10
            await assert_still_serving(live)

    run(main(), timeout=60.0)


# Signatures ######################################################################################


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SignatureCase = Callable[[Rig], dict[str, Any]]


def _tampered(field: str, value: Any) -> SignatureCase:
    def build(live: Rig) -> dict[str, Any]:
        auth = live.auth()
        auth[field] = value(auth[field]) if callable(value) else value
        return auth

    return build


def _plus_one(value: int) -> int:
    return value + 1


def _with_signature(signature: Callable[[str], Any]) -> SignatureCase:
    def build(live: Rig) -> dict[str, Any]:
        auth = live.auth()
        auth["signature"] = signature(auth["signature"])
        return auth

    return build


def _urlsafe(signature: str) -> str:
    assert "+" in signature or "/" in signature  # else urlsafe would be the same string
    return signature.replace("+", "-").replace("/", "_")


def _without(field: str) -> SignatureCase:
    def build(live: Rig) -> dict[str, Any]:
        auth = live.auth()
        del auth[field]
        return auth

    return build


SIGNATURE_401: dict[str, SignatureCase] = {
    "forged random": _with_signature(lambda _s: _b64(os.urandom(256))),
    "forged all ones (>= n)": _with_signature(lambda _s: _b64(b"\xff" * 256)),
    "forged zero": _with_signature(lambda _s: _b64(b"\x00" * 256)),
    "forged one": _with_signature(lambda _s: _b64(b"\x00" * 255 + b"\x01")),
    "empty": _with_signature(lambda _s: ""),
    "cost tampered": _tampered("cost", "101"),
    "cost re-typed str -> int": _tampered("cost", 100),
    "endpoint tampered": _tampered("endpoint", "other"),
    "reqnum tampered": _tampered("reqnum", _plus_one),
    "url tampered": _tampered("url", "http://127.0.0.1:1"),
    "wrong key": lambda live: live.auth(signer=OTHER_KEY),
    "truncated by 4 characters": _with_signature(lambda s: s[:-4]),
    "truncated by 1 character": _with_signature(lambda s: s[:-1]),
    "truncated to 10 characters": _with_signature(lambda s: s[:10]),
    "with newlines (MIME base64)": _with_signature(
        lambda s: "\n".join(s[i : i + 76] for i in range(0, len(s), 76))
    ),
    "urlsafe alphabet": _with_signature(_urlsafe),
    "without padding": _with_signature(lambda s: s.rstrip("=")),
    "with surrounding spaces": _with_signature(lambda s: f" {s} "),
    "non-ASCII": _with_signature(lambda s: "é" + s[1:]),
    "huge base64 (1 MB... of A)": _with_signature(lambda _s: "A" * (MAX_BODY // 2)),
    "signature of 4 KiB + 4": _with_signature(lambda _s: "A" * 4100),
    "doubled signature": _with_signature(lambda s: s + s),
    "signature with a zero byte prefix": _with_signature(
        lambda s: _b64(b"\x00" + base64.b64decode(s))
    ),
}

SIGNATURE_422: dict[str, SignatureCase] = {
    "signature int": _with_signature(lambda _s: 12345),
    "signature null": _with_signature(lambda _s: None),
    "signature list": _with_signature(lambda s: [s]),
    "signature object": _with_signature(lambda s: {"s": s}),
    "signature bool": _with_signature(lambda _s: True),
    "cost list": _tampered("cost", ["100"]),
    "cost null": _tampered("cost", None),
    "cost bool": _tampered("cost", True),
    "endpoint int": _tampered("endpoint", 1),
    "reqnum str": _tampered("reqnum", str),
    "reqnum float": _tampered("reqnum", float),
    "reqnum bool": _tampered("reqnum", True),
    "reqnum null": _tampered("reqnum", None),
    "url null": _tampered("url", None),
    "url list": _tampered("url", ["http://x"]),
    "missing signature": _without("signature"),
    "missing cost": _without("cost"),
    "missing endpoint": _without("endpoint"),
    "missing reqnum": _without("reqnum"),
    "missing url": _without("url"),
    "auth_data list": lambda _live: [],  # type: ignore[return-value]
    "auth_data string": lambda _live: "auth",  # type: ignore[return-value]
    "auth_data null": lambda _live: None,  # type: ignore[return-value]
}


def _post_auth(live: Rig, auth: Any) -> Awaitable[tuple[int, bytes]]:
    body = {"auth_data": auth, "payload": {"prompt": MARK, "max_response_tokens": 4}}
    return post(live, json.dumps(body).encode())


def test_bad_signatures_are_401_or_422_never_500(tmp_path: Path) -> None:
    """Guards the signature check: forged, tampered (each field), wrong key, truncated,
    re-encoded, huge and mistyped signatures answer 401 (bad) or 422 (mistyped), never 500;
    none reaches the model; valid requests keep working between them."""

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            failures: list[str] = []
            for cases, expected in ((SIGNATURE_401, 401), (SIGNATURE_422, 422)):
                for name, build in cases.items():
                    status, body = await _post_auth(live, build(live))
                    if status != expected:
                        failures.append(f"{name}: {status} {body[:200]!r}")
                await assert_still_serving(live)
            assert failures == [], failures
            assert smuggled(live) == []
            assert live.backend.metrics.received.requests == live.backend.metrics.served.requests
            consistent(live)

    run(main())


def test_replayed_and_stale_signatures_are_401(tmp_path: Path) -> None:
    """Guards against replay: the same signed auth_data twice, and a reqnum far below the
    highest accepted, answer 401; neither reaches the model twice."""

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            auth = live.auth()
            body = {"auth_data": auth, "payload": {"prompt": "once", "max_response_tokens": 4}}
            first = await post(live, json.dumps(body).encode())
            again = await post(live, json.dumps(body).encode())
            # The replay must not slip through with unknown extra keys either.
            body["auth_data"] = {**auth, "__request_id": "different"}
            extra = await post(live, json.dumps(body).encode())
            assert (first[0], again[0], extra[0]) == (200, 401, 401), (first, again, extra)
            assert [r["prompt"] for r in live.fake.requests].count("once") == 1
            live.reqnum = 1000
            await assert_still_serving(live)  # reqnum 1001 accepted
            stale = await _post_auth(live, live.auth(reqnum=800))
            assert stale[0] == 401, stale
            assert smuggled(live) == []

    run(main())


def test_huge_reqnum_digits_are_422(tmp_path: Path) -> None:
    """10**5000 as a reqnum (written as digits, signed or not) is a 422, never a 500."""

    async def main() -> None:
        async with live_worker(tmp_path) as live:
            auth = json.dumps(live.auth())
            auth = auth.replace(f'"reqnum": {live.reqnum}', '"reqnum": 1' + "0" * 5000)
            body = f'{{"auth_data": {auth}, "payload": {{"prompt": "{MARK}"}}}}'
            status, reply = await post(live, body.encode())
            assert status == 422, reply[:200]
            await assert_still_serving(live)

    run(main())


# Payloads ########################################################################################


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _payload_bodies(live: Rig) -> dict[str, bytes]:
    """Request bodies with a valid signature and a poisonous payload or shape."""

    def with_payload(payload_json: str) -> bytes:
        auth = json.dumps(live.auth())
        return f'{{"auth_data": {auth}, "payload": {payload_json}}}'.encode()

    def with_fields(**fields: Any) -> bytes:
        return with_payload(json.dumps({"prompt": MARK, **fields}))

    def with_tokens(raw: str) -> bytes:
        """max_response_tokens written as raw JSON text (numbers json.dumps cannot write)."""
        return with_payload(f'{{"prompt": "{MARK}", "max_response_tokens": {raw}}}')

    return {
        "prompt of 500 nested arrays": with_payload(f'{{"prompt": {_nested(500)}}}'),
        "max_response_tokens 1e400": with_tokens("1e400"),
        "max_response_tokens -1e400": with_tokens("-1e400"),
        "max_response_tokens 10**5000": with_tokens("1" + "0" * 5000),
        "max_response_tokens 2**64": with_tokens(str(2**64)),
        "max_response_tokens NaN": with_tokens("NaN"),
        "max_response_tokens Infinity": with_tokens("Infinity"),
        "max_response_tokens 1.5": with_fields(max_response_tokens=1.5),
        "max_response_tokens string": with_fields(max_response_tokens="5"),
        "max_response_tokens bool": with_fields(max_response_tokens=True),
        "max_response_tokens list": with_fields(max_response_tokens=[5]),
        "prompt int": with_payload('{"prompt": 5}'),
        "prompt null": with_payload('{"prompt": null}'),
        "prompt bool": with_payload('{"prompt": true}'),
        "prompt object": with_payload(json.dumps({"prompt": {"text": MARK}})),
        "prompt missing": with_payload("{}"),
        "payload list": with_payload(json.dumps([MARK])),
        "payload string": with_payload(json.dumps(MARK)),
        "payload number": with_payload("5"),
        "payload null": with_payload("null"),
        "payload missing": json.dumps({"auth_data": live.auth()}).encode(),
        "body empty": b"",
        "body list": b"[]",
        "body string": b'"x"',
        "body number": b"1",
        "body null": b"null",
        "body true": b"true",
        "body not UTF-8": b'{"payload": "\xff\xfe"}',
        "body with a BOM": b"\xef\xbb\xbf" + with_fields(),
        "body truncated": with_fields()[:-3],
        "body with trailing garbage": with_fields() + b"garbage",
        "body with 50,000 keys": json.dumps({f"k{i}": i for i in range(50_000)}).encode(),
    }


def test_poisonous_payloads_are_422_never_500(tmp_path: Path) -> None:
    """Guards the JSON and field checks: deep nesting, huge numbers, wrong types and non-object
    bodies answer 422 (never 500, never a crash), none reaches the model, the worker keeps
    serving. (A 2**64 max_response_tokens is a float to orjson, so also a 422.)"""

    async def main() -> None:
        async with live_worker(tmp_path, max_body=4 * 1024 * 1024) as live:
            failures: list[str] = []
            for name, body in _payload_bodies(live).items():
                status, reply = await post(live, body)
                if status != 422:
                    failures.append(f"{name}: {status} {reply[:200]!r}")
                elif not isinstance(json.loads(reply), dict):
                    failures.append(f"{name}: 422 without a JSON object")
            await assert_still_serving(live)
            assert failures == [], failures
            assert smuggled(live) == []
            consistent(live)

    run(main())


# Deep nesting, against a worker process ##########################################################
# Run in a child process: orjson before 3.9.15 (CVE-2024-27454) recurses without a limit and
# overflows the C stack, which would kill the test runner itself.

DEEP_BODIES: dict[str, bytes] = {
    "body of 100,000 nested arrays": _nested(100_000).encode(),
    "body of 100,000 nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "payload of 100,000 nested objects": b'{"payload": '
    + b'{"a":' * 100_000
    + b"1"
    + b"}" * 100_000
    + b"}",
    "prompt of 100,000 nested arrays": b'{"payload": {"prompt": %s}}' % _nested(100_000).encode(),
    "body of 4,000,000 nested arrays (8 MB)": _nested(4_000_000).encode(),
}


def test_deeply_nested_json_is_422_and_the_worker_process_survives(tmp_path: Path) -> None:
    """Guards against a remote crash: deeply nested JSON (sent before any signature check, so
    by anyone) answers 422, and the worker process is still alive and serving afterwards."""

    async def main() -> None:
        fake = await FakeModel(tokens=4).start()
        env = unsecured_vars(loaded_model_log(tmp_path), fake.url)
        try:
            async with spawned_worker(tmp_path, **env) as worker:
                await worker.wait_ready()  # the benchmark (8 quick rounds) then ready
                proc = worker.proc
                client = pyworker.HttpClient(f"http://127.0.0.1:{worker.port}")
                try:
                    outcomes: dict[str, str] = {}
                    for name, body in DEEP_BODIES.items():
                        try:
                            async with await client.request(
                                "POST", "/generate", body, timeout=10
                            ) as r:
                                outcomes[name] = str(r.status)
                                await r.read()
                        except pyworker.UpstreamError as exc:
                            outcomes[name] = f"no answer ({type(exc).__name__})"
                        if proc.returncode is not None or await _exited(proc):
                            outcomes[name] += (
                                f", worker process died (exit status {proc.returncode})"
                            )
                            break
                finally:
                    await client.close()
            assert outcomes == {name: "422" for name in DEEP_BODIES}, outcomes
            assert not any(MARK in str(r.get("prompt")) for r in fake.requests)
        finally:
            await fake.stop()

    run(main(), timeout=90.0)


async def _exited(proc: asyncio.subprocess.Process) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), 0.2)
    return proc.returncode is not None
