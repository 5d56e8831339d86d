"""A CI-sized soak: a few thousand mixed JSON and streaming requests against a live worker,
some of them abandoned by their client at a random moment, checking that nothing grows
without bound: open descriptors, asyncio tasks, pooled and server connections, traced
memory; and that the bookkeeping balances at the end. tests/soak.py is the long version.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import time
import tracemalloc
from collections.abc import Generator
from pathlib import Path
from typing import Any

from support import (
    UNUSED_URL,
    RawClient,
    Rig,
    Runner,
    encode_request,
    fetch,
    loaded_model_log,
    raw_client,
    worker_rig,
)

import pyworker
from test_load import FakeModel

WARMUP = 400  # requests before the baseline is taken (pools and caches fill up)
SOAK = int(os.environ.get("PYWORKER_SOAK_REQUESTS", "2600"))
CONCURRENCY = 24
DISCONNECT_RATE = 0.12  # share of requests whose client goes away at a random moment
SEED = 7

run = Runner(timeout=100.0)


@contextlib.contextmanager
def quiet_worker_log() -> Generator[None, None, None]:
    """Each abandoned or cut stream logs a warning, and pytest keeps every captured record in
    memory: that would be the test's growth, not the worker's."""
    quiet = logging.getLogger("pyworker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def resources(worker: pyworker.RunningWorker, backend: pyworker.Backend) -> dict[str, float]:
    """What a worker holds now, which a soak must leave where it found it."""
    return {
        "fds": open_fds(),
        "tasks": len(asyncio.all_tasks()),
        "pooled": backend.client.idle_connections,
        "server_connections": worker.server.connections,
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "in_flight": backend.metrics.in_flight.requests,
    }


class Load:
    """Closed-loop load: CONCURRENCY clients, mixed routes, random disconnects."""

    def __init__(self, port: int, rng: random.Random) -> None:
        self.port = port
        self.rng = rng
        self.client = pyworker.HttpClient(f"http://127.0.0.1:{port}", max_idle=CONCURRENCY)
        self.outcomes: dict[str, int] = {}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @staticmethod
    def body(i: int) -> bytes:
        payload = {"prompt": f"soak {i} " * 5, "max_response_tokens": 6}
        return json.dumps({"payload": payload}).encode()

    async def one(self, i: int) -> None:
        route = "/generate_stream" if i % 2 else "/generate"
        if self.rng.random() < DISCONNECT_RATE:
            await self.abandon(route, i)
            return
        async with await self.client.request("POST", route, self.body(i), timeout=10) as r:
            data = await r.read()
        ok = r.status == 200 and (data.count(b"data:") == 6 or b'"tokens":6' in data)
        self._count("ok" if ok else f"bad {r.status}")

    async def abandon(self, route: str, i: int) -> None:
        """Send a request on a raw connection and go away: before, or after part of, the answer."""
        body = self.body(i)
        head = f"POST {route} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(body)}\r\n\r\n"
        client = await RawClient.connect(self.port)
        try:
            client.writer.write(head.encode() + body)
            moment = self.rng.choice(["at once", "after a moment", "after some bytes"])
            if moment == "after a moment":
                await asyncio.sleep(self.rng.uniform(0, 0.01))
            elif moment == "after some bytes":
                await asyncio.wait_for(client.reader.read(self.rng.randint(1, 200)), 5)
        finally:
            if self.rng.random() < 0.5:
                client.abort()  # reset
            else:
                client.writer.close()  # FIN
        self._count("abandoned")

    async def run(self, start: int, count: int) -> None:
        queue = iter(range(start, start + count))

        async def client() -> None:
            for i in queue:
                await self.one(i)

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


def test_soak_has_bounded_growth(tmp_path: Path) -> None:
    """Guards against leaks under long mixed load with disconnects: descriptors, tasks,
    connections and traced memory after SOAK requests stay within a small bound of what they
    were after the warm-up; the bookkeeping balances; the worker still answers."""

    async def main() -> dict[str, Any]:
        loaded_model_log(tmp_path)
        async with worker_rig(
            tmp_path,
            fake=FakeModel(tokens=6, token_delay=0.001),
            report_addrs=[UNUSED_URL],  # nothing listens: reports fail, quietly
            unsecured=True,
            report_check_interval=60.0,
            report_max_interval=60.0,
            log_poll_interval=0.05,
        ) as rig:
            tracemalloc.start()
            try:
                return await soak(rig)
            finally:
                tracemalloc.stop()

    async def soak(rig: Rig) -> dict[str, Any]:
        backend, worker, fake = rig.backend, rig.worker, rig.fake
        rng = random.Random(SEED)

        async def phase(start: int, count: int) -> dict[str, float]:
            load = Load(worker.port, rng)
            try:
                await load.run(start, count)
            finally:
                await load.client.close()
            outcomes.update({k: outcomes.get(k, 0) + v for k, v in load.outcomes.items()})
            # Let the worker notice the closed connections and settle.
            for _ in range(200):
                if worker.server.connections == 0 and backend.metrics.in_flight.requests == 0:
                    break
                await asyncio.sleep(0.02)
            fake.requests.clear()  # the fake model's own record, not the worker's memory
            gc.collect()  # closed transports sit in reference cycles until collected
            return resources(worker, backend)

        outcomes: dict[str, int] = {}
        started = time.monotonic()
        base = await phase(0, WARMUP)
        after = await phase(WARMUP, SOAK)
        elapsed = time.monotonic() - started
        status, body = await _ping(worker.port)
        metrics = backend.metrics
        return {
            "base": base,
            "after": after,
            "outcomes": outcomes,
            "elapsed": elapsed,
            "ping": (status, body),
            "consistent": metrics.consistent(),
            "received": metrics.received.requests,
            "served": metrics.served.requests,
            "cancelled": metrics.cancelled.requests,
            "errored": metrics.errored.requests,
        }

    with quiet_worker_log():
        r = run(main())
    base, after, outcomes = r["base"], r["after"], r["outcomes"]
    total = WARMUP + SOAK
    assert sum(outcomes.values()) == total, outcomes
    assert outcomes.get("ok", 0) + outcomes.get("abandoned", 0) == total, outcomes
    assert outcomes["abandoned"] > total * DISCONNECT_RATE / 2, outcomes
    assert r["ping"] == (200, b"pong")
    # Bookkeeping: every request that reached the handler is in exactly one outcome.
    assert r["consistent"], r
    assert after["in_flight"] == 0, after
    assert r["received"] == r["served"] + r["cancelled"] + r["errored"], r
    assert r["served"] >= outcomes["ok"], r
    assert r["errored"] == 0, r
    # Bounded growth between the warm-up and the end of the soak.
    assert after["server_connections"] == 0, after
    # Each pooled model connection holds two descriptors here (the worker's end and the fake
    # model's) and one fake-model task; the pool may still be filling up toward CONCURRENCY.
    assert after["fds"] - 2 * after["pooled"] <= base["fds"] - 2 * base["pooled"] + 4, (base, after)
    assert after["tasks"] - after["pooled"] <= base["tasks"] - base["pooled"] + 2, (base, after)
    assert after["pooled"] <= pyworker.MAX_IDLE_UPSTREAM, after
    assert after["pooled"] <= 2 * CONCURRENCY, after
    growth = after["traced_bytes"] - base["traced_bytes"]
    assert growth < 1024 * 1024, (growth, base, after)  # < 1 MiB over thousands of requests
    print(
        f"soak: {total} requests in {r['elapsed']:.1f}s, {outcomes}; fds {base['fds']}->"
        f"{after['fds']}, tasks {base['tasks']}->{after['tasks']}, pooled {base['pooled']}->"
        f"{after['pooled']}, traced memory growth {growth / 1024:.0f} KiB; received "
        f"{r['received']} = served {r['served']} + cancelled {r['cancelled']}"
    )


async def _ping(port: int) -> tuple[int, bytes]:
    return await fetch(f"http://127.0.0.1:{port}", "GET", "/ping", timeout=5)


def test_soak_sessions_leave_nothing_behind(tmp_path: Path) -> None:
    """Guards against leaks in sessions (SPEC 11.5): 1,000 sessions opened and ended against
    a live worker, some with requests inside (JSON and streams), some with a close callback,
    some left to expire, some ended under a stream in flight. Descriptors, tasks and traced
    memory after the last 900 stay within a small bound of what they were after the first
    100; the bookkeeping balances; no session is left open; and once the worker has
    stopped, no task of its is left."""
    sessions, warmup, concurrency = 1000, 100, 8
    expire_every, cut_every = 25, 50  # left to expire; ended under a stream in flight

    async def main() -> dict[str, Any]:
        mine = set(asyncio.all_tasks())  # the test's own (Runner's wait_for)
        loaded_model_log(tmp_path)
        async with worker_rig(
            tmp_path,
            fake=FakeModel(tokens=400, token_delay=0.002),
            report_addrs=[UNUSED_URL],  # nothing listens: reports fail, quietly
            log_actions=[(pyworker.LogAction.ModelLoaded, FakeModel.LOADED_LINE)],
            max_sessions=64,
            ready=False,  # waited for below, under tracemalloc
            unsecured=True,
            report_check_interval=60.0,
            report_max_interval=60.0,
            log_poll_interval=0.05,
            session_gc_interval=0.05,
        ) as rig:
            result = await soak(rig)
        # Nothing of the worker's (or the fake model's) is left running.
        for _ in range(100):
            left = asyncio.all_tasks() - mine
            if not left:
                break
            await asyncio.sleep(0.02)
        result["tasks_left"] = [repr(t) for t in asyncio.all_tasks() - mine]
        result["drained"] = rig.backend.metrics.sessions_ended["drained"]
        return result

    async def soak(rig: Rig) -> dict[str, Any]:
        backend, worker, fake = rig.backend, rig.worker, rig.fake
        clients: list[pyworker.HttpClient] = []  # the current phase's, closed at its end
        outcomes: dict[str, int] = {}

        def count(outcome: str) -> None:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def post(route: str, body: dict[str, Any]) -> tuple[int, bytes]:
            data = json.dumps(body).encode()
            async with await clients[-1].request("POST", route, data, timeout=10) as resp:
                return resp.status, await resp.read()

        async def cut(session_id: str, auth: dict[str, Any]) -> None:
            """A long stream inside the session, ended by /session/end after its first chunk."""
            body = {
                "auth_data": auth,
                "session_id": session_id,
                "payload": {"prompt": "cut me off", "max_response_tokens": 400},
            }
            async with raw_client(worker.port, timeout=5) as client:
                await client.send(encode_request("POST", "/generate_stream", body))
                status, _ = await client.head()
                first = await client.chunk_or_none()
                ask = {"session_id": session_id, "session_auth": auth}
                ended, _ = await post("/session/end", ask)
                while (chunk := await client.chunk_or_none()) is not None:
                    if chunk == b"":
                        break
                ok = status == 200 and bool(first) and ended == 200 and chunk is None
                count("cut" if ok else f"bad cut {status} {ended} {chunk!r}")

        async def one(i: int) -> None:
            auth = {"cost": "3", "reqnum": i}
            payload: dict[str, Any] = {"lifetime": 0.2 if i % expire_every == 1 else 30}
            if i % 10 == 0:
                payload["on_close_route"] = "/generate"
                payload["on_close_payload"] = {"prompt": f"closed {i}", "max_response_tokens": 1}
            status, data = await post("/session/create", {"auth_data": auth, "payload": payload})
            if status != 201:
                count(f"create {status}")
                return
            session_id = json.loads(data)["session_id"]
            ask = {"session_id": session_id, "session_auth": auth}
            inside = {"prompt": f"session {i}", "max_response_tokens": 4}
            body = {"auth_data": auth, "session_id": session_id, "payload": inside}
            if i % 5 == 0:
                status, data = await post("/generate", body)
                count("inside" if status == 200 and b'"tokens":4' in data else f"json {status}")
            if i % 10 == 0:
                status, data = await post("/generate_stream", body)
                ok = status == 200 and data.count(b"data:") == 4
                count("inside" if ok else f"stream {status}")
            if i % 7 == 0:
                status, data = await post("/session/health", ask)
                count("health" if json.loads(data) == {"ok": True} else f"health {status}")
            if i % expire_every == 1:
                count("left to expire")
            elif i % cut_every == 3:
                await cut(session_id, auth)
            else:
                status, _ = await post("/session/end", ask)
                count("ended" if status == 200 else f"end {status}")

        async def phase(start: int, stop: int) -> dict[str, Any]:
            queue = iter(range(start, stop))
            clients.append(
                pyworker.HttpClient(f"http://127.0.0.1:{worker.port}", max_idle=concurrency)
            )

            async def worker_client() -> None:
                for i in queue:
                    await one(i)

            try:
                await asyncio.gather(*(worker_client() for _ in range(concurrency)))
            finally:
                await clients[-1].close()
            # Let expiries, callbacks and closed connections settle.
            sessions_table = backend.sessions
            assert sessions_table is not None
            for _ in range(200):
                metrics = backend.metrics
                if (
                    metrics.sessions_open == 0
                    and metrics.in_flight.requests == 0
                    and not sessions_table.callbacks
                    and worker.server.connections == 0
                ):
                    break
                await asyncio.sleep(0.02)
            fake.requests.clear()  # the fake model's own record, not the worker's memory
            gc.collect()
            return {
                **resources(worker, backend),
                "sessions_open": backend.metrics.sessions_open,
                "callbacks": len(sessions_table.callbacks),
            }

        tracemalloc.start()
        try:
            await rig.wait_ready()
            started = time.monotonic()
            base = await phase(0, warmup)
            after = await phase(warmup, sessions)
            elapsed = time.monotonic() - started
            metrics = backend.metrics
            return {
                "base": base,
                "after": after,
                "outcomes": outcomes,
                "elapsed": elapsed,
                "ping": await _ping(worker.port),
                "consistent": metrics.consistent(),
                "ended": dict(metrics.sessions_ended),
                "received": metrics.received.requests,
                "served": metrics.served.requests,
                "cancelled": metrics.cancelled.requests,
                "errored": metrics.errored.requests,
            }
        finally:
            tracemalloc.stop()
            for client in clients:
                await client.close()

    with quiet_worker_log():
        r = run(main())
    base, after, outcomes = r["base"], r["after"], r["outcomes"]
    expired = len(range(1, sessions, expire_every))
    cut_off = len([i for i in range(sessions) if i % cut_every == 3 and i % expire_every != 1])
    inside = len(range(0, sessions, 5)) + len(range(0, sessions, 10))
    expected = {
        "ended": sessions - expired - cut_off,
        "left to expire": expired,
        "cut": cut_off,
        "inside": inside,
        "health": len(range(0, sessions, 7)),
    }
    assert outcomes == expected, outcomes
    assert r["ping"] == (200, b"pong")
    # Every session ended once, by its client or by expiry; none was left for the drain.
    assert r["ended"] == {"ended": sessions - expired, "expired": expired}, r["ended"]
    assert r["drained"] == 0
    assert r["consistent"], r
    assert after["in_flight"] == 0 and after["sessions_open"] == 0, after
    assert after["callbacks"] == 0, after
    # sessions + requests inside them; the cut streams cancelled, nothing errored
    assert r["received"] == r["served"] + r["cancelled"] + r["errored"], r
    assert r["received"] == sessions + inside + cut_off, r
    assert r["cancelled"] == cut_off, r
    assert r["errored"] == 0, r
    assert r["tasks_left"] == [], r["tasks_left"]
    # Bounded growth between the warm-up and the end.
    assert after["server_connections"] == 0, after
    assert after["fds"] - 2 * after["pooled"] <= base["fds"] - 2 * base["pooled"] + 4, (base, after)
    assert after["tasks"] - after["pooled"] <= base["tasks"] - base["pooled"] + 2, (base, after)
    growth = after["traced_bytes"] - base["traced_bytes"]
    assert growth < 1024 * 1024, (growth, base, after)  # < 1 MiB over 900 sessions
    print(
        f"session soak: {sessions} sessions in {r['elapsed']:.1f}s, {outcomes}; fds "
        f"{base['fds']}->{after['fds']}, tasks {base['tasks']}->{after['tasks']}, traced "
        f"memory growth {growth / 1024:.0f} KiB"
    )
