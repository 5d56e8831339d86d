"""What tripped a new user (issue 14): --help, old Pythons, bad environment lines, a missing
model log, and shaping the model request (headers, JSON body, multipart uploads)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.parser
import email.policy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import (
    ROOT,
    UNUSED_URL,
    WORKER_FILE,
    Runner,
    loaded_model_log,
    request,
    worker_rig,
)

import hello_world
import pyworker
from test_load import FakeModel

run = Runner(timeout=30.0)
PYWORKER_FILE = ROOT / "pyworker.py"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "MODEL_"))}
    env.update(PYTHONPATH=str(ROOT), REPORT_ADDR=UNUSED_URL, **extra)
    return env


def _run(*args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *args],
        cwd=ROOT,
        env=_clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


# --help, arguments, old Pythons ###################################################################


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_worker_file_help_prints_usage_and_exits_0(flag: str) -> None:
    # Guards: `python hello_world.py --help` once started a real worker on all interfaces.
    done = _run(str(WORKER_FILE), flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python hello_world.py")
    for name in ("WORKER_PORT", "MODEL_LOG", "MASTER_TOKEN", "BENCHMARK_CACHE"):
        assert name in done.stdout
    assert "listening" not in done.stdout + done.stderr


def test_worker_file_refuses_unknown_arguments() -> None:
    done = _run(str(WORKER_FILE), "--port", "3000")
    assert done.returncode == 2
    assert "unknown argument '--port'" in done.stderr
    assert "listening" not in done.stdout + done.stderr


def test_pyworker_help_says_what_it_is() -> None:
    done = _run(str(PYWORKER_FILE), "--help")
    assert done.returncode == 0, done.stderr
    assert "run a worker file" in done.stdout and "WORKER_PORT" in done.stdout
    bare = _run(str(PYWORKER_FILE))
    assert bare.returncode == 2 and "hello_world.py" in bare.stderr


def _old_python() -> str | None:
    """A Python 3.8 or 3.9 that really runs (pyenv's shims exist even where it does not)."""
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates = [str(p / "bin" / "python") for p in sorted(pyenv.glob("3.[89].*"))]
    candidates += [found for n in ("python3.9", "python3.8") if (found := shutil.which(n))]
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info < (3, 10))"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


def test_python_older_than_3_10_stops_with_one_line() -> None:
    old = _old_python()
    if old is None:
        pytest.skip("no Python 3.8 or 3.9 on this machine")
    done = _run(str(WORKER_FILE), python=old)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 and "Python 3.10 or newer" in lines[0], lines


# Bad environment values name their variable ######################################################


def test_worker_host_is_checked() -> None:
    with pytest.raises(pyworker.ConfigError, match="WORKER_HOST"):
        pyworker.Config.from_env({"WORKER_HOST": "999.1.1.1"})
    with pytest.raises(pyworker.ConfigError, match="WORKER_HOST"):
        pyworker.Config.from_env({"WORKER_HOST": "not a host"})
    for good in ("127.0.0.1", "::1", "localhost", "worker-1.example.com"):
        assert pyworker.Config.from_env({"WORKER_HOST": good}).host == good


def test_pubkey_file_without_a_key_is_refused_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "key.pem"
    empty.write_text("not a key\n")
    with pytest.raises(pyworker.ConfigError, match="PUBKEY_FILE") as info:
        pyworker.Config.from_env({"PUBKEY_FILE": str(empty)})
    assert "no PEM public key" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"), [("WORKER_HOST", "999.1.1.1"), ("SIGNATURE_LAYOUTS", "url,rsa")]
)
def test_bad_value_stops_the_process_with_one_line(name: str, value: str) -> None:
    done = _run(str(WORKER_FILE), **{name: value})
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 1
    assert len(lines) == 1 and name in lines[0], lines


def test_missing_model_log_is_warned_with_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no" / "model.log"
    seen: list[str] = []

    async def main() -> None:
        watcher = pyworker.ModelLogWatcher(
            str(missing), [], on_loaded=seen.append, on_error=seen.append, poll_interval=0.01
        )
        task = asyncio.ensure_future(watcher.run())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="pyworker"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning, not one per poll (the next comes MISSING_LOG_WARNING seconds later)
    assert len(warnings) == 1 and str(missing) in warnings[0], warnings
    assert pyworker.MISSING_LOG_WARNING == 30.0


# Shaping the model request #######################################################################


@dataclasses.dataclass
class Transcribe(pyworker.ApiPayload):
    audio_b64: str
    language: str = "en"

    @classmethod
    def for_test(cls) -> Transcribe:
        return cls(audio_b64="AAEC")

    def generate_payload_json(self) -> dict[str, Any]:
        return {"language": self.language}

    def count_workload(self) -> float:
        return 1.0


class StreamingChat(pyworker.EndpointHandler[hello_world.InputData]):
    """A model server started with an API key, whose route needs "stream": true."""

    endpoint = "/generate"

    def model_body(self, payload: hello_world.InputData) -> dict[str, Any] | pyworker.Multipart:
        return {**payload.generate_payload_json(), "stream": True}

    def model_headers(self, payload: hello_world.InputData) -> list[tuple[str, str]]:
        return [("Authorization", "Bearer sk-model"), ("X-Trace", "t1")]


class Upload(pyworker.EndpointHandler[Transcribe]):
    endpoint = "/transcribe"

    def model_body(self, payload: Transcribe) -> dict[str, Any] | pyworker.Multipart:
        return pyworker.Multipart(
            {"language": payload.language, "note": 'quote " and\r\nnewline'},
            [("file", 'a "b".wav', "audio/wav", bytes(range(256)) * 4)],
        )


@dataclasses.dataclass
class FormTranscribe(Transcribe):
    """Today's vastai form of an upload: the payload names its form fields itself."""

    def generate_payload_multipart(self) -> dict[str, Any] | None:
        return {
            "file": ("a.wav", bytes(range(256)), "audio/wav"),
            "language": self.language,
            "timestamp_granularities": ["word", "segment"],  # a list repeats its field
            "options": {"beam": 5},  # a dict is sent as JSON text
            "stream": False,
            "prompt": None,  # left out
        }


class FormUpload(pyworker.EndpointHandler[FormTranscribe]):
    endpoint = "/transcribe"


def _parse_multipart(content_type: str, body: bytes) -> list[Any]:
    """The parts of a multipart/form-data body, by the standard library's MIME parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart()
    parts: list[Any] = list(message.iter_parts())  # pyright: ignore[reportAttributeAccessIssue, reportUnknownArgumentType, reportUnknownMemberType]
    return parts


def test_multipart_encoding_parses_back() -> None:
    multipart = Upload().model_body(Transcribe.for_test())
    assert isinstance(multipart, pyworker.Multipart)
    content_type, body = multipart.encode()
    parts = _parse_multipart(content_type, body)
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        "language",
        "note",
        "file",
    ]
    assert parts[0].get_payload(decode=True) == b"en"
    # a quote and CR LF in a value are data; in a name they would be escaped
    assert parts[1].get_payload(decode=True) == b'quote " and\r\nnewline'
    assert parts[2].get_content_type() == "audio/wav"
    assert parts[2].get_payload(decode=True) == bytes(range(256)) * 4
    assert parts[2].get_param("filename", header="content-disposition") == "a %22b%22.wav"


def test_payload_multipart_fields_are_sent_as_a_form() -> None:
    # Guards vastai's generate_payload_multipart() (vllm's upload routes are served only when
    # ApiPayload has it): the default model_body sends its fields as multipart/form-data.
    assert "generate_payload_multipart" in vars(pyworker.ApiPayload)
    multipart = FormUpload().model_body(FormTranscribe(audio_b64="x", language="de"))
    assert isinstance(multipart, pyworker.Multipart)
    parts = _parse_multipart(*multipart.encode())
    names = [p.get_param("name", header="content-disposition") for p in parts]
    repeated = ["timestamp_granularities"] * 2
    assert names == ["language", *repeated, "options", "stream", "file"]
    values = [p.get_payload(decode=True) for p in parts]
    assert values[:5] == [b"de", b"word", b"segment", b'{"beam":5}', b"false"]
    assert parts[5].get_content_type() == "audio/wav" and values[5] == bytes(range(256))
    # a payload without it is JSON, as before
    assert Upload().model_body(Transcribe.for_test()) is not None
    assert isinstance(StreamingChat().model_body(hello_world.InputData.for_test()), dict)
    with pytest.raises(TypeError, match="file tuple"):
        pyworker.Multipart.from_form({"file": b"raw bytes"})


def test_multipart_refuses_a_header_injection() -> None:
    bad = pyworker.Multipart({}, [("f", "x", "text/plain\r\nX-Evil: 1", b"")])
    with pytest.raises(ValueError, match="CR or LF"):
        bad.encode()


class RecordingModel:
    """A model server that keeps every request whole (headers and raw body) and answers JSON."""

    def __init__(self) -> None:
        self.seen: list[pyworker.Request] = []
        self.server = pyworker.HttpServer(
            [pyworker.post("/generate", self._answer), pyworker.post("/transcribe", self._answer)]
        )
        self.port = 0

    async def _answer(self, request: pyworker.Request) -> pyworker.Response:
        self.seen.append(request)
        return pyworker.json_response({"text": "ok"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_model_request_headers_body_and_multipart_reach_the_model(tmp_path: Path) -> None:
    async def main() -> None:
        model = RecordingModel()
        model.port = await model.server.start("127.0.0.1", 0)
        loaded_model_log(tmp_path)
        try:
            async with worker_rig(
                tmp_path,
                model_url=model.url,
                report_addrs=[UNUSED_URL],
                handler=StreamingChat(),
                routes=lambda backend: [
                    pyworker.post("/chat", backend.create_handler(StreamingChat())),
                    pyworker.post("/transcribe", backend.create_handler(Upload())),
                ],
                log_actions=[(pyworker.LogAction.ModelLoaded, FakeModel.LOADED_LINE)],
                benchmark_runs=1,
                unsecured=True,
            ) as rig:
                # the benchmark went through the hooks too
                assert (
                    model.seen and model.seen[0].headers.get("authorization") == "Bearer sk-model"
                )
                body = {"payload": {"prompt": "hello world", "max_response_tokens": 3}}
                reply = await request(rig.port, "POST", "/chat", body)
                assert reply.status == 200
                chat = model.seen[-1]
                assert chat.headers.get("authorization") == "Bearer sk-model"
                assert chat.headers.get("x-trace") == "t1"
                assert chat.headers.get("content-type") == "application/json"
                sent = pyworker.json_loads(chat.body)
                assert sent == {"prompt": "hello world", "max_response_tokens": 3, "stream": True}
                upload_body = {"payload": {"audio_b64": "x"}}
                reply = await request(rig.port, "POST", "/transcribe", upload_body)
                assert reply.status == 200, reply.body
                upload = model.seen[-1]
                content_type = upload.headers.get("content-type") or ""
                assert content_type.startswith("multipart/form-data; boundary=")
                parts = _parse_multipart(content_type, upload.body)
                assert parts[2].get_payload(decode=True) == bytes(range(256)) * 4
        finally:
            await model.server.shutdown(0.0)

    run(main())
