"""`python hello_world.py` as a real process: startup, readiness, bad configuration, a stalled
autoscaler, SIGTERM during streams, TLS.

The fake model and the local autoscaler run in the test's event loop on 127.0.0.1; the worker
is a child process talking to them over loopback. Every child is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from support import (
    UNUSED_URL,
    WORKER_FILE,
    RawClient,
    Runner,
    StalledServer,
    WorkerProcess,
    child_env,
    free_port,
    generate,
    request,
    self_signed_cert,
    signing_key,
    spawned_worker,
    unsecured_vars,
)

from test_load import FakeModel, LocalAutoscaler

run = Runner(timeout=40.0)


@contextlib.asynccontextmanager
async def model_and_autoscaler(
    tmp_path: Path, **fake_options: Any
) -> AsyncGenerator[tuple[FakeModel, LocalAutoscaler], None]:
    fake = FakeModel(log_path=str(tmp_path / "model.log"), **fake_options)
    scaler = LocalAutoscaler(signing_key())
    try:
        await fake.start()
        await scaler.start()
        yield fake, scaler
    finally:
        await fake.stop()
        await scaler.stop()


def worker_vars(fake: FakeModel, report_addr: str, **extra: str) -> dict[str, str]:
    assert fake.log_path is not None
    return unsecured_vars(fake.log_path, fake.url, report_addr, **extra)


# Tests ###########################################################################################


def test_worker_process_output_is_all_of_it(tmp_path: Path) -> None:
    # What it guards (review T2): output() gave the last 4,000 characters only, and the
    # presence and count checks made on it (test_compat_*.py) missed a line written early in
    # a long run; tail() is for assertion messages.
    log_file = tmp_path / "worker.log"
    log_file.write_text("the first line\n" + "x" * 10_000 + "\nthe last line\n")
    child: Any = None  # no process: output() reads the file only
    process = WorkerProcess(child, 0, log_file)
    assert process.output().startswith("the first line\n")
    assert process.output().count("x") == 10_000
    assert len(process.tail()) == 4000 and process.tail().endswith("the last line\n")


def test_spawn_to_ping_then_ready(tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "model.log"
        fake = FakeModel()  # the test writes the log itself, when it chooses
        scaler = LocalAutoscaler(signing_key())
        try:
            await fake.start()
            await scaler.start()
            env = {
                "MODEL_LOG": str(log),
                "MODEL_SERVER_URL": fake.url,
                "REPORT_ADDR": scaler.url,
                "CONTAINER_ID": "9",
            }
            async with spawned_worker(tmp_path / "w", **env) as worker:
                await worker.until(worker.ping, 10.0, "/ping")
                # Up, but not ready: the model has not logged its line, no key fetched yet
                # does not matter either (503 all the same).
                reply = await request(worker.port, "POST", "/generate", generate())
                assert reply.status == 503
                assert fake.requests == []
                with open(log, "a") as f:
                    f.write(f"{FakeModel.LOADED_LINE} on port {fake.port}\n")
                await worker.until(lambda: _has_ready_report(scaler), 15.0, "a ready load report")
                report = next(r for r in scaler.reports if r["max_perf"] > 0)
                assert report["id"] == 9 and report["loadtime"] > 0
                assert report["url"] == f"http://127.0.0.1:{worker.port}"
                # The key came from /pubkey/: a signed request is served.
                auth = signing_key().sign_auth(
                    cost=3, endpoint="local", reqnum=1, url=report["url"]
                )
                body = {"auth_data": auth, **generate("a b c")}
                reply = await request(worker.port, "POST", "/generate", body)
                assert reply.status == 200, reply
                worker.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(worker.proc.wait(), 15.0) == 0
        finally:
            await fake.stop()
            await scaler.stop()

    run(main())


async def _has_ready_report(scaler: LocalAutoscaler) -> bool:
    return any(r["max_perf"] > 0 for r in scaler.reports)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_PORT", "abc"),
        ("WORKER_PORT", "\u00b3"),  # "³".isdigit() is True, int("³") raises
        ("USE_SSL", "maybe"),
        ("REPORT_ADDR", "ftp://x"),
        ("LOG_LEVEL", "LOUD"),
        ("PUBKEY_FILE", "/nonexistent/key.pem"),
        ("CONTAINER_ID", "twelve"),
    ],
)
def test_bad_environment_exits_with_one_line(tmp_path: Path, name: str, value: str) -> None:
    # REPORT_ADDR on loopback: the failed-start report must not leave the machine
    done = subprocess.run(
        [sys.executable, str(WORKER_FILE)],
        cwd=tmp_path,
        env=child_env(**{"REPORT_ADDR": UNUSED_URL, name: value}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode != 0, output
    assert len(lines) == 1, output
    assert name in lines[0]


async def _failed_start(tmp_path: Path, **env: str) -> tuple[int, str, list[dict[str, Any]]]:
    """`python hello_world.py` that cannot start, reporting to a local autoscaler: its exit
    status, its output, and the reports the autoscaler got."""
    scaler = await LocalAutoscaler(signing_key()).start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_FILE),
            cwd=tmp_path,
            env=child_env(REPORT_ADDR=scaler.url, CONTAINER_ID="42", MASTER_TOKEN="tok", **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode is not None
        return proc.returncode, output.decode(errors="replace"), scaler.reports
    finally:
        await scaler.stop()


@pytest.mark.parametrize("case", ["bad environment", "port in use"])
def test_failed_start_is_reported_to_the_autoscaler(tmp_path: Path, case: str) -> None:
    # Guards issue 12 item 7: a worker that cannot start says why on the platform's console
    # (one report with error_msg) instead of "loading" for ever, then exits non-zero.
    async def main() -> None:
        holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        try:
            busy = str(holder.sockets[0].getsockname()[1])
            env = {"WORKER_PORT": "abc"} if case == "bad environment" else {"WORKER_PORT": busy}
            code, output, reports = await _failed_start(tmp_path, **env)
        finally:
            holder.close()
        assert code != 0, output
        assert len(reports) == 1, (reports, output)
        report = reports[0]
        assert set(report) == {"id", "mtoken", "version", "error_msg", "url"}
        assert report["id"] == 42 and report["mtoken"] == "tok" and report["version"] == "1.1.0"
        expected = "WORKER_PORT" if case == "bad environment" else "cannot start"
        assert expected in report["error_msg"], report

    run(main())


def test_unusable_pubkey_file_exits_non_zero(tmp_path: Path) -> None:
    pem = tmp_path / "garbage.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    env = {"PUBKEY_FILE": str(pem), "WORKER_PORT": str(free_port()), "REPORT_ADDR": UNUSED_URL}
    done = subprocess.run(
        [sys.executable, str(WORKER_FILE)],
        cwd=tmp_path,
        env=child_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0, output
    assert "Traceback" not in output, output


def test_stalled_autoscaler_does_not_slow_requests(tmp_path: Path) -> None:
    """Two workers on one fake model; one reports to a healthy autoscaler, the other to one
    that never answers. The same requests, interleaved, take about as long on both."""

    async def main() -> None:
        stalled = await StalledServer().start()
        stalled_conns = stalled.conns
        try:
            async with model_and_autoscaler(tmp_path) as (fake, scaler):
                healthy_vars = worker_vars(fake, scaler.url)
                hung_vars = worker_vars(fake, stalled.url)
                async with (
                    spawned_worker(tmp_path / "a", **healthy_vars) as healthy,
                    spawned_worker(tmp_path / "b", **hung_vars) as hung,
                ):
                    await healthy.wait_ready()
                    await hung.wait_ready()
                    await hung.until(
                        lambda: _has_connections(stalled_conns), 5.0, "a report attempt"
                    )
                    times: dict[int, list[float]] = {healthy.port: [], hung.port: []}
                    for i in range(40):
                        for w in (healthy, hung):
                            start = time.monotonic()
                            reply = await request(w.port, "POST", "/generate", generate(f"x {i}"))
                            times[w.port].append(time.monotonic() - start)
                            assert reply.status == 200
                        await asyncio.sleep(0.03)  # spread over > 1 s of report checks
                    base = statistics.median(times[healthy.port])
                    slow = statistics.median(times[hung.port])
                    assert slow <= 3 * base + 0.05, (base, slow)
                    assert max(times[hung.port]) < 1.0, times[hung.port]
                    assert stalled_conns, "the stalled autoscaler was never contacted"
                    # Shutdown's last report to it is bounded too: the worker still exits.
                    hung.proc.send_signal(signal.SIGTERM)
                    code = await asyncio.wait_for(hung.proc.wait(), 15.0)
                    assert code == 0, hung.tail()
        finally:
            await stalled.close()

    run(main(), timeout=60)


async def _has_connections(conns: list[asyncio.StreamWriter]) -> bool:
    return bool(conns)


def test_access_log_reaches_stdout_in_time_and_whole_at_exit(tmp_path: Path) -> None:
    """Under PYTHONUNBUFFERED=1 (child_env sets it) access lines are buffered by the worker's
    own handler: they still show up within about LOG_FLUSH_INTERVAL, one per request, in the
    usual format, and the ones still buffered at SIGTERM are written before the exit."""

    async def main() -> None:
        async with (
            model_and_autoscaler(tmp_path) as (fake, scaler),
            spawned_worker(tmp_path / "w", **worker_vars(fake, scaler.url)) as worker,
        ):
            await worker.wait_ready()
            for i in range(20):
                reply = await request(worker.port, "POST", "/generate", generate(f"w {i}"))
                assert reply.status == 200

            async def twenty_lines() -> bool:
                return worker.output().count("pyworker.access: /generate 200 ") >= 21

            await worker.until(twenty_lines, 3.0, "20 access lines")
            for i in range(5):  # then SIGTERM at once: these lines are still buffered
                reply = await request(worker.port, "POST", "/generate", generate(f"z {i}"))
                assert reply.status == 200
            worker.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.proc.wait(), 15.0) == 0
            text = worker.log_file.read_text()
        served = re.findall(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pyworker\.access: /generate 200 "
            r"workload=\d+ queue=\d+\.\d{3}s total=\d+\.\d{3}s$",
            text,
            re.MULTILINE,
        )
        # wait_ready()'s request and the test's 25 (the benchmark's are not access-logged).
        assert len(served) == 26, text[-3000:]
        assert text.rstrip().endswith("INFO pyworker: stopped"), text[-500:]

    run(main(), timeout=60)


def test_sigterm_lets_twenty_streams_finish(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            model_and_autoscaler(tmp_path, token_delay=0.08, tokens=16) as (fake, scaler),
            spawned_worker(tmp_path / "w", **worker_vars(fake, scaler.url)) as worker,
        ):
            await worker.wait_ready()
            conns: list[RawClient] = []
            try:
                for i in range(20):
                    client = await RawClient.connect(worker.port)
                    conns.append(client)
                    body = {"payload": {"prompt": f"tell me {i}", "max_response_tokens": 16}}
                    await client.send_request("POST", "/generate_stream", body, close=True)

                async def first(client: RawClient) -> bytes | None:
                    status, headers = await client.head()
                    assert status == 200 and headers["transfer-encoding"] == "chunked"
                    return await client.chunk_or_none()

                firsts = await asyncio.wait_for(asyncio.gather(*(first(c) for c in conns)), 10.0)
                assert all(firsts), "every stream started"
                worker.proc.send_signal(signal.SIGTERM)
                sigterm_at = time.monotonic()

                async def rest(client: RawClient) -> tuple[int, bool]:
                    count = 1
                    while (chunk := await client.chunk_or_none()) is not None:
                        if chunk == b"":
                            return count, True
                        count += chunk.count(b"data:")
                    return count, False

                results = await asyncio.wait_for(asyncio.gather(*(rest(c) for c in conns)), 15.0)
                assert results == [(16, True)] * 20, results
            finally:
                for client in conns:
                    await client.close()
            code = await asyncio.wait_for(worker.proc.wait(), 15.0)
            assert code == 0, worker.tail()
            assert fake.cancelled == 0
            # The autoscaler heard, before the exit, that nothing is in flight any more.
            assert scaler.report_times[-1] > sigterm_at
            assert scaler.reports[-1]["num_requests_working"] == 0
            assert scaler.reports[-1]["num_requests_recieved"] >= 20

    run(main())


def test_sigterm_stops_accepting_new_connections(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            model_and_autoscaler(tmp_path, token_delay=0.1, tokens=20) as (fake, scaler),
            spawned_worker(tmp_path / "w", **worker_vars(fake, scaler.url)) as worker,
        ):
            await worker.wait_ready()
            client = await RawClient.connect(worker.port)
            try:
                body = {"payload": {"prompt": "a long story", "max_response_tokens": 20}}
                await client.send_request("POST", "/generate_stream", body, close=True)
                assert (await client.head())[0] == 200
                worker.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)  # the stream is still going (2 s in all)
                assert worker.proc.returncode is None
                with pytest.raises(OSError):
                    await request(worker.port, "GET", "/ping", timeout=2.0)
                while (chunk := await asyncio.wait_for(client.chunk_or_none(), 5.0)) is not None:
                    if chunk == b"":
                        break
                assert chunk == b"", "the stream in flight ended with its last chunk"
            finally:
                await client.close()
            assert await asyncio.wait_for(worker.proc.wait(), 15.0) == 0

    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_ping(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)

    async def main() -> None:
        context = ssl.create_default_context(cafile=str(cert))
        async with model_and_autoscaler(tmp_path) as (fake, scaler):
            env = worker_vars(
                fake,
                scaler.url,
                USE_SSL="true",
                WORKER_SSL_CERT=str(cert),
                WORKER_SSL_KEY=str(key),
            )
            async with spawned_worker(tmp_path / "w", **env) as worker:

                async def ping() -> bool:
                    try:
                        reply = await request(
                            worker.port, "GET", "/ping", timeout=2.0, ssl_context=context
                        )
                    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                        return False
                    return (reply.status, reply.body) == (200, b"pong")

                await worker.until(ping, 10.0, "/ping over TLS")
                # Plain HTTP on the TLS port gets no HTTP answer.
                with pytest.raises((OSError, asyncio.IncompleteReadError, ValueError)):
                    await request(worker.port, "GET", "/ping", timeout=3.0)
                await worker.until(lambda: _has_ready_report(scaler), 15.0, "a ready load report")
                assert scaler.reports[-1]["url"] == f"https://127.0.0.1:{worker.port}"

    run(main())
