"""The worker's life with real files and real sockets (SPEC sections 5 to 8, issue 4).

A worker runs in-process on 127.0.0.1 beside test_load's FakeModel and LocalAutoscaler. The
model log is a real file the tests write slowly, in pieces, truncate and rotate; load reports
are the JSON bodies the local autoscaler recorded; requests go over raw sockets so that the
client side owes nothing to the code under test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import time
import tracemalloc
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    MODEL_ERROR,
    SEED_REPORT_FIELDS,
    RawClient,
    Rig,
    Runner,
    StalledServer,
    append,
    free_port,
    generate,
    hello_world_routes,
    model_log,
    request,
    signing_key,
    until,
    worker_rig,
)

import hello_world
import pyworker
from pyworker import Config, ConfigError, State
from test_load import FakeModel, LocalAutoscaler

LOADED = FakeModel.LOADED_LINE
ERROR_TEXT = MODEL_ERROR


run = Runner(timeout=30.0)


# A worker in-process #############################################################################


class FastHandler(hello_world.GenerateHandler):
    benchmark_runs = 2


class HealthHandler(FastHandler):
    healthcheck_endpoint = "/health"


class CountingModel(FakeModel):
    """A FakeModel that counts its healthchecks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.health_hits = 0

    async def _health(self, request: pyworker.Request) -> pyworker.Response:
        self.health_hits += 1
        return await super()._health(request)


def running_worker(
    tmp_path: Path,
    *,
    handler: pyworker.EndpointHandler[Any] | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[Rig]:
    """The rig, not waited for, UNSECURED, with quick reports and healthchecks: a FakeModel
    that writes its own log (loaded at once) unless `fake` is given, a LocalAutoscaler unless
    `report_addrs` are; `options` are worker_rig's (Config fields among them)."""
    settings: dict[str, Any] = {
        "ready": False,
        "unsecured": True,
        "report_check_interval": 0.1,
        "report_max_interval": 0.5,
        "report_timeout": 1.0,
        "healthcheck_interval": 0.2,
        "log_poll_interval": 0.05,
    }
    settings.update(options)
    return worker_rig(
        tmp_path,
        handler=handler or FastHandler(),
        routes=lambda backend: hello_world_routes(backend, FastHandler()),
        **settings,
    )


# Model log #######################################################################################


def test_log_created_late_and_written_in_pieces(tmp_path: Path) -> None:
    """The log does not exist when the worker starts; the loaded line arrives in three
    writes, and acts only once its newline is written."""

    async def main() -> None:
        log = model_log(tmp_path)
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            await asyncio.sleep(0.3)
            assert rig.backend.state is State.LOADING
            append(log, "2024-01-01 starting up\ninfer serv")
            await asyncio.sleep(0.2)
            append(log, "er has star")
            await asyncio.sleep(0.2)
            append(log, "ted on port 5001")  # the whole text, but no newline yet
            await asyncio.sleep(0.3)
            assert rig.backend.state is State.LOADING
            assert rig.fake.requests == []  # no benchmark yet
            append(log, "\n")
            await rig.wait_ready()

    run(main())


def test_log_truncated_is_read_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, logger="pyworker")
        log = model_log(tmp_path)
        append(log, "noise line number whatever\n" * 200)
        append(log, '{"message":"Downloading shard 1"}\n')
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            await until(lambda: "Downloading shard 1" in caplog.text, 5, "the old content")
            with open(log, "w") as f:  # truncate: the new content is shorter than the old
                f.write(f"{LOADED}\n")
            await rig.wait_ready()

    run(main())


def test_log_rotated_by_rename_and_new_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, logger="pyworker")
        log = model_log(tmp_path)
        append(log, "old log line\n" * 100 + '{"message":"Downloading shard 1"}\n')
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            await until(lambda: "Downloading shard 1" in caplog.text, 5, "the old content")
            os.rename(log, tmp_path / "model.log.1")
            await asyncio.sleep(0.2)
            append(log, f"fresh\n{LOADED}\n")
            await rig.wait_ready()
            # What the old file gets after the rotation is no longer followed.
            append(tmp_path / "model.log.1", f"{ERROR_TEXT}\n")
            await asyncio.sleep(0.3)
            assert rig.backend.state is State.READY

    run(main())


def test_rotation_within_one_poll_keeps_the_old_files_last_lines(tmp_path: Path) -> None:
    """Guards a lost line: the loaded line lands in the old file just before it is rotated,
    within one poll; the tail must finish the old file before it follows the new one."""

    async def main() -> None:
        log = model_log(tmp_path)
        append(log, "starting\n")
        async with running_worker(tmp_path, fake=FakeModel(), log_poll_interval=0.5) as rig:
            await asyncio.sleep(0.7)  # the first lines were read; the tail now sleeps
            append(log, f"{LOADED}\n")
            os.rename(log, tmp_path / "model.log.1")
            append(log, "fresh file\n")
            await rig.wait_ready()
            assert rig.backend.state is State.READY

    run(main())


def test_unreadable_log_path_is_reported_once_and_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards a silent death of the log tail: an OSError other than 'not found' (here the
    path runs through a regular file) is logged once, and the tail keeps trying."""

    async def main() -> None:
        caplog.set_level(logging.INFO, logger="pyworker")
        (tmp_path / "afile").write_text("not a directory\n")
        bad = str(tmp_path / "afile" / "model.log")
        async with running_worker(tmp_path, fake=FakeModel(), model_log=bad) as rig:
            await asyncio.sleep(0.6)  # a dozen polls
            warnings = [r for r in caplog.records if "cannot read the model log" in r.message]
            assert len(warnings) == 1, [r.message for r in warnings]
            assert rig.backend.state is State.LOADING
            assert rig.backend.error_msg == ""  # the tail did not die (that would error it)

    run(main())


def test_loaded_line_repeated_benchmarks_once(tmp_path: Path) -> None:
    async def main() -> None:
        log = model_log(tmp_path)
        append(log, f"{LOADED}\n{LOADED}\n")
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            await rig.wait_ready()
            expected = 1 + rig.backend.benchmark_runs * 10  # warm-up + rounds of 10
            assert len(rig.fake.requests) == expected
            append(log, f"{LOADED} again\n")
            await asyncio.sleep(0.5)
            assert rig.backend.state is State.READY
            assert len(rig.fake.requests) == expected
            await until(lambda: len(rig.reports) >= 3, 5, "three load reports")
            assert sum(1 for r in rig.reports if r["loadtime"] != 0) == 1

    run(main())


def test_model_error_is_sticky_and_reported(tmp_path: Path) -> None:
    async def main() -> None:
        log = model_log(tmp_path)
        append(log, f"{ERROR_TEXT}: shard 3 checksum mismatch\n")
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            await until(lambda: rig.backend.state is State.ERRORED, 5, "errored")
            assert "shard 3 checksum mismatch" in rig.backend.error_msg
            append(log, f"{LOADED}\n")
            await asyncio.sleep(0.4)
            assert rig.backend.state is State.ERRORED
            assert rig.fake.requests == []  # no benchmark for an errored model
            reply = await request(rig.port, "POST", "/generate", generate("hi"))
            assert reply.status == 503
            assert "shard 3 checksum mismatch" in reply.json()["error"]
            n = len(rig.reports)
            await until(lambda: len(rig.reports) > n, 3, "a load report")
            assert "shard 3 checksum mismatch" in rig.reports[-1]["error_msg"]

    run(main())


def test_model_error_after_ready_is_sticky(tmp_path: Path) -> None:
    async def main() -> None:
        log = model_log(tmp_path)
        async with running_worker(tmp_path) as rig:
            await rig.wait_ready()
            append(log, f"{ERROR_TEXT} (out of memory)\n")
            await until(lambda: rig.backend.state is State.ERRORED, 5, "errored")
            append(log, f"{LOADED}\n")
            await asyncio.sleep(0.3)
            assert rig.backend.state is State.ERRORED
            assert "out of memory" in rig.backend.error_msg

    run(main())


def test_info_lines_are_echoed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        caplog.set_level(logging.INFO, logger="pyworker")
        log = model_log(tmp_path)
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            append(log, "unrelated chatter 1234\n")
            append(log, '{"level":"info","message":"Downloading shard 7 of 9"}\n')
            await until(lambda: "Downloading shard 7 of 9" in caplog.text, 5, "the echo")
            assert "unrelated chatter 1234" not in caplog.text
            assert rig.backend.state is State.LOADING

    run(main())


def test_huge_line_without_newline_is_bounded(tmp_path: Path) -> None:
    """A 10 MB line with no newline neither crashes the tail nor gets buffered whole."""

    async def main() -> None:
        log = model_log(tmp_path)
        megabyte = b"x" * (1 << 20)
        async with running_worker(tmp_path, fake=FakeModel()) as rig:
            rig.cache.write_text("100\n")
            tracemalloc.start()
            try:
                for _ in range(10):
                    with open(log, "ab") as f:
                        f.write(megabyte)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                assert rig.backend.state is State.LOADING
                append(log, f"\nnext line\n{LOADED}\n")
                await rig.wait_ready(timeout=20)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 8 * (1 << 20), f"peak {peak} bytes while tailing a 10 MB line"
            ping = await request(rig.port, "GET", "/ping")
            assert ping.status == 200

    run(main())


def test_huge_line_outcome_does_not_depend_on_write_timing(tmp_path: Path) -> None:
    """A 100 KB line whose error text sits past the first 64 KiB: written at once or in two
    pieces, the log holds the same bytes, so the worker must end in the same state. (Guards
    against the tail treating the rest of an over-long line as a new line.)"""
    line_start = "y" * 100_000

    async def outcome(workdir: Path, pieces: list[str]) -> State:
        os.makedirs(workdir)
        log = model_log(workdir)
        async with running_worker(workdir, fake=FakeModel()) as rig:
            for piece in pieces:
                append(log, piece)
                await asyncio.sleep(0.3)
            append(log, "marker line\n")
            await asyncio.sleep(0.3)
            return rig.backend.state

    async def main() -> None:
        tail = f" {ERROR_TEXT}\n"
        whole = await outcome(tmp_path / "whole", [line_start + tail])
        pieces = await outcome(tmp_path / "pieces", [line_start, tail])
        assert whole == pieces, (whole, pieces)

    run(main())


# Benchmark #######################################################################################


def test_benchmark_uses_cached_number(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_worker(tmp_path, cached_max_perf=123.5) as rig:
            await rig.wait_ready()
            await asyncio.sleep(0.3)
            assert rig.backend.max_perf == 123.5
            assert len(rig.fake.requests) == 1  # the warm-up only
            await until(lambda: bool(rig.reports), 3, "a load report")
            assert rig.reports[-1]["max_perf"] == 123.5

    run(main())


THIS_FILE = os.path.abspath(__file__)
OTHER_WORKER = '{"max_perf": 8832.0, "worker": "/elsewhere/hello_world.py", "route": "/generate"}'


# A bare number is an older cache's, nobody knows whose; OTHER_WORKER is another worker's
# figure (the 8,832 that a vLLM worker once took from hello_world's cache for its own 504).
@pytest.mark.parametrize(
    "cached", [None, "not a number", "", "-5", "nan", "123.5", '{"max_perf": -1}', OTHER_WORKER]
)
def test_benchmark_rounds_of_ten(tmp_path: Path, cached: str | None) -> None:
    async def main() -> None:
        if cached is not None:
            (tmp_path / ".has_benchmark").write_text(cached)
        fake = FakeModel(log_path=str(model_log(tmp_path)), json_delay=0.05)
        async with running_worker(tmp_path, fake=fake) as rig:
            await rig.wait_ready()
            requests = rig.fake.requests
            assert len(requests) == 1 + 2 * 10
            assert rig.fake.max_active == 10
            workload = sum(hello_world.count_tokens(r["prompt"]) for r in requests[1:11])
            # A round of 10 takes at least json_delay: its throughput is at most this.
            assert 0 < rig.backend.max_perf <= workload / 0.05 * 1.5
            saved = json.loads(rig.cache.read_text())
            assert math.isclose(saved["max_perf"], rig.backend.max_perf)
            assert saved["route"] == "/generate" and saved["model"] == rig.fake.url
            assert saved["worker"] == THIS_FILE  # the handler's worker file

    run(main())


def test_benchmark_cache_off(tmp_path: Path) -> None:
    # BENCHMARK_CACHE=off: measured at every start, nothing written
    async def main() -> None:
        async with running_worker(tmp_path, benchmark_cache=None) as rig:
            await rig.wait_ready()
            assert len(rig.fake.requests) == 1 + 2 * 10
            assert not rig.cache.exists()

    run(main())
    assert not any(p.name.startswith(".has") for p in tmp_path.iterdir())


def test_benchmark_cache_environment() -> None:
    assert Config.from_env({"BENCHMARK_CACHE": "off"}).benchmark_cache is None
    assert Config.from_env({"BENCHMARK_CACHE": "/tmp/x.json"}).benchmark_cache == "/tmp/x.json"
    assert Config.from_env({}).benchmark_cache == ".has_benchmark"


def test_benchmark_one_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(model_log(tmp_path)), json_delay=0.02, one_at_a_time=True)
        async with running_worker(tmp_path, fake=fake, parallel=False) as rig:
            await rig.wait_ready()
            assert len(rig.fake.requests) == 1 + 2
            assert rig.fake.max_active == 1
            assert rig.backend.max_perf > 0

    run(main())


def test_benchmark_counts_only_successful_requests(tmp_path: Path) -> None:
    """The model takes one request at a time and answers 500 to the others: a round of 10
    has one success, and only its workload counts."""

    async def main() -> None:
        fake = FakeModel(log_path=str(model_log(tmp_path)), json_delay=0.05, one_at_a_time=True)
        async with running_worker(tmp_path, fake=fake) as rig:
            await rig.wait_ready()
            assert len(rig.fake.requests) == 21
            biggest = max(hello_world.count_tokens(r["prompt"]) for r in rig.fake.requests)
            # One success of at most `biggest` per round of at least json_delay.
            assert 0 < rig.backend.max_perf <= biggest / 0.05 * 1.2

    run(main())


def test_benchmark_all_failing_errors_the_worker(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(model_log(tmp_path)), fail_status=500)
        async with running_worker(tmp_path, fake=fake) as rig:
            await until(lambda: rig.backend.state is State.ERRORED, 5, "errored")
            assert "benchmark" in rig.backend.error_msg
            assert len(rig.fake.requests) == 21
            assert not rig.cache.exists()
            n = len(rig.reports)
            await until(lambda: len(rig.reports) > n, 3, "a load report")
            assert rig.reports[-1]["error_msg"] == rig.backend.error_msg
            assert rig.reports[-1]["loadtime"] == 0

    run(main())


# Healthcheck #####################################################################################


def test_healthcheck_failure_after_success_errors(tmp_path: Path) -> None:
    async def main() -> None:
        fake = CountingModel(log_path=str(model_log(tmp_path)))
        async with running_worker(tmp_path, fake=fake, handler=HealthHandler()) as rig:
            await rig.wait_ready()
            await until(lambda: fake.health_hits >= 2, 3, "two healthchecks")
            assert rig.backend.state is State.READY
            fake.healthy = False
            await until(lambda: rig.backend.state is State.ERRORED, 3, "errored")
            assert "healthcheck" in rig.backend.error_msg
            fake.healthy = True
            await asyncio.sleep(0.5)
            assert rig.backend.state is State.ERRORED  # sticky

    run(main())


def test_healthcheck_never_healthy_is_never_ready(tmp_path: Path) -> None:
    # Today's platform (SPEC 11.6): a health endpoint's first 200 gates readiness. Never
    # healthy -> never ready, and errored once health_start_timeout passed since loading.
    async def main() -> None:
        fake = CountingModel(log_path=str(model_log(tmp_path)))
        fake.healthy = False
        handler = HealthHandler()
        async with running_worker(
            tmp_path, fake=fake, handler=handler, health_start_timeout=1.0
        ) as rig:
            await until(lambda: fake.health_hits >= 3, 3, "three healthchecks")
            assert rig.backend.state is State.BENCHMARKING  # benchmarked, waiting for health
            await until(lambda: rig.backend.state is State.ERRORED, 5, "errored")
            assert "not healthy" in rig.backend.error_msg

    run(main())


def test_healthcheck_one_failure_is_not_fatal(tmp_path: Path) -> None:
    # A busy model answering its health route badly once must not lose its worker.
    async def main() -> None:
        fake = CountingModel(log_path=str(model_log(tmp_path)))
        async with running_worker(tmp_path, fake=fake, handler=HealthHandler()) as rig:
            await rig.wait_ready()
            fake.healthy = False
            hits = fake.health_hits
            await until(lambda: fake.health_hits >= hits + 1, 3, "one failed healthcheck")
            fake.healthy = True
            hits = fake.health_hits
            await until(lambda: fake.health_hits >= hits + 4, 5, "four more healthchecks")
            assert rig.backend.state is State.READY

    run(main())


# Load reports ####################################################################################


def test_report_fields_and_types(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_worker(tmp_path, container_id=42) as rig:
            await rig.wait_ready()
            reply = await request(rig.port, "POST", "/generate", generate("one two three"))
            assert reply.status == 200
            await until(lambda: len(rig.reports) >= 2, 3, "two load reports")
        assert rig.autoscaler is not None
        for report in rig.autoscaler.reports:
            assert set(report) == SEED_REPORT_FIELDS
            assert type(report["id"]) is int and report["id"] == 42
            for name in ("loadtime", "cur_load", "max_perf", "cur_perf", "additional_disk_usage"):
                assert type(report[name]) in (int, float), name
                assert report[name] >= 0, name
            for name in ("cur_capacity", "max_capacity"):
                assert type(report[name]) is int and report[name] == 0, name
            for name in ("num_requests_working", "num_requests_recieved"):
                assert type(report[name]) is int and report[name] >= 0, name
            assert type(report["error_msg"]) is str and report["error_msg"] == ""
            assert report["url"] == rig.backend.config.public_url
        last = rig.autoscaler.reports[-1]
        assert last["num_requests_recieved"] == 1
        assert last["max_perf"] == rig.backend.max_perf > 0

    run(main())


def test_loadtime_nonzero_exactly_once(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(model_log(tmp_path)), load_time=0.4)
        async with running_worker(tmp_path, fake=fake, report_max_interval=0.3) as rig:
            await rig.wait_ready()
            await until(lambda: len(rig.reports) >= 6, 5, "six load reports")
            loadtimes = [r["loadtime"] for r in rig.reports]
            nonzero = [t for t in loadtimes if t != 0]
            assert len(nonzero) == 1, loadtimes
            assert 0.4 <= nonzero[0] < 5.0
            # Sent non-zero in the first report after ready, never before.
            assert all(r["max_perf"] == 0 for r in rig.reports[: loadtimes.index(nonzero[0])])

    run(main())


def test_two_autoscalers_each_get_loadtime_once(tmp_path: Path) -> None:
    async def main() -> None:
        first = await LocalAutoscaler(signing_key()).start()
        second = await LocalAutoscaler(signing_key()).start()
        try:
            addrs = [first.url, second.url]
            async with running_worker(tmp_path, report_addrs=addrs, report_max_interval=0.3):
                await until(
                    lambda: len(first.reports) >= 5 and len(second.reports) >= 5,
                    5,
                    "five reports at each autoscaler",
                )
            for scaler in (first, second):
                loadtimes = [r["loadtime"] for r in scaler.reports]
                assert sum(1 for t in loadtimes if t != 0) == 1, loadtimes
        finally:
            await first.stop()
            await second.stop()

    run(main())


def test_loadtime_survives_an_autoscaler_outage(tmp_path: Path) -> None:
    """The autoscaler is down when the worker becomes ready: the non-zero loadtime is not
    spent on a failed send; it goes out once the autoscaler is back."""

    async def main() -> None:
        port = free_port()
        async with running_worker(tmp_path, report_addrs=[f"http://127.0.0.1:{port}"]) as rig:
            await rig.wait_ready()
            await asyncio.sleep(0.5)  # report attempts fail meanwhile
            scaler = await LocalAutoscaler(signing_key()).start(port)
            try:
                await until(lambda: len(scaler.reports) >= 3, 8, "three load reports")
                loadtimes = [r["loadtime"] for r in scaler.reports]
                assert loadtimes[0] > 0 and loadtimes[1:] == [0] * (len(loadtimes) - 1)
            finally:
                await scaler.stop()

    run(main())


def test_report_url_from_environment(tmp_path: Path) -> None:
    env = {"WORKER_PORT": "3456", "PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_3456": "41234"}
    assert Config.from_env(env).public_url == "http://203.0.113.7:41234"
    assert Config.from_env({**env, "USE_SSL": "true"}).public_url == "https://203.0.113.7:41234"
    assert Config.from_env({"WORKER_PORT": "3456"}).public_url == "http://127.0.0.1:3456"
    assert Config.from_env({}).public_url == "http://127.0.0.1:3000"
    # VAST_TCP_PORT_<port> of another port is not ours.
    other = {"WORKER_PORT": "3456", "PUBLIC_IPADDR": "198.51.100.1", "VAST_TCP_PORT_3000": "1"}
    assert Config.from_env(other).public_url == "http://198.51.100.1:3456"

    async def main() -> None:
        config = Config.from_env({**env, "CONTAINER_ID": "777"})
        async with running_worker(tmp_path, base=config) as rig:
            await until(lambda: bool(rig.reports), 3, "a load report")
            assert rig.reports[-1]["url"] == "http://203.0.113.7:41234"
            assert rig.reports[-1]["id"] == 777

    run(main())


def test_report_cadence(tmp_path: Path) -> None:
    """Idle: a report every report_max_interval (1 s). A finished request: a report at the
    next check (0.1 s), not at the next interval."""

    async def main() -> None:
        async with running_worker(tmp_path, report_max_interval=1.0) as rig:
            await rig.wait_ready()
            assert rig.autoscaler is not None
            times = rig.autoscaler.report_times
            await until(lambda: any(r["loadtime"] for r in rig.reports), 3, "loadtime report")
            first = len(times)
            await until(lambda: len(times) >= first + 2, 4, "two idle reports")
            gaps = [b - a for a, b in zip(times[first - 1 :], times[first:])]
            assert all(0.85 <= g <= 1.6 for g in gaps), gaps
            # Right after an idle report, a request: its report comes well before 1 s.
            n = len(times)
            await until(lambda: len(times) > n, 2, "an idle report")
            await asyncio.sleep(0.1)
            n = len(times)
            reply = await request(rig.port, "POST", "/generate", generate("a b c"))
            done = time.monotonic()
            assert reply.status == 200
            await until(lambda: len(times) > n, 2, "a report after the request")
            assert times[n] - done < 0.5
            assert rig.reports[n]["num_requests_recieved"] == 1

    run(main())


def test_report_cadence_with_one_stalled_autoscaler(tmp_path: Path) -> None:
    """REPORT_ADDR names two autoscalers and the first never answers: the second still gets
    its reports on the cadence (at most report_max_interval apart), not only after every
    timeout and retry towards the first."""

    async def main() -> None:
        stalled = await StalledServer().start()
        scaler = await LocalAutoscaler(signing_key()).start()
        try:
            addrs = [stalled.url, scaler.url]
            async with running_worker(tmp_path, report_addrs=addrs, report_max_interval=1.0) as rig:
                await rig.wait_ready()
                await until(lambda: bool(stalled.conns), 3, "a report attempt to the stalled one")
                start = time.monotonic()
                await asyncio.sleep(3.0)
                times = [start, *(t for t in scaler.report_times if t > start), time.monotonic()]
                gaps = [b - a for a, b in itertools.pairwise(times)]
                assert max(gaps) <= 2.0, gaps
                # Gone before the worker stops: its last report is refused at once instead of
                # waiting out report_timeout (what this test is about is behind us).
                await stalled.close()
        finally:
            await scaler.stop()
            await stalled.close()

    run(main())


def test_workload_figures_survive_an_autoscaler_outage(tmp_path: Path) -> None:
    """A known sequence while the autoscaler is down: 2 served, 1 errored (model 500), 1
    cancelled (client left mid-stream), 1 still in flight, 1 rejected (422, never received).
    The first report after the autoscaler is back holds all of it: nothing was reset by the
    failed sends."""

    async def main() -> None:
        fake = FakeModel(log_path=str(model_log(tmp_path)), token_delay=0.3)
        served_prompts = ["alpha beta gamma", "one two three four five"]
        errored_prompt = "a b c d e f g"
        stream_prompts = {"cancelled": "k " * 11, "in_flight": "z " * 13}
        tokens = hello_world.count_tokens
        assert [tokens(p) for p in served_prompts] == [3, 5]
        assert tokens(errored_prompt) == 7
        assert [tokens(p) for p in stream_prompts.values()] == [11, 13]
        async with running_worker(tmp_path, fake=fake) as rig:
            scaler = rig.autoscaler
            assert scaler is not None
            await rig.wait_ready()
            await until(lambda: any(r["loadtime"] for r in scaler.reports), 3, "loadtime")
            port = scaler.port
            await scaler.stop()  # the autoscaler goes down
            t0 = scaler.report_times[-1]
            streams: list[RawClient] = []
            try:
                for prompt in served_prompts:
                    reply = await request(rig.port, "POST", "/generate", generate(prompt))
                    assert reply.status == 200
                fake.fail_status = 500
                reply = await request(rig.port, "POST", "/generate", generate(errored_prompt))
                fake.fail_status = None
                assert reply.status == 500
                bad = await request(rig.port, "POST", "/generate", {"payload": {"prompt": 5}})
                assert bad.status == 422
                for prompt in stream_prompts.values():
                    client = await RawClient.connect(rig.port)
                    streams.append(client)
                    body = {"payload": {"prompt": prompt, "max_response_tokens": 16}}
                    await client.send_request("POST", "/generate_stream", body, close=True)
                    status, _ = await client.head()
                    assert status == 200
                    assert await client.chunk()  # the first token
                await streams.pop(0).close()  # the client of the "cancelled" stream leaves
                await until(lambda: rig.backend.metrics.cancelled.requests == 1, 2, "cancel")
                sequence_end = time.monotonic()
                # Failed sends take a few report_backoff (REPORT_BACKOFF) of retries: let the
                # ones that began during the sequence fail before the autoscaler comes back.
                await asyncio.sleep(0.5)
                back = await LocalAutoscaler(signing_key()).start(port)
                try:
                    await until(lambda: bool(back.reports), 5, "a report after the outage")
                    report, t1 = back.reports[0], back.report_times[0]
                finally:
                    await back.stop()
            finally:
                for client in streams:
                    await client.close()
        assert report["num_requests_recieved"] == 5
        assert report["num_requests_working"] == 1
        received = 3 + 5 + 7 + 13  # served, errored and in flight; not the cancelled 11
        served = 3 + 5
        assert report["cur_load"] > 0
        assert math.isclose(report["cur_perf"] / report["cur_load"], served / received)
        window = received / report["cur_load"]  # the report's window, implied
        assert sequence_end - t0 - 0.05 <= window <= t1 - t0 + 0.2, (window, t0, t1)

    run(main(), timeout=40)


# Public key ######################################################################################


def test_pubkey_fetched_in_background_from_a_late_autoscaler(tmp_path: Path) -> None:
    async def main() -> None:
        key = signing_key()
        port = free_port()
        addr = f"http://127.0.0.1:{port}"
        async with running_worker(tmp_path, report_addrs=[addr], unsecured=False) as rig:
            ping = await request(rig.port, "GET", "/ping")
            assert (ping.status, ping.body) == (200, b"pong")
            await until(lambda: rig.backend.state is State.READY, 10, "the model to be ready")
            url = f"http://127.0.0.1:{rig.port}"
            signed = {
                "auth_data": key.sign_auth(cost=3, endpoint="local", reqnum=1, url=url),
                "payload": {"prompt": "a b c", "max_response_tokens": 4},
            }
            reply = await request(rig.port, "POST", "/generate", signed)
            assert reply.status == 503
            assert reply.json()["error"] == "no public key yet"
            scaler = await LocalAutoscaler(key).start(port)
            try:
                await until(lambda: rig.backend.pubkey is not None, 8, "the public key")
                reply = await request(rig.port, "POST", "/generate", signed)
                assert reply.status == 200, reply.body
                forged = dict(signed, auth_data=dict(signed["auth_data"], reqnum=2))
                reply = await request(rig.port, "POST", "/generate", forged)
                assert reply.status == 401
            finally:
                await scaler.stop()

    run(main())


# /metrics ########################################################################################

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, loosely: every line a comment or `name{labels} value`."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            typed.add(name)
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed or name in typed, line
        samples[name + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_metrics_prometheus_counters_move(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_worker(tmp_path) as rig:
            await rig.wait_ready()
            reply = await request(rig.port, "GET", "/metrics")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
            before = parse_metrics(reply.body.decode())
            for prompt in ("a b", "c d e"):
                assert (
                    await request(rig.port, "POST", "/generate", generate(prompt))
                ).status == 200
            bad = await request(rig.port, "POST", "/generate", {"payload": {}})
            assert bad.status == 422
            after = parse_metrics((await request(rig.port, "GET", "/metrics")).body.decode())
        ok = 'pyworker_requests_total{route="/generate",status="200"}'
        rejected = 'pyworker_requests_total{route="/generate",status="422"}'
        assert after[ok] - before.get(ok, 0) == 2
        assert after[rejected] - before.get(rejected, 0) == 1
        assert after["pyworker_requests_in_flight"] == 0
        assert after['pyworker_state{state="ready"}'] == 1
        assert after["pyworker_max_perf"] > 0

    run(main())


# Configuration ###################################################################################


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_PORT", "abc"),
        ("WORKER_PORT", "70000"),
        ("WORKER_PORT", "\u00b3"),  # str.isdigit() accepts "³"; int() does not
        ("WORKER_PORT", "0x10"),
        ("USE_SSL", "maybe"),
        ("UNSECURED", "sure"),
        ("REPORT_ADDR", "ftp://x"),
        ("MODEL_SERVER_URL", "localhost:5001"),
        ("LOG_LEVEL", "LOUD"),
        ("PUBKEY_FILE", "/nonexistent/pubkey.pem"),
        ("CONTAINER_ID", "-1"),
        ("VAST_TCP_PORT_3000", "x"),
    ],
)
def test_config_rejects_bad_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_config_reads_good_values(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text(signing_key().public_pem())
    env = {
        "WORKER_PORT": "3001",
        "REPORT_ADDR": "http://127.0.0.1:8081/, https://example.test",
        "CONTAINER_ID": "12",
        "USE_SSL": "true",
        "UNSECURED": "false",
        "PUBKEY_FILE": str(pem),
        "LOG_LEVEL": "debug",
        "MODEL_LOG": "/tmp/model.log",
        "MODEL_SERVER_URL": "http://127.0.0.1:5001",
    }
    config = Config.from_env(env)
    assert config.worker_port == 3001
    assert config.report_addrs == ["http://127.0.0.1:8081", "https://example.test"]
    assert (config.container_id, config.use_ssl, config.unsecured) == (12, True, False)
    assert (config.pubkey_file, config.log_level) == (str(pem), "DEBUG")
    assert config.model_log == "/tmp/model.log"
    assert config.model_server_url == "http://127.0.0.1:5001"
    assert config.public_url == "https://127.0.0.1:3001"
    assert Config.from_env({}).report_addrs == ["https://run.vast.ai"]


def test_disk_used_is_the_filesystem_figure_shutil_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    ours = pyworker._disk_used()  # pyright: ignore[reportPrivateUsage]
    theirs = shutil.disk_usage(".").used
    assert ours > 0
    assert abs(ours - theirs) <= 64 * 1024 * 1024  # other programs write meanwhile
