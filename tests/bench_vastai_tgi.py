"""bench_vastai_tgi: the platform's own tgi example worker on vastai 1.9.1 and on pyworker.

    python tests/bench_vastai_tgi.py [TGI_WORKER_FILE] [--repeat 3] [--seconds 5]
        [--vastai-python /work/vastvenv/bin/python]

TGI_WORKER_FILE is vast-sdk's examples/server/tgi_worker.py (downloaded from GitHub when not
given). The file runs twice in one run: as it is on vastai 1.9.1 (the side venv's python),
and as a copy made here with its one import line changed to `from pyworker import ...`, on
this interpreter. Nothing else in the file changes; what it needs around it is provided:

- `nltk`: a stand-in package on PYTHONPATH (nltk.download() does nothing, words() is a short
  list): no network here, and the words do not change what is measured.
- MODEL_LOG_FILE "/workspace/infer.log": vastai has no override, so the file is created
  (and /workspace with it, when missing; both removed at the end if this script made them);
  pyworker is given MODEL_LOG=<temp dir>/infer.log, its documented override.
- port 5001: the fake TGI server listens there (the file's model URL, http://0.0.0.0:5001,
  for both workers); the run stops if something else holds the port.
- the autoscaler: a local one serving /pubkey/, /worker_status/ and /delete_requests/.

Both workers check signatures (SECURED): every request carries today's auth_data, the `url`
layout signed with tests/data/test_key.pem, with a request_idx. Both log as shipped (vastai
logs every request at DEBUG; pyworker its access log at INFO). wrk (-t1 -c32) loads
/generate (TGI JSON) and /generate_stream (TGI SSE, 16 tokens) of each worker in turn,
`--repeat` times; the script prints each run's requests/s, the medians, and pyworker/vastai.

Needs wrk (apt-get install wrk) and a venv holding vastai 1.9.1. Only loopback; every
process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Generator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from support import load_private_key  # noqa: E402

TGI_WORKER_URL = (
    "https://raw.githubusercontent.com/vast-ai/vast-sdk/main/examples/server/tgi_worker.py"
)
IMPORT_LINE = "from vastai import "
MODEL_PORT = 5001  # the file's MODEL_SERVER_PORT
WORKSPACE_LOG = Path("/workspace/infer.log")  # the file's MODEL_LOG_FILE
LOADED_LINE = '{"message":"Connected","target":"text_generation_router"}'  # one of its on_load
STREAM_TOKENS = 16
ROUTES = ("/generate", "/generate_stream")

NLTK_STANDIN = '''"""A stand-in for nltk: what tgi_worker.py uses of it, offline."""
import types

_WORDS = "the of and to in is was that for it with as his on be at by had are cat dog".split()


def download(*args, **kwargs):
    return True


corpus = types.SimpleNamespace(words=types.SimpleNamespace(words=lambda: list(_WORDS)))
'''


# The fake TGI server (run as `bench_vastai_tgi.py --fake-tgi PORT LOG...`) #######################
# A raw asyncio protocol, so that it is not what limits the workers: /generate answers TGI's JSON,
# /generate_stream TGI's SSE events (a chunk each), /health 200. It writes TGI's "connected"
# line into each log named once it listens.

_TGI_JSON = json.dumps({"generated_text": " the cat sat on the mat" * 4}).encode()
_JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (
        len(_TGI_JSON),
        _TGI_JSON,
    )
)
_HEALTH_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _stream_body() -> bytes:
    parts: list[bytes] = []
    for i in range(STREAM_TOKENS):
        last = i == STREAM_TOKENS - 1
        token = {"id": i, "text": f" tok{i}", "logprob": -0.1, "special": False}
        event = {"token": token, "generated_text": "done" if last else None, "details": None}
        data = b"data:" + json.dumps(event).encode() + b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(data), data))
    return b"".join(parts) + b"0\r\n\r\n"


class _FakeTgi(asyncio.Protocol):
    stream_body = _stream_body()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            path = head.split(" ", 2)[1]
            self.buffer = self.buffer[end + 4 + length :]
            if path.startswith("/generate_stream"):
                self.transport.write(_STREAM_HEAD + self.stream_body)
            elif path.startswith("/generate"):
                self.transport.write(_JSON_RESPONSE)
            else:
                self.transport.write(_HEALTH_RESPONSE)


async def _serve_fake_tgi(port: int, logs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_FakeTgi, "127.0.0.1", port, backlog=4096)
    for log in logs:
        with open(log, "a") as f:
            f.write(LOADED_LINE + "\n")
    print("fake TGI listening", flush=True)
    await server.serve_forever()


# The local autoscaler (a thread's HTTP server: it answers the workers' few calls) ##############


def _autoscaler(port: int, pem: bytes) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(pem if self.path.startswith("/pubkey") else b"{}")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(b'{"ok": true}')

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


# The run ##########################################################################################


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def signed_body(url: str, route: str) -> str:
    """Today's client body: the /route/ answer as auth_data (the `url` layout, request_idx),
    and a payload like the file's benchmark_generator's."""
    key = load_private_key("test_key.pem")
    message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
    auth = {
        "cost": "128",
        "endpoint": "bench",
        "reqnum": 1,
        "request_idx": 1,
        "signature": base64.b64encode(key.sign(message)).decode(),
        "url": url,
    }
    prompt = " ".join(["the cat sat on the mat"] * 40)
    payload = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": 128, "temperature": 0.7, "return_full_text": False},
    }
    return json.dumps({"auth_data": auth, "payload": payload})


def wrk(lua: Path, url: str, seconds: int) -> tuple[float, int]:
    """(requests/s, non-2xx answers) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(lua), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    rate = float(out.split("Requests/sec:")[1].split()[0])
    bad = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    return rate, bad


def post(url: str, body: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, body.encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@contextlib.contextmanager
def process(
    args: list[str], out: Path, **kwargs: object
) -> Generator[subprocess.Popen[bytes], None, None]:
    with open(out, "wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(name: str, url: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    """Until a signed /generate is answered 200 (vastai waits up to 10 s for its first health
    poll after the benchmark)."""
    body = signed_body(url, "/generate")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited:\n{out.read_text(errors='replace')[-3000:]}")
        status, answer = post(url + "/generate", body)
        if status == 200:
            assert b"generated_text" in answer, answer
            return
        time.sleep(0.5)
    raise SystemExit(
        f"{name} was not ready after 180 s:\n{out.read_text(errors='replace')[-3000:]}"
    )


def load_worker_file(path: str | None) -> str:
    if path is not None:
        return Path(path).read_text()
    with urllib.request.urlopen(TGI_WORKER_URL, timeout=30) as response:
        return response.read().decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("worker_file", nargs="?", help="vast-sdk's examples/server/tgi_worker.py")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--vastai-python", default="/work/vastvenv/bin/python")
    parser.add_argument("--fake-tgi", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_tgi:
        asyncio.run(_serve_fake_tgi(int(args.fake_tgi[0]), args.fake_tgi[1:]))
        return 0
    if shutil.which("wrk") is None:
        print("bench_vastai_tgi: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if port_taken(MODEL_PORT):
        print(f"bench_vastai_tgi: port {MODEL_PORT} is in use; the file needs it", file=sys.stderr)
        return 2
    source = load_worker_file(args.worker_file)
    if source.count(IMPORT_LINE) != 1:
        print(f"bench_vastai_tgi: expected one line {IMPORT_LINE!r}", file=sys.stderr)
        return 2
    made: list[Path] = []  # what this script created under /workspace, removed at the end
    if not WORKSPACE_LOG.parent.exists():
        WORKSPACE_LOG.parent.mkdir(parents=True)
        made.append(WORKSPACE_LOG.parent)
    if not WORKSPACE_LOG.exists():
        WORKSPACE_LOG.touch()
        made.insert(0, WORKSPACE_LOG)
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory)
            (tmp / "stub" / "nltk").mkdir(parents=True)
            (tmp / "stub" / "nltk" / "__init__.py").write_text(NLTK_STANDIN)
            for name in ("vastai", "pyworker"):
                (tmp / name).mkdir()
            (tmp / "vastai" / "tgi_worker.py").write_text(source)
            ported = source.replace(IMPORT_LINE, "from pyworker import ")
            (tmp / "pyworker" / "tgi_worker.py").write_text(ported)
            pyworker_log = tmp / "infer.log"
            pyworker_log.touch()
            scaler_port = free_port()
            pem = (HERE / "data" / "test_key.pub.pem").read_bytes()
            _autoscaler(scaler_port, pem)
            ports = {"vastai": free_port(), "pyworker": free_port()}
            base = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("WORKER_", "MODEL_", "VAST_TCP_PORT_"))
            }
            base.update(
                REPORT_ADDR=f"http://127.0.0.1:{scaler_port}",
                PUBLIC_IPADDR="127.0.0.1",
                CONTAINER_ID="1",
                MASTER_TOKEN="bench-token",
                UNSECURED="false",
                BENCHMARK_CACHE="off",
            )
            envs: dict[str, dict[str, str]] = {}
            for name, port in ports.items():
                envs[name] = {
                    **base,
                    "WORKER_PORT": str(port),
                    "WORKER_HTTP_PORT": str(free_port()),
                    f"VAST_TCP_PORT_{port}": str(port),
                }
            envs["vastai"]["PYTHONPATH"] = str(tmp / "stub")
            envs["pyworker"]["PYTHONPATH"] = os.pathsep.join([str(tmp / "stub"), str(ROOT)])
            envs["pyworker"]["MODEL_LOG"] = str(pyworker_log)
            fake_args = [sys.executable, __file__, "--fake-tgi", str(MODEL_PORT)]
            fake_args += [str(WORKSPACE_LOG), str(pyworker_log)]
            pythons = {"vastai": args.vastai_python, "pyworker": sys.executable}
            with contextlib.ExitStack() as stack:
                procs: dict[str, subprocess.Popen[bytes]] = {}
                for name in ports:  # the workers first: they tail the logs from the start
                    procs[name] = stack.enter_context(
                        process(
                            [pythons[name], "tgi_worker.py"],
                            tmp / f"{name}.out",
                            cwd=tmp / name,
                            env=envs[name],
                            stdin=subprocess.DEVNULL,
                        )
                    )
                time.sleep(1.0)
                stack.enter_context(process(fake_args, tmp / "fake.out"))
                urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
                for name in ports:
                    wait_ready(name, urls[name], procs[name], tmp / f"{name}.out")
                scripts: dict[tuple[str, str], Path] = {}
                for name in ports:
                    for route in ROUTES:
                        lua = tmp / f"{name}{route.replace('/', '_')}.lua"
                        lua.write_text(
                            'wrk.method = "POST"\n'
                            'wrk.headers["Content-Type"] = "application/json"\n'
                            f"wrk.body = {json.dumps(signed_body(urls[name], route))}\n"
                        )
                        scripts[name, route] = lua
                        status, answer = post(urls[name] + route, signed_body(urls[name], route))
                        assert status == 200, (name, route, status, answer[:300])
                        if route == "/generate_stream":
                            assert answer.count(b"data:") == STREAM_TOKENS, (name, answer[:300])
                        wrk(lua, urls[name] + route, 1)  # warm-up
                print(
                    f"tgi_worker.py, wrk -t1 -c32 -d{args.seconds}s, signed (url layout), "
                    f"{STREAM_TOKENS}-token streams"
                )
                for run in range(args.repeat):
                    for route in ROUTES:
                        for name in ports:
                            rate, bad = wrk(scripts[name, route], urls[name] + route, args.seconds)
                            rates.setdefault((name, route), []).append(rate)
                            flag = f"  ({bad} non-2xx!)" if bad else ""
                            print(f"run {run + 1}  {name:<8} {route:<17} {rate:>9,.0f} req/s{flag}")
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        print(f"{name} exited during the run", file=sys.stderr)
    finally:
        for path in made:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
    for route in ROUTES:
        medians = {name: statistics.median(rates[name, route]) for name in ("vastai", "pyworker")}
        ratios = [p / v for p, v in zip(rates["pyworker", route], rates["vastai", route])]
        print(
            f"{route:<17} median vastai {medians['vastai']:>7,.0f} req/s, pyworker "
            f"{medians['pyworker']:>7,.0f} req/s: {medians['pyworker'] / medians['vastai']:.1f}x "
            f"(runs {min(ratios):.1f}x to {max(ratios):.1f}x; issue 17 wants >= 5x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
