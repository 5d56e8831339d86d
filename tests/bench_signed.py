"""bench_signed: a signed /generate with today's repeated `url` signature, against unsigned.

    python tests/bench_signed.py [--pairs 5] [--seconds 5]

Alternates the two, `--pairs` times: `hello_world.py` UNSECURED, then `hello_world.py` with
PUBKEY_FILE, each loaded by wrk with the SAME body (a `url`-layout auth_data with a
request_idx, signed with tests/data/test_key.pem), against ../shared/bench/fake_model.py. It
prints each run's requests/s and the worker's CPU microseconds per request, then the medians
and their ratios. Alternating and taking medians is the point: on these shared machines one
pair of runs moves by 20% either way (tests/bench_worker.py measures each case once).

Needs wrk (apt-get install wrk). Only loopback; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from support import load_private_key  # noqa: E402

FAKE_MODEL = ROOT.parent / "shared" / "bench" / "fake_model.py"
URL = "http://127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signed_body() -> str:
    """The body today's platform's client sends: the /route/ answer as auth_data, signed in the
    `url` layout (SPEC 11.2), the same on every request to this worker."""
    key = load_private_key("test_key.pem")
    message = json.dumps({"url": URL}, indent=4, sort_keys=True).encode()
    auth = {
        "cost": "20",
        "endpoint": "bench",
        "reqnum": 1,
        "url": URL,
        "request_idx": 1,
        "signature": base64.b64encode(key.sign(message)).decode(),
    }
    payload = {"prompt": "tell me about cats and dogs please", "max_response_tokens": 20}
    return json.dumps({"auth_data": auth, "payload": payload})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(lua: Path, port: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds}s",
            "-s",
            str(lua),
            f"http://127.0.0.1:{port}/generate",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rate = float(out.split("Requests/sec:")[1].split()[0])
    requests = int(out.split(" requests in ")[0].split()[-1])
    return rate, requests


def one_run(
    signed: bool, model_url: str, tmp: Path, lua: Path, seconds: int
) -> tuple[float, float]:
    """(requests/s, worker CPU us per request) of one worker process under wrk."""
    port = free_port()
    log = tmp / "model.log"
    log.write_text("infer server has started\n")
    env = {
        **os.environ,
        "WORKER_PORT": str(port),
        "WORKER_HOST": "127.0.0.1",
        "MODEL_SERVER_URL": model_url,
        "MODEL_LOG": str(log),
        "REPORT_ADDR": "http://127.0.0.1:9",
        "BENCHMARK_CACHE": "off",
        "PYTHONPATH": str(ROOT),
    }
    if signed:
        env["PUBKEY_FILE"] = str(HERE / "data" / "test_key.pub.pem")
    else:
        env["UNSECURED"] = "true"
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "hello_world.py")],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                    if b"ready" in r.read():
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the worker did not become ready")
        wrk(lua, port, 2)  # warm-up
        before = cpu_seconds(worker.pid)
        rate, requests = wrk(lua, port, seconds)
        return rate, (cpu_seconds(worker.pid) - before) / requests * 1e6
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench_signed: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    model_port = free_port()
    model = subprocess.Popen(
        [sys.executable, str(FAKE_MODEL), str(model_port), "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    try:
        time.sleep(1.0)
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory)
            lua = tmp / "signed.lua"
            lua.write_text(
                'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(signed_body())}\n"
            )
            for pair in range(args.pairs):
                for signed in (False, True):
                    rate, cpu = one_run(
                        signed, f"http://127.0.0.1:{model_port}", tmp, lua, args.seconds
                    )
                    results[signed].append((rate, cpu))
                    name = "signed (url)" if signed else "unsigned"
                    print(f"pair {pair + 1}  {name:<13} {rate:>9,.0f} req/s  {cpu:6.1f} CPU us/req")
    finally:
        model.terminate()
        model.wait(timeout=30)
    rate = {s: statistics.median(r for r, _ in results[s]) for s in results}
    cpu = {s: statistics.median(c for _, c in results[s]) for s in results}
    print(
        f"medians: unsigned {rate[False]:,.0f} req/s {cpu[False]:.1f} us; "
        f"signed {rate[True]:,.0f} req/s {cpu[True]:.1f} us; "
        f"signed/unsigned {rate[True] / rate[False]:.2f}x by rate, "
        f"{cpu[False] / cpu[True]:.2f}x by CPU (goal >= 0.9x, issue 12)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
