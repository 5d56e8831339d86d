"""A fleet's bad days (issue 18), each on loopback with real processes: a model API that
opens after its loaded line, a side port (WORKER_HTTP_PORT) somebody else holds, signatures
that stop verifying, an autoscaler whose key changes mid-run, a PUBKEY_FILE rewritten, and
the worker started twice on one port.

The fakes (model, autoscaler, a wrapper answering 503) run in the test's event loop; the
worker is a `python hello_world.py` child (or hello_world with test-only Config fields:
KNOBBED_WORKER). The tests wait on the worker's log lines and on the fakes' counts. A few
details are checked in-process (worker_rig): the health route's patience, the warning's
interval and counts, no key yet, and the replay guard and the cache across key changes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import (
    DATA,
    FastGenerateHandler,
    Reply,
    Runner,
    WorkerProcess,
    append,
    free_port,
    free_ports,
    generate,
    load_private_key,
    loaded_model_log,
    request,
    self_signed_cert,
    signed_auth,
    signing_key,
    spawned_worker,
    unsecured_vars,
    until,
    worker_rig,
)

import pyworker
from pyworker import State
from test_load import FakeModel, LocalAutoscaler, RsaPrivateKey

run = Runner(timeout=60.0)

KEY_A = signing_key()  # the autoscaler's key at first
KEY_B = load_private_key("other_key.pem")  # ... and after it changed
KEY_C = load_private_key("e3_key.pem")  # nobody's: a forger's

# hello_world with Config fields that no environment variable sets (the tests' knobs, such
# as Config.report_backoff): a minute between warnings is too long for a test.
KNOBBED_WORKER = """\
import asyncio, dataclasses, json, os
import hello_world, pyworker
knobs = json.loads(os.environ["TEST_KNOBS"])
config = dataclasses.replace(pyworker.Config.from_env(), **knobs)
asyncio.run(pyworker.serve(hello_world.backend, hello_world.routes, config))
"""


def fingerprint(key: RsaPrivateKey) -> str:
    """sha256 of the DER in the PEM /pubkey/ serves, first 16 hex (computed here, not by the
    worker's own DER encoder)."""
    lines = key.public_pem().strip().splitlines()
    return hashlib.sha256(base64.b64decode("".join(lines[1:-1]))).hexdigest()[:16]


def seen(worker: WorkerProcess, text: str) -> Callable[[], Awaitable[bool]]:
    """A WorkerProcess.until check: `text` is in the worker's output."""

    async def check() -> bool:
        return text in worker.log_file.read_text(errors="replace")

    return check


def output(worker: WorkerProcess) -> str:
    return worker.log_file.read_text(errors="replace")


class CountingAutoscaler(LocalAutoscaler):
    """A LocalAutoscaler that counts GET /pubkey/; `key` may be changed mid-run."""

    def __init__(self, key: RsaPrivateKey) -> None:
        super().__init__(key)
        self.pubkey_fetches = 0

    async def _pubkey(self, request: pyworker.Request) -> pyworker.Response:
        self.pubkey_fetches += 1
        return await super()._pubkey(request)


class Wrapper:
    """A model's API wrapper whose model is not up: 503 to everything on the route."""

    def __init__(self, route: str) -> None:
        self.hits = 0

        async def answer(request: pyworker.Request) -> pyworker.Response:
            self.hits += 1
            return pyworker.error_response(503, "model not up yet (wrapper)")

        self._server = pyworker.HttpServer(
            [pyworker.get(route, answer), pyworker.post(route, answer)]
        )

    async def start(self, port: int) -> Wrapper:
        await self._server.start("127.0.0.1", port)
        return self

    async def stop(self) -> None:
        await self._server.shutdown(0.0)


@contextlib.asynccontextmanager
async def started(*servers: FakeModel | LocalAutoscaler) -> AsyncGenerator[None, None]:
    try:
        for server in servers:
            await server.start()
        yield
    finally:
        for server in servers:
            await server.stop()


# 1. The model's API opens after its loaded line ##################################################


def test_model_api_opening_after_its_loaded_line_is_waited_for(tmp_path: Path) -> None:
    # vast-ai/pyworker#85: ComfyUI logs its ready line before the API wrapper listens. The
    # worker waits (refused, then a wrapper's 503), then benchmarks and becomes ready.
    async def main() -> None:
        model_port = free_port()  # reserved: nobody else binds it meanwhile
        model_url = f"http://127.0.0.1:{model_port}"
        log = tmp_path / "model.log"
        log.write_text("")
        scaler = LocalAutoscaler(KEY_A)
        fake = FakeModel()
        async with started(scaler):
            env = unsecured_vars(log, model_url, scaler.url)
            async with spawned_worker(tmp_path / "w", **env) as worker:
                await worker.until(worker.ping, 15.0, "/ping")
                append(log, FakeModel.LOADED_LINE + "\n")  # loaded; its port still closed
                target = f"{model_url}/generate"
                waiting = f"model loaded; waiting for the model's API at {target} to open"
                await worker.until(seen(worker, waiting), 15.0, "the waiting line")
                line = next(x for x in output(worker).splitlines() if waiting in x)
                assert f"(cannot connect to {model_url}" in line and "MODEL_API_WAIT" in line
                wrapper = await Wrapper("/generate").start(model_port)  # a wrapper, model down
                try:
                    await until(lambda: wrapper.hits >= 2, 20.0, "the worker to ask twice")
                    reply = await request(worker.port, "POST", "/generate", generate())
                    assert reply.status == 503 and reply.json()["state"] == "benchmarking"
                finally:
                    await wrapper.stop()
                await fake.start(model_port)  # the API opens at last
                try:
                    await worker.wait_ready(30.0)
                    assert fake.requests, "the benchmark reached the model"
                finally:
                    await fake.stop()
                opened = f"the model's API at {target} is open after"
                await worker.until(seen(worker, opened), 5.0, "the open line")  # INFO: buffered
                assert "errored" not in output(worker), output(worker)
                await until(
                    lambda: any(r["max_perf"] > 0 for r in scaler.reports), 15.0, "a ready report"
                )
                assert all(r["error_msg"] == "" for r in scaler.reports)

    run(main(), timeout=90)


def test_model_api_that_never_opens_errors_with_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        model_port = free_port()  # nobody ever listens there
        model_url = f"http://127.0.0.1:{model_port}"
        scaler = LocalAutoscaler(KEY_A)
        async with started(scaler):
            log = loaded_model_log(tmp_path)
            env = unsecured_vars(log, model_url, scaler.url, MODEL_API_WAIT="1")
            async with spawned_worker(tmp_path / "w", **env) as worker:
                line = (
                    f"worker errored: the model's API at {model_url}/generate did not open "
                    "within 1s of its loaded line (cannot connect"
                )
                await worker.until(seen(worker, line), 20.0, "the errored line")
                errored = [x for x in output(worker).splitlines() if "errored" in x]
                assert len(errored) == 1 and "MODEL_API_WAIT sets how long to wait" in errored[0]
                await until(
                    lambda: any("did not open within 1s" in r["error_msg"] for r in scaler.reports),
                    15.0,
                    "the error in a load report",
                )
                reply = await request(worker.port, "POST", "/generate", generate())
                assert reply.status == 503 and "did not open" in reply.json()["error"]

    run(main())


class _KeyedHandler(FastGenerateHandler):
    """hello_world's /generate on a model server started with an API key."""

    def model_headers(self, payload: Any) -> Sequence[tuple[str, str]]:
        return [("Authorization", "Bearer sk-model")]


def test_model_api_wait_probe_sends_the_benchmarks_model_headers() -> None:
    # L6: guards that the probe carries the handler's model_headers, as the benchmark's
    # requests do: a proxy in front of the model that wants its key answers 503 without it,
    # and the worker would wait all of MODEL_API_WAIT and error.
    async def main() -> None:
        seen_keys: list[str | None] = []

        async def answer(request: pyworker.Request) -> pyworker.Response:
            key = request.headers.get("authorization")
            seen_keys.append(key)
            if key != "Bearer sk-model":
                return pyworker.error_response(503, "no key, no model (proxy)")
            return pyworker.error_response(405, "POST only")

        proxy = pyworker.HttpServer([pyworker.get("/generate", answer)])
        port = await proxy.start("127.0.0.1", 0)
        client = pyworker.HttpClient(f"http://127.0.0.1:{port}")
        try:
            api = pyworker.ModelApiWait(client, _KeyedHandler(), limit=3.0)
            assert await api.wait() is None, api.last
            assert api.last == "status 405" and seen_keys == ["Bearer sk-model"]
        finally:
            await client.close()
            await proxy.shutdown(0.0)

    run(main())


def test_model_api_wait_is_validated_like_the_other_variables() -> None:
    assert pyworker.Config.from_env({}).model_api_wait == 600
    assert pyworker.Config.from_env({"MODEL_API_WAIT": "45"}).model_api_wait == 45
    for bad in ("soon", "-1", "1.5", "999999999"):
        with pytest.raises(pyworker.ConfigError, match=r"^MODEL_API_WAIT="):
            pyworker.Config.from_env({"MODEL_API_WAIT": bad})
    assert "MODEL_API_WAIT" in pyworker.usage("worker.py")


def test_model_api_open_but_failing_the_benchmark_says_what_it_answered(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"), fail_status=500)
        async with worker_rig(tmp_path, fake=fake, unsecured=True, ready=False) as rig:
            await until(lambda: rig.backend.state is State.ERRORED, 15.0, "errored")
            message = rig.backend.error_msg
            assert message.startswith("benchmark: no request to the model succeeded"), message
            assert f"its API at {fake.url}/generate is open" in message, message

    run(main())


def test_health_route_gets_the_model_api_patience(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The health route's first 200 is waited for up to MODEL_API_WAIT (not 300 s) after the
    # model loaded; with a line saying what it waits for.
    caplog.set_level("INFO", logger="pyworker")

    async def one(wait: float, healthy_later: bool) -> None:
        directory = tmp_path / f"wait{wait:g}"
        directory.mkdir()
        fake = FakeModel(log_path=str(directory / "model.log"))
        fake.healthy = False
        async with worker_rig(
            directory,
            fake=fake,
            unsecured=True,
            ready=False,
            healthcheck_endpoint="/health",
            healthcheck_interval=0.05,
            model_api_wait=wait,
        ) as rig:
            life = rig.backend.lifecycle
            await until(lambda: life.loaded_at is not None, 10.0, "loaded")
            if healthy_later:
                await until(lambda: life.max_perf > 0, 10.0, "benchmarked")
                assert life.state is State.BENCHMARKING  # benchmarked, waiting for health
                waiting = "waiting for the model's health endpoint /health to answer 200"
                await until(lambda: waiting in caplog.text, 10.0, "the waiting line")
                fake.healthy = True
                await rig.wait_ready(10.0)
            else:
                await until(lambda: life.state is State.ERRORED, 10.0, "errored")
                assert "MODEL_API_WAIT" in life.error_msg, life.error_msg

    async def main() -> None:
        for wait, healthy_later in ((1.0, False), (30.0, True)):
            await one(wait, healthy_later)

    run(main())


# 2. The side port is taken #######################################################################


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_worker_whose_side_port_is_taken_warns_and_serves(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)

    async def main() -> None:
        context = ssl.create_default_context(cafile=str(cert))
        port, side = free_ports(2)
        holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", side)
        fake = FakeModel(log_path=str(tmp_path / "model.log"))
        scaler = LocalAutoscaler(KEY_A)
        try:
            async with started(fake, scaler):
                env = unsecured_vars(
                    tmp_path / "model.log",
                    fake.url,
                    scaler.url,
                    USE_SSL="true",
                    WORKER_SSL_CERT=str(cert),
                    WORKER_SSL_KEY=str(key),
                    WORKER_PORT=str(port),
                    WORKER_HTTP_PORT=str(side),
                )
                async with spawned_worker(tmp_path / "w", **env) as worker:
                    warning = f"WARNING pyworker: port {side} (WORKER_HTTP_PORT"
                    await worker.until(seen(worker, warning), 15.0, "the side-port warning")

                    async def tls(path: str, body: Any) -> Reply:
                        return await request(port, "POST", path, body, ssl_context=context)

                    async def served() -> bool:
                        reply = await tls("/generate", generate())
                        return reply.status == 200

                    await worker.until(served, 20.0, "/generate served over TLS")
                    auth = {"signature": "x", "cost": 1, "endpoint": "e", "reqnum": 1, "url": "u"}
                    payload = {"lifetime": 60}
                    created = await tls("/session/create", {"auth_data": auth, "payload": payload})
                    assert created.status == 201, created
                    end = {"session_id": created.json()["session_id"], "session_auth": auth}
                    ended = await tls("/session/end", end)
                    assert ended.status == 200 and ended.json()["ended"] is True, ended
                    line = next(x for x in output(worker).splitlines() if warning in x)
                    assert f"port {port} (WORKER_PORT, TLS)" in line, line
        finally:
            holder.close()
            await holder.wait_closed()

    run(main())


# 3 and 4. Signatures stop verifying; the key changes #############################################


def _signed(key: RsaPrivateKey, reqnum: int, port: int) -> dict[str, Any]:
    auth = signed_auth(key, "10", reqnum, f"http://127.0.0.1:{port}")
    return {"auth_data": auth, "payload": {"prompt": "a key change", "max_response_tokens": 4}}


def _failures(metrics: str) -> dict[str, int]:
    found = re.findall(r'pyworker_signature_failures_total\{reason="(\w+)"\} (\d+)', metrics)
    return {reason: int(n) for reason, n in found}


class Signer:
    """Signs fresh tickets for one worker, one reqnum after the other."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reqnum = 0

    def body(self, key: RsaPrivateKey) -> dict[str, Any]:
        self.reqnum += 1
        return _signed(key, self.reqnum, self.port)

    async def post(self, key: RsaPrivateKey) -> int:
        return (await request(self.port, "POST", "/generate", self.body(key))).status


def test_autoscaler_key_change_is_fetched_again_and_logged(tmp_path: Path) -> None:
    knobs = {
        "signature_warn_interval": 0.5,
        "key_refetch_failures": 3,
        "key_refetch_quiet": 60.0,  # 3 in a minute: however slow the machine (T1's lesson)
        "key_refetch_interval": 1.0,
    }
    script = tmp_path / "knobbed_worker.py"
    script.write_text(KNOBBED_WORKER)

    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"))
        scaler = CountingAutoscaler(KEY_A)
        async with started(fake, scaler):
            env = {
                "MODEL_LOG": str(tmp_path / "model.log"),
                "MODEL_SERVER_URL": fake.url,
                "REPORT_ADDR": scaler.url,
                "TEST_KNOBS": json.dumps(knobs),
            }
            async with spawned_worker(tmp_path / "w", [str(script)], **env) as worker:
                signer = Signer(worker.port)

                async def served() -> bool:
                    return await signer.post(KEY_A) == 200

                await worker.until(worker.ping, 15.0, "/ping")
                await worker.until(served, 20.0, "a signed request served")
                accepted = signer.body(KEY_A)
                reply = await request(worker.port, "POST", "/generate", accepted)
                assert reply.status == 200
                reply = await request(worker.port, "POST", "/generate", accepted)
                assert reply.status == 401 and reply.json() == {"error": "replayed request"}
                fa, fb = fingerprint(KEY_A), fingerprint(KEY_B)
                scaler.key = KEY_B  # the autoscaler's key changes
                changed = (
                    f"public key changed: sha256:{fa} -> sha256:{fb} (from {scaler.url}/pubkey/)"
                )
                statuses: list[int] = []
                for _ in range(400):  # bounded: each try is a request and a look at the log
                    if await seen(worker, changed)():
                        break
                    statuses.append(await signer.post(KEY_B))
                else:
                    raise AssertionError(f"no key change logged:\n{output(worker)}")
                assert statuses and set(statuses) <= {200, 401}, statuses
                assert statuses[:3] == [401] * 3, statuses  # refused until the key was fetched
                # From now on: the new key's tickets are served, anything else is refused.
                assert await signer.post(KEY_B) == 200
                for forger in (KEY_A, KEY_C):
                    reply = await request(worker.port, "POST", "/generate", signer.body(forger))
                    assert reply.status == 401 and reply.json() == {"error": "bad signature"}
                again = signer.body(KEY_B)
                assert (await request(worker.port, "POST", "/generate", again)).status == 200
                reply = await request(worker.port, "POST", "/generate", again)
                assert reply.status == 401 and reply.json() == {"error": "replayed request"}
                unsigned = await request(worker.port, "POST", "/generate", generate())
                assert unsigned.status == 422
                assert scaler.pubkey_fetches >= 2
                # The warning: counts by reason, the key's fingerprint, where and when.
                text = output(worker)
                none = "matching none of the layouts accepted (url, fields, seed)"
                warnings = [x for x in text.splitlines() if "signed requests refused" in x]
                assert warnings and all("WARNING" in x for x in warnings), text
                under_a = [x for x in warnings if f"key sha256:{fa} from" in x]
                assert any(" replayed" in x for x in under_a), warnings
                assert any(none in x for x in under_a), warnings  # said before the change
                assert all(
                    f"key sha256:{fa} from {scaler.url}/pubkey/, loaded 20" in x for x in under_a
                )
                await worker.until(seen(worker, f"key sha256:{fb} from"), 10.0, "a warning on B")
                metrics = (await request(worker.port, "GET", "/metrics")).body.decode()
                counts = _failures(metrics)
                assert set(counts) == {"no_layout", "replayed", "malformed", "no_key"}, metrics
                assert counts["no_layout"] >= 3 + 2 and counts["replayed"] == 2, counts

    run(main(), timeout=90)


def test_pubkey_file_rewritten_is_read_again(tmp_path: Path) -> None:
    async def main() -> None:
        pem = tmp_path / "autoscaler.pem"
        pem.write_text(KEY_A.public_pem())
        fake = FakeModel(log_path=str(tmp_path / "model.log"))
        scaler = CountingAutoscaler(KEY_B)  # reports only: the key is the file's
        async with started(fake, scaler):
            env = {
                "MODEL_LOG": str(tmp_path / "model.log"),
                "MODEL_SERVER_URL": fake.url,
                "REPORT_ADDR": scaler.url,
                "PUBKEY_FILE": str(pem),
            }
            async with spawned_worker(tmp_path / "w", **env) as worker:
                signer = Signer(worker.port)

                async def served() -> bool:
                    return await signer.post(KEY_A) == 200

                await worker.until(worker.ping, 15.0, "/ping")
                await worker.until(served, 20.0, "a signed request served")
                fa, fb = fingerprint(KEY_A), fingerprint(KEY_B)
                # Replaced as deployment tools do (a new file renamed over it: a new inode)
                new = tmp_path / "autoscaler.pem.new"
                new.write_text(KEY_B.public_pem())
                os.replace(new, pem)
                changed = f"public key changed: sha256:{fa} -> sha256:{fb} (from PUBKEY_FILE {pem})"
                await worker.until(seen(worker, changed), 10.0, "the key read again")
                assert await signer.post(KEY_B) == 200
                assert await signer.post(KEY_A) == 401
                # ... and rewritten in place (the same inode, the same size: mtime changes)
                pem.write_text(KEY_A.public_pem())
                back = f"public key changed: sha256:{fb} -> sha256:{fa}"
                await worker.until(seen(worker, back), 10.0, "the key read again in place")
                assert await signer.post(KEY_A) == 200
                assert await signer.post(KEY_B) == 401

                # A file that cannot be used keeps the key in use, and says so. T3: a partial
                # read of a rewrite above may have said so already: wait for one more line.
                def kept() -> int:
                    return output(worker).count("the key loaded stays in use")

                before = kept()
                pem.write_text("not a key\n")

                async def said() -> bool:
                    return kept() > before

                await worker.until(said, 10.0, "the warning")
                assert await signer.post(KEY_A) == 200
                assert scaler.pubkey_fetches == 0

    run(main())


def test_signature_failures_warned_at_most_once_per_interval_with_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # In-process: a burst of refusals gives one line at once, then nothing until the interval
    # is over; flush() (as a key change does) says the rest in one line. T1: the interval is
    # an hour so that no count depends on how fast this machine sends six requests.
    async def main() -> None:
        async with worker_rig(tmp_path, signer=KEY_A, signature_warn_interval=3600.0) as rig:
            caplog.set_level("WARNING", logger="pyworker")
            signer = Signer(rig.port)
            assert await signer.post(KEY_A) == 200
            statuses = [await signer.post(KEY_B) for _ in range(5)]
            body = signer.body(KEY_A)
            body["auth_data"]["signature"] = "not base64!"
            statuses.append((await request(rig.port, "POST", "/generate", body)).status)
            assert statuses == [401] * 6

            def lines() -> list[str]:
                messages = [r.getMessage() for r in caplog.records]
                return [m for m in messages if "signed requests refused" in m]

            assert len(lines()) == 1, lines()  # the first at once, the rest held back
            rig.backend.signatures.watch.flush()
            assert len(lines()) == 2, lines()
            first, second = lines()
            head = "signed requests refused: %d since the last such line (%d matching none"
            assert first.startswith(head % (1, 1)), first
            assert second.startswith(head % (5, 4)) and ", 1 malformed);" in second, second
            assert rig.autoscaler is not None
            source = f"key sha256:{fingerprint(KEY_A)} from {rig.autoscaler.url}/pubkey/"
            assert source in second, second

    run(main())


def test_no_key_yet_is_counted_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        unused = f"http://127.0.0.1:{free_port()}"
        async with worker_rig(tmp_path, report_addrs=[unused], signer=KEY_A, ready=False) as rig:
            await rig.wait_ready(pubkey=False)
            caplog.set_level("WARNING", logger="pyworker")
            reply = await request(rig.port, "POST", "/generate", _signed(KEY_A, 1, rig.port))
            assert reply.status == 503 and reply.json()["error"] == "no public key yet"
            text = "\n".join(r.getMessage() for r in caplog.records)
            assert "1 before a key came); no key yet (fetching from " + unused + "/pubkey/)" in text
            metrics = (await request(rig.port, "GET", "/metrics")).body.decode()
            assert _failures(metrics)["no_key"] == 1

    run(main())


def test_replay_guard_and_cache_survive_a_key_change(tmp_path: Path) -> None:
    # A ticket spent under key A stays spent after A -> B -> A; a `url` signature verified
    # under A is not taken on trust (from the cache) once B is the key.
    checker = pyworker.SignatureChecker()
    key_a, key_b = KEY_A.public_key, KEY_B.public_key
    checker.use_key(key_a, "test")
    auth = pyworker.AuthData.from_json_msg(signed_auth(KEY_A, "10", 7, "http://w"))
    assert checker.check(auth) is None
    checker.spend(auth)
    url_ticket = KEY_A.sign_url_auth(cost=1, endpoint="e", reqnum=1, url="http://w", request_idx=1)
    url_auth = pyworker.AuthData.from_json_msg(url_ticket)
    assert checker.check(url_auth) is None
    checker.use_key(key_b, "test")
    assert checker.check(url_auth) == "bad signature"
    checker.use_key(key_a, "test")
    again = pyworker.AuthData.from_json_msg(signed_auth(KEY_A, "10", 7, "http://w"))
    assert checker.check(again) == "replayed request"
    assert checker.watch.totals == {"no_layout": 1, "replayed": 1}
    assert key_a.fingerprint == fingerprint(KEY_A) != key_b.fingerprint
    pkcs1 = pyworker.RsaPublicKey.from_pem((DATA / "test_key.rsapub.pem").read_text())
    assert pkcs1.fingerprint == key_a.fingerprint  # the same key, whatever its PEM form


# 5. The worker is started twice ##################################################################


def test_second_worker_on_a_taken_port_exits_at_once_and_the_first_serves(tmp_path: Path) -> None:
    # vast-ai/base-image#133: the image started the worker from two places at once.
    async def main() -> None:
        fake = FakeModel(log_path=str(tmp_path / "model.log"))
        scaler = LocalAutoscaler(KEY_A)
        async with started(fake, scaler):
            env = unsecured_vars(tmp_path / "model.log", fake.url, scaler.url)
            async with spawned_worker(tmp_path / "a", **env) as first:
                await first.wait_ready()
                # The first listens without SO_REUSEPORT: a socket asking for it cannot bind.
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    with pytest.raises(OSError) as bind_error:
                        probe.bind(("0.0.0.0", first.port))
                    assert bind_error.value.errno == errno.EADDRINUSE
                reports_before = len(scaler.reports)
                second_env = {**env, "WORKER_PORT": str(first.port)}
                async with spawned_worker(tmp_path / "b", **second_env) as second:
                    code = await asyncio.wait_for(second.proc.wait(), 20.0)
                text = output(second)
                assert code != 0, text
                message = (
                    f"cannot start: port {first.port} (WORKER_PORT) is held by another process, "
                    "maybe another worker already running on this machine"
                )
                assert [x for x in text.splitlines() if "ERROR" in x] == [
                    x for x in text.splitlines() if message in x
                ], text
                assert message in text and "Traceback" not in text, text
                assert "listening" not in text and "model loaded" not in text, text
                await until(
                    lambda: any(
                        r.get("error_msg") == message for r in scaler.reports[reports_before:]
                    ),
                    10.0,
                    "the failed-start report",
                )
                assert code == 1
                report = next(r for r in scaler.reports if r.get("error_msg") == message)
                assert set(report) == {"id", "mtoken", "version", "error_msg", "url"}
                # The first is undisturbed.
                assert first.proc.returncode is None
                reply = await request(first.port, "POST", "/generate", generate())
                assert reply.status == 200
                assert "ERROR" not in output(first), output(first)

    run(main())
