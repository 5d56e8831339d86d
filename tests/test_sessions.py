"""Sessions (SPEC 11.5, issue 13), end to end on loopback: a worker secured by a real RSA key
(PUBKEY_FILE), the fake model behind it, and a raw HTTP/1.1 client in front.

/session/create verified like any model request; a session is one request in flight (its
cost) until it ends, reported once; requests inside it are served, signature-checked and
extend it; /session/get, /health, /end; expiry collected in the background; ending a
session cuts its own streams only; the close callback reaches the model server once, at
the resolved path, and its failures are only logged; RunningWorker.stop() drains; /metrics; the
plain-HTTP /session/end listener beside TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import string
import time
import typing
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    UNUSED_URL,
    RawClient,
    Reply,
    Rig,
    Runner,
    encode_request,
    loaded_model_log,
    request,
    self_signed_cert,
    signed_auth,
    signing_key,
    until,
    worker_rig,
)

import pyworker
from hello_world import count_tokens
from pyworker import Backend, Request, Response, State
from test_load import FakeModel

run = Runner(timeout=60.0)  # one test's event loop, bounded: a hang fails, CI does not stall

LOG_ACTIONS = [(pyworker.LogAction.ModelLoaded, FakeModel.LOADED_LINE)]
INVALID = {"error": "invalid session"}


# The fakes around the worker #####################################################################


class CallbackModel(FakeModel):
    """The fake model with two callback routes, /hooks/closed and /hooks/other, that record
    (path, body); they answer `hook_status`, after `hook_hold` is set when there is one."""

    HOOKS = ("/hooks/closed", "/hooks/other")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hooks: list[tuple[str, dict[str, Any]]] = []
        self.hook_status = 200
        self.hook_hold: asyncio.Event | None = None
        for path in self.HOOKS:
            self._server.routes[path] = {"POST": self._hook}

    async def _hook(self, request: Request) -> Response:
        body: Any = json.loads(request.body)
        self.hooks.append((request.path, typing.cast(dict[str, Any], body)))
        if self.hook_hold is not None:
            await self.hook_hold.wait()
        if self.hook_status != 200:
            return pyworker.error_response(self.hook_status, "hook failure (fake)")
        return pyworker.json_response({"ok": True})

    def hooks_for(self, session_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [h for h in self.hooks if h[1].get("session_id") == session_id]

    async def stop(self) -> None:
        """Let a held callback go, then stop."""
        if self.hook_hold is not None:
            self.hook_hold.set()
        await super().stop()


class Platform:
    """Today's autoscaler's report routes: every /worker_status/ and /delete_requests/ body."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.deletes: list[dict[str, Any]] = []
        self.port = 0
        self._server = pyworker.HttpServer(
            [
                pyworker.post("/worker_status/", self._status),
                pyworker.post("/delete_requests/", self._delete),
            ]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Platform:
        self.port = await self._server.start("127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        await self._server.shutdown(grace=0.0)

    async def __aenter__(self) -> Platform:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _status(self, request: Request) -> Response:
        self.reports.append(typing.cast(dict[str, Any], json.loads(request.body)))
        return pyworker.json_response({"ok": True})

    async def _delete(self, request: Request) -> Response:
        self.deletes.append(typing.cast(dict[str, Any], json.loads(request.body)))
        return pyworker.json_response({"ok": True})

    def completions(self) -> list[dict[str, Any]]:
        return [entry for body in self.deletes for entry in body["requests"]]


# The worker: the rig, secured by signing_key(), before a CallbackModel ###########################


def session_worker(
    tmp: Path,
    *,
    pubkey: bool = True,
    max_sessions: int = 10,
    report_addrs: list[str] | None = None,
    **settings: Any,
) -> AbstractAsyncContextManager[Rig]:
    """The rig, with hello_world's handlers before a CallbackModel, secured by signing_key()
    (PUBKEY_FILE unless `pubkey` is False, when it is not waited for: the key never comes),
    reporting to `report_addrs` (nowhere by default); `settings` go into its Config."""
    loaded_model_log(tmp)
    fields: dict[str, Any] = {
        "report_check_interval": 60.0,
        "report_max_interval": 60.0,
        "log_poll_interval": 0.02,
    }
    if pubkey:
        pem = tmp / "pubkey.pem"
        pem.write_text(signing_key().public_pem())
        fields["pubkey_file"] = str(pem)
    fields.update(settings)
    return worker_rig(
        tmp,
        fake=CallbackModel(tokens=400),
        report_addrs=report_addrs or [UNUSED_URL],
        signer=signing_key(),
        log_actions=LOG_ACTIONS,
        max_sessions=max_sessions,
        ready=pubkey,
        **fields,
    )


def callbacks(r: Rig) -> CallbackModel:
    """The rig's model: session_worker's CallbackModel."""
    assert isinstance(r.fake, CallbackModel)
    return r.fake


def fresh_auth(r: Rig, cost: str = "4", **fields: Any) -> dict[str, Any]:
    """A fresh seed-layout ticket (fields such as request_idx added, unsigned)."""
    r.reqnum += 1
    auth = signed_auth(signing_key(), cost, r.reqnum, r.url)
    auth.update(fields)
    return auth


async def create(r: Rig, auth: dict[str, Any] | None = None, **payload: Any) -> Reply:
    body = {"auth_data": fresh_auth(r) if auth is None else auth, "payload": payload}
    return await r.request("POST", "/session/create", body)


async def open_session(r: Rig, cost: str = "4", **payload: Any) -> tuple[str, dict[str, Any]]:
    """A new session: its id and the auth_data it was created with."""
    auth = fresh_auth(r, cost)
    reply = await create(r, auth, **payload)
    assert reply.status == 201, reply
    return reply.json()["session_id"], auth


async def ask(r: Rig, what: str, session_id: Any, session_auth: Any) -> Reply:
    body = {"session_id": session_id, "session_auth": session_auth}
    return await r.request("POST", f"/session/{what}", body)


def generate_body(
    r: Rig,
    session_id: str | None = None,
    auth: dict[str, Any] | None = None,
    *,
    prompt: str = "hello there world",
    tokens: int = 4,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "auth_data": fresh_auth(r) if auth is None else auth,
        "payload": {"prompt": prompt, "max_response_tokens": tokens},
    }
    if session_id is not None:
        body["session_id"] = session_id
    return body


async def generate(
    r: Rig, session_id: str | None = None, auth: dict[str, Any] | None = None, **kw: Any
) -> Reply:
    return await r.request("POST", "/generate", generate_body(r, session_id, auth, **kw))


async def expiration(r: Rig, session_id: str, auth: dict[str, Any]) -> float:
    reply = await ask(r, "get", session_id, auth)
    assert reply.status == 200, reply
    return float(reply.json()["expiration"])


def names(reply: Reply, field: str) -> bool:
    """Whether a 422 answer names `field` (as a key, at any depth)."""

    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            mapping = typing.cast(dict[str, Any], value)
            return field in mapping or any(walk(v) for v in mapping.values())
        return False

    return walk(reply.json())


def settled(backend: Backend) -> bool:
    m = backend.metrics
    return m.consistent() and m.in_flight.requests == 0 and m.sessions_open == 0


# 1. /session/create ##############################################################################


def test_create_is_verified_like_a_model_request(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            # bad signatures: tampered cost, another key's signature, not base64
            tampered = fresh_auth(r, "4")
            tampered["cost"] = "1"
            assert (await create(r, tampered)).status == 401
            forged = fresh_auth(r)
            forged["signature"] = fresh_auth(r)["signature"]  # another ticket's signature
            assert (await create(r, forged)).status == 401
            garbage = fresh_auth(r)
            garbage["signature"] = "not base64!"
            assert (await create(r, garbage)).status == 401
            missing = await r.request("POST", "/session/create", {"payload": {}})
            assert missing.status == 422 and names(missing, "auth_data"), missing
            assert r.backend.metrics.sessions_open == 0

            ticket = fresh_auth(r)
            before = time.time()
            created = await create(r, ticket, lifetime=30)
            assert created.status == 201, created
            answer = created.json()
            assert set(answer) == {"session_id", "expiration"}, answer
            assert isinstance(answer["session_id"], str)
            assert before + 30 <= answer["expiration"] <= time.time() + 30
            # The same seed-layout ticket again: a replay, for a session or a model request.
            again = await create(r, ticket, lifetime=30)
            assert again.status == 401, again
            assert (await generate(r, auth=ticket)).status == 401
            assert r.backend.metrics.sessions_open == 1
            assert (await create(r, lifetime=30)).status == 201  # a fresh ticket is fine

    run(main())


def test_create_names_each_bad_field(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path, max_sessions=0) as r:
            bad: list[tuple[str, dict[str, Any]]] = [
                ("lifetime", {"lifetime": 0}),
                ("lifetime", {"lifetime": -5}),
                ("lifetime", {"lifetime": 86400.5}),
                ("lifetime", {"lifetime": 1e9}),
                ("lifetime", {"lifetime": "60"}),
                ("lifetime", {"lifetime": True}),
                ("lifetime", {"lifetime": None}),
                ("on_close_route", {"on_close_route": "http://evil.example/x"}),
                ("on_close_route", {"on_close_route": "https://evil.example/generate"}),
                ("on_close_route", {"on_close_route": "http://127.0.0.1:9/generate"}),
                ("on_close_route", {"on_close_route": "generate"}),
                ("on_close_route", {"on_close_route": "/a path"}),
                ("on_close_route", {"on_close_route": 5}),
                ("on_close_payload", {"on_close_payload": [1, 2]}),
                ("on_close_payload", {"on_close_payload": "x"}),
                ("on_close_payload", {"on_close_payload": 3}),
            ]
            for field, payload in bad:
                reply = await create(r, **payload)
                assert reply.status == 422, (payload, reply)
                assert names(reply, field), (payload, reply.body)
            both = await create(r, lifetime=0, on_close_route="http://evil.example/x")
            assert both.status == 422 and names(both, "lifetime"), both
            assert names(both, "on_close_route"), both
            not_object = await r.request(
                "POST", "/session/create", {"auth_data": fresh_auth(r), "payload": 3}
            )
            assert not_object.status == 422 and names(not_object, "payload"), not_object
            assert (await r.request("POST", "/session/create", b"{nope")).status == 422
            assert (await r.request("POST", "/session/create", b"[1]")).status == 422
            assert r.backend.metrics.sessions_open == 0
            # the limits themselves are fine
            fine: list[dict[str, Any]] = [
                {"lifetime": 86400},
                {"lifetime": 0.5},
                {},
                {"on_close_route": "/generate", "on_close_payload": {"prompt": "x"}},
                {"on_close_route": f"{r.fake.url}/generate", "on_close_payload": None},
            ]
            for payload in fine:
                reply = await create(r, **payload)
                assert reply.status == 201, (payload, reply)
            assert r.backend.metrics.sessions_open == 5

    run(main())


def test_create_without_a_key_yet_is_503(tmp_path: Path) -> None:
    async def main() -> None:
        # No PUBKEY_FILE and an autoscaler that is not there: the key never comes.
        async with session_worker(tmp_path, pubkey=False) as r:
            await r.wait_ready(pubkey=False)
            assert r.backend.state is State.READY
            reply = await create(r, lifetime=30)
            assert reply.status == 503, reply
            assert reply.json().get("state") == "no_pubkey", reply
            assert r.backend.metrics.sessions_open == 0
            assert r.backend.metrics.in_flight.requests == 0

    run(main())


def test_max_sessions_answers_429_and_0_means_no_limit(tmp_path: Path) -> None:
    (tmp_path / "two").mkdir()
    (tmp_path / "none").mkdir()

    async def main() -> None:
        async with session_worker(tmp_path / "two", max_sessions=2) as r:
            first, auth = await open_session(r)
            await open_session(r)
            ticket = fresh_auth(r)
            full = await create(r, ticket)
            assert full.status == 429, full
            assert r.backend.metrics.sessions_open == 2
            assert r.backend.metrics.in_flight.requests == 2
            assert (await ask(r, "end", first, auth)).status == 200
            assert (await create(r, ticket)).status == 201  # room again; the ticket not spent
            assert (await create(r)).status == 429

        async with session_worker(tmp_path / "none", max_sessions=0) as r:
            ids = [(await open_session(r))[0] for _ in range(50)]
            assert r.backend.metrics.sessions_open == 50
            # unguessable: distinct, long, from a wide alphabet, no shared prefixes
            assert len(set(ids)) == 50
            alphabet = set(string.ascii_letters + string.digits + "-_")
            assert all(len(i) >= 22 and set(i) <= alphabet for i in ids), ids
            assert len(set("".join(ids))) >= 50, ids
            assert len({i[:6] for i in ids}) == 50, ids

    run(main())


# Guards: an expired session not yet collected once held a max_sessions slot.
def test_an_expired_session_holds_no_slot(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path, max_sessions=1, session_gc_interval=30.0) as r:
            session, auth = await open_session(r, lifetime=0.2)
            await asyncio.sleep(0.3)
            reply = await create(r, lifetime=30)
            assert reply.status == 201, reply
            assert (await ask(r, "get", session, auth)).status == 400

    run(main())


# 2. A session in flight, and what is reported ####################################################


def test_a_session_is_one_request_in_flight_with_its_cost(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            m = r.backend.metrics
            received, served = m.received.requests, m.served.requests
            session, auth = await open_session(r, cost="7", lifetime=30)
            assert (m.in_flight.requests, m.in_flight.workload) == (1, 7.0)
            assert m.received.requests == received + 1
            assert m.consistent()

            for _ in range(2):
                reply = await generate(r, session, auth, prompt="one two three")
                assert reply.status == 200, reply
            assert (m.in_flight.requests, m.in_flight.workload) == (1, 7.0)
            assert m.received.requests == received + 3
            assert m.served.requests == served + 2
            assert m.consistent()

            assert (await ask(r, "end", session, auth)).status == 200
            assert (m.in_flight.requests, m.in_flight.workload) == (0, 0.0)
            assert m.served.requests == served + 3
            assert m.consistent()
            assert (await ask(r, "end", session, auth)).status == 410
            assert m.served.requests == served + 3  # completed once
            assert m.sessions_ended["ended"] == 1

    run(main())


def test_the_session_is_reported_once_and_its_requests_never(tmp_path: Path) -> None:
    async def main() -> None:
        settings: dict[str, Any] = {
            "master_token": "session-token",
            "report_format": "1.1.0",
            "container_id": 31,
            "report_check_interval": 0.05,
            "report_max_interval": 0.2,
            "report_timeout": 2.0,
        }
        async with (
            Platform() as platform,
            session_worker(tmp_path, report_addrs=[platform.url], **settings) as r,
        ):
            auth = fresh_auth(r, "5", request_idx=501)
            created = await create(r, auth, lifetime=30)
            assert created.status == 201, created
            session = created.json()["session_id"]

            # A request inside the session, held at the model, with a ticket of its own.
            r.fake.json_delay = 1.0
            inner = generate_body(r, session, fresh_auth(r, "2", request_idx=777))
            held = asyncio.ensure_future(r.request("POST", "/generate", inner))
            seen = len(platform.reports)

            def working_both() -> bool:
                return any(rep["num_requests_working"] == 2 for rep in platform.reports[seen:])

            await until(working_both, 5.0, "a report with the session and its request")
            for rep in platform.reports[seen:]:
                if rep["num_requests_working"] == 2:
                    assert rep["working_request_idxs"] == [501], rep
            assert (await held).status == 200
            r.fake.json_delay = 0.0
            # with the session's own ticket too
            assert (await generate(r, session, auth)).status == 200

            assert (await ask(r, "end", session, auth)).status == 200

            def reported() -> bool:
                return any(c["request_idx"] == 501 for c in platform.completions())

            await until(reported, 5.0, "the session's completion report")
            await asyncio.sleep(0.4)  # two more report rounds: nothing else comes
            entries = platform.completions()
            assert [c["request_idx"] for c in entries] == [501], entries
            assert entries[0]["status"] == "Success", entries
            assert all(777 not in rep["working_request_idxs"] for rep in platform.reports)
            last = platform.reports[-1]
            assert last["working_request_idxs"] == [] and last["num_requests_working"] == 0
            assert settled(r.backend)
            # one more, left open: drained at stop, and reported then, once
            assert (await create(r, fresh_auth(r, "1", request_idx=601), lifetime=30)).status == 201
        assert platform is not None
        assert [c["request_idx"] for c in platform.completions()] == [501, 601]

    run(main())


# 3. Requests inside a session ####################################################################


def test_requests_inside_are_served_checked_and_extend_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            payload: dict[str, Any] = {"on_close_route": "/hooks/closed"}
            payload["on_close_payload"] = {"k": [1]}
            session, auth = await open_session(r, lifetime=40, **payload)
            details = await ask(r, "get", session, auth)
            assert details.status == 200, details
            got = details.json()
            assert got["session_id"] == session and got["auth_data"] == auth, got
            assert got["lifetime"] == 40 and got["on_close_payload"] == {"k": [1]}, got
            assert got["on_close_route"] == "/hooks/closed", got
            first = float(got["expiration"])

            before = len(r.fake.requests)
            assert (await generate(r, session, auth, prompt="in the session")).status == 200
            assert r.fake.requests[before:] == [
                {"prompt": "in the session", "max_response_tokens": 4}
            ]
            second = await expiration(r, session, auth)
            assert abs(second - (first + 40)) < 1.0, (first, second)
            stream = await r.request("POST", "/generate_stream", generate_body(r, session, auth))
            assert stream.status == 200 and stream.complete, stream
            assert stream.body.count(b"data:") == 4, stream
            third = await expiration(r, session, auth)
            assert abs(third - (second + 40)) < 1.0, (second, third)

            # a bad signature inside the session: refused, never forwarded, nothing extended
            tampered = dict(auth, cost="1")
            assert (await generate(r, session, tampered)).status == 401
            forged = dict(auth, signature=fresh_auth(r)["signature"])
            assert (await generate(r, session, forged)).status == 401
            no_auth = generate_body(r, session)
            del no_auth["auth_data"]
            assert (await r.request("POST", "/generate", no_auth)).status == 422
            assert len(r.fake.requests) == before + 2
            assert await expiration(r, session, auth) == third
            # a ticket of its own inside the session is spent there like anywhere
            fresh = fresh_auth(r)
            assert (await generate(r, session, fresh)).status == 200
            assert (await generate(r, auth=fresh)).status == 401
            assert (await generate(r, session, fresh)).status == 401
            assert len(r.fake.requests) == before + 3
            third = await expiration(r, session, auth)

            # ids not open: unknown, not a string, ended
            unknown = await generate(r, "no-such-session", auth)
            assert (unknown.status, unknown.json()) == (410, INVALID), unknown
            assert (await generate(r, typing.cast(Any, 5), auth)).status == 422
            assert (await ask(r, "end", session, auth)).status == 200
            ended = await generate(r, session, auth)
            assert (ended.status, ended.json()) == (410, INVALID), ended
            ended_stream = await r.request(
                "POST", "/generate_stream", generate_body(r, session, auth)
            )
            assert (ended_stream.status, ended_stream.json()) == (410, INVALID)
            assert len(r.fake.requests) == before + 3
            assert settled(r.backend)

    run(main())


def test_an_expired_id_is_invalid_even_before_collection(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path, session_gc_interval=30.0) as r:
            session, auth = await open_session(r, lifetime=0.2)
            await asyncio.sleep(0.3)
            assert r.backend.metrics.sessions_ended["expired"] == 0  # not collected yet
            reply = await generate(r, session, auth)
            assert (reply.status, reply.json()) == (410, INVALID), reply
            assert r.backend.metrics.sessions_ended["expired"] == 1
            assert settled(r.backend)

    run(main())


# 4. /session/get, /health, /end ##################################################################


def test_get_health_and_end_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            session, auth = await open_session(r, lifetime=30)
            other_auth = fresh_auth(r)
            for what in ("get", "health", "end"):
                for body in (b"{not json", b"[]", b'"x"', b"{}", b'{"session_id": 5}'):
                    reply = await r.request("POST", f"/session/{what}", body)
                    assert reply.status == 422, (what, body, reply)
                empty = await ask(r, what, "", auth)
                assert empty.status == 422, (what, empty)
                for wrong in (other_auth, None, dict(auth, reqnum=auth["reqnum"] + 1)):
                    refused = await ask(r, what, session, wrong)
                    assert refused.status == 401, (what, wrong, refused)
            assert r.backend.metrics.sessions_open == 1  # the refused /end ended nothing

            got = await ask(r, "get", session, auth)
            assert got.status == 200 and got.json()["session_id"] == session, got
            assert (await ask(r, "get", "unknown", auth)).status == 400
            health = await ask(r, "health", session, auth)
            assert (health.status, health.json()) == (200, {"ok": True}), health
            unknown = await ask(r, "health", "unknown", auth)
            assert (unknown.status, unknown.json()) == (200, {"ok": False}), unknown

            end = await ask(r, "end", session, auth)
            assert end.status == 200, end
            assert end.json() == {"ended": True, "removed_session": session}, end
            again = await ask(r, "end", session, auth)
            assert again.status == 410, again
            assert (await ask(r, "end", "unknown", auth)).status == 400
            assert (await ask(r, "get", session, auth)).status == 400
            closed = await ask(r, "health", session, auth)
            assert (closed.status, closed.json()) == (200, {"ok": False}), closed
            assert r.backend.metrics.sessions_ended == {"ended": 1}
            assert settled(r.backend)

    run(main())


# 5. Expiry, ending mid-stream, callbacks, drain ###################################################


def test_expired_sessions_are_collected_and_called_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path, session_gc_interval=0.1) as r:
            m = r.backend.metrics
            payload: dict[str, Any] = {"on_close_route": "/generate"}
            payload["on_close_payload"] = {"prompt": "bye"}
            created = await create(r, lifetime=0.3, **payload)
            assert created.status == 201, created
            session, expiration = created.json()["session_id"], created.json()["expiration"]
            keeper, _ = await open_session(r, lifetime=60, on_close_route="/generate")
            await until(lambda: m.sessions_ended["expired"] == 1, 3.0, "the session to expire")
            assert time.time() >= expiration
            assert m.sessions_open == 1
            assert m.in_flight.requests == 1  # the keeper

            def called_back() -> bool:
                return any(b.get("session_id") == session for b in r.fake.requests)

            await until(called_back, 3.0, "the close callback")
            await asyncio.sleep(0.3)  # a few more collections: no second callback
            calls = [b for b in r.fake.requests if "session_id" in b]
            assert calls == [{"prompt": "bye", "session_id": session}], calls
            assert m.sessions_ended["expired"] == 1
            sessions = r.backend.sessions
            assert sessions is not None and keeper in sessions.open
            assert m.consistent()
            assert r.backend.state is State.READY

    run(main())


async def open_stream(r: Rig, body: dict[str, Any]) -> RawClient:
    """A /generate_stream request on a raw connection, its head read, its first chunk too."""
    client = await RawClient.connect(r.port, timeout=5.0)
    await client.send(encode_request("POST", "/generate_stream", body))
    status, headers = await client.head()
    assert status == 200, (status, headers)
    assert (headers.get("transfer-encoding") or "").lower() == "chunked", headers
    first = await client.chunk_or_none()
    assert first and b"data:" in first, first
    return client


async def rest(client: RawClient, timeout: float) -> tuple[bytes, bool]:
    """The rest of a chunked body (each chunk within `timeout`), and whether it ended with
    its last chunk."""
    client.timeout = timeout
    parts: list[bytes] = []
    while chunk := await client.chunk_or_none():
        parts.append(chunk)
    return b"".join(parts), chunk == b""


def test_ending_a_session_cuts_its_stream_and_only_that(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            m = r.backend.metrics
            r.fake.token_delay = 0.05
            session, auth = await open_session(r, lifetime=30)
            prompt = "a long answer in the session please"
            inside = generate_body(r, session, auth, prompt=prompt, tokens=200)  # 10 s
            outside = generate_body(r, prompt="short and outside", tokens=24)  # 1.2 s
            in_stream = await open_stream(r, inside)
            out_stream = await open_stream(r, outside)
            try:
                cancelled = (m.cancelled.requests, m.cancelled.workload)
                served = m.served.requests
                assert m.in_flight.requests == 3

                started = time.monotonic()
                assert (await ask(r, "end", session, auth)).status == 200
                body, complete = await rest(in_stream, 3.0)
                assert not complete, "the session's stream was cut"
                assert time.monotonic() - started < 2.0
                assert body.count(b"data:") < 100, body

                body, complete = await rest(out_stream, 5.0)
                assert complete, "the stream outside the session ended with its last chunk"
                assert body.count(b"data:") == 23, body  # after the first one
            finally:
                await in_stream.close()
                await out_stream.close()
            await until(lambda: m.in_flight.requests == 0, 3.0, "the streams to settle")
            assert m.cancelled.requests == cancelled[0] + 1
            assert abs(m.cancelled.workload - cancelled[1] - count_tokens(prompt)) < 1e-6
            assert m.served.requests == served + 2  # the session and the outside stream
            assert m.consistent()
            await until(lambda: r.fake.cancelled == 1, 3.0, "the model stream to be dropped")
            assert r.backend.state is State.READY

    run(main())


def test_close_callback_once_at_the_resolved_path(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            a, a_auth = await open_session(
                r, on_close_route="/hooks/closed", on_close_payload={"n": 1, "deep": {"x": [2]}}
            )
            b, b_auth = await open_session(
                r, on_close_route=f"{r.fake.url}/hooks/other", on_close_payload={"n": 2}
            )
            c, c_auth = await open_session(r)  # no callback at all
            d, d_auth = await open_session(
                r, on_close_route="/hooks/closed", on_close_payload={"session_id": "x"}
            )
            e, e_auth = await open_session(
                r, on_close_route="/generate", on_close_payload={"prompt": "p"}
            )
            for session, auth in ((a, a_auth), (b, b_auth), (c, c_auth), (d, d_auth)):
                assert (await ask(r, "end", session, auth)).status == 200
            await until(lambda: len(callbacks(r).hooks) >= 3, 3.0, "three callbacks")
            assert (await ask(r, "end", a, a_auth)).status == 410  # no second callback
            assert (await ask(r, "end", e, e_auth)).status == 200
            await until(
                lambda: any(b.get("session_id") == e for b in r.fake.requests), 3.0, "e's call"
            )
            await asyncio.sleep(0.2)
            assert callbacks(r).hooks_for(a) == [
                ("/hooks/closed", {"n": 1, "deep": {"x": [2]}, "session_id": a})
            ]
            assert callbacks(r).hooks_for(b) == [("/hooks/other", {"n": 2, "session_id": b})]
            assert callbacks(r).hooks_for(c) == []
            assert callbacks(r).hooks_for(d) == [("/hooks/closed", {"session_id": d})]
            assert len(callbacks(r).hooks) == 3
            calls = [b for b in r.fake.requests if "session_id" in b]
            assert calls == [{"prompt": "p", "session_id": e}], calls
        # RunningWorker.stop() drained nothing more: each callback ran once.
        assert len(callbacks(r).hooks) == 3

    run(main())


def test_failing_or_hanging_callback_is_logged_and_the_worker_stays_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pyworker, "SESSION_CALLBACK_TIMEOUT", 2.0)
    caplog.set_level(logging.WARNING, logger="pyworker")

    def warned(text: str) -> bool:
        return any(
            "session close callback" in rec.getMessage() and text in rec.getMessage()
            for rec in caplog.records
        )

    async def main() -> None:
        async with session_worker(tmp_path) as r:
            # The model answers 500.
            callbacks(r).hook_status = 500
            session, auth = await open_session(r, on_close_route="/hooks/closed")
            assert (await ask(r, "end", session, auth)).status == 200
            await until(lambda: warned("500"), 3.0, "the failed callback's warning")
            assert r.backend.state is State.READY
            assert (await generate(r)).status == 200

            # The model never answers: ending is not held up, and the callback times out.
            callbacks(r).hook_status = 200
            callbacks(r).hook_hold = asyncio.Event()
            session, auth = await open_session(r, on_close_route="/hooks/other")
            started = time.monotonic()
            assert (await ask(r, "end", session, auth)).status == 200
            assert time.monotonic() - started < 1.0  # not the callback's 2 s
            await until(lambda: len(callbacks(r).hooks_for(session)) == 1, 3.0, "the hung callback")
            assert (await generate(r)).status == 200  # served meanwhile
            assert (await ask(r, "health", session, auth)).json() == {"ok": False}
            await until(lambda: warned("failed"), 5.0, "the hung callback's warning")
            assert r.backend.state is State.READY
            assert (await generate(r)).status == 200
            assert settled(r.backend)
            assert not r.backend.sessions or not r.backend.sessions.callbacks
            assert len(callbacks(r).hooks) == 2
        # nothing raised out of a callback task
        assert not [rec for rec in caplog.records if "never retrieved" in rec.getMessage()]

    run(main())


def test_stop_drains_open_sessions_and_runs_their_callbacks(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path) as r:
            m = r.backend.metrics
            a, _ = await open_session(r, cost="3", on_close_route="/hooks/closed")
            b, _ = await open_session(
                r, cost="2", on_close_route="/generate", on_close_payload={"prompt": "z"}
            )
            await open_session(r, cost="1")
            ended, ended_auth = await open_session(r, on_close_route="/hooks/other")
            assert (await ask(r, "end", ended, ended_auth)).status == 200
            await until(lambda: len(callbacks(r).hooks) == 1, 3.0, "the ended session's callback")
            assert (m.sessions_open, m.in_flight.requests, m.in_flight.workload) == (3, 3, 6.0)
            fake, backend = callbacks(r), r.backend
        # started_worker ran RunningWorker.stop(), as SIGTERM does
        assert backend.metrics.sessions_ended == {"ended": 1, "drained": 3}
        assert settled(backend)
        assert fake.hooks_for(a) == [("/hooks/closed", {"session_id": a})]
        calls = [body for body in fake.requests if "session_id" in body]
        assert calls == [{"prompt": "z", "session_id": b}], calls
        assert len(fake.hooks) == 2

    run(main())


# Guards: JSON nested ~1000 deep once made json.dumps raise RecursionError: a 500.
def test_deeply_nested_session_auth_is_refused_not_a_500(tmp_path: Path) -> None:
    depth = 1000
    deep = "[" * depth + "]" * depth
    try:
        pyworker.json_loads(deep.encode())
    except Exception:
        pytest.skip("this JSON parser refuses such nesting already (422)")

    async def main() -> None:
        async with session_worker(tmp_path) as r:
            session, _ = await open_session(r, lifetime=30)
            body = f'{{"session_id": {json.dumps(session)}, "session_auth": {{"x": {deep}}}}}'
            for what in ("get", "health", "end"):
                reply = await r.request("POST", f"/session/{what}", body.encode())
                assert reply.status == 401, (what, reply)
            ticket = json.dumps(fresh_auth(r))[:-1] + f', "x": {deep}}}'
            body = f'{{"auth_data": {ticket}, "payload": {{"lifetime": 30}}}}'
            reply = await r.request("POST", "/session/create", body.encode())
            assert reply.status < 500, reply

    run(main())


# 6. /metrics #####################################################################################


def test_metrics_show_sessions_open_and_ended_by_cause(tmp_path: Path) -> None:
    async def main() -> None:
        async with session_worker(tmp_path, session_gc_interval=0.05) as r:

            async def samples() -> dict[str, float]:
                reply = await r.request("GET", "/metrics")
                assert reply.status == 200, reply
                lines = reply.body.decode().splitlines()
                pairs = [ln.rsplit(" ", 1) for ln in lines if ln.startswith("pyworker_sessions")]
                return {name: float(value) for name, value in pairs}

            before = await samples()
            assert before["pyworker_sessions_open"] == 0, before
            a, a_auth = await open_session(r, lifetime=30)
            await open_session(r, lifetime=30)
            await open_session(r, lifetime=0.1)
            opened = await samples()
            assert opened["pyworker_sessions_open"] == 3, opened
            await until(lambda: r.backend.metrics.sessions_open == 2, 3.0, "an expiry")
            assert (await ask(r, "end", a, a_auth)).status == 200
            after = await samples()
            assert after["pyworker_sessions_open"] == 1, after
            assert after['pyworker_sessions_ended_total{cause="ended"}'] == 1, after
            assert after['pyworker_sessions_ended_total{cause="expired"}'] == 1, after
            assert after['pyworker_sessions_ended_total{cause="drained"}'] == 0, after

    run(main())


# 7. TLS: /session/end in plain HTTP beside it ####################################################


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_worker_serves_session_end_in_plain_http_and_nothing_else(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)

    async def main() -> None:
        tls: dict[str, Any] = {"use_ssl": True, "ssl_cert": str(cert), "ssl_key": str(key)}
        async with session_worker(tmp_path, **tls) as r:
            plain = r.worker.plain_port
            assert plain is not None and plain != r.port
            forwarded = len(r.fake.requests)
            session, auth = await open_session(r, lifetime=30, on_close_route="/hooks/closed")
            assert (await generate(r, session, auth)).status == 200  # over TLS

            async def end(session_id: str, session_auth: Any) -> Reply:
                body = {"session_id": session_id, "session_auth": session_auth}
                return await request(plain, "POST", "/session/end", body)

            assert (await end(session, fresh_auth(r))).status == 401
            assert (await end("unknown", auth)).status == 400
            assert (await request(plain, "POST", "/session/end", b"{bad")).status == 422
            ended = await end(session, auth)
            assert ended.status == 200, ended
            assert ended.json() == {"ended": True, "removed_session": session}
            assert (await end(session, auth)).status == 410
            await until(lambda: len(callbacks(r).hooks_for(session)) == 1, 3.0, "the callback")
            # the TLS port knows it ended
            assert (await ask(r, "health", session, auth)).json() == {"ok": False}

            # anything else on the plain port: 404
            for method, path, body in (
                ("POST", "/session/create", {"auth_data": fresh_auth(r), "payload": {}}),
                ("POST", "/session/get", {"session_id": session, "session_auth": auth}),
                ("POST", "/session/health", {"session_id": session, "session_auth": auth}),
                ("POST", "/generate", generate_body(r)),
                ("GET", "/ping", None),
                ("GET", "/metrics", None),
                ("GET", "/healthcheck", None),
            ):
                reply = await request(plain, method, path, body)
                assert reply.status == 404, (method, path, reply)
            assert r.backend.metrics.sessions_open == 0
            assert len(r.fake.requests) == forwarded + 1

    run(main())


def test_open_sessions_do_not_count_in_the_queue_estimate(tmp_path: Path) -> None:
    # Guards: a session holds its cost in flight with no model time; counted in the estimated
    # wait, three idle sessions of cost 1,000 made every request a 429 while the model idled.
    async def main() -> None:
        async with session_worker(tmp_path, max_queue_time=1.0) as r:
            r.backend.max_perf = 100.0  # 1,000 of workload is 10 s of the model's time
            assert r.backend.max_queue_time == 1.0
            for _ in range(3):
                await open_session(r, cost="1000", lifetime=30)
            assert r.backend.metrics.in_flight.workload >= 3000
            reply = await r.post("/generate", r.body("hello"))
            assert reply.status == 200, reply

    run(main())
