"""The soak benchmark (not a test): a real `python hello_world.py` worker process under mixed
JSON and streaming load, with clients that go away at random moments, for --minutes.

    python tests/soak.py                 # 30 minutes
    python tests/soak.py --minutes 2 --concurrency 32

A FakeModel (test_load.py) runs in this process as the model server; the worker runs as a
subprocess (UNSECURED=true, its own working directory). Every minute it prints the worker
process's RSS, open descriptors, threads, its TCP connections to the model (pooled and busy)
and from clients, the requests in flight and the totals from GET /metrics; at the end the
same figures and their growth since the first minute. Exit status 1 if any request that was
not abandoned failed, or the worker died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from support import (  # noqa: E402
    fetch,
    free_port,
    launch_hello_world,
    loaded_model_log,
    unsecured_env,
)

import pyworker  # noqa: E402
from test_load import FakeModel  # noqa: E402


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_connections(pid: int, model_port: int, worker_port: int) -> tuple[int, int]:
    """(connections to the model, connections from clients) held by process `pid`."""
    inodes = _socket_inodes(pid)
    to_model = from_clients = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] not in inodes or fields[3] != "01":  # 01: ESTABLISHED
                continue
            local_port = int(fields[1].split(":")[1], 16)
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == model_port:
                to_model += 1
            elif local_port == worker_port:
                from_clients += 1
    return to_model, from_clients


def process_figures(pid: int, model_port: int, worker_port: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    to_model, from_clients = _tcp_connections(pid, model_port, worker_port)
    return {
        "rss_mib": rss_kib / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": threads,
        "model_conns": to_model,
        "client_conns": from_clients,
    }


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name in ("pyworker_requests_in_flight", "pyworker_requests_queued"):
            out[name.removeprefix("pyworker_requests_")] = float(value)
        elif name.startswith("pyworker_requests_total{"):
            status = re.search(r'status="(\d+)"', name)
            key = f"status_{status.group(1) if status else '?'}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


class Soak:
    def __init__(self, port: int, concurrency: int, disconnect_rate: float, seed: int) -> None:
        self.port = port
        self.concurrency = concurrency
        self.disconnect_rate = disconnect_rate
        self.rng = random.Random(seed)
        self.client = pyworker.HttpClient(f"http://127.0.0.1:{port}", max_idle=concurrency)
        self.counts: dict[str, int] = {"ok": 0, "abandoned": 0, "failed": 0}
        self.errors: list[str] = []
        self.stop_at = 0.0
        self.sent = 0

    def body(self) -> bytes:
        words = " ".join(self.rng.choices(("cats", "dogs", "sun", "runs", "the"), k=40))
        tokens = self.rng.randint(4, 24)
        return json.dumps({"payload": {"prompt": words, "max_response_tokens": tokens}}).encode()

    async def one(self) -> None:
        route = self.rng.choice(["/generate", "/generate_stream"])
        self.sent += 1
        if self.rng.random() < self.disconnect_rate:
            await self.abandon(route)
            return
        try:
            async with await self.client.request("POST", route, self.body(), timeout=30) as r:
                await r.read()
            if r.status == 200:
                self.counts["ok"] += 1
                return
            why = f"HTTP {r.status}"
        except pyworker.UpstreamError as exc:
            why = str(exc)
        self.counts["failed"] += 1
        if len(self.errors) < 10:
            self.errors.append(why)

    async def abandon(self, route: str) -> None:
        body = self.body()
        head = f"POST {route} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(body)}\r\n\r\n"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.counts["failed"] += 1
            self.errors.append(f"connect: {exc}")
            return
        try:
            writer.write(head.encode() + body)
            moment = self.rng.random()
            if moment < 0.3:
                await asyncio.sleep(self.rng.uniform(0, 0.2))
            elif moment < 0.7:
                await asyncio.wait_for(reader.read(self.rng.randint(1, 400)), 10)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            if self.rng.random() < 0.5:
                writer.transport.abort()
            else:
                writer.close()
        self.counts["abandoned"] += 1

    async def client_loop(self) -> None:
        while time.monotonic() < self.stop_at:
            await self.one()

    async def run(self, seconds: float) -> None:
        self.stop_at = time.monotonic() + seconds
        await asyncio.gather(*(self.client_loop() for _ in range(self.concurrency)))
        await self.client.close()


async def fetch_metrics(port: int) -> dict[str, float]:
    try:
        _status, body = await fetch(f"http://127.0.0.1:{port}", "GET", "/metrics", timeout=5)
    except pyworker.UpstreamError:
        return {}
    return parse_metrics(body.decode())


def line(minute: float, figures: dict[str, float], soak: Soak) -> str:
    return (
        f"[{minute:5.1f} min] rss {figures['rss_mib']:.1f} MiB  fds {figures['fds']:.0f}  "
        f"threads {figures['threads']:.0f}  model conns {figures['model_conns']:.0f}  "
        f"client conns {figures['client_conns']:.0f}  in flight "
        f"{figures.get('in_flight', 0):.0f}  requests {soak.sent} (ok {soak.counts['ok']}, "
        f"abandoned {soak.counts['abandoned']}, failed {soak.counts['failed']})"
    )


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pyworker-soak-"))
    fake = await FakeModel(
        tokens=24, first_token_delay=0.01, token_delay=args.token_delay, json_delay=0.01
    ).start()
    port = free_port()
    env = unsecured_env(port, loaded_model_log(workdir), fake.url, LOG_LEVEL="WARNING")
    worker_log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - closed in finally
    proc = await launch_hello_world(
        workdir, env, stdout=worker_log, stderr=asyncio.subprocess.STDOUT
    )
    samples: list[dict[str, float]] = []
    soak = Soak(port, args.concurrency, args.disconnect_rate, args.seed)
    try:
        deadline = time.monotonic() + 60
        while (await fetch_metrics(port)) == {} or not await _ready(port):
            if proc.returncode is not None or time.monotonic() > deadline:
                print("the worker did not become ready; see", workdir / "worker.log")
                return 1
            await asyncio.sleep(0.2)
        print(f"worker pid {proc.pid} ready on port {port}; soak for {args.minutes} min")
        seconds = args.minutes * 60
        started = time.monotonic()
        load = asyncio.ensure_future(soak.run(seconds))
        while not load.done():
            await asyncio.wait([load], timeout=args.interval)
            if proc.returncode is not None:
                break
            figures = process_figures(proc.pid, fake.port, port)
            figures.update(await fetch_metrics(port))
            samples.append(figures)
            print(line((time.monotonic() - started) / 60, figures, soak), flush=True)
        if not load.done():
            load.cancel()
        await asyncio.sleep(1.0)  # let abandoned requests settle
        alive = proc.returncode is None
        final = process_figures(proc.pid, fake.port, port) if alive else {}
        final.update(await fetch_metrics(port) if alive else {})
        elapsed = time.monotonic() - started
        print("\n== soak summary")
        print(f"duration {elapsed / 60:.1f} min, worker alive: {alive}")
        total = soak.sent
        print(
            f"requests {total} ({total / elapsed:.0f}/s): ok {soak.counts['ok']}, "
            f"abandoned {soak.counts['abandoned']}, failed {soak.counts['failed']}"
        )
        if soak.errors:
            print("first errors:", soak.errors)
        if final and samples:
            first = samples[0]
            print("final: " + line(elapsed / 60, final, soak))
            for key in ("rss_mib", "fds", "threads", "model_conns", "client_conns"):
                print(
                    f"  {key:13s} first minute {first[key]:8.1f}  end {final[key]:8.1f}  "
                    f"growth {final[key] - first[key]:+8.1f}"
                )
            statuses = {k: v for k, v in final.items() if k.startswith("status_")}
            print(f"  worker's answers by status: {statuses}; in flight {final.get('in_flight')}")
        return 0 if alive and soak.counts["failed"] == 0 else 1
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        worker_log.close()
        await fake.stop()


async def _ready(port: int) -> bool:
    body = json.dumps({"payload": {"prompt": "ready?", "max_response_tokens": 1}}).encode()
    try:
        status, _ = await fetch(f"http://127.0.0.1:{port}", "POST", "/generate", body, timeout=5)
    except pyworker.UpstreamError:
        return False
    return status == 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (30)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at once (32)")
    parser.add_argument(
        "--disconnect-rate", type=float, default=0.1, help="share of abandoned requests (0.1)"
    )
    parser.add_argument("--token-delay", type=float, default=0.002, help="model s/token (0.002)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between lines (60)")
    parser.add_argument("--seed", type=int, default=1)
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
