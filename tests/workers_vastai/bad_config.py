"""A worker file of today's vastai form with a mistake picked by BAD_CASE; it must stop at
start with one line. Used by tests/test_compat_vastai.py."""

import os
from typing import Any

from pyworker import BenchmarkConfig, HandlerConfig, Worker, WorkerConfig

BENCH = BenchmarkConfig(dataset=[{"prompt": "hi"}])


async def remote(**params: object) -> dict[str, Any]:
    return {}


CASES = {
    "two_benchmarks": [
        HandlerConfig(route="/a", benchmark_config=BENCH),
        HandlerConfig(route="/b", benchmark_config=BENCH),
    ],
    "no_benchmark": [HandlerConfig(route="/a"), HandlerConfig(route="/b")],
    "no_handlers": [],
    "remote_function": [HandlerConfig(route="/a", benchmark_config=BENCH, remote_function=remote)],
    "remote_dispatch": [HandlerConfig(route="/a", benchmark_config=BENCH, is_remote_dispatch=True)],
    "empty_benchmark": [HandlerConfig(route="/a", benchmark_config=BenchmarkConfig())],
}


case = os.environ["BAD_CASE"]
Worker(WorkerConfig(model_server_port=5001, handlers=CASES[case])).run()
