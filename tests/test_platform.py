"""Today's platform (SPEC section 11) end to end on loopback: signature layouts, request_idx and
session_id in the client body, "1.1.0" load reports, completion reports (/delete_requests/),
the model's health endpoint, POST /pyworker/update, and two fast refusals on the plain port.

Each test starts its own worker (hello_world's handlers), a FakeModel that can hold requests
and script its health answers, and a fake autoscaler written here that records every
/worker_status/ and /delete_requests/ body and can answer 500 for a while. Signatures are
made with a real RSA key (tests/data/test_key.pem) in each of the three layouts.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import logging
import ssl
import time
import typing
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    SEED_REPORT_FIELDS,
    UNUSED_URL,
    RawClient,
    Reply,
    Rig,
    Runner,
    append,
    encode_request,
    load_private_key,
    raw_client,
    request_bytes,
    until,
    worker_rig,
)

import hello_world
import pyworker
from pyworker import Config, ConfigError, LogAction, Request, Response, State, post
from test_load import FakeModel, RsaPrivateKey

KEY = load_private_key("test_key.pem")
TOKEN = "mtoken-0123456789abcdef"
CONTAINER_ID = 4242
PUBLIC_URL = "http://203.0.113.7:41234"  # what the worker reports as `url`, and auth_data's url
CACHED_MAX_PERF = 2.0  # max_perf from the benchmark cache: a known queue estimate
LOG_ACTIONS = [(LogAction.ModelLoaded, FakeModel.LOADED_LINE)]

# SPEC 11.3, exactly
REPORT_1_1_0_FIELDS = SEED_REPORT_FIELDS | {
    "mtoken",
    "version",
    "rej_load",
    "new_load",
    "disk_usage",
    "working_request_idxs",
}
INT_FIELDS = ("id", "num_requests_working", "num_requests_recieved")
NUMBER_FIELDS = (
    "loadtime",
    "cur_load",
    "rej_load",
    "new_load",
    "max_perf",
    "cur_perf",
    "cur_capacity",
    "max_capacity",
    "additional_disk_usage",
    "disk_usage",
)
STR_FIELDS = ("mtoken", "version", "error_msg", "url")
COMPLETION_FIELDS = {
    "request_idx",
    "success",
    "status",
    "entered_queue_at",
    "work_started_at",
    "work_completed_at",
}

run = Runner(timeout=30.0)


# Signing: the three layouts of SPEC 11.2 #########################################################


def signed(key: RsaPrivateKey, message: str) -> str:
    return base64.b64encode(key.sign(message.encode())).decode()


def layout_message(layout: str, auth: dict[str, Any]) -> str:
    if layout == "url":
        return json.dumps({"url": auth["url"]}, indent=4, sort_keys=True)
    if layout == "fields":
        fields = {k: v for k, v in auth.items() if k not in ("signature", "__request_id")}
        return json.dumps(fields, indent=4, sort_keys=True)
    assert layout == "seed"
    seed = {k: auth[k] for k in ("cost", "endpoint", "reqnum", "url")}
    return json.dumps(seed, indent=4)


def make_auth(
    layout: str,
    reqnum: int,
    *,
    request_idx: object = None,
    cost: str | int = "100",
    key: RsaPrivateKey = KEY,
    **extra: Any,
) -> dict[str, Any]:
    """auth_data as today's /route/ hands it out, signed in `layout`."""
    auth: dict[str, Any] = {"cost": cost, "endpoint": "hello", "reqnum": reqnum, "url": PUBLIC_URL}
    if request_idx is not None:
        auth["request_idx"] = request_idx
    auth.update(extra)
    auth["signature"] = signed(key, layout_message(layout, auth))
    auth["__request_id"] = f"rid-{reqnum}"  # added after signing: no layout signs it
    return auth


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def workload(prompt: str) -> float:
    return float(hello_world.count_tokens(prompt))


# The fake model and the fake autoscaler ##########################################################


class HeldModel(FakeModel):
    """A FakeModel whose /generate can be held until released, and whose /health can be told
    to fail its next N polls."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.holding = False
        self.held = 0  # /generate requests waiting at the model now
        self._released = asyncio.Event()
        self.health_failures = 0  # the next this-many health polls answer 503
        self.health_polls = 0

    def hold(self) -> None:
        self.holding = True
        self._released.clear()

    def release(self) -> None:
        self.holding = False
        self._released.set()

    async def _generate(self, request: Request) -> Response:
        if self.holding:
            self.held += 1
            try:
                await self._released.wait()
            finally:
                self.held -= 1
        return await super()._generate(request)

    async def _health(self, request: Request) -> Response:
        self.health_polls += 1
        if self.health_failures > 0:
            self.health_failures -= 1
            return pyworker.error_response(503, "unhealthy (scripted)")
        return await super()._health(request)

    async def stop(self) -> None:
        """Release what is held, then stop."""
        self.release()
        await super().stop()


class FakeAutoscaler:
    """POST /worker_status/ and /delete_requests/, every body recorded; `failing` answers 500
    to both (and records nothing) while it is set."""

    def __init__(self) -> None:
        self.failing = False
        self.reports: list[dict[str, Any]] = []
        self.deletes: list[dict[str, Any]] = []
        self.delete_times: list[float] = []
        self.report_attempts = 0
        self.delete_attempts = 0
        self.delete_attempt_times: list[float] = []
        self.port = 0
        self._server = pyworker.HttpServer(
            [post("/worker_status/", self._status), post("/delete_requests/", self._delete)]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeAutoscaler:
        self.port = await self._server.start("127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        await self._server.shutdown(grace=0.0)

    async def __aenter__(self) -> FakeAutoscaler:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        body: Any = json.loads(request.body)
        assert isinstance(body, dict), body
        return typing.cast(dict[str, Any], body)

    async def _status(self, request: Request) -> Response:
        self.report_attempts += 1
        if self.failing:
            return pyworker.error_response(500, "autoscaler down (fake)")
        self.reports.append(self._body(request))
        return pyworker.json_response({"ok": True})

    async def _delete(self, request: Request) -> Response:
        self.delete_attempts += 1
        self.delete_attempt_times.append(time.monotonic())
        if self.failing:
            return pyworker.error_response(500, "autoscaler down (fake)")
        self.deletes.append(self._body(request))
        self.delete_times.append(time.monotonic())
        return pyworker.json_response({"ok": True})

    def completions(self) -> list[dict[str, Any]]:
        """Every request entry of every accepted /delete_requests/ body, in order."""
        return [entry for body in self.deletes for entry in body["requests"]]

    def completed(self) -> dict[int, dict[str, Any]]:
        return {entry["request_idx"]: entry for entry in self.completions()}


# The worker: the rig, secured by KEY, reporting to a FakeAutoscaler ###############################


def platform_worker(
    tmp: Path,
    platform: FakeAutoscaler,
    *,
    model: HeldModel | None = None,
    master_token: str = TOKEN,
    loaded: bool = True,
    ready: bool = True,
    report_addrs: list[str] | None = None,
    max_queue_time: float | None = None,
    **settings: Any,
) -> AbstractAsyncContextManager[Rig]:
    """The rig with hello_world's handlers before a HeldModel (or `model`), secured by KEY
    (PUBKEY_FILE), reporting to `platform` (or `report_addrs`) with short intervals, max_perf
    CACHED_MAX_PERF from the benchmark cache; ready first unless `ready` is False (or the model
    log holds no loaded line: `loaded` False). `settings` are Config fields."""
    pubkey = tmp / "pubkey.pem"
    pubkey.write_text(KEY.public_pem())
    if settings.get("model_log", "") is not None:  # model_log=None: no model log at all
        (tmp / "model.log").write_text(FakeModel.LOADED_LINE + "\n" if loaded else "starting\n")
    fields: dict[str, Any] = {
        "pubkey_file": str(pubkey),
        "master_token": master_token,
        "container_id": CONTAINER_ID,
        "public_url": PUBLIC_URL,
        "force_update_file": str(tmp / "force_update"),
        "report_check_interval": 0.05,
        "report_max_interval": 0.5,
        "report_timeout": 2.0,
        "healthcheck_interval": 0.05,
        "log_poll_interval": 0.02,
        **settings,
    }
    return worker_rig(
        tmp,
        fake=model or HeldModel(),
        report_addrs=report_addrs or [platform.url],
        signer=KEY,
        log_actions=LOG_ACTIONS,
        max_queue_time=max_queue_time,
        cached_max_perf=CACHED_MAX_PERF,
        ready=ready and loaded,
        **fields,
    )


def ticket(r: Rig, layout: str = "seed", **fields: Any) -> dict[str, Any]:
    """A fresh auth_data (the rig's next reqnum) signed in `layout`."""
    r.reqnum += 1
    return make_auth(layout, r.reqnum, **fields)


async def send(
    r: Rig,
    auth: dict[str, Any] | None,
    prompt: str | None = "tell me about cats",
    *,
    route: str = "/generate",
    **extra: Any,
) -> Reply:
    """POST `route` with `auth` and a payload (without its prompt when `prompt` is None)."""
    payload: dict[str, Any] = {"max_response_tokens": 4}
    if prompt is not None:
        payload["prompt"] = prompt
    body: dict[str, Any] = {"payload": payload, **extra}
    if auth is not None:
        body["auth_data"] = auth
    return await r.request("POST", route, body)


async def generate(r: Rig, layout: str = "seed", prompt: str = "hi there", **fields: Any) -> Reply:
    return await send(r, ticket(r, layout, **fields), prompt)


# 1. Signature layouts ############################################################################


def test_each_layout_accepted_and_a_wrong_signature_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            assert (await generate(r, "url")).status == 200
            # fields: every key but signature and __request_id is signed, extra ones too
            fields_auth = ticket(r, "fields", request_idx=5, extra_key="x", nested={"a": [1, 2]})
            assert "__request_id" in fields_auth
            assert (await send(r, fields_auth)).status == 200
            assert (await generate(r, "seed")).status == 200
            assert (await generate(r, "seed", request_idx=6, other="y")).status == 200
            assert (await generate(r, "seed", cost=250)).status == 200  # a number cost

            # the right key over the wrong bytes, in every layout
            for layout in ("url", "fields", "seed"):
                auth = ticket(r, layout, request_idx=9)
                auth["signature"] = signed(KEY, layout_message(layout, auth) + " ")
                reply = await send(r, auth)
                assert reply.status == 401, (layout, reply)
            tampered = ticket(r, "fields", request_idx=10)
            tampered["cost"] = "1"  # signed in the fields layout: cost is covered
            assert (await send(r, tampered)).status == 401
            other_url = ticket(r, "url")
            other_url["signature"] = signed(KEY, layout_message("url", {"url": UNUSED_URL}))
            assert (await send(r, other_url)).status == 401
            missing = ticket(r, "url")
            del missing["signature"]
            assert (await send(r, missing)).status in (401, 422)

    run(main())


def test_url_signature_repeats_but_seed_and_fields_replays_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            same = ticket(r, "url", request_idx=1)
            for i in range(20):
                reply = await send(r, same)
                assert reply.status == 200, (i, reply)
            # with request_idx a seed message is not also the fields message: each layout's
            # own replay check is what refuses it
            for layout in ("seed", "fields"):
                auth = ticket(r, layout, request_idx=2)
                assert (await send(r, auth)).status == 200
                reply = await send(r, auth)
                assert reply.status == 401, (layout, reply)
            for layout in ("seed", "fields"):  # the 2024 auth_data, four fields alone
                auth = ticket(r, layout)
                assert (await send(r, auth)).status == 200
                reply = await send(r, auth)
                assert reply.status == 401, (layout, reply)
            # the url layout still works after those refusals
            assert (await send(r, same)).status == 200

    run(main())


def test_signature_layouts_restricted_to_url(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            FakeAutoscaler() as platform,
            platform_worker(tmp_path, platform, signature_layouts=("url",)) as r,
        ):
            assert (await generate(r, "seed")).status == 401
            assert (await generate(r, "fields", request_idx=3)).status == 401
            assert (await generate(r, "url")).status == 200

    run(main())


def test_config_from_env_platform_variables() -> None:
    for bad in ("url,bogus", "sha1", ","):
        with pytest.raises(ConfigError, match="SIGNATURE_LAYOUTS"):
            Config.from_env({"SIGNATURE_LAYOUTS": bad})
    with pytest.raises(ConfigError, match="REPORT_FORMAT"):
        Config.from_env({"REPORT_FORMAT": "1.2.0"})
    with pytest.raises(ConfigError, match="MODEL_HEALTH_ENDPOINT"):
        Config.from_env({"MODEL_HEALTH_ENDPOINT": "ftp://model/health"})
    assert Config.from_env({"SIGNATURE_LAYOUTS": "url"}).signature_layouts == ("url",)
    assert Config.from_env({"SIGNATURE_LAYOUTS": "seed,url"}).signature_layouts == ("seed", "url")
    config = Config.from_env(
        {
            "MASTER_TOKEN": TOKEN,
            "REPORT_FORMAT": "2024",
            "MODEL_HEALTH_ENDPOINT": "/health",
            "FORCE_UPDATE_FILE": "/tmp/force",
        }
    )
    assert config.master_token == TOKEN
    assert config.report_format == "2024"
    assert config.model_health_endpoint == "/health"
    assert config.force_update_file == "/tmp/force"
    defaults = Config.from_env({})
    assert defaults.master_token == ""
    assert defaults.report_format == "auto"
    assert defaults.signature_layouts == ("url", "fields", "seed")
    assert defaults.model_health_endpoint is None
    assert defaults.force_update_file == "/.force_update"


# 2. The client body: request_idx and session_id ##################################################


def test_request_idx_and_session_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            assert (await generate(r, "seed", request_idx=7)).status == 200
            assert (await generate(r, "url", request_idx=8)).status == 200
            reply = await generate(r, "seed", request_idx="7")
            assert reply.status == 422, reply
            assert "auth_data" in reply.json(), reply.json()
            reply = await send(r, ticket(r, "url", request_idx=[7]))
            assert reply.status == 422, reply
            assert "auth_data" in reply.json(), reply.json()
            reply = await send(r, ticket(r, "seed", request_idx=11), session_id=None)
            assert reply.status == 200, reply
            # a session_id the worker never created: SPEC 11.5's 410
            reply = await send(r, ticket(r, "seed", request_idx=12), session_id="abc")
            assert reply.status == 410, reply
            assert reply.json() == {"error": "invalid session"}

    run(main())


# 3. Load reports #################################################################################


def check_1_1_0(report: dict[str, Any]) -> None:
    assert set(report) == REPORT_1_1_0_FIELDS, sorted(set(report) ^ REPORT_1_1_0_FIELDS)
    for name in INT_FIELDS:
        assert is_int(report[name]), (name, report[name])
    for name in NUMBER_FIELDS:
        assert is_number(report[name]), (name, report[name])
    for name in STR_FIELDS:
        assert isinstance(report[name], str), (name, report[name])
    idxs: Any = report["working_request_idxs"]
    assert isinstance(idxs, list), idxs
    assert all(is_int(i) for i in typing.cast(list[Any], idxs)), idxs
    assert report["version"] == "1.1.0"
    assert report["mtoken"] == TOKEN
    assert report["id"] == CONTAINER_ID
    assert report["url"] == PUBLIC_URL


def test_1_1_0_report_fields_and_load_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    prompts = {11: "one two three", 12: "one two three four five", 13: "a b c d e f g"}
    expected_load = sum(workload(p) for p in prompts.values())

    async def main() -> None:
        model = HeldModel()
        async with (
            FakeAutoscaler() as platform,
            platform_worker(tmp_path, platform, model=model) as r,
        ):
            await until(lambda: platform.reports, 5.0, "a first report")
            model.hold()
            sends = [
                asyncio.ensure_future(send(r, ticket(r, "seed", request_idx=i), p))
                for i, p in prompts.items()
            ]
            await until(lambda: model.held == 3, 5.0, "three requests held at the model")
            mark = len(platform.reports)

            def in_flight_reports() -> list[dict[str, Any]]:
                reports = platform.reports[mark:]
                return [rep for rep in reports if rep.get("num_requests_working") == 3]

            # two: cur_load is what is in flight now, not what arrived since the last report
            await until(
                lambda: len(in_flight_reports()) >= 2,
                5.0,
                "two reports with the three requests in flight",
            )
            for report in in_flight_reports():
                check_1_1_0(report)
                assert abs(report["cur_load"] - expected_load) < 1e-6, report
                assert sorted(report["working_request_idxs"]) == sorted(prompts), report
            report = in_flight_reports()[-1]
            assert report["loadtime"] > 0, report
            assert abs(report["max_perf"] - CACHED_MAX_PERF) < 1e-6, report
            assert report["error_msg"] == ""
            assert report["num_requests_recieved"] >= 3

            model.release()
            replies = await asyncio.gather(*sends)
            assert [x.status for x in replies] == [200, 200, 200]
            mark = len(platform.reports)

            def idle_report() -> dict[str, Any] | None:
                for report in platform.reports[mark:]:
                    if report.get("num_requests_working") == 0:
                        return report
                return None

            await until(idle_report, 5.0, "a report with nothing in flight")
            idle = idle_report()
            assert idle is not None
            check_1_1_0(idle)
            assert idle["cur_load"] == 0, idle
            assert idle["working_request_idxs"] == [], idle

            # served and new load over all reports add up to the three requests
            def total(name: str) -> float:
                return sum(float(rep[name]) for rep in platform.reports)

            await until(
                lambda: abs(total("cur_perf") - expected_load) < 1e-6,
                5.0,
                "cur_perf over the reports to add up to the served workload",
            )
            await until(
                lambda: abs(total("new_load") - expected_load) < 1e-6,
                5.0,
                "new_load over the reports to add up to the received workload",
            )
        for report in platform.reports:
            check_1_1_0(report)
        assert caplog.records, "nothing logged at all: the check below would prove nothing"
        assert TOKEN not in caplog.text, "MASTER_TOKEN logged whole"

    run(main())


@pytest.mark.parametrize(
    ("token", "report_format"), [("", "auto"), (TOKEN, "2024")], ids=["no-token", "2024"]
)
def test_2024_report_format(tmp_path: Path, token: str, report_format: str) -> None:
    async def main() -> None:
        async with (
            FakeAutoscaler() as platform,
            platform_worker(
                tmp_path, platform, master_token=token, report_format=report_format
            ) as r,
        ):
            assert (await generate(r, "seed")).status == 200
            await until(lambda: len(platform.reports) >= 2, 5.0, "two reports")
        for report in platform.reports:
            assert set(report) == SEED_REPORT_FIELDS, sorted(set(report) ^ SEED_REPORT_FIELDS)
            assert report["id"] == CONTAINER_ID

    run(main())


def test_1_1_0_report_without_token_when_asked(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            FakeAutoscaler() as platform,
            platform_worker(tmp_path, platform, master_token="", report_format="1.1.0"),
        ):
            await until(lambda: platform.reports, 5.0, "a report")
        for report in platform.reports:
            assert set(report) == REPORT_1_1_0_FIELDS, sorted(set(report) ^ REPORT_1_1_0_FIELDS)
            assert report["version"] == "1.1.0"

    run(main())


def test_report_addr_fallback_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as first, FakeAutoscaler() as second:
            addrs = [UNUSED_URL, first.url, second.url]
            async with platform_worker(tmp_path, first, report_addrs=addrs) as r:
                first.failing = True
                # the first address is down, the second answers 500: the third receives
                await until(lambda: second.reports, 5.0, "reports at the third address")
                assert first.report_attempts > 0
                assert (await generate(r, "seed", request_idx=31)).status == 200
                await until(
                    lambda: 31 in {e["request_idx"] for b in second.deletes for e in b["requests"]},
                    5.0,
                    "the completion report at the third address",
                )
                check_1_1_0(second.reports[-1])
                # the second recovers: it takes the reports, the third no longer gets any
                first.failing = False
                await until(lambda: len(first.reports) >= 2, 5.0, "reports at the second again")
                settled = len(second.reports)
                await until(lambda: len(first.reports) >= 6, 5.0, "more reports at the second")
                assert len(second.reports) == settled
                assert (await generate(r, "seed", request_idx=32)).status == 200
                await until(lambda: 32 in first.completed(), 5.0, "completion at the second")
                assert 32 not in {e["request_idx"] for b in second.deletes for e in b["requests"]}

    run(main())


# 4. Completion reports ###########################################################################


def check_completions(platform: FakeAutoscaler, expected: dict[int, str]) -> None:
    """Each expected request_idx exactly once, with its status; well-formed bodies."""
    for body in platform.deletes:
        assert set(body) == {"worker_id", "mtoken", "requests"}, body
        assert body["worker_id"] == CONTAINER_ID
        assert body["mtoken"] == TOKEN
        assert isinstance(body["requests"], list)
        assert body["requests"], "an empty completion report"
    entries = platform.completions()
    counts = collections.Counter(e["request_idx"] for e in entries)
    assert {i: n for i, n in counts.items() if n != 1} == {}, "reported more than once"
    assert set(counts) == set(expected), (sorted(counts), sorted(expected))
    now = time.time()
    for entry in entries:
        assert set(entry) == COMPLETION_FIELDS, entry
        idx = entry["request_idx"]
        assert is_int(idx)
        assert entry["status"] == expected[idx], (idx, entry)
        assert entry["success"] is (expected[idx] in ("Success", "Cancelled")), entry
        for name in ("entered_queue_at", "work_started_at", "work_completed_at"):
            value = entry[name]
            assert isinstance(value, float), (name, entry)
            assert value == 0.0 or now - 60 < value <= now + 1, (name, entry)
        if entry["status"] == "Success":
            assert 0 < entry["entered_queue_at"] <= entry["work_started_at"], entry
            assert entry["work_started_at"] <= entry["work_completed_at"], entry


def test_completion_reports_every_outcome_once(tmp_path: Path) -> None:
    expected: dict[int, str] = {}
    big = " ".join(["word"] * 20)  # workload 20: 10 s of queue at max_perf 2

    async def main() -> None:
        model = HeldModel(crash_after=2, tokens=6)
        async with (
            FakeAutoscaler() as platform,
            platform_worker(
                tmp_path,
                platform,
                loaded=False,
                max_queue_time=1.0,
                model=model,
                report_check_interval=0.02,
            ) as r,
        ):
            # 503 before the model is loaded: Rejected
            reply = await generate(r, "seed", request_idx=1)
            assert reply.status == 503, reply
            expected[1] = "Rejected"
            append(tmp_path / "model.log", FakeModel.LOADED_LINE + "\n")
            await r.wait_ready()

            assert (await generate(r, "seed", request_idx=2)).status == 200
            expected[2] = "Success"
            assert (await generate(r, "url", request_idx=3)).status == 200
            expected[3] = "Success"

            bad = ticket(r, "seed", request_idx=4)
            bad["signature"] = signed(KEY, "not the message")
            assert (await send(r, bad)).status == 401
            expected[4] = "Rejected"

            reply = await send(r, ticket(r, "seed", request_idx=5), prompt=None)
            assert reply.status == 422, reply
            expected[5] = "Error"

            model.fail_status = 500
            assert (await generate(r, "seed", request_idx=6)).status == 500
            model.fail_status = None
            expected[6] = "Error"

            # a request held at the model, one refused for the queue, then the first's client
            # goes away
            model.hold()
            client = await RawClient.connect(r.port)
            body = {"auth_data": ticket(r, "seed", request_idx=7), "payload": {"prompt": big}}
            await client.send(encode_request("POST", "/generate", body))
            await until(lambda: model.held == 1, 5.0, "the request held at the model")
            reply = await generate(r, "seed", request_idx=8, prompt="short one")
            assert reply.status == 429, reply
            expected[8] = "Rejected"
            client.abort()
            expected[7] = "Cancelled"
            await until(lambda: 7 in platform.completed(), 5.0, "the cancelled request")
            model.release()

            # the model hangs up in the middle of a stream
            reply = await send(r, ticket(r, "seed", request_idx=9), route="/generate_stream")
            assert reply.status == 200 and not reply.complete, reply
            expected[9] = "Error"

            # a request without request_idx is served, and not reported
            assert (await generate(r, "seed")).status == 200

            await until(
                lambda: set(platform.completed()) >= set(expected),
                5.0,
                "completion reports for every request so far",
            )
            # the model is gone: 502
            await model.stop()
            assert (await generate(r, "seed", request_idx=10)).status == 502
            expected[10] = "Error"
            await until(lambda: 10 in platform.completed(), 5.0, "the 502's completion")
            await asyncio.sleep(0.3)  # nothing more should come
            check_completions(platform, expected)
            times = platform.delete_times
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(gap > 0.8 for gap in gaps), gaps  # batches at most every second
            rejected = sum(float(rep["rej_load"]) for rep in platform.reports)
            assert rejected >= workload("short one"), platform.reports
        check_completions(platform, expected)  # stopping sent nothing twice

    run(main())


def test_completion_reports_kept_while_the_autoscaler_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:

            def failed_for() -> float:
                times = platform.delete_attempt_times
                return times[-1] - times[0] if times else 0.0

            platform.failing = True
            assert (await generate(r, "seed", request_idx=21)).status == 200
            assert (await generate(r, "url", request_idx=22)).status == 200
            # refused over more than a second: more than one round of delivery
            await until(
                lambda: platform.delete_attempts >= 2 and failed_for() > 1.2,
                8.0,
                "refused deliveries over more than a second",
            )
            assert platform.deletes == []
            platform.failing = False
            await until(lambda: set(platform.completed()) == {21, 22}, 8.0, "the delayed delivery")
            await asyncio.sleep(0.3)
            check_completions(platform, {21: "Success", 22: "Success"})
        check_completions(platform, {21: "Success", 22: "Success"})

    run(main())


# 5. /pyworker/update, health, fast refusals ######################################################


def update_request(authorization: str | None) -> bytes:
    head = "POST /pyworker/update HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
    if authorization is not None:
        head += f"Authorization: {authorization}\r\n"
    return (head + "Connection: close\r\n\r\n").encode()


def test_pyworker_update(tmp_path: Path) -> None:
    async def main() -> None:
        flag = tmp_path / "force_update"
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            for wrong in (None, "Bearer wrong-token", f"Bearer {TOKEN}x", TOKEN, "Bearer "):
                reply = await request_bytes(r.port, update_request(wrong))
                assert reply.status == 401, (wrong, reply)
                assert not flag.exists()
            reply = await request_bytes(r.port, update_request(f"Bearer {TOKEN}"))
            assert reply.status == 200, reply
            assert reply.json() == {"ok": True}
            assert flag.exists()

    run(main())


def test_pyworker_update_without_master_token(tmp_path: Path) -> None:
    async def main() -> None:
        flag = tmp_path / "force_update"
        async with (
            FakeAutoscaler() as platform,
            platform_worker(tmp_path, platform, master_token="") as r,
        ):
            for auth in (None, "Bearer ", "Bearer x"):
                reply = await request_bytes(r.port, update_request(auth))
                assert reply.status == 404, (auth, reply)
            assert not flag.exists()

    run(main())


def test_health_endpoint_gates_readiness_and_errors_after_three_failures(tmp_path: Path) -> None:
    async def main() -> None:
        model = HeldModel()
        model.health_failures = 10**6

        async def more_polls(count: int) -> None:
            target = model.health_polls + count
            await until(lambda: model.health_polls >= target, 5.0, f"{count} more health polls")

        async with (
            FakeAutoscaler() as platform,
            platform_worker(
                tmp_path, platform, ready=False, model=model, model_health_endpoint="/health"
            ) as r,
        ):
            await until(lambda: model.health_polls >= 8, 5.0, "health polls before the first 200")
            assert r.backend.state not in (State.READY, State.ERRORED), r.backend.state
            assert (await generate(r, "seed")).status == 503
            model.health_failures = 0
            await r.wait_ready(5.0)
            assert (await generate(r, "seed")).status == 200
            for failures in (1, 2):
                model.health_failures = failures
                await more_polls(6)
                assert model.health_failures == 0
                assert r.backend.state is State.READY, (failures, r.backend.error_msg)
            model.health_failures = 3
            await until(lambda: r.backend.state is State.ERRORED, 5.0, "errored after 3 failures")
            assert (await generate(r, "seed")).status == 503

    run(main())


def test_health_endpoint_alone_makes_ready_without_model_log(tmp_path: Path) -> None:
    async def main() -> None:
        model = HeldModel()
        model.health_failures = 3
        async with (
            FakeAutoscaler() as platform,
            platform_worker(
                tmp_path,
                platform,
                ready=False,
                model=model,
                model_log=None,
                model_health_endpoint="/health",
            ) as r,
        ):
            assert not (tmp_path / "model.log").exists()
            await r.wait_ready(8.0)
            assert model.health_polls >= 4
            assert (await generate(r, "seed", request_idx=41)).status == 200

    run(main())


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="worker.example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16", data[:8]
    return data


def test_tls_client_hello_on_plain_port_closed_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            async with raw_client(r.port) as client:
                start = time.monotonic()
                await client.send(client_hello())
                received, closed = await client.until_closed(5.0)
                elapsed = time.monotonic() - start
            assert closed, "not closed within 5 s"
            assert elapsed < 0.5, f"closed after {elapsed:.2f}s"
            assert len(received) < 4096, received[:200]
            assert (await generate(r, "seed")).status == 200  # the worker is fine

    run(main())


def test_bare_lf_request_line_gets_400_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            for data in (
                b"GET /ping HTTP/1.1\nHost: 127.0.0.1\n\n",
                b"GET /ping HTTP/1.1\nHost: 127.0.0.1\r\n\r\n",
            ):
                async with raw_client(r.port, timeout=5.0) as client:
                    start = time.monotonic()
                    await client.send(data)
                    status, _ = await client.head()
                    elapsed = time.monotonic() - start
                assert status == 400, (data, status)
                assert elapsed < 0.5, f"400 after {elapsed:.2f}s"
            reply = await request_bytes(
                r.port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert reply.status == 200 and reply.body == b"pong"

    run(main())


def test_bare_lf_request_line_in_pieces_gets_400_at_once(tmp_path: Path) -> None:
    """The same, when the request line arrives over more than one TCP segment."""

    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            for parts in (
                [b"GET /ping HTTP/1.1", b"\nHost: 127.0.0.1\n\n"],
                [b"G", b"ET /ping HTTP/1.1\n"],
            ):
                async with raw_client(r.port, timeout=5.0) as client:
                    start = time.monotonic()
                    for part in parts:
                        await client.send(part)
                        await asyncio.sleep(0.05)
                    status, _ = await client.head()
                    elapsed = time.monotonic() - start
                assert status == 400, (parts, status)
                assert elapsed < 0.6, f"400 after {elapsed:.2f}s"

    run(main())


# Regressions from the review of this protocol's code ############################################


def test_claimed_cost_is_never_negative_nor_an_error() -> None:
    # Guards: an unverified cost of -1e12 made cur_load negative; 10**400 raised OverflowError
    # on the stdlib JSON path (a 500 per request).
    for cost, expected in ((-1e12, 0.0), (10**400, 0.0), ("1e999", 0.0), ("7", 7.0), (True, 0.0)):
        assert pyworker.peek_auth({"auth_data": {"cost": cost, "request_idx": 3}}) == (3, expected)


def test_a_bad_signature_adds_no_rejected_load(tmp_path: Path) -> None:
    # Guards: an anonymous 401 once added whatever cost it claimed to rej_load.
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            bad = ticket(r, "seed", request_idx=77, cost="1000000")
            bad["signature"] = signed(KEY, "not the message")
            assert (await send(r, bad)).status == 401
            assert r.backend.metrics.refused.requests == 1
            assert r.backend.metrics.refused.workload == 0.0
            await until(lambda: 77 in platform.completed(), 5.0, "the 401's completion")
            assert platform.completed()[77]["status"] == "Rejected"

    run(main())


def test_each_request_idx_is_reported_once_even_if_its_ticket_comes_twice(tmp_path: Path) -> None:
    # Guards: a url-layout ticket (never spent) sent twice reported its request_idx twice.
    async def main() -> None:
        async with FakeAutoscaler() as platform, platform_worker(tmp_path, platform) as r:
            auth = ticket(r, "url", request_idx=88)
            assert (await send(r, auth)).status == 200
            assert (await send(r, auth)).status == 200
            await until(lambda: 88 in platform.completed(), 5.0, "the completion")
            await asyncio.sleep(1.3)  # a second batch would have left by now
            entries = [e for d in platform.deletes for e in d["requests"]]
            assert [e["request_idx"] for e in entries].count(88) == 1, entries

    run(main())


def test_completions_queued_during_a_send_are_not_lost() -> None:
    # Guards: entries dropped from a full queue while a batch was being sent made the send's
    # clean-up take newer, unsent entries out of the queue.
    class Small(pyworker.PlatformReporter):
        MAX_PENDING = 3

    async def main() -> None:
        reporter: pyworker.PlatformReporter | None = None

        async def delete(request: Request) -> Response:
            assert reporter is not None
            for idx in (10, 11, 12, 13):  # arrive while the batch [1, 2, 3] is in flight
                reporter.completed(pyworker.completion(idx, "Success", 1.0))
            return pyworker.json_response({"ok": True})

        server = pyworker.HttpServer([post("/delete_requests/", delete)])
        port = await server.start("127.0.0.1", 0)
        try:
            config = pyworker.Config(report_addrs=[f"http://127.0.0.1:{port}"], master_token="t")
            reporter = Small(config, pyworker.Metrics(), pyworker.Lifecycle())
            for idx in (1, 2, 3):
                reporter.completed(pyworker.completion(idx, "Success", 1.0))
            assert await reporter.send_completions()
            assert [e["request_idx"] for e in reporter.pending] == [11, 12, 13]
            assert reporter.dropped == 4  # 1, 2, 3 (sent anyway) and 10 were pushed out
            await reporter.close()
        finally:
            await server.shutdown(0.0)

    run(main())
