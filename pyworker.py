"""pyworker: a standard-library PyWorker for serverless GPU endpoints.

A PyWorker is the small server that runs beside a model server (an LLM, an image
generator) on a rented GPU instance. The platform's autoscaler routes a client to this
worker and hands the client a signed ``auth_data``; the client then calls the worker
directly.

For worker authors: a worker file (hello_world.py is one) subclasses two classes, makes a
Backend and calls run(). These names are all it needs (they are __all__), each listed with
the section of this file it is in (sections start with a banner line "# Name ####").

    Payload protocol      ApiPayload        the model API's request fields: a dataclass
                                            with for_test(), generate_payload_json() and
                                            count_workload()
    Errors                JsonDataException bad fields in a client's JSON (422)
                          HttpError         raise it to answer with a status
    Handler base classes  EndpointHandler   one model route: `endpoint = "/generate"`, the
                                            payload class in EndpointHandler[MyPayload]
                          relay, relay_json, relay_stream
                                            the model's answer, as the client's answer: as
                                            it is, read whole, or chunk by chunk
                          Multipart         a multipart/form-data body for the model
                          LogAction         what a line of the model's log means
    Backend               Backend           the worker: model URL, log actions, benchmark
    HTTP client           ClientResponse    the model's answer (status, headers, read(),
                                            json(), iter_chunks())
    HTTP server           Request, Response what a handler gets and returns
                          json_response, text_response, error_response
                          post, get         a route: post("/generate", create_handler(...))
    Server and run()      run               run(backend, routes): serve until SIGTERM

Worker files written for other libraries run with their imports changed to pyworker's (the
README's "Bring your worker"); these names are for them, not for new worker files:

    Compatibility: the 2024 lib
                          web               aiohttp.web's names: Request, Response,
                                            StreamResponse, json_response, post, get
                          start_server      start_server(backend, routes): run()
                          AuthData          the autoscaler's ticket (lib.data_types')
                          and, in the core: Backend(max_wait_time=), backend.session;
                          EndpointHandler(benchmark_runs=...); ClientResponse.content
    Compatibility: today's vastai workers
                          Worker            Worker(config).run(), await .run_async()
                          WorkerConfig      the model server, log, handlers, lifecycle
                          HandlerConfig     one route: parallel, queue time, parser,
                                            workload, response_generator, classes
                          BenchmarkConfig   the benchmark: dataset or generator, runs
                          LogActionConfig   on_load, on_error, on_info log lines

Everything else is the machinery behind them, readable top to bottom.

One request travels through this module like this:

    client --POST /generate {"auth_data": ..., "payload": ...}--> HttpServer
      HttpServer._serve_connection   read_request_head / read the body (strict RFC 9112)
      Backend.create_handler(...)    Admission.admit: ready? -> JSON -> AuthData -> verify
                                     the signature (SignatureChecker) -> ApiPayload.from_json_msg
                                     -> count_workload
                                     -> wait for the model (FIFO when one at a time)
      HttpClient.request             POST payload.generate_payload_json() to the model
      EndpointHandler                turn the model's answer into the client's Response
      HttpServer._write_response     JSON with Content-Length, or a chunked stream relayed
                                     chunk by chunk (cut, not finished, if the model breaks)
    client <-------------------------------------------------------------------------

Beside the requests, the Backend's parts work in the background: ModelReadiness takes the
model from loading to ready (ModelLogWatcher tails the model's log: loaded / errored;
ModelApiWait waits for the model's API to open after that; Benchmark measures the model's
throughput; HealthCheck polls the model's health route), LoadReporter (the seed's format) or
PlatformReporter (today's, with completion reports) reports load to the autoscaler
(POST {REPORT_ADDR}/worker_status/), SessionTable keeps the sessions clients open (Admission
opens them, as it admits requests); Lifecycle holds the state they move, Metrics the counts.

A server connection is one task moving through phases (_Phase); each phase has a deadline
that one sweeper task enforces, and a client going away in the last two cancels the task:

    IDLE ---byte---> HEAD ---CRLF CRLF---> BODY ---read---> HANDLING ---head sent---> RESPONDING
    keep-alive       HEAD_TIMEOUT          BODY_TIMEOUT     (the model's time)        WRITE_TIMEOUT
     ^                                                                                   |
     +------------------------- keep-alive (HTTP/1.1 default) ---------------------------+--> close

Environment (validated at start by Config.from_env; a bad value stops the worker with one
line naming the variable):

    WORKER_PORT       port to listen on (3000)
    WORKER_HOST       address to listen on (0.0.0.0; 127.0.0.1 keeps it off the network)
    MODEL_LOG         the model server's log file (required to become ready)
    MODEL_SERVER_URL  overrides the worker file's model URL
    REPORT_ADDR       autoscaler base URL(s), comma-separated (https://run.vast.ai)
    CONTAINER_ID      worker id in load reports (0)
    PUBLIC_IPADDR, VAST_TCP_PORT_<WORKER_PORT>   the public address reported as `url`
    USE_SSL           true: serve TLS with /etc/instance.crt and /etc/instance.key
                      (WORKER_SSL_CERT / WORKER_SSL_KEY override the paths)
    UNSECURED         true: do not check signatures (says so loudly)
    PUBKEY_FILE       PEM public key instead of fetching {REPORT_ADDR}/pubkey/
    MAX_BODY_BYTES    largest request body accepted (16 MiB)
    LOG_LEVEL         DEBUG, INFO (default), WARNING, ERROR
    MASTER_TOKEN      today's platform: `mtoken` in reports; the key to POST /pyworker/update
    REPORT_FORMAT     1.1.0 (today's reports), 2024 (the seed's), auto (1.1.0 with a token)
    SIGNATURE_LAYOUTS signed messages accepted: url, fields, seed (all three)
    MODEL_HEALTH_ENDPOINT  the model's health route (path or URL); ready after its first 200
    FORCE_UPDATE_FILE the flag file POST /pyworker/update creates (/.force_update)
    WORKER_HTTP_PORT  plain-HTTP port for /session/end beside TLS (WORKER_PORT + 1)
    MODEL_API_WAIT    seconds to wait after the model's loaded line for its API to open
                      (and for the health route's first 200) before erroring (600)
    BENCHMARK_CACHE   where the benchmark's figure is kept (.has_benchmark), or off

Standard library only; uvloop and orjson are used when they can be imported.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 10):  # noqa: UP036 - one line, before a 3.10 feature's traceback
    sys.exit(f"pyworker needs Python 3.10 or newer; this is Python {sys.version.split()[0]}")

import abc
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import hashlib
import hmac
import http
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import ssl
import time
import types
import typing
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, ClassVar, Generic, TypeVar

__all__ = [
    "ApiPayload",
    "AuthData",
    "Backend",
    "BenchmarkConfig",
    "ClientResponse",
    "EndpointHandler",
    "HandlerConfig",
    "HttpError",
    "JsonDataException",
    "LogAction",
    "LogActionConfig",
    "Multipart",
    "Request",
    "Response",
    "Worker",
    "WorkerConfig",
    "error_response",
    "get",
    "json_response",
    "post",
    "relay",
    "relay_json",
    "relay_stream",
    "run",
    "start_server",
    "text_response",
    "web",
]

# Optional accelerators ###########################################################################


def _json_int(text: str) -> int | float:
    """An integer as orjson reads it, so that a worker gets the same payload from either
    parser: beyond 64 bits (signed below zero, unsigned above) it is a float."""
    if len(text) < 19:
        return int(text)
    if len(text) <= 21 and -(2**63) <= (value := int(text)) < 2**64:
        return value
    return _json_float(text)


def _json_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError("number is infinity as a double")  # 1e400: orjson refuses it too
    return number


def _json_constant(text: str) -> typing.NoReturn:
    raise ValueError(f"{text} is not JSON")  # NaN and Infinity (RFC 8259): orjson refuses them


_json_decoder = json.JSONDecoder(
    parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
)
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def stdlib_json_loads(data: bytes) -> Any:
    """JSON with the json module, read as orjson reads it (the same payload either way)."""
    return _json_decoder.decode(data.decode("utf-8"))


try:  # orjson parses and serialises JSON about 5x faster than the json module.
    import orjson

    # Before 3.9.15, orjson crashed the process (SIGSEGV) on deeply nested input, which any
    # client can send: such a version is not used.
    if tuple(int(p) for p in re.findall(r"\d+", orjson.__version__)[:3]) < (3, 9, 15):
        raise ImportError("orjson older than 3.9.15")

    def json_loads(data: bytes) -> Any:
        return orjson.loads(data)

    def json_dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _JSON_DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised by the bare-interpreter run
    json_loads = stdlib_json_loads

    def json_dumps(obj: Any) -> bytes:
        return _json_encoder.encode(obj).encode("utf-8")

    _JSON_DECODE_ERRORS = (  # pyright: ignore[reportConstantRedefinition]
        ValueError,
        RecursionError,
    )


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed; returns whether it is."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # pyright: ignore
    return True


log = logging.getLogger("pyworker")
access_log = logging.getLogger("pyworker.access")


class _AccessLogLine:
    """Writes a line to the access log (the caller checks access_log.isEnabledFor(INFO)).

    run() points `direct` at its own log handler when nothing else listens to the access
    log, so that a line is a string in a buffer instead of a LogRecord (about 4 us a line
    instead of 11, on a request that costs the worker some 140 us in all)."""

    def __init__(self) -> None:
        self.direct: Callable[[str], None] | None = None

    def __call__(self, message: str) -> None:
        if self.direct is not None and not access_log.filters:
            self.direct(message)
        else:
            access_log.info("%s", message)


_access_log_line = _AccessLogLine()

# Limits ##########################################################################################
# Each limit answers a status (or closes the connection) instead of letting a client make the
# worker buffer or wait without end.

MAX_REQUEST_LINE = 8 * 1024  # 414 past this; URIs here are short route names
MAX_HEAD = 64 * 1024  # 431: request line + headers; h11 allows 16 KiB, http.client 64 KiB
MAX_HEADERS = 100  # 431: the same count http.client allows
MAX_BODY = 16 * 1024 * 1024  # 413, checked before reading; MAX_BODY_BYTES overrides
MAX_CHUNK_SIZE_DIGITS = 16  # 16 hex digits = 2**64 - 1; more is an attack, not a chunk
MAX_TRAILERS = 100  # trailer fields are read and dropped, but not without end
MAX_BODY_CHUNKS = 4096  # chunks in one request body: a JSON body needs a handful, not millions
MAX_CHUNK_LINE = 4096  # a chunk-size line with extensions; real ones are under 20 bytes
HEAD_TIMEOUT = 10.0  # seconds to receive a whole request head (slow-loris)
BODY_TIMEOUT = 60.0  # seconds to receive a whole request body once the head arrived
KEEPALIVE_TIMEOUT = 60.0  # idle seconds before a keep-alive connection is closed
WRITE_TIMEOUT = 60.0  # seconds a client may leave a response unread before it is dropped
SWEEP_INTERVAL = 0.25  # how often connections are checked against those deadlines
MAX_UPSTREAM_BODY = 256 * 1024 * 1024  # a model's JSON answer read into memory at most
UPSTREAM_READ_SIZE = 64 * 1024  # streamed model chunks are relayed in pieces of at most this
MAX_IDLE_UPSTREAM = 128  # pooled keep-alive connections to the model kept open at most
CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the model or the autoscaler
SHUTDOWN_GRACE = 30.0  # seconds in-flight requests get to finish after SIGTERM
MAX_LOG_LINE = 64 * 1024  # a model-log line is matched on its first 64 KiB (bounded memory)
MISSING_LOG_WARNING = 30.0  # seconds between warnings that MODEL_LOG does not exist
BENCHMARK_TIMEOUT = 600.0  # seconds one benchmark request may take
MODEL_API_WAIT = 600.0  # seconds after the loaded line for the model's API to open (a wrapper
# such as ComfyUI's listens after its ready line: vast-ai/pyworker#85); MODEL_API_WAIT sets it
MAX_WORKLOAD = 1e9  # 422 past this: a request's workload (count_workload); a client-chosen
# count such as max_new_tokens=1e308 would otherwise make the running sums of workload in
# flight infinite for good (inf - x = inf), and every queue-time estimate with them
MAX_RETRY_AFTER = 24 * 3600.0  # seconds a 429's Retry-After (and its estimated wait) says at most
MAX_SESSION_LIFETIME = 24 * 3600.0  # a session's lifetime, and how far requests extend it
SESSION_GC_INTERVAL = 5.0  # seconds between collections of expired sessions
SESSION_CALLBACK_TIMEOUT = 10.0  # seconds a session's close callback to the model may take
FINAL_REPORT_TIMEOUT = 3.0  # seconds the last reports at shutdown may take (a stalled autoscaler)
COMPLETION_INTERVAL = 1.0  # seconds between completion report batches, at least
REPORT_ATTEMPTS = 3  # tries per load report and address, backoff Config.report_backoff (0.5 s)
LOG_FLUSH_INTERVAL = 0.5  # seconds an INFO line may wait in the log buffer
LOG_FLUSH_LINES = 512  # ... or this many lines

# Errors ##########################################################################################


class HttpError(Exception):
    """A request that must be answered with `status` (h11's error_status_hint, as one type).

    Raised by the framing code and by handlers; the server turns it into a short JSON answer.
    A framing error also closes the connection, since the stream position is then unknown.
    """

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class UpstreamError(Exception):
    """The model server (or autoscaler) was unreachable or broke the HTTP protocol: 502."""

    status = 502


class UpstreamUnreachable(UpstreamError):
    """The upstream refused or dropped the connection before any answer: nothing listens
    there (yet), or a wrapper in front of it is restarting. 502."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time: 504."""

    status = 504


class JsonDataException(Exception):
    """Bad fields in a client's JSON: {field: message} (or one message), answered as 422
    (SPEC section 2)."""

    def __init__(self, json_msg: Mapping[str, Any] | str) -> None:
        super().__init__(json_msg)
        self.message: Any = json_msg if isinstance(json_msg, str) else dict(json_msg)


# HTTP framing ####################################################################################
# Parsing is kept apart from I/O (h11's habit): these functions take bytes and return values or
# raise HttpError; the stream code around them is thin.

# The grammar, from one character class: RFC 9110 5.6.2's tchar makes a token, and a token is a
# method, a header field name, a transfer coding or a Connection option.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+")
# Bytes never allowed in a head: NUL and the controls except HTAB; CR and LF are checked apart.
_BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# method SP origin-form SP version (RFC 9112 3), the one shape accepted; the target is printable
# ASCII without spaces. Anything else goes to _request_line_error, which says why.
_REQUEST_LINE = re.compile(rb"(%s+) (/[\x21-\x7e]*) (HTTP/1\.[01])" % _TCHAR)
# One regex checks a whole head in C: a first line, then fields "token: value CRLF" whose values
# hold no control byte but HTAB (so no bare CR or LF, no NUL, no obs-fold), then CRLF.
_FIELD = rb"%s+:[\t\x20-\x7e\x80-\xff]*\r\n" % _TCHAR
_HEAD = re.compile(rb"([^\r\n]*)\r\n((?:%s)*)\r\n" % _FIELD)
# ... and, once it passed, takes the fields apart as text (latin-1 maps bytes 1:1).
_FIELD_PARTS = re.compile(rf"({_TCHAR.decode('ascii')}+):[ \t]*([^\r]*)\r\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,%d}" % MAX_CHUNK_SIZE_DIGITS)
# A well-formed chunk-size line (RFC 9112 7.1.1), for the decoder's fast path; any other line
# goes through parse_chunk_size, which says what is wrong.
_WHOLE_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n" % MAX_CHUNK_SIZE_DIGITS
)
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2})(?: ([\x09\x20-\x7e\x80-\xff]*))?")
_DIGITS = re.compile(rb"[0-9]{1,19}")  # len(str(2**63)) == 19; more is no real length


class Headers:
    """Header fields in arrival order, names lower-cased; `get` returns the first value."""

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields = list(fields)
        index: dict[str, list[str]] = {}
        for key, value in self._fields:
            if key in index:
                index[key].append(value)
            else:
                index[key] = [value]
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._index.get(name)
        if values is None and not name.islower():  # "Content-Type": any case, as aiohttp's
            values = self._index.get(name.lower())
        return values[0] if values else default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def values(self, name: str) -> Sequence[str]:
        """Every value of `name` (lower-cased), in arrival order (for reading only: not a
        copy); get(), [] and `in` take any case."""
        return self._index.get(name, ())

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __contains__(self, name: object) -> bool:
        if name in self._index:
            return True
        return isinstance(name, str) and not name.islower() and name.lower() in self._index

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


@dataclasses.dataclass
class BodyFraming:
    """How a message body is delimited (RFC 9112 section 6.3)."""

    kind: typing.Literal["length", "chunked", "close"]
    length: int = 0


@dataclasses.dataclass
class ClientResponseHead:
    """The head of an upstream server's response (parse_response_head's result)."""

    status: int
    reason: str
    headers: Headers
    framing: BodyFraming
    keep_alive: bool


@dataclasses.dataclass
class Request:
    """One parsed client request. `body` is filled in once it has been read."""

    method: str
    target: str
    version: str
    headers: Headers
    framing: BodyFraming
    keep_alive: bool
    expect_continue: bool = False
    body: bytes = b""
    remote: str = ""
    # the server's connection it came on: how its handler may answer early (responder)
    connection: _ServerProtocol | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query_string(self) -> str:
        """The target's query, after "?" (still percent-encoded)."""
        return self.target.partition("?")[2]

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters, decoded; a repeated one keeps its first value."""
        import urllib.parse

        pairs = urllib.parse.parse_qsl(self.query_string, keep_blank_values=True)
        return dict(reversed(pairs))

    async def read(self) -> bytes:
        return self.body

    async def text(self) -> str:
        """The body, decoded with the charset its Content-Type names (UTF-8 if none)."""
        return _decode_text(self.body, self.headers.get("content-type"))

    async def json(self) -> Any:
        """The body as JSON; HttpError(400) when it is not JSON (the client's fault, where
        a model's answer that is not JSON is the model's: UpstreamError, 502)."""
        try:
            return json_loads(self.body)
        except _JSON_DECODE_ERRORS:
            raise HttpError(400, "invalid JSON") from None

    @property
    def responder(self) -> EarlyResponse | None:
        """How the handler answers before it returns (EarlyResponse); None outside a server.
        Made when first asked for: a request that never asks costs nothing."""
        proto = self.connection
        if proto is None or proto.writer is None:
            return None
        if proto.early is None:
            proto.early = EarlyResponse(self, proto, proto.writer, proto.closing)
        return proto.early

    @property
    def response_started(self) -> bool:
        """Whether the handler began its answer already (EarlyResponse.start)."""
        proto = self.connection
        return proto is not None and proto.early is not None and proto.early.started


def _decode_text(body: bytes, content_type: str | None) -> str:
    """A body as text (aiohttp's text()), for a request and a model's answer alike: in the
    charset its Content-Type names, UTF-8 if none or one Python does not know; bytes that
    do not decode become U+FFFD."""
    charset = "utf-8"
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _parse_head(head: bytes) -> tuple[bytes, Headers]:
    """The first line and the fields of a head ending in CRLF CRLF (names lower-cased)."""
    match = _HEAD.fullmatch(head)
    if match is None:
        lines = _split_head(head)  # the slow path names what is wrong
        parse_header_lines(lines[1:])
        raise HttpError(400, "malformed head")
    # A value holds no CR, so the greedy match runs to the line end; its trailing OWS is
    # stripped.
    fields = _FIELD_PARTS.findall(match.group(2).decode("latin-1"))
    if len(fields) > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    return match.group(1), Headers([(name.lower(), value.rstrip(" \t")) for name, value in fields])


def _split_head(head: bytes) -> list[bytes]:
    """Split a head (ending in CRLF CRLF) into lines; reject bare CR/LF and control bytes."""
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "head not terminated by CRLF CRLF")
    body = head[:-4]
    # RFC 9112 section 2.2: a bare CR is invalid; we also refuse bare LF line ends, which
    # some parsers accept and some do not (a smuggling vector between proxies).
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        raise HttpError(400, "bare CR or LF in head")
    if _BAD_HEAD_BYTE.search(body):
        raise HttpError(400, "control character in head")
    return body.split(b"\r\n")


def parse_header_lines(lines: Sequence[bytes]) -> Headers:
    """Parse `name: value` lines (no CRLF); names are lower-cased, values stripped of OWS."""
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise HttpError(400, "header line without a colon")
        if not _TOKEN.fullmatch(name):
            # Also catches "Name :" and obs-fold continuation lines (RFC 9112 5.1, 5.2).
            raise HttpError(400, "invalid header field name")
        fields.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return Headers(fields)


def _content_length(headers: Headers) -> int | None:
    values = headers.values("content-length")
    if not values:
        return None
    if len(values) == 1:  # the usual case, without the list handling below
        value = values[0]
        if value.isascii() and value.isdigit() and len(value) <= 19:
            return int(value)
    seen: set[bytes] = set()
    for value in values:
        for raw in value.encode("latin-1").split(b","):
            item = raw.strip(b" \t")
            if not _DIGITS.fullmatch(item):
                raise HttpError(400, "invalid Content-Length")
            seen.add(item.lstrip(b"0") or b"0")
    if len(seen) != 1:  # RFC 9112 6.3: differing lengths are unrecoverable
        raise HttpError(400, "conflicting Content-Length values")
    return int(seen.pop())


def _header_tokens(headers: Headers, name: str) -> list[str]:
    """The comma-separated list of every `name` field, lower-cased, empty items dropped
    (RFC 9110 5.6.1): Connection options, Expect, and the transfer codings."""
    values = headers.values(name)
    if not values:  # the usual case: skip the joining and splitting
        return []
    items = ",".join(values).split(",")
    return [t.strip(" \t").lower() for t in items if t.strip(" \t")]


def _keep_alive(version: str, headers: Headers) -> bool:
    """RFC 9112 9.3: HTTP/1.1 keeps the connection unless told "close"; HTTP/1.0 closes it
    unless told "keep-alive". The one rule, for requests and responses."""
    connection = _header_tokens(headers, "connection")
    if version == "HTTP/1.1":
        return "close" not in connection
    return "keep-alive" in connection and "close" not in connection


def request_framing(headers: Headers, version: str) -> BodyFraming:
    """Body framing of a request: Content-Length, chunked, or no body (RFC 9112 6.3)."""
    length = _content_length(headers)
    if headers.values("transfer-encoding"):
        if length is not None:
            # Both present: the classic smuggling setup (RFC 9112 6.3 rule 3). Refuse it.
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _header_tokens(headers, "transfer-encoding")
        if not codings or codings[-1] != "chunked":
            if codings and "chunked" in codings:
                raise HttpError(400, "chunked is not the final transfer coding")
            raise HttpError(501, "unsupported transfer coding")
        if len(codings) > 1:
            raise HttpError(501, "unsupported transfer coding")
        return BodyFraming("chunked")
    return BodyFraming("length", length or 0)


def _request_line_error(request_line: bytes) -> typing.NoReturn:
    """Say what is wrong with a request line that _REQUEST_LINE refused."""
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, _target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "invalid method")
    if not _VERSION.fullmatch(version):
        raise HttpError(400, "invalid HTTP version")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, "HTTP version not supported")
    raise HttpError(400, "invalid request target")


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (request line and fields, ending in CRLF CRLF) into a Request."""
    request_line, headers = _parse_head(head)
    if len(request_line) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        _request_line_error(request_line)
    method, target, version = match.groups()
    version_s = version.decode("ascii")
    hosts = headers.values("host")
    if len(hosts) > 1 or (not hosts and version_s == "HTTP/1.1"):
        raise HttpError(400, "exactly one Host header is required")  # RFC 9112 3.2
    framing = request_framing(headers, version_s)
    keep_alive = _keep_alive(version_s, headers)
    expectations = _header_tokens(headers, "expect")
    if any(e != "100-continue" for e in expectations):
        raise HttpError(417, "unsupported expectation")
    expect_continue = bool(expectations) and version_s == "HTTP/1.1"
    return Request(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version_s,
        headers=headers,
        framing=framing,
        keep_alive=keep_alive,
        expect_continue=expect_continue,
    )


def parse_response_head(head: bytes, *, request_method: str = "POST") -> ClientResponseHead:
    """Parse a response head from an upstream server (status line and fields)."""
    status_line, headers = _parse_head(head)
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HttpError(502, "malformed status line")
    status = int(match.group(1))
    reason = (match.group(2) or b"").decode("latin-1")
    version = status_line[:8].decode("ascii")
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        framing = BodyFraming("length", 0)
    elif headers.values("transfer-encoding"):
        codings = _header_tokens(headers, "transfer-encoding")
        # RFC 9112 6.3 rule 4: chunked last means chunked; otherwise read until close.
        framing = BodyFraming("chunked") if codings == ["chunked"] else BodyFraming("close")
        if codings and codings[-1] == "chunked" and len(codings) > 1:
            raise HttpError(502, "unsupported transfer coding from upstream")
    else:
        length = _content_length(headers)
        framing = BodyFraming("close") if length is None else BodyFraming("length", length)
    keep_alive = _keep_alive(version, headers) and framing.kind != "close"
    return ClientResponseHead(status, reason, headers, framing, keep_alive)


def parse_chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (with its CRLF): 1-16 hex digits, extensions ignored.

    Unlike http.client's int(line, 16) this refuses "0x1a", "+1a", "1_a", "-1" and " 1a".
    """
    if not line.endswith(b"\r\n"):
        raise HttpError(400, "chunk size line not terminated by CRLF")
    size, _, extension = line[:-2].partition(b";")
    size = size.rstrip(b" \t")  # RFC 9112 7.1.1: BWS may precede a chunk extension
    if not _CHUNK_SIZE.fullmatch(size):
        raise HttpError(400, "invalid chunk size")
    if b"\r" in extension or b"\n" in extension or _BAD_HEAD_BYTE.search(extension):
        raise HttpError(400, "invalid chunk extension")
    return int(size, 16)


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def response_head(
    status: int,
    headers: Iterable[tuple[str, str]],
    *,
    content_length: int | None,
    keep_alive: bool,
    chunked: bool = True,
    reason: str | None = None,
) -> bytes:
    """Serialise a status line and header fields, framed by Content-Length, or chunked when
    content_length is None (or, for an HTTP/1.0 client, by closing the connection)."""
    if reason is None:
        reason = _REASONS.get(status, "Unknown")
    elif "\r" in reason or "\n" in reason:
        raise ValueError(f"CR or LF in the reason phrase {reason!r}")
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines.append(f"Date: {_http_date()}\r\nServer: pyworker\r\n")
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"CR or LF in header field {name!r}")  # response splitting
        lines.append(f"{name}: {value}\r\n")
    if content_length is None:
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
    else:
        lines.append(f"Content-Length: {content_length}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header value (RFC 9110 5.6.7), formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))
    return _date_cache[1]


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 7.1); empty data would end the body, so refuse it."""
    if not data:
        raise ValueError("an empty chunk ends the body; skip it instead")
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


async def read_head(reader: asyncio.StreamReader, *, first_line_limit: int) -> bytes:
    """Read one head up to CRLF CRLF; the reader's limit bounds it (431 or 414)."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        # Tell an over-long request line (414) from an over-long header block (431).
        # The connection is closed after this error, so consuming the buffer is harmless.
        buffered = await reader.read(first_line_limit + 2)
        if b"\r\n" not in buffered and exc.consumed >= first_line_limit:
            raise HttpError(414, "request line too long") from None
        raise HttpError(431, "request head too large") from None


class ChunkedDecoder:
    """A sans-IO decoder of a chunked body (RFC 9112 7.1): feed() it bytes as they arrive and
    get back the chunk data completed so far; trailers are checked and dropped.

    A relay reads whatever the socket has and feeds it here, so the chunks that arrived
    together go out together, in one write, with one await per read instead of three per
    chunk. Bytes after the last chunk are kept in `trailing` (a connection that has any is
    not reused). Errors raise HttpError(400), or 413 past `max_size`.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self.total = 0
        self.done = False
        self.trailing = b""
        self.error: HttpError | None = None
        self._buffer = b""
        self._remaining = 0  # data bytes of the current chunk still to come
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done
        self._trailers = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The chunk data completed by `data`. When `data` also holds an error, the data
        before it is returned first and the error is kept in `error` (raised by the next
        feed), so a relay forwards what was good before it cuts the stream."""
        if self.error is not None:
            raise self.error
        if self.done:
            self.trailing += data
            return []
        out: list[bytes] = []
        try:
            self._decode(data, out)
        except HttpError as exc:
            if not out:
                raise
            self.error = exc
        return out

    def _decode(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        while not self.done:
            state = self._state
            if state == "size":  # the usual case: a whole chunk is here, take it in one step
                match = _WHOLE_CHUNK_SIZE.match(buf, pos)
                if match is not None:
                    size = int(match.group(1), 16)
                    end = match.end() + size
                    if size and len(buf) >= end + 2 and self._fits(size):
                        if buf[end : end + 2] != b"\r\n":
                            raise HttpError(400, "chunk data not followed by CRLF")
                        out.append(buf[match.end() : end])
                        pos = end + 2
                        continue
            if state == "data":
                take = min(self._remaining, len(buf) - pos)
                if take:
                    out.append(buf[pos : pos + take])
                    pos += take
                    self._remaining -= take
                if self._remaining:
                    break
                self._state = "crlf"
            elif state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 2
                self._state = "size"
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE:
                        raise HttpError(400, "chunk size or trailer line too long")
                    break
                line = buf[pos : end + 2]
                pos = end + 2
                if state == "size":
                    size = parse_chunk_size(line)
                    if not self._fits(size):
                        raise HttpError(413, "body too large")
                    self._remaining = size
                    self._state = "data" if size else "trailer"
                elif line == b"\r\n":  # the empty line that ends the trailer section
                    self.done = True
                    self.trailing = buf[pos:]
                    pos = len(buf)
                else:
                    self._trailers += 1
                    if self._trailers > MAX_TRAILERS:
                        raise HttpError(431, "too many trailer fields")
                    parse_header_lines([line[:-2]])  # validated, then dropped
        self._buffer = buf[pos:]

    def wants(self) -> int:
        """How many bytes the decoder needs next: 0 for a line (chunk size or trailer)."""
        if self._state == "data":
            return self._remaining
        if self._state == "crlf":
            return 2 - len(self._buffer)
        return 0

    @property
    def in_trailers(self) -> bool:
        return self._state == "trailer"

    def _fits(self, size: int) -> bool:
        self.total += size
        return self.max_size is None or self.total <= self.max_size


async def read_chunked(
    reader: asyncio.StreamReader, *, max_size: int | None, piece: int = UPSTREAM_READ_SIZE
) -> AsyncIterator[bytes]:
    """Yield the data of a chunked body as it arrives; trailers are read and dropped.

    The grammar is ChunkedDecoder's; this reads exactly what it wants next (a line, or so
    many bytes), never past the body's end, where a pipelined request may follow. A chunk
    larger than `piece` is yielded in pieces so memory stays bounded. Raises HttpError(400)
    on any grammar error, HttpError(413) past `max_size` (before the chunk's data is read),
    and asyncio.IncompleteReadError when the peer closes early.
    """
    decoder = ChunkedDecoder(max_size)
    while not decoder.done:
        wanted = decoder.wants()
        if wanted:
            data = await reader.readexactly(min(wanted, piece))
        else:
            try:
                data = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                if decoder.in_trailers:
                    raise HttpError(431, "trailer section too large") from None
                raise HttpError(400, "chunk size line too long") from None
        for chunk in decoder.feed(data):
            yield chunk


# HTTP client #####################################################################################
# A keep-alive pool to one base URL: the model server, or the autoscaler for load reports.


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an http or https base URL; ValueError otherwise."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"URL must not have a query, fragment or user: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


class _Deadline:
    """A time limit on one exchange: when it passes, the connection is aborted, which wakes
    whatever read is waiting on it. Cheaper than wait_for around every read."""

    __slots__ = ("_handle", "_transport", "expired")

    def __init__(self, seconds: float | None) -> None:
        self.expired = False
        self._transport: asyncio.BaseTransport | None = None
        self._handle: asyncio.TimerHandle | None = None
        if seconds is not None:
            self._handle = asyncio.get_running_loop().call_later(seconds, self._expire)

    def watch(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        if self._transport is not None:
            _abort(self._transport)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._transport = None


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:  # pragma: no cover - every stream transport has abort()
        transport.close()


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received but not read yet. asyncio has no public way to ask, so this reads the
    reader's buffer (a bytearray in every CPython version and in uvloop's stream use)."""
    buffer = getattr(reader, "_buffer", b"")
    return len(typing.cast(bytes, buffer))


def _abandon_connect(
    connecting: asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> None:
    """Cancel a connect nobody waits for; close the connection if it completed anyway."""

    def close(task: asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result()[1].close()

    connecting.cancel()
    connecting.add_done_callback(close)


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        """Whether the connection can carry a new request: not closed, no EOF, and nothing
        unread (bytes an idle server sent on its own, such as a 408, would otherwise be
        taken for the next answer)."""
        reader = self.reader
        return not (
            self.writer.is_closing() or reader.at_eof() or reader.exception() or _buffered(reader)
        )

    def abort(self) -> None:
        _abort(self.writer.transport)


# What HttpClient.request may send (H4: a worker that puts a client's decoded text in a path or
# a header must not write a second request to the model): a method token, a target of printable
# ASCII without spaces, fields "token: value" whose values hold no control character but HTAB
# and nothing beyond Latin-1. A head with fields of the caller's is checked whole in one match
# (CR LF inside a value would still match as two fields: request() also counts the line ends);
# the usual model request, a known method and no fields, has only its target to check. The
# parts are named by _request_head_error only once a check failed.
_PLAIN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
_PLAIN_TYPES = frozenset({"application/json", "application/octet-stream"})
_OUTGOING_HEAD = re.compile(
    rf"{_TCHAR.decode('ascii')}+ /[\x21-\x7e]* HTTP/1\.1\r\n"
    rf"(?:{_TCHAR.decode('ascii')}+: [\t\x20-\x7e\x80-\xff]*\r\n)+\r\n"
)
_OUTGOING_TARGET = re.compile(r"/[\x21-\x7e]*")
_OUTGOING_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def _request_head_error(
    method: str, target: str, headers: Sequence[tuple[str, str]], content_type: str
) -> str:
    """What makes a request unsendable (request()'s check failed): the first bad part, named."""
    if not _TOKEN.fullmatch(method.encode("latin-1", "replace")):
        return f"method {method!r} is not a token"
    if not _OUTGOING_TARGET.fullmatch(target):
        return (
            f"target {target[:200]!r} must start with / and hold printable ASCII only (no spaces, "
            "no control characters: percent-encode them)"
        )
    for name, value in [*headers, ("Content-Type", content_type)]:
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")):
            return f"header name {name!r} is not a token"
        if not _OUTGOING_VALUE.fullmatch(value):
            return (
                f"header {name!r}: its value holds CR, LF, NUL, another control character, "
                "or a character beyond Latin-1"
            )
    return "malformed request head"  # pragma: no cover - one of the above fails


class HttpClient:
    """An HTTP/1.1 client with a keep-alive connection pool to one base URL.

    Safe for concurrent use: each request takes an idle connection or opens one. A connection
    returns to the pool only when its response was read completely and neither side asked to
    close. A pooled connection the server closed while idle is detected, and a request that
    failed on a reused connection before any response byte arrived is retried once on a new
    connection.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_idle: int = MAX_IDLE_UPSTREAM,
        max_body: int = MAX_UPSTREAM_BODY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.scheme, self.host, self.port, self.prefix = split_url(base_url)
        # 0.0.0.0 is where a server listens on every address, not an address to connect to
        # (worker files write http://0.0.0.0:5001 for the model): this host is meant.
        self.host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        scheme = self.scheme
        self.max_idle = max_idle
        self.max_body = max_body
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = 443 if scheme == "https" else 80
        self._host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if not _OUTGOING_VALUE.fullmatch(self._host_header):  # request() trusts it
            raise ValueError(f"not a host to send in a Host field: {self.host!r}")
        self._idle: collections.deque[_Connection] = collections.deque()
        self.connections_opened = 0

    # idle_connections and connections_opened: what the pool did, for tests and benchmarks
    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def _connect(self, deadline: _Deadline, timeout: float | None) -> _Connection:
        limit = CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT)
        # Not wait_for: up to Python 3.11 it drops a cancellation that arrives as the connect
        # completes, and a cancelled request (or worker shutdown) would carry on.
        connecting = asyncio.get_running_loop().create_task(
            asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=MAX_HEAD)
        )
        try:
            done, _ = await asyncio.wait({connecting}, timeout=limit)
        except asyncio.CancelledError:
            _abandon_connect(connecting)
            raise
        if not done:
            _abandon_connect(connecting)
            raise UpstreamTimeout(f"connect to {self.base_url} timed out")
        try:
            reader, writer = connecting.result()
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {self.base_url}: {exc}") from None
        self.connections_opened += 1
        conn = _Connection(reader, writer)
        deadline.watch(writer.transport)
        return conn

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recent one is the least likely to be stale
            if conn.usable():
                return conn
            conn.writer.close()
        return None

    def release(self, conn: _Connection) -> None:
        """(Called by a ClientResponse read to its end.) Keep the connection for reuse."""
        if len(self._idle) < self.max_idle and conn.usable():
            self._idle.append(conn)
        else:
            conn.writer.close()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> ClientResponse:
        """Send a request and return once the response head arrived.

        `timeout` bounds the whole exchange, body included. Raises UpstreamError when the
        server is unreachable or breaks the protocol, UpstreamTimeout past the timeout.
        The caller must read the body or close() the response.

        Raises ValueError, before anything is sent, for a method, target (prefix + path),
        header or content type that cannot be sent as it is: a target with spaces, control
        characters or non-ASCII (percent-encode them), a header name that is not a token,
        a value with CR, LF, NUL or beyond Latin-1.
        """
        target = self.prefix + path or "/"
        fields = tuple(headers)  # () for the model routes' usual none: the same object
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in fields:
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        if fields or method not in _PLAIN_METHODS or content_type not in _PLAIN_TYPES:
            # request line, Host, the fields, two for a body, the blank line: one LF each
            ends = len(lines) + (2 if body is not None else 1)
            ok = _OUTGOING_HEAD.fullmatch(head) is not None and head.count("\n") == ends
        else:  # one regex over a few bytes: the hot path's whole cost
            ok = _OUTGOING_TARGET.fullmatch(target) is not None
        if not ok:
            raise ValueError(
                f"request to {self.base_url} not sent: "
                + _request_head_error(method, target, fields, content_type)
            )
        data = head.encode("latin-1") + (body or b"")
        deadline = _Deadline(timeout)
        try:
            return await self._exchange(method, data, deadline, timeout)
        except BaseException:
            deadline.cancel()
            raise

    async def _exchange(
        self, method: str, data: bytes, deadline: _Deadline, timeout: float | None
    ) -> ClientResponse:
        for attempt in (1, 2):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(deadline, timeout)
            else:
                deadline.watch(conn.writer.transport)
            try:
                conn.writer.write(data)
                head = await read_head(conn.reader, first_line_limit=MAX_HEAD)
                parsed = parse_response_head(head, request_method=method)
                while 100 <= parsed.status < 200:  # 1xx answers precede the real one
                    if parsed.status == 101:
                        raise HttpError(502, "unexpected protocol switch")
                    head = await read_head(conn.reader, first_line_limit=MAX_HEAD)
                    parsed = parse_response_head(head, request_method=method)
            except asyncio.IncompleteReadError as exc:
                conn.abort()
                if deadline.expired:
                    raise UpstreamTimeout(f"{self.base_url} did not answer in time") from None
                if reused and attempt == 1 and not exc.partial:
                    continue  # the server closed the idle connection as we sent: retry once
                raise UpstreamUnreachable(f"{self.base_url} closed the connection early") from None
            except (ConnectionError, OSError) as exc:
                conn.abort()
                if deadline.expired:
                    raise UpstreamTimeout(f"{self.base_url} did not answer in time") from None
                if reused and attempt == 1:
                    continue
                raise UpstreamUnreachable(f"{self.base_url}: {exc}") from None
            except HttpError as exc:
                conn.abort()
                raise UpstreamError(f"{self.base_url} broke HTTP: {exc.message}") from None
            except BaseException:
                conn.abort()  # cancelled: the half-done exchange cannot be reused
                raise
            return ClientResponse(self, conn, parsed, deadline)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the idle connections; responses still being read keep theirs."""
        while self._idle:
            self._idle.pop().writer.close()


# Media types whose body is a stream of events, relayed as they arrive even with a length.
STREAM_MEDIA_TYPES = frozenset({"text/event-stream", "application/x-ndjson"})


class ClientResponse:
    """A response whose head arrived; read() or iter_chunks() the body, or close() it."""

    def __init__(
        self,
        client: HttpClient,
        conn: _Connection,
        head: ClientResponseHead,
        deadline: _Deadline,
    ) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self._client = client
        self._conn: _Connection | None = conn
        self._head = head
        self._deadline = deadline
        self._started = False

    @property
    def content_type(self) -> str:
        """The media type, lower-cased and without parameters ("text/event-stream"), as
        aiohttp has it; the whole field, to relay, is headers.get("content-type")."""
        return _media_type(self.headers.get("content-type"))

    @property
    def streaming(self) -> bool:
        """Whether the body is a stream to relay as it comes: chunked, or a streaming type."""
        return self._head.framing.kind == "chunked" or self.content_type in STREAM_MEDIA_TYPES

    @property
    def content(self) -> BodyStream:
        """The body as a stream (aiohttp's name): `async for line in response.content`,
        iter_any(), iter_chunked(n). For handlers that read the model's stream themselves."""
        return BodyStream(self.iter_chunks())

    async def text(self) -> str:
        """The whole body, decoded with the charset it names (UTF-8 if none)."""
        return _decode_text(await self.read(), self.headers.get("content-type"))

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body: at most `limit` bytes (the client's max_body if None), else
        UpstreamError."""
        framing = self._head.framing
        if limit is None:
            limit = self._client.max_body
        if framing.kind == "length":
            if framing.length > limit:
                self.close()
                raise UpstreamError(f"upstream body larger than {limit:,} bytes")
            if self._conn is not None and not self._started:  # the common case, in one read
                self._started = True
                complete = False
                try:
                    body = await self._conn.reader.readexactly(framing.length)
                    complete = True
                    return body
                except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                    raise self._broken(exc) from None
                finally:
                    self._finish(complete)
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamError(f"upstream body larger than {limit:,} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def json(self) -> Any:
        return _upstream_json(await self.read())

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield body data as it arrives, never waiting for the end of a slow stream.

        Raises UpstreamError if the body breaks off or is malformed (UpstreamTimeout past
        the deadline). Leaving the loop early closes the connection.
        """
        conn = self._conn
        if conn is None or self._started:
            raise RuntimeError("the body was already read or the response closed")
        self._started = True
        framing = self._head.framing
        reader = conn.reader
        complete = False
        try:
            if framing.kind == "length":
                remaining = framing.length
                while remaining:
                    data = await reader.read(min(remaining, UPSTREAM_READ_SIZE))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    remaining -= len(data)
                    yield data
            elif framing.kind == "chunked":
                decoder = ChunkedDecoder()
                while not decoder.done:
                    data = await reader.read(UPSTREAM_READ_SIZE)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    pieces = decoder.feed(data)
                    if pieces:  # what arrived together leaves together
                        yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    if decoder.error is not None:
                        raise decoder.error
                if decoder.trailing:
                    self._head.keep_alive = False  # bytes after the end: do not reuse
            else:
                while data := await reader.read(UPSTREAM_READ_SIZE):
                    yield data
            complete = True
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise self._broken(exc) from None
        except HttpError as exc:
            raise UpstreamError(f"upstream sent a malformed body: {exc.message}") from None
        finally:
            self._finish(complete)

    def _broken(self, exc: BaseException) -> UpstreamError:
        if self._deadline.expired:
            return UpstreamTimeout("upstream did not finish in time")
        return UpstreamError(f"upstream broke off the body: {exc!r}")

    def _finish(self, complete: bool) -> None:
        conn, self._conn = self._conn, None
        self._deadline.cancel()
        if conn is None:
            return
        if complete and self._head.keep_alive:
            self._client.release(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Done with this response: an unread or partly read body closes the connection."""
        complete = not self._started and self._head.framing == BodyFraming("length", 0)
        self._finish(complete)

    async def __aenter__(self) -> ClientResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _upstream_json(body: bytes) -> Any:
    """A model's (or autoscaler's) answer as JSON; UpstreamError (502) when it is not."""
    try:
        return json_loads(body)
    except _JSON_DECODE_ERRORS:
        raise UpstreamError("upstream answered invalid JSON") from None


def _media_type(field: str | None) -> str:
    """A Content-Type field's media type: "Text/HTML; charset=utf-8" -> "text/html"."""
    return (field or "").partition(";")[0].strip().lower() or "application/octet-stream"


class BodyStream:
    """A body arriving in pieces (ClientResponse.content): iterated, it yields lines (each
    with its b"\n", the last one perhaps without), as aiohttp's StreamReader does;
    iter_any() yields what arrived, iter_chunked(n) pieces of at most n bytes."""

    def __init__(self, pieces: AsyncIterator[bytes]) -> None:
        self._pieces = pieces

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._pieces

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        async for data in self._pieces:
            for start in range(0, len(data), n):
                yield data[start : start + n]

    async def read(self) -> bytes:
        return b"".join([data async for data in self._pieces])

    async def __aiter__(self) -> AsyncIterator[bytes]:
        rest = b""
        async for data in self._pieces:
            rest += data
            *lines, rest = rest.split(b"\n")
            for line in lines:
                yield line + b"\n"
            if len(rest) > UPSTREAM_READ_SIZE:  # no newline in sight: memory stays bounded
                yield rest
                rest = b""
        if rest:
            yield rest


# HTTP server #####################################################################################


class Response:
    """An answer to a request: a body sent with Content-Length, or a stream sent chunked.

    `stream` yields the body's pieces; each is written and drained as it comes. If the stream
    raises, the connection is cut without the last chunk, so the client sees an error rather
    than a short success. `reason` is the status line's phrase (the status's own if None).
    """

    __slots__ = ("body", "content_type", "headers", "reason", "status", "stream")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Sequence[tuple[str, str]] = (),
        stream: AsyncIterator[bytes] | None = None,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.stream = stream
        self.reason = reason


def json_response(obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response(status, json_dumps(obj), headers=headers)


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), content_type="text/plain; charset=utf-8")


def error_response(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


Handler = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


def post(path: str, handler: Handler) -> Route:
    return Route("POST", path, handler)


def get(path: str, handler: Handler) -> Route:
    return Route("GET", path, handler)


class _Phase(enum.Enum):
    """Where a server connection is; each phase has its own time limit (the deadline)."""

    IDLE = "idle"  # no byte of a next request yet: HEAD_TIMEOUT when new, then KEEPALIVE_TIMEOUT
    HEAD = "head"  # a head is arriving: HEAD_TIMEOUT from its first byte (slow-loris)
    BODY = "body"  # head parsed, body arriving: BODY_TIMEOUT
    HANDLING = "handling"  # the handler works, nothing sent yet: no limit (the model's time)
    RESPONDING = "responding"  # the answer is being written: WRITE_TIMEOUT per blocked write


class _ServerProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, plus the connection's phase and deadline, and: the
    connection's task is cancelled when the client goes away while its request is being
    answered, so the model request is abandoned at once."""

    def __init__(self, server: HttpServer) -> None:
        self.reader = asyncio.StreamReader(limit=MAX_HEAD)
        super().__init__(self.reader)
        self._server = server
        self._loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self.conn_transport: asyncio.BaseTransport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.early: EarlyResponse | None = None  # the answer its handler began itself
        self.phase = _Phase.IDLE
        self._request_line: bytes | None = None  # a request line's end not seen yet
        # When the connection is dropped unless the client makes progress; the server's
        # sweeper checks it (one float per connection instead of a timer per phase).
        self.deadline = self._loop.time() + HEAD_TIMEOUT

    @property
    def closing(self) -> bool:
        """The server is shutting down: no keep-alive."""
        return self._server.closing

    @property
    def busy(self) -> bool:
        """A request is being answered (or, from BODY on, received)."""
        return self.phase in (_Phase.BODY, _Phase.HANDLING, _Phase.RESPONDING)

    def enter(self, phase: _Phase, timeout: float = math.inf) -> None:
        """Every phase change goes through here: the phase, and its deadline from now."""
        self.phase = phase
        self.deadline = self._loop.time() + timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn_transport = transport
        writer = self.writer = asyncio.StreamWriter(
            typing.cast(asyncio.WriteTransport, transport), self, self.reader, self._loop
        )
        self.task = self._server.serve(self, writer)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server.forget(self)
        if self.phase in (_Phase.HANDLING, _Phase.RESPONDING) and self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.phase is not _Phase.IDLE:
            if self._request_line is not None:
                self._check_request_line(data)
            super().data_received(data)
            return
        # A request begins: its head has HEAD_TIMEOUT. Two wrong starts are refused at once
        # instead of waiting for a CRLF CRLF that never comes: a TLS handshake (0x16, a
        # client speaking https to a plain port), and a request line ended by a bare LF.
        if data[:1] == b"\x16" and self.conn_transport is not None:
            self._server.refuse_tls(self.conn_transport)
            return
        self.enter(_Phase.HEAD, HEAD_TIMEOUT)
        self._request_line = b""
        self._check_request_line(data)
        super().data_received(data)

    def _check_request_line(self, data: bytes) -> None:
        """Until the request line ended: refuse it at once if it ends in a bare LF (the
        error goes to the reader before the bytes, so its waiting task sees it)."""
        line = (self._request_line or b"") + data
        newline = line.find(b"\n")
        if newline < 0:
            self._request_line = line[-1:]  # its last byte is all the check needs
            return
        self._request_line = None
        if newline == 0 or line[newline - 1] != 0x0D:
            self.reader.set_exception(HttpError(400, "bare LF line end"))

    def eof_received(self) -> bool | None:
        # A client that closes its side while its request is being answered has gone away:
        # stop working for it. (A client that half-closes to wait for its answer is cut too;
        # HTTP clients do not do that, and a GPU working for nobody costs more.)
        keep_open = super().eof_received()
        if self.phase in (_Phase.HANDLING, _Phase.RESPONDING) and self.task is not None:
            self.task.cancel()
        return keep_open


async def read_request_body(
    request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int
) -> bytes:
    """A request's body, as its head frames it: Content-Length (refused with 413 past
    `max_body` before any of it is read) or chunked (413 past `max_body` bytes or
    MAX_BODY_CHUNKS chunks); a 100 Continue first when the client waits for one."""
    framing = request.framing
    if framing.kind == "length" and framing.length == 0:
        return b""
    if framing.kind == "length" and framing.length > max_body:
        raise HttpError(413, "body too large")  # before reading any of it
    if request.expect_continue:  # RFC 9110 10.1.1: tell the client to go ahead
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if framing.kind == "length":
        return await reader.readexactly(framing.length)
    body = bytearray()
    chunks = 0
    async for data in read_chunked(reader, max_size=max_body):
        body += data
        chunks += 1
        if chunks > MAX_BODY_CHUNKS:  # tiny chunks cost far more than their bytes
            raise HttpError(413, "too many chunks in the body")
    return bytes(body)


class HttpServer:
    """A strict HTTP/1.1 server on asyncio streams, routing method + path to handlers."""

    def __init__(self, routes: Iterable[Route], *, max_body: int = MAX_BODY) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}
        for route in routes:
            self.routes.setdefault(route.path, {})[route.method] = route.handler
        self.max_body = max_body
        self._server: asyncio.Server | None = None
        self._protocols: set[_ServerProtocol] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        self.tls_refused = 0  # connections that began with a TLS handshake
        self._tls_warned = -math.inf

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        # SO_REUSEADDR (asyncio's default): a restart binds while old connections linger in
        # TIME_WAIT. Never SO_REUSEPORT: it would let a second worker bind the same port and
        # take half the connections (the image once started the worker twice:
        # vast-ai/base-image#133); without it the second one fails with EADDRINUSE.
        self._server = await loop.create_server(
            lambda: _ServerProtocol(self),
            host,
            port,
            ssl=ssl_context,
            backlog=1024,
            reuse_address=True,
            reuse_port=False,
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    def serve(self, proto: _ServerProtocol, writer: asyncio.StreamWriter) -> asyncio.Task[None]:
        """(Called by a new connection's protocol.) Track the connection and serve it."""
        self._protocols.add(proto)
        return asyncio.get_running_loop().create_task(
            self._serve_connection(proto, proto.reader, writer)
        )

    def refuse_tls(self, transport: asyncio.BaseTransport) -> None:
        """(Called by a protocol that got a TLS handshake.) Close, and say why, once a minute."""
        _abort(transport)
        self.tls_refused += 1
        now = time.monotonic()
        if now - self._tls_warned >= 60.0:
            self._tls_warned = now
            log.warning(
                "a client speaks TLS (https) to this plain-HTTP port: closed (%d so far); "
                "set USE_SSL=true to serve TLS, or have clients use http://",
                self.tls_refused,
            )

    def forget(self, proto: _ServerProtocol) -> None:
        """(Called when a connection is lost.)"""
        self._protocols.discard(proto)

    @property
    def connections(self) -> int:
        """Open connections (the soak and abuse tests watch that none is left behind)."""
        return len(self._protocols)

    @property
    def busy_connections(self) -> int:
        return sum(1 for p in self._protocols if p.busy)

    async def _sweep(self) -> None:
        """Drop connections past their deadline: slow-loris heads, stalled bodies, idle
        keep-alive connections, clients that stopped reading their response."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for proto in [p for p in self._protocols if p.deadline < now]:
                if proto.conn_transport is not None:
                    _abort(proto.conn_transport)

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, close idle connections, wait for busy ones up to `grace` seconds."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while True:
            for proto in list(self._protocols):
                # Only connections between requests: a head or a body on its way is a
                # request in flight, and it is answered (with Connection: close).
                if proto.phase is _Phase.IDLE and proto.conn_transport is not None:
                    proto.conn_transport.close()
            if not self._protocols or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        tasks = [p.task for p in self._protocols if p.task is not None]
        for proto in list(self._protocols):
            if proto.conn_transport is not None:
                _abort(proto.conn_transport)
        if tasks:  # let the aborted requests settle their bookkeeping before the last report
            await asyncio.wait(tasks, timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _serve_connection(
        self, proto: _ServerProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        transport = writer.transport
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        try:
            while True:
                # The sweeper drops the connection if the client stalls (slow-loris).
                try:
                    head = await read_head(reader, first_line_limit=MAX_REQUEST_LINE)
                    proto.enter(_Phase.BODY, BODY_TIMEOUT)
                    request = parse_request_head(head)
                    request.remote = remote
                    request.connection = proto
                    proto.early = None  # made if its handler asks for it (Request.responder)
                    request.body = await read_request_body(request, reader, writer, self.max_body)
                except HttpError as exc:
                    self._send_error(writer, exc)
                    break
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    break  # closed by the client or by the sweeper
                if self.closing:
                    request.keep_alive = False
                proto.enter(_Phase.HANDLING)
                try:
                    ok = await self._respond(request, proto, writer)
                except (ConnectionError, OSError):
                    break  # the client went away while we answered
                if not (ok and request.keep_alive) or self.closing:
                    break
                proto.enter(_Phase.IDLE, KEEPALIVE_TIMEOUT)
        except asyncio.CancelledError:
            pass  # the client went away mid-request; the handler has cleaned up
        except Exception:
            log.exception("unexpected error on a connection")
        finally:
            self.forget(proto)
            if not transport.is_closing():
                with contextlib.suppress(Exception):
                    await writer.drain()
            transport.close()

    def _send_error(self, writer: asyncio.StreamWriter, exc: HttpError) -> None:
        """A framing error: answer it and close, since where the next request starts is unknown."""
        access_log.info("- %d (%s)", exc.status, exc.message)
        body = json_dumps({"error": exc.message})
        head = response_head(
            exc.status,
            [("Content-Type", "application/json"), *exc.headers],
            content_length=len(body),
            keep_alive=False,
        )
        with contextlib.suppress(Exception):
            writer.write(head + body)

    async def _respond(
        self, request: Request, proto: _ServerProtocol, writer: asyncio.StreamWriter
    ) -> bool:
        """Run the handler and write its response; False when the connection must close."""
        methods = self.routes.get(request.path)
        if methods is None:
            response = error_response(404, "not found")
            access_log.info("%s 404 (not found)", request.path)
        elif request.method not in methods:
            allow = ", ".join(sorted(methods))
            response = error_response(405, "method not allowed")
            response.headers = [("Allow", allow)]
            access_log.info("%s 405 (%s not allowed)", request.path, request.method)
        else:
            try:
                response = await methods[request.method](request)
            except HttpError as exc:
                early = proto.early
                if early is not None and early.started:
                    return early.cut(exc.__cause__ or exc)
                response = error_response(exc.status, exc.message)
                response.headers = exc.headers
            except UpstreamError as exc:  # a worker's own route asked the model (backend.session)
                early = proto.early
                if early is not None and early.started:
                    return early.cut(exc)
                log.warning("%s %s: model request failed: %s", request.method, request.path, exc)
                response = error_response(exc.status, _upstream_message(exc))
            except Exception as exc:
                early = proto.early
                if early is not None and early.started:
                    return early.cut(exc)
                log.exception("handler for %s %s failed", request.method, request.path)
                response = error_response(500, "internal error")
            early = proto.early
            if early is not None and early.started:  # the handler wrote its answer; the end
                if response.stream is not None or response.body:  # ... and returned another
                    if response.stream is not None:
                        await _aclose(response.stream)
                    why = "the handler began its answer, then returned another one"
                    return early.cut(RuntimeError(why))
                return await early.finish()
        return await self._write_response(request, response, proto, writer)

    def _unsendable(self, request: Request, exc: ValueError) -> Response:
        """A response whose head cannot be written (CR or LF, or a character beyond Latin-1,
        in a field): a 500 instead, rather than a connection closed without an answer."""
        log.error("the answer to %s %s cannot be sent: %s", request.method, request.path, exc)
        return error_response(500, "internal error")

    async def _write_response(
        self,
        request: Request,
        response: Response,
        proto: _ServerProtocol,
        writer: asyncio.StreamWriter,
    ) -> bool:
        keep_alive = request.keep_alive and not self.closing
        stream, body = response.stream, b""
        chunked = False
        content_length: int | None = None
        if response.status in (204, 304):  # RFC 9110 15.3.5, 15.4.5: never a body
            if stream is not None:  # a relayed 204 or 304: its (empty) body ends at once
                async for _ in stream:
                    pass
            stream, headers = None, list(response.headers)
        else:
            headers = [("Content-Type", response.content_type), *response.headers]
            if stream is None:
                body = response.body
                content_length = len(body)
                if keep_alive and request.version == "HTTP/1.0":
                    headers.append(("Connection", "keep-alive"))  # 1.0 closes unless told
            else:
                # An HTTP/1.0 client knows no chunked coding: its stream ends with the connection.
                chunked = request.version == "HTTP/1.1"
                keep_alive = keep_alive and chunked
        try:  # ValueError, UnicodeEncodeError among them: a field that cannot be sent
            head = response_head(
                response.status,
                headers,
                content_length=content_length,
                keep_alive=keep_alive,
                chunked=chunked,
                reason=response.reason,
            )
        except ValueError as exc:
            if stream is not None:
                await _aclose(stream)
            return await self._write_response(
                request, self._unsendable(request, exc), proto, writer
            )
        if stream is None:
            proto.enter(_Phase.RESPONDING)
            writer.write(head + body)
            await self._drain(proto, writer)
            return keep_alive
        # The head waits for the first chunk: they leave in one write, and a model that fails
        # before its first byte still gets the client a proper error answer instead of a cut.
        try:
            async for data in stream:
                if data:
                    framed = encode_chunk(data) if chunked else data
                    if head:
                        framed, head = head + framed, b""
                        proto.enter(_Phase.RESPONDING)
                    writer.write(framed)
                    await self._drain(proto, writer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = exc.__cause__ or exc  # the detail behind what the client is told
            if head:  # nothing sent yet: a proper answer instead of a cut
                log.warning("stream for %s failed before its first byte: %s", request.path, why)
                if isinstance(exc, HttpError):
                    failed = error_response(exc.status, exc.message)
                else:
                    failed = error_response(500, "internal error")
                return await self._write_response(request, failed, proto, writer)
            # The model broke off: cut the client's stream (no last chunk) so it sees an error.
            log.warning("stream for %s cut: %s", request.path, why)
            _abort(writer.transport)
            return False
        finally:
            await _aclose(stream)
        writer.write(head + LAST_CHUNK if chunked else head)
        await self._drain(proto, writer)
        return keep_alive

    @staticmethod
    async def _drain(proto: _ServerProtocol, writer: asyncio.StreamWriter) -> None:
        await _drain(proto, writer)


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    """Close a response's stream (an async generator's finally runs; a job settles)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _drain(proto: _ServerProtocol, writer: asyncio.StreamWriter) -> None:
    """Wait while the client's socket buffer is full (back-pressure), but not forever."""
    transport = writer.transport
    if transport.is_closing():
        raise ConnectionResetError("client connection closed")
    if transport.get_write_buffer_size() <= 64 * 1024:
        return  # asyncio's drain() would return at once; skip its overhead
    proto.enter(_Phase.RESPONDING, WRITE_TIMEOUT)  # the client must read within it
    try:
        await writer.drain()
    finally:
        proto.enter(_Phase.RESPONDING)


class EarlyResponse:
    """An answer a handler writes itself while it runs (request.responder): start() sends
    the head at once, each write() is sent before it returns, and the server ends it when
    the handler returns (the last chunk), or cuts it (no last chunk) if the handler raised.

    Why a hook, and not a Response returned: a handler that relays a model's stream in its
    own loop (aiohttp's StreamResponse, the 2024 form: prepare, write ..., return) returns
    only once the stream is over, and buffering its writes until then would turn a token
    stream into one late answer. Written from inside the handler, it stays a stream, with
    no task or queue between the handler and the socket, and whatever bookkeeping wraps the
    handler's call (ModelQueue's job and FIFO turn) ends when the stream does."""

    __slots__ = (
        "_bodiless",
        "_chunked",
        "_ended",
        "_keep_alive",
        "_proto",
        "_request",
        "_writer",
        "started",
    )

    def __init__(
        self,
        request: Request,
        proto: _ServerProtocol,
        writer: asyncio.StreamWriter,
        closing: bool,
    ) -> None:
        self._request = request
        self._proto = proto
        self._writer = writer
        # An HTTP/1.0 client knows no chunked coding: its stream ends when the connection does.
        self._chunked = request.version == "HTTP/1.1"
        self._keep_alive = request.keep_alive and self._chunked and not closing
        self._bodiless = False  # a 204 or 304: no framing, no body, no last chunk
        self._ended = False  # finished or cut: the connection is the next answer's
        self.started = False

    def start(
        self, status: int, headers: Sequence[tuple[str, str]], reason: str | None = None
    ) -> None:
        """Send the head (status, header fields; the framing is added here). A head that
        cannot be sent raises ValueError before anything is: the handler may answer anyway."""
        if self.started:
            raise RuntimeError("the response was started already")
        bodiless = status in (204, 304)  # RFC 9110 15.3.5, 15.4.5: never a body
        head = response_head(
            status,
            headers,
            content_length=None,
            keep_alive=self._keep_alive,
            chunked=self._chunked and not bodiless,
            reason=reason,
        )
        self.started = True
        self._bodiless = bodiless
        self._proto.enter(_Phase.RESPONDING)
        self._writer.write(head)

    async def write(self, data: bytes) -> None:
        """Send `data` as the body's next piece (waiting while the client does not read)."""
        if not self.started:
            raise RuntimeError("start() the response before writing to it")
        if self._ended:  # its bytes would land in the next answer on this connection
            raise RuntimeError("the response has ended: nothing more can be written to it")
        if data:
            if self._bodiless:
                raise RuntimeError("a 204 or 304 answer has no body")
            self._writer.write(encode_chunk(data) if self._chunked else data)
            await _drain(self._proto, self._writer)

    async def finish(self) -> bool:
        """(The server's, when the handler returned.) The last chunk; whether to keep alive."""
        self._ended = True
        if self._chunked and not self._bodiless:
            self._writer.write(LAST_CHUNK)
        await _drain(self._proto, self._writer)
        return self._keep_alive

    def cut(self, why: BaseException) -> bool:
        """(The server's, when the handler raised.) Cut the stream, so the client sees an
        error rather than a short success."""
        self._ended = True
        log.warning("stream for %s cut: %s", self._request.path, why)
        _abort(self._writer.transport)
        return False


# Payload protocol ################################################################################
# What a worker author writes: an ApiPayload for the model API's request fields.

if typing.TYPE_CHECKING:
    from typing_extensions import Self


class ApiPayload(abc.ABC):
    """The model API's request fields, parsed from the client's `payload` object.

    A dataclass subclass gets `from_json_msg` for free: each field is checked for presence
    (unless it has a default) and type, and every bad field is reported at once (422).
    """

    @classmethod
    @abc.abstractmethod
    def for_test(cls) -> Self:
        """A realistic random payload, used by the benchmark and the load tester."""

    @abc.abstractmethod
    def generate_payload_json(self) -> dict[str, Any]:
        """The JSON object sent to the model API."""

    @abc.abstractmethod
    def count_workload(self) -> float:
        """The request's cost in the autoscaler's unit (tokens, pixels x steps ...)."""

    def generate_payload_multipart(self) -> dict[str, Any] | None:
        """Form fields to send the model as multipart/form-data instead of JSON (the name
        today's vastai library gives it), or None: JSON. See Multipart.from_form."""
        return None

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> Self:
        """Build the payload from the client's JSON; raise JsonDataException on bad fields."""
        return from_json_fields(cls, json_msg)


_T = TypeVar("_T")
# Per dataclass: (name, required, hint, exact types when the hint is a plain one, else None)
_FieldPlan = list[tuple[str, bool, Any, "tuple[type, ...] | None"]]
_plans: dict[type, _FieldPlan] = {}
_EXACT: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), bool: (bool,)}
_EXACT[type(None)] = _EXACT[None] = (type(None),)


def _exact_types(hint: Any) -> tuple[type, ...] | None:
    """For str, int, bool, None and unions of them, the exact types a value may have."""
    if hint in _EXACT:
        return _EXACT[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_exact_types(a) for a in typing.get_args(hint)]
        if all(p is not None for p in parts):
            return tuple(t for p in parts if p is not None for t in p)
    return None


def _field_plan(cls: type) -> _FieldPlan:
    plan = _plans.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = _plans[cls] = [
            (
                f.name,
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                hints.get(f.name, Any),
                _exact_types(hints.get(f.name, Any)),
            )
            for f in dataclasses.fields(cls)
            if f.init
        ]
    return plan


def from_json_fields(cls: type[_T], json_msg: Any) -> _T:
    """Instantiate dataclass `cls` from a JSON object, checking every field's presence and type.

    Unknown keys are ignored. Raises JsonDataException({field: message}) listing every bad field.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass: write its from_json_msg yourself")
    if not isinstance(json_msg, dict):
        raise JsonDataException({"__all__": "expected a JSON object"})
    msg = typing.cast(dict[str, Any], json_msg)
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, required, hint, exact in _field_plan(cls):
        if name not in msg:
            if required:
                errors[name] = "missing parameter"
            continue
        value = msg[name]
        if not (type(value) in exact if exact is not None else _matches(value, hint)):
            errors[name] = f"expected {_describe(hint)}"
            continue
        values[name] = float(value) if hint is float and type(value) is int else value
    if errors:
        raise JsonDataException(errors)
    return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint (the subset of types JSON can carry)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int  # bool is an int in Python, never in JSON
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return type(value) is str
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list or hint is list:
        items = typing.cast(list[Any], value)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in items))
    if origin is dict or hint is dict:
        mapping = typing.cast(dict[Any, Any], value)
        return isinstance(value, dict) and (
            not args or all(_matches(v, args[1]) for v in mapping.values())
        )
    return isinstance(value, hint) if isinstance(hint, type) else False


def _describe(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    if hint in names:
        return names[hint]
    if hint is None or hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    if typing.get_origin(hint) is dict or hint is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))


_SIGNED_LAYOUT = '{\n    "cost": %s,\n    "endpoint": %s,\n    "reqnum": %s,\n    "url": %s\n}'
_URL_LAYOUT = '{\n    "url": %s\n}'
# What the autoscaler has signed over the years (SPEC 11.2), newest first: the url alone
# (2026-01 to today), every auth_data field (2025-10 to 2025-12), the seed's four fields (2024).
SIGNATURE_LAYOUTS = ("url", "fields", "seed")
REPLAYABLE_LAYOUTS = frozenset({"fields", "seed"})  # those that sign reqnum: replays checked
_UNSIGNED_KEYS = frozenset({"signature", "__request_id"})


@dataclasses.dataclass
class AuthData:
    """The autoscaler's signed ticket that comes with each client request (SPEC sections 3
    and 11.1): the whole /route/ answer. `received` keeps it as it came, extra keys included,
    for the `fields` layout; `layout` is the layout its signature was found in."""

    signature: str
    cost: str | int | float
    endpoint: str
    reqnum: int
    url: str
    request_idx: int | None = None  # today's platform's id of this request (SPEC 11.1)
    received: dict[str, Any] = dataclasses.field(
        default_factory=dict[str, Any], init=False, repr=False, compare=False
    )
    layout: str = dataclasses.field(default="", init=False, compare=False)

    @classmethod
    def from_json_msg(cls, json_msg: Any) -> AuthData:
        if type(json_msg) is dict:  # the usual, well-formed ticket, checked without the plan
            m = typing.cast(dict[str, Any], json_msg)
            sig, cost, endpoint = m.get("signature"), m.get("cost"), m.get("endpoint")
            reqnum, url, idx = m.get("reqnum"), m.get("url"), m.get("request_idx")
            if (
                type(sig) is str
                and (type(cost) in (str, int) or (type(cost) is float and math.isfinite(cost)))
                and type(endpoint) is str
                and type(reqnum) is int
                and type(url) is str
                and (idx is None or type(idx) is int)
            ):
                auth = cls(sig, typing.cast(Any, cost), endpoint, reqnum, url, idx)
                auth.received = m
                return auth
        auth = from_json_fields(cls, json_msg)  # names every bad field
        auth.received = typing.cast(dict[str, Any], json_msg)
        return auth

    def message(self, layout: str = "seed") -> bytes:
        """The bytes the autoscaler signed in `layout` (SPEC 11.2)."""
        if layout == "url":
            return (_URL_LAYOUT % json.dumps(self.url)).encode("ascii")
        if layout == "fields":
            fields = self.received or {
                "cost": self.cost,
                "endpoint": self.endpoint,
                "reqnum": self.reqnum,
                "url": self.url,
                **({} if self.request_idx is None else {"request_idx": self.request_idx}),
            }
            signed = {k: v for k, v in fields.items() if k not in _UNSIGNED_KEYS}
            return json.dumps(signed, indent=4, sort_keys=True).encode("ascii")
        return self.seed_message()

    def seed_message(self) -> bytes:
        """The seed's signed bytes: Python's json.dumps(indent=4) of the four fields in this
        order, each value as received (a cost sent as "20" and one sent as 20 sign different
        bytes).

        orjson cannot produce this layout. The values are scalars, so the layout is spelled
        out here around the stdlib's own encoding of each value: the same bytes as
        json.dumps({"cost": ..., "endpoint": ..., "reqnum": ..., "url": ...}, indent=4), in a
        third of the time.
        """
        text = _SIGNED_LAYOUT % (
            json.dumps(self.cost),
            json.dumps(self.endpoint),
            json.dumps(self.reqnum),
            json.dumps(self.url),
        )
        return text.encode("ascii")  # json.dumps escapes all non-ASCII


# Signatures ######################################################################################
# RSA PKCS#1 v1.5 with SHA-256, verified in pure Python: pow() is the only real cost
# (about 0.2 ms for a 2048-bit key).

# DigestInfo for SHA-256 (RFC 8017 section 9.2, note 1)
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
MAX_SIGNATURE_B64 = 4096  # base64 of an 8192-bit signature is 1368 characters


class KeyFormatError(ValueError):
    """A public key that cannot be used."""


def _der_next(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """Read one DER TLV of `tag` at `pos`: (content, position after it)."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise KeyFormatError(f"DER: expected tag 0x{tag:02x}")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise KeyFormatError("DER: bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise KeyFormatError("DER: truncated")
    return data[pos : pos + length], pos + length


@dataclasses.dataclass(frozen=True)
class RsaPublicKey:
    n: int
    e: int

    @property
    def size(self) -> int:
        """The modulus length in bytes: every signature has exactly this many."""
        return (self.n.bit_length() + 7) // 8

    @classmethod
    def from_pkcs1_der(cls, der: bytes) -> RsaPublicKey:
        seq, end = _der_next(der, 0, 0x30)
        if end != len(der):
            raise KeyFormatError("DER: trailing bytes")
        n_bytes, pos = _der_next(seq, 0, 0x02)
        e_bytes, pos = _der_next(seq, pos, 0x02)
        if pos != len(seq):
            raise KeyFormatError("DER: trailing bytes in RSAPublicKey")
        n, e = int.from_bytes(n_bytes, "big"), int.from_bytes(e_bytes, "big")
        if not 1024 <= n.bit_length() <= 8192 or e < 3 or e % 2 == 0 or e >= n:
            raise KeyFormatError("RSA key must be 1024-8192 bits with an odd exponent >= 3")
        return cls(n, e)

    @classmethod
    def from_spki_der(cls, der: bytes) -> RsaPublicKey:
        seq, end = _der_next(der, 0, 0x30)
        if end != len(der):
            raise KeyFormatError("DER: trailing bytes")
        algorithm, pos = _der_next(seq, 0, 0x30)
        oid, _ = _der_next(algorithm, 0, 0x06)
        if oid != _RSA_ENCRYPTION_OID:
            raise KeyFormatError("not an RSA public key")
        bits, _ = _der_next(seq, pos, 0x03)
        if not bits or bits[0] != 0:
            raise KeyFormatError("DER: bad BIT STRING")
        return cls.from_pkcs1_der(bits[1:])

    @classmethod
    def from_pem(cls, pem: str | bytes) -> RsaPublicKey:
        """Load `BEGIN PUBLIC KEY` (SubjectPublicKeyInfo) or `BEGIN RSA PUBLIC KEY` (PKCS#1)."""
        text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
        for label, loader in (
            ("PUBLIC KEY", cls.from_spki_der),
            ("RSA PUBLIC KEY", cls.from_pkcs1_der),
        ):
            match = re.search(
                rf"-----BEGIN {label}-----([A-Za-z0-9+/=\s]*)-----END {label}-----", text
            )
            if match:
                try:
                    der = base64.b64decode("".join(match.group(1).split()), validate=True)
                except binascii.Error:
                    raise KeyFormatError("PEM: bad base64") from None
                return loader(der)
        raise KeyFormatError("no PEM public key found (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY)")

    def spki_der(self) -> bytes:
        """The key as SubjectPublicKeyInfo DER (what `BEGIN PUBLIC KEY` holds), whatever
        form it was loaded from."""

        def tlv(tag: int, content: bytes) -> bytes:
            n = len(content)
            if n < 0x80:
                return bytes((tag, n)) + content
            size = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return bytes((tag, 0x80 | len(size))) + size + content

        def integer(v: int) -> bytes:  # a leading 0 byte when the top bit is set
            return tlv(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))

        rsa = tlv(0x30, integer(self.n) + integer(self.e))
        algorithm = tlv(0x30, tlv(0x06, _RSA_ENCRYPTION_OID) + b"\x05\x00")
        return tlv(0x30, algorithm + tlv(0x03, b"\x00" + rsa))

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of SHA-256 of the SubjectPublicKeyInfo DER: the same as
        `openssl pkey -pubin -outform DER | sha256sum` gives, to compare keys in logs."""
        return hashlib.sha256(self.spki_der()).hexdigest()[:16]

    def verify(self, message: bytes, signature: bytes) -> bool:
        """PKCS#1 v1.5 SHA-256 (RFC 8017 8.2.2), by encoding the expected block and comparing
        it whole. Never parse the decrypted block: parsing verifiers accept forgeries for
        small exponents (Bleichenbacher 2006)."""
        block = self.recover(signature)
        return block is not None and hmac.compare_digest(block, self.expected_block(message))

    def recover(self, signature: bytes) -> bytes | None:
        """s^e mod n as a k-byte block (the one costly step); None for an impossible one."""
        k = self.size
        if len(signature) != k:
            return None
        s = int.from_bytes(signature, "big")
        if s >= self.n:
            return None
        return pow(s, self.e, self.n).to_bytes(k, "big")

    def expected_block(self, message: bytes) -> bytes:
        """The EMSA-PKCS1-v1_5 encoding of SHA-256(message), which the block must equal."""
        digest = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        return b"\x00\x01" + b"\xff" * (self.size - len(digest) - 3) + b"\x00" + digest


REPLAY_REASONS = frozenset({"stale reqnum", "replayed request"})  # a valid signature, reused


class ReplayGuard:
    """Refuses a reqnum more than WINDOW below the highest accepted, and any message identical
    to one of the last WINDOW accepted. Memory is bounded; look-ups are O(1)."""

    WINDOW = 100

    def __init__(self) -> None:
        self.highest: int | None = None
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def check(self, reqnum: int, message: bytes) -> str | None:
        """Why this request is a replay, or None."""
        if self.highest is not None and reqnum < self.highest - self.WINDOW:
            return "stale reqnum"
        if hashlib.sha256(message).digest() in self._recent:
            return "replayed request"
        return None

    def record(self, reqnum: int, message: bytes) -> None:
        self.highest = reqnum if self.highest is None else max(self.highest, reqnum)
        self._recent[hashlib.sha256(message).digest()] = None
        if len(self._recent) > self.WINDOW:
            self._recent.popitem(last=False)


def verify_auth(
    key: RsaPublicKey, auth: AuthData, guard: ReplayGuard, *, record: bool = True
) -> str | None:
    """Check one request's signature and freshness; the reason it fails, or None.

    With record=False the caller records the ticket in `guard` itself once the request is
    accepted, so a request refused for another reason (429) can be retried with it.
    """
    if len(auth.signature) > MAX_SIGNATURE_B64:
        return "signature too long"
    try:
        signature = base64.b64decode(auth.signature, validate=True)
    except (binascii.Error, ValueError):
        return "signature is not base64"
    message = auth.seed_message()
    reason = guard.check(auth.reqnum, message)
    if reason is not None:
        return reason
    if not key.verify(message, signature):
        return "bad signature"
    if record:
        guard.record(auth.reqnum, message)
    return None


# Counted apart (malformed: no layout was tried, no reason to doubt the key), told to the client
# as any other bad signature: the 401 says no more than it did before it was counted apart.
_WRONG_SIZE = "signature has the wrong size"


# A refusal's reason (what the client's 401 says, _WRONG_SIZE aside) -> its label in /metrics
FAILURE_LABELS = {
    "no public key yet": "no_key",
    "signature too long": "malformed",
    "signature is not base64": "malformed",
    _WRONG_SIZE: "malformed",
    "bad signature": "no_layout",
    "stale reqnum": "replayed",
    "replayed request": "replayed",
}


class SignatureWatch:
    """Signed requests refused, by label (FAILURE_LABELS): totals for /metrics, and a
    WARNING at most every `interval` seconds with the counts since the last one and the key
    in use (vast-cli#493: workers answering 401 to everything, their operators seeing only
    access-log lines). It also says when the key looks outdated: `doubt_after` signatures
    verified under no layout within the last `window` seconds. Counted in a sliding window,
    not "in a row": good signatures do not reset it, since a client holding a ticket signed
    before the key changed (a `url` signature never expires) would otherwise keep a changed
    key from ever being fetched again."""

    TEXT = {"replayed": "replayed", "malformed": "malformed", "no_key": "before a key came"}

    def __init__(
        self,
        checker: SignatureChecker,
        totals: collections.Counter[str] | None = None,
        *,
        interval: float = 60.0,
        doubt_after: int = 20,
        window: float = 60.0,
    ) -> None:
        self.checker = checker
        self.totals: collections.Counter[str] = collections.Counter() if totals is None else totals
        self.pending: collections.Counter[str] = collections.Counter()  # since the last line
        self.interval = interval
        self.doubt_after = doubt_after
        self.window = window
        # time.monotonic() of the latest no-layout refusals, newest last; doubt_after of
        # them at most (doubtful() needs no more), cleared when a key is loaded
        self.no_layout: collections.deque[float] = collections.deque(maxlen=doubt_after)
        self._warned = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def failed(self, label: str) -> None:
        self.totals[label] += 1
        self.pending[label] += 1
        if label == "no_layout":
            if self.no_layout.maxlen != self.doubt_after:  # doubt_after set after __init__
                self.no_layout = collections.deque(self.no_layout, maxlen=self.doubt_after)
            self.no_layout.append(time.monotonic())
        if self._timer is not None:
            return  # a line is due already: it will count this one
        delay = self._warned + self.interval - time.monotonic()
        if delay <= 0:
            self.warn()
            return
        with contextlib.suppress(RuntimeError):  # no loop (a test calling check()): next time
            self._timer = asyncio.get_running_loop().call_later(delay, self.warn)

    def doubtful(self) -> bool:
        """Whether the key may have changed under the worker: doubt_after no-layout
        refusals, the oldest of them no more than `window` seconds ago."""
        recent = self.no_layout
        if len(recent) < self.doubt_after or not recent:
            return False
        return time.monotonic() - recent[0] <= self.window

    def warn(self) -> None:
        """The WARNING line with the counts since the last one (none: no line)."""
        self._timer = None
        if not self.pending:
            return
        self._warned = time.monotonic()
        layouts = ", ".join(self.checker.layouts)
        parts: list[str] = []
        for label in ("no_layout", "replayed", "malformed", "no_key"):
            if self.pending[label]:
                text = self.TEXT.get(label, f"matching none of the layouts accepted ({layouts})")
                parts.append(f"{self.pending[label]} {text}")
        log.warning(
            "signed requests refused: %d since the last such line (%s); %s",
            sum(self.pending.values()),
            ", ".join(parts),
            self.checker.key_text(),
        )
        self.pending.clear()

    def flush(self) -> None:
        """The line now, if refusals are pending (the key is about to change)."""
        self.close()
        self.warn()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


class SignatureChecker:
    """Whether a request comes from the autoscaler: its public key (from PUBKEY_FILE, or
    fetched from the autoscaler in the background), the RSA check against each signature
    layout allowed, the replay guard for layouts that sign reqnum, and a bounded cache of
    verified `url` signatures: such a signature recurs on every request to this worker, and
    a look-up costs a fraction of a microsecond where pow() costs some 200. (The other
    layouts' tickets are good once: caching them would hold memory for nothing.)

    The key can change under a running worker (issue 18). A fetched key is fetched again when
    signatures keep failing (SignatureWatch.doubtful), from where it was fetched, at most
    every `refetch_interval` seconds; a PUBKEY_FILE key is read again when its file changes
    (watch_file). A new key empties the cache of verified signatures; the replay guard stays
    as it is, so a ticket spent under the old key stays spent."""

    CACHE_SIZE = 4096

    def __init__(
        self,
        layouts: Sequence[str] = SIGNATURE_LAYOUTS,
        *,
        failures: collections.Counter[str] | None = None,
    ) -> None:
        self.pubkey: RsaPublicKey | None = None
        self.key_source = ""  # where the key came from: a URL, or "PUBKEY_FILE <path>"
        self.key_time = 0.0  # when (epoch seconds)
        self.guard = ReplayGuard()
        self.layouts = tuple(layouts)
        self.watch = SignatureWatch(self, failures)
        # Fetching the key again (Backend.start sets these when the key is fetched)
        self.spawn: Callable[[typing.Coroutine[Any, Any, None]], None] | None = None
        self.client: HttpClient | None = None
        self.refetch_interval = 300.0
        self._fetched_at = -math.inf  # time.monotonic() of the last fetch begun
        self._refetching = False
        self._file_stamp: tuple[int, int, int, int] | None = None
        # (signature, url) pairs verified in the `url` layout, oldest first
        self._verified: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def key_text(self) -> str:
        """The key in use, for the log: its fingerprint, where and when it was loaded."""
        if self.pubkey is None:
            where = self.client.base_url + "/pubkey/" if self.client is not None else "nowhere"
            return f"no key yet (fetching from {where})"
        return (
            f"key sha256:{self.pubkey.fingerprint} from {self.key_source}, "
            f"loaded {_utc(self.key_time)}"
        )

    def use_key(self, key: RsaPublicKey, source: str) -> None:
        """Verify with `key` from now on (logged: both fingerprints when it replaces one)."""
        old = self.pubkey
        if old is not None and old != key:
            self.watch.flush()  # the refusals so far were under the old key: said with it
        self.key_source, self.key_time = source, time.time()
        if old is None:
            log.info("public key loaded from %s (sha256:%s)", source, key.fingerprint)
        elif old == key:
            log.info("public key from %s: unchanged (sha256:%s)", source, key.fingerprint)
            return
        else:
            log.warning(
                "public key changed: sha256:%s -> sha256:%s (from %s); signatures are "
                "verified with the new key from now on",
                old.fingerprint,
                key.fingerprint,
                source,
            )
            self._verified.clear()  # verified with the old key: not proof under the new one
        self.pubkey = key
        self.watch.no_layout.clear()  # refusals under the old key are no doubt about this one

    @staticmethod
    def _stamp(path: str) -> tuple[int, int, int, int]:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def load_file(self, path: str) -> None:
        stamp = self._stamp(path)
        with open(path, "rb") as f:
            key = RsaPublicKey.from_pem(f.read(64 * 1024))
        self._file_stamp = stamp
        self.use_key(key, f"PUBKEY_FILE {path}")

    def reload_file(self, path: str) -> None:
        """Read PUBKEY_FILE again if it changed (device, inode, size or mtime: one stat); a
        file that cannot be used now is said once, and the key loaded stays in use."""
        try:
            stamp = self._stamp(path)
        except OSError as exc:
            stamp = (-1, -1, -1, exc.errno or 0)
            if stamp != self._file_stamp:
                self._file_stamp = stamp
                log.warning("PUBKEY_FILE %s: %s; the key loaded stays in use", path, exc)
            return
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            self.load_file(path)
        except (OSError, KeyFormatError) as exc:
            log.warning("PUBKEY_FILE %s changed but %s; the key loaded stays in use", path, exc)

    async def watch_file(self, path: str, interval: float) -> None:
        """PUBKEY_FILE looked at every `interval` seconds: a stat, no read unless it changed."""
        while True:
            await asyncio.sleep(interval)
            self.reload_file(path)

    async def _get_key(self, client: HttpClient) -> RsaPublicKey:
        async with await client.request("GET", "/pubkey/", timeout=10.0) as resp:
            body = await resp.read()
        if resp.status != 200:
            raise UpstreamError(f"status {resp.status}")
        return RsaPublicKey.from_pem(body)

    async def fetch(self, client: HttpClient) -> None:
        """GET {autoscaler}/pubkey/ until it works, backing off up to a minute."""
        self.client = client
        delay = 1.0
        while self.pubkey is None:
            self._fetched_at = time.monotonic()
            try:
                self.use_key(await self._get_key(client), client.base_url + "/pubkey/")
                return
            except (UpstreamError, KeyFormatError) as exc:
                log.warning(
                    "public key fetch from %s failed (%s); retry in %.0fs",
                    client.base_url,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def refetch(self, client: HttpClient) -> None:
        """The key fetched once more: signatures keep failing, the autoscaler's key may have
        changed (a failed try waits for the next doubt, refetch_interval later at least)."""
        try:
            log.warning(
                "%d signatures matched no layout in the last %.0fs; fetching the public key "
                "again from %s",
                len(self.watch.no_layout),
                self.watch.window,
                client.base_url,
            )
            key = await self._get_key(client)
        except (UpstreamError, KeyFormatError) as exc:
            log.warning("public key fetch from %s failed (%s)", client.base_url, exc)
            return
        finally:
            self._refetching = False
        self.use_key(key, client.base_url + "/pubkey/")

    def _doubt(self) -> None:
        """Signatures keep failing: fetch the key again, if it was fetched and not lately."""
        now = time.monotonic()
        if self.spawn is None or self.client is None or self.pubkey is None:
            return  # a PUBKEY_FILE key (watch_file), or the first fetch is still going
        if self._refetching or now - self._fetched_at < self.refetch_interval:
            return
        self._refetching = True
        self._fetched_at = now
        self.spawn(self.refetch(self.client))

    def check(self, auth: AuthData, *, replay: bool = True) -> str | None:
        """Why `auth` is refused (bad signature, replay unless replay=False), or None; sets
        auth.layout. The ticket is not spent: spend() it once the request is accepted, so
        that a 429 can be retried with it. Refusals are counted (SignatureWatch)."""
        reason = self._check(auth, replay)
        if reason is None:
            return None
        watch = self.watch
        label = FAILURE_LABELS.get(reason, "malformed")
        watch.failed(label)
        if label == "no_layout" and watch.doubtful():
            self._doubt()
        return "bad signature" if reason == _WRONG_SIZE else reason

    def _check(self, auth: AuthData, replay: bool) -> str | None:
        if self.pubkey is None:
            return "no public key yet"
        if len(auth.signature) > MAX_SIGNATURE_B64:
            return "signature too long"
        key = (auth.signature, auth.url)
        if key in self._verified and "url" in self.layouts:  # the usual case today
            auth.layout = "url"
            return None
        try:
            signature = base64.b64decode(auth.signature, validate=True)
        except (binascii.Error, ValueError):
            return "signature is not base64"
        if len(signature) != self.pubkey.size:  # no RSA signature under this key at all
            # One of another RSA key's size (1,024 to 8,192 bits) may be the autoscaler's new
            # key: it counts toward fetching the key again, as a same-size failure does.
            return "bad signature" if 128 <= len(signature) <= 1024 else _WRONG_SIZE
        block = self.pubkey.recover(signature)  # the one RSA operation, whatever the layouts
        if block is None:  # s >= n: a same-size key's signature may be (the key changed)
            return "bad signature"
        for layout in self.layouts:
            try:
                message = auth.message(layout)
            except (RecursionError, ValueError):  # nested past json's depth: never signed
                continue
            # compare_digest: the block is public, but the habit costs nothing here.
            if hmac.compare_digest(block, self.pubkey.expected_block(message)):
                if layout == "url":  # the only layout whose signature recurs
                    self._verified[key] = None
                    if len(self._verified) > self.CACHE_SIZE:
                        self._verified.popitem(last=False)
                return self._fresh(auth, layout, message, replay)
        return "bad signature"

    def _fresh(self, auth: AuthData, layout: str, message: bytes, replay: bool) -> str | None:
        auth.layout = layout
        if replay and layout in REPLAYABLE_LAYOUTS:
            return self.guard.check(auth.reqnum, message)
        return None  # a `url` signature signs nothing that changes: no replay check can apply

    def spend(self, auth: AuthData) -> None:
        if auth.layout in REPLAYABLE_LAYOUTS:
            self.guard.record(auth.reqnum, auth.message(auth.layout))


def decode_client_json(body: bytes) -> dict[str, Any]:
    """A client's body as a JSON object; HttpError(422) for anything else."""
    try:
        data = json_loads(body)
    except _JSON_DECODE_ERRORS:
        raise HttpError(422, "invalid JSON") from None
    if not isinstance(data, dict):
        raise HttpError(422, "invalid JSON")
    return typing.cast(dict[str, Any], data)


def peek_auth(msg: dict[str, Any]) -> tuple[int | None, float]:
    """The request_idx and the cost a client's auth_data claims, before anything is checked:
    a refused request is still reported (completion, rejected load) under them."""
    auth = msg.get("auth_data")
    if not isinstance(auth, dict):
        return None, 0.0
    fields = typing.cast(dict[str, Any], auth)
    idx, cost = fields.get("request_idx"), fields.get("cost")
    workload = 0.0
    if isinstance(cost, (int, float, str)) and not isinstance(cost, bool):
        with contextlib.suppress(ValueError, OverflowError):  # float(10**400) overflows
            workload = float(cost)
    if not (math.isfinite(workload) and workload > 0):  # claimed, not proven: never negative
        workload = 0.0
    return (idx if type(idx) is int else None), workload


# What a worker's own payload code raises on a payload it cannot read (see below); an
# OverflowError is a client's number too big for a float (float(10**400))
_PAYLOAD_READ_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)


class PayloadUnreadable(JsonDataException):
    """A payload the worker's own code (`what`) raised on while reading it: 422, "invalid
    payload". `error` is that exception, for the operator's log (Admission.code_failed),
    never for the client: its text may carry the client's data."""

    def __init__(
        self,
        error: BaseException,
        what: str = "payload class's from_json_msg",
        json_msg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(json_msg or {"payload": "invalid payload"})
        self.error = error
        self.what = what


def parse_client_request(
    parse_payload: Callable[[dict[str, Any]], _T],
    msg: dict[str, Any],
    signatures: SignatureChecker | None,
    *,
    replay: bool = True,
) -> tuple[_T, AuthData | None]:
    """A client's `{"auth_data": ..., "session_id": ..., "payload": ...}`: auth_data checked
    against `signatures` (None: not checked, UNSECURED; replay=False: a session's own ticket,
    sent again by design), and only then the payload parsed with `parse_payload` (such as
    an ApiPayload's from_json_msg). Raises HttpError(401) for a refused signature, or
    JsonDataException (422) naming every bad field at once."""
    errors: dict[str, Any] = {}
    session_id = msg.get("session_id")
    if session_id is not None and type(session_id) is not str:
        errors["session_id"] = "expected null or a string"
    auth: AuthData | None = None
    if signatures is not None:
        if "auth_data" not in msg:
            errors["auth_data"] = "missing parameter"
        else:
            try:
                auth = AuthData.from_json_msg(msg["auth_data"])
            except JsonDataException as exc:
                errors["auth_data"] = exc.message.get("__all__", exc.message)
    raw_payload = msg.get("payload")
    if "payload" not in msg:
        errors["payload"] = "missing parameter"
    elif not isinstance(raw_payload, dict):
        errors["payload"] = "expected a JSON object"
    if errors:
        if "payload" not in errors:  # report the payload's bad fields in the same answer
            try:
                parse_payload(typing.cast(dict[str, Any], raw_payload))
            except JsonDataException as exc:
                errors["payload"] = exc.message
            except _PAYLOAD_READ_ERRORS:
                errors["payload"] = "invalid payload"
        raise JsonDataException(errors)
    if signatures is not None and auth is not None:
        reason = signatures.check(auth, replay=replay)
        if reason is not None:
            raise HttpError(401, reason)
    try:
        return parse_payload(typing.cast(dict[str, Any], raw_payload)), auth
    except PayloadUnreadable:
        raise
    except JsonDataException as exc:
        raise JsonDataException({"payload": exc.message}) from None
    except _PAYLOAD_READ_ERRORS as exc:
        # A worker's own from_json_msg that indexes the payload (json_msg["input"]["x"]) meets
        # a client's bad payload: the client's to fix (422), not the worker's failure (500).
        # Or the worker's own bug: which, only the operator can tell (Admission.code_failed).
        raise PayloadUnreadable(exc) from None


# Handler base classes ############################################################################

P = TypeVar("P", bound=ApiPayload)


class Multipart:
    """A multipart/form-data body (RFC 7578): text fields, and files as
    (field name, file name, content type, bytes). encode() gives the Content-Type and body."""

    def __init__(
        self,
        fields: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        files: Sequence[tuple[str, str, str, bytes]] = (),
    ) -> None:
        # Pairs, not a dict: a form may repeat a field (an HTML form's multiple select does).
        self.fields = list(fields.items() if isinstance(fields, Mapping) else fields or ())
        self.files = list(files)

    @classmethod
    def from_form(cls, form: Mapping[str, Any]) -> Multipart:
        """A payload's generate_payload_multipart() fields as a Multipart: a (file name,
        bytes, content type) tuple is a file, a list repeats its field, None is left out, a
        dict or list item is sent as JSON, a bool as true / false, anything else as str()."""
        fields: list[tuple[str, str]] = []
        files: list[tuple[str, str, str, bytes]] = []
        for name, value in form.items():
            items: list[Any] = value if isinstance(value, list) else [value]  # pyright: ignore[reportUnknownVariableType]
            for item in items:
                if item is None:
                    continue
                if isinstance(item, tuple):
                    filename, data, content_type = typing.cast(tuple[str, bytes, str], item)
                    files.append((name, filename, content_type, bytes(data)))
                elif isinstance(item, (bytes, bytearray)):
                    raise TypeError(f"form field {name!r}: bytes go in a file tuple")
                elif isinstance(item, (dict, list)):
                    fields.append((name, json_dumps(item).decode()))
                elif isinstance(item, bool):
                    fields.append((name, "true" if item else "false"))
                else:
                    fields.append((name, str(item)))
        return cls(fields, files)

    @staticmethod
    def _quoted(text: str) -> str:
        # RFC 7578 4.2 and the HTML form encoding: a quoted name; CR, LF and " escaped.
        return '"' + text.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22") + '"'

    def encode(self) -> tuple[str, bytes]:
        parts: list[tuple[bytes, bytes]] = []
        for name, value in self.fields:
            head = f"Content-Disposition: form-data; name={self._quoted(name)}\r\n"
            parts.append((head.encode("utf-8"), value.encode("utf-8")))
        for name, filename, content_type, data in self.files:
            if "\r" in content_type or "\n" in content_type:
                raise ValueError(f"CR or LF in the content type of file {filename!r}")
            head = (
                f"Content-Disposition: form-data; name={self._quoted(name)}; "
                f"filename={self._quoted(filename)}\r\nContent-Type: {content_type}\r\n"
            )
            parts.append((head.encode("utf-8"), data))
        boundary = secrets.token_hex(16).encode()
        while any(boundary in data for _, data in parts):  # 2**-128 odds, but checked
            boundary = secrets.token_hex(16).encode()
        body = b"".join(b"--%s\r\n%s\r\n%s\r\n" % (boundary, head, data) for head, data in parts)
        body += b"--%s--\r\n" % boundary
        return f"multipart/form-data; boundary={boundary.decode()}", body


def model_request_body(body: dict[str, Any] | Multipart) -> tuple[str, bytes]:
    """(Content-Type, bytes) of what a handler's model_body() returned."""
    if isinstance(body, Multipart):
        return body.encode()
    return "application/json", json_dumps(body)


def _upstream_message(exc: BaseException) -> str:
    """What a client is told when the model fails; the details (addresses) go to the log."""
    if isinstance(exc, UpstreamTimeout):
        return "the model server did not answer in time"
    if isinstance(exc, UpstreamError):
        return "the model server failed"
    return "internal error"


class _ToClient:
    """The boundary between the model and the client: a model stream's failure becomes an
    HttpError, which the server answers (502, 504) if nothing was sent yet, else cuts.
    (Backend's accounting wraps the model's chunks itself and does the same.)"""

    __slots__ = ("chunks",)

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> _ToClient:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.chunks.__anext__()
        except UpstreamError as exc:
            raise HttpError(exc.status, _upstream_message(exc)) from exc

    async def aclose(self) -> None:
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _relayed_type(model_response: ClientResponse) -> str:
    """The model's Content-Type field as it is, parameters included (a charset matters)."""
    return model_response.headers.get("content-type") or "application/octet-stream"


async def relay_json(model_response: ClientResponse) -> Response:
    """The model's answer read whole: its status, content type and body."""
    body = await model_response.read()
    return Response(model_response.status, body, content_type=_relayed_type(model_response))


async def relay_stream(model_response: ClientResponse) -> Response:
    """The model's body relayed chunk by chunk as it arrives (chunked / SSE streams)."""
    return Response(
        model_response.status,
        content_type=_relayed_type(model_response),
        stream=_ToClient(model_response.iter_chunks()),
    )


async def relay(model_response: ClientResponse) -> Response:
    """The model's answer as it is: streamed chunk by chunk when the model streams (chunked,
    text/event-stream, application/x-ndjson), else read whole and sent with its length."""
    if model_response.streaming:
        return await relay_stream(model_response)
    return await relay_json(model_response)


class _Unset:
    """The value of a handler setting not given as a keyword (see EndpointHandler)."""

    def __repr__(self) -> str:
        return "<class attribute>"


_UNSET: Any = _Unset()


@dataclasses.dataclass(eq=False)
class EndpointHandler(abc.ABC, Generic[P]):
    """One model API route: the model's path, the payload class, how the answer is relayed.

        class GenerateHandler(EndpointHandler[InputData]):
            endpoint = "/generate"

    is a whole handler: the payload class comes from the brackets (or a `payload_class`
    attribute), and the model's answer goes back as it is, streamed or not (see relay).
    Override generate_client_response to shape it, make_benchmark_payload to benchmark
    with other payloads.

    The route's settings are class attributes, or keywords (GenerateHandler(benchmark_runs=3)):

        allow_parallel_requests  None: the Backend's. False: this route's model requests
                                 wait in the one FIFO queue that all such routes share
        max_queue_time           None: the Backend's; seconds of estimated wait past which
                                 a request gets 429
        concurrency              requests per benchmark round (this handler benchmarking);
                                 None: 10 if the route is parallel, else 1
        benchmark_runs           the most rounds' worth the benchmark sends (this handler
                                 benchmarking; it stops once stable); None: the Backend's
        do_warmup_benchmark      the benchmark's warm-up request first

    The 2024 library's form works too: the handler a dataclass (its subclasses decorated
    with @dataclasses.dataclass, adding fields), `endpoint` as a property, a `payload_cls`
    classmethod, generate_client_response(client_request, model_response) overridden,
    healthcheck_endpoint on the benchmark handler, and benchmark_words (kept, unused). The
    base class declares no `endpoint`, so that both a plain string and a property
    type-check; Backend.create_handler checks it.
    """

    #: the ApiPayload subclass this route takes; set from EndpointHandler[...] when not given
    payload_class: ClassVar[type[ApiPayload] | None] = None
    #: seconds a model request may take, answer included (None: no limit, for long streams)
    model_timeout: ClassVar[float | None] = None

    # The settings are dataclass fields, so that GenerateHandler(benchmark_runs=3) and the
    # 2024 form's @dataclass subclasses take them as keywords; their default is _UNSET, which
    # __post_init__ removes from the instance, so that a subclass's plain class attribute
    # (allow_parallel_requests = True) is what shows instead of being hidden by a default.
    allow_parallel_requests: bool | None = dataclasses.field(default=_UNSET, kw_only=True)
    max_queue_time: float | None = dataclasses.field(default=_UNSET, kw_only=True)
    concurrency: int | None = dataclasses.field(default=_UNSET, kw_only=True)
    benchmark_runs: int | None = dataclasses.field(default=_UNSET, kw_only=True)
    do_warmup_benchmark: bool = dataclasses.field(default=_UNSET, kw_only=True)
    benchmark_words: int | None = dataclasses.field(default=_UNSET, kw_only=True)

    def __post_init__(self) -> None:
        own = vars(self)
        for name in _HANDLER_SETTINGS:
            if own.get(name) is _UNSET:
                delattr(self, name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "payload_class" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):  # its own bases, not inherited
            origin = typing.get_origin(base)
            if isinstance(origin, type) and issubclass(origin, EndpointHandler):
                arg = typing.get_args(base)[0]
                if isinstance(arg, type) and issubclass(arg, ApiPayload):
                    cls.payload_class = arg

    @classmethod
    def payload_cls(cls) -> type[P]:
        """The payload class (the 2024 library's name: overriding it still works)."""
        if cls.payload_class is None:
            raise TypeError(
                f"{cls.__name__}: no payload class; write EndpointHandler[MyPayload] "
                "or set payload_class = MyPayload"
            )
        return typing.cast(type[P], cls.payload_class)

    def make_benchmark_payload(self) -> P:
        """A payload for the benchmark; by default the payload class's for_test()."""
        return self.payload_cls().for_test()

    def model_body(self, payload: P) -> dict[str, Any] | Multipart:
        """What the model is sent: by default payload.generate_payload_json() as JSON.
        Override to add to it (`{**payload.generate_payload_json(), "stream": True}`), or
        return a Multipart for a model API that takes uploads (audio, images). A payload
        whose generate_payload_multipart() gives fields is sent as multipart/form-data."""
        form = payload.generate_payload_multipart()
        if form is not None:
            return Multipart.from_form(form)
        return payload.generate_payload_json()

    def model_headers(self, payload: P) -> Sequence[tuple[str, str]]:
        """Header fields for the model request, e.g. [("Authorization", "Bearer KEY")] for a
        model server started with an API key (vLLM's --api-key)."""
        return ()

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        """The client's answer; by default the model's, relayed as it is (see relay)."""
        return await relay(model_response)


_HANDLER_SETTINGS = {
    "allow_parallel_requests": None,
    "max_queue_time": None,
    "concurrency": None,
    "benchmark_runs": None,
    "do_warmup_benchmark": True,
    "benchmark_words": None,
}
for _name, _default in _HANDLER_SETTINGS.items():  # the class attributes under the fields
    setattr(EndpointHandler, _name, _default)


def handler_setting(handler: EndpointHandler[Any], name: str) -> Any:
    """A handler's setting: its own, else its class's (also when a subclass's __post_init__
    did not call EndpointHandler's)."""
    value = getattr(handler, name)
    return getattr(type(handler), name) if value is _UNSET else value


def _endpoint_of(handler: EndpointHandler[Any]) -> str:
    """A handler's model path, whichever form declares it (a string, or a property)."""
    endpoint = getattr(handler, "endpoint", None)
    if not isinstance(endpoint, str) or not endpoint.startswith("/"):
        name = type(handler).__name__
        raise TypeError(f'{name}.endpoint must be a path such as "/generate", not {endpoint!r}')
    return endpoint


class LogAction(enum.Enum):
    """What a model-log line means when it contains the action's text."""

    ModelLoaded = "model_loaded"  # run the benchmark, then ready
    ModelError = "model_error"  # errored, for good
    Info = "info"  # echo the line to the worker's log


# Configuration ###################################################################################


class ConfigError(ValueError):
    """A bad environment value; the message names the variable."""


_HOST_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def _is_host(host: str) -> bool:
    """An IP address, or a host name (RFC 1123) that is not all digits and dots (999.1.1.1
    is neither: a mistyped address, not a name)."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return bool(_HOST_NAME.fullmatch(host)) and not re.fullmatch(r"[0-9.]+", host)


@dataclasses.dataclass
class Config:
    """The worker's settings (SPEC section 8); Config.from_env() reads and checks them."""

    worker_port: int = 3000
    host: str = "0.0.0.0"
    model_log: str | None = None
    model_server_url: str | None = None
    report_addrs: list[str] = dataclasses.field(default_factory=lambda: ["https://run.vast.ai"])
    container_id: int = 0
    public_url: str = ""
    use_ssl: bool = False
    ssl_cert: str = "/etc/instance.crt"
    ssl_key: str = "/etc/instance.key"
    unsecured: bool = False
    pubkey_file: str | None = None
    max_body: int = MAX_BODY
    log_level: str = "INFO"
    benchmark_cache: str | None = ".has_benchmark"  # BENCHMARK_CACHE; None ("off"): no cache
    report_check_interval: float = 1.0  # how often a report is considered
    report_max_interval: float = 10.0  # a report goes out at least this often
    report_timeout: float = 10.0  # SPEC 11.3: timeout 10 s, 3 tries
    report_backoff: float = 0.5  # seconds before a failed report's second try; doubled after
    healthcheck_interval: float = 10.0
    log_poll_interval: float = 0.2
    # Today's platform (SPEC 11)
    master_token: str = ""  # MASTER_TOKEN: in every report as `mtoken`; a secret
    report_format: str = "auto"  # "1.1.0", "2024", or auto: "1.1.0" when MASTER_TOKEN is set
    signature_layouts: tuple[str, ...] = SIGNATURE_LAYOUTS
    model_health_endpoint: str | None = None  # a path on the model server, or a URL
    force_update_file: str = "/.force_update"
    # seconds from loaded to the first healthy answer; None: model_api_wait (MODEL_API_WAIT),
    # the patience the model's API gets (ModelApiWait)
    health_start_timeout: float | None = None
    health_failures: int = 3  # failures in a row, once healthy, that mark the worker errored
    worker_http_port: int | None = None  # /session/end in plain HTTP beside TLS; None: port + 1
    session_gc_interval: float = SESSION_GC_INTERVAL
    # Bad days (issue 18): a model API that opens late, signatures that stop verifying
    model_api_wait: float = MODEL_API_WAIT  # MODEL_API_WAIT: seconds for the API to open
    model_api_log_interval: float = 10.0  # a "still waiting for the model's API" line this often
    signature_warn_interval: float = 60.0  # the refused-signatures warning at most this often
    key_refetch_failures: int = 20  # this many signatures matching no layout ...
    key_refetch_quiet: float = 60.0  # ... within this many seconds: fetch the key again,
    key_refetch_interval: float = 300.0  # ... at most this often
    pubkey_file_poll: float = 1.0  # PUBKEY_FILE is looked at (stat) for a change this often

    @property
    def platform_reports(self) -> bool:
        """Whether load reports are in today's format "1.1.0" (with completion reports)."""
        if self.report_format == "auto":
            return bool(self.master_token)
        return self.report_format == "1.1.0"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        config = cls()

        def flag(name: str) -> bool:
            value = env.get(name, "false").strip().lower()
            if value not in ("true", "false", "1", "0", "yes", "no", ""):
                raise ConfigError(f"{name}={value!r}: expected true or false")
            return value in ("true", "1", "yes")

        def integer(name: str, default: int, low: int, high: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
                raise ConfigError(f"{name}={raw!r}: expected an integer from {low} to {high}")
            return int(raw)

        def url(name: str, raw: str) -> str:
            try:
                split_url(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: expected an http:// or https:// URL") from None
            return raw.rstrip("/")

        config.worker_port = integer("WORKER_PORT", 3000, 1, 65535)
        config.host = env.get("WORKER_HOST", "").strip() or config.host
        if not _is_host(config.host):
            raise ConfigError(f"WORKER_HOST={config.host!r}: expected an IP address or a host name")
        config.model_log = env.get("MODEL_LOG") or None
        if env.get("MODEL_SERVER_URL"):
            config.model_server_url = url("MODEL_SERVER_URL", env["MODEL_SERVER_URL"])
        addrs = [a.strip() for a in env.get("REPORT_ADDR", "").split(",") if a.strip()]
        if addrs:
            config.report_addrs = [url("REPORT_ADDR", a) for a in addrs]
        config.container_id = integer("CONTAINER_ID", 0, 0, 2**63 - 1)
        config.use_ssl = flag("USE_SSL")
        config.ssl_cert = env.get("WORKER_SSL_CERT") or config.ssl_cert
        config.ssl_key = env.get("WORKER_SSL_KEY") or config.ssl_key
        config.unsecured = flag("UNSECURED")
        config.pubkey_file = env.get("PUBKEY_FILE") or None
        if config.pubkey_file and not os.path.isfile(config.pubkey_file):
            raise ConfigError(f"PUBKEY_FILE={config.pubkey_file!r}: no such file")
        if config.pubkey_file:
            try:
                with open(config.pubkey_file, "rb") as f:
                    RsaPublicKey.from_pem(f.read(64 * 1024))
            except (OSError, KeyFormatError) as exc:
                raise ConfigError(f"PUBKEY_FILE={config.pubkey_file!r}: {exc}") from None
        config.max_body = integer("MAX_BODY_BYTES", MAX_BODY, 1024, 2**40)
        level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
        config.log_level = level
        public_ip = env.get("PUBLIC_IPADDR", "").strip() or "127.0.0.1"
        port_var = f"VAST_TCP_PORT_{config.worker_port}"
        public_port = integer(port_var, config.worker_port, 1, 65535)
        scheme = "https" if config.use_ssl else "http"
        config.public_url = f"{scheme}://{public_ip}:{public_port}"
        config.master_token = env.get("MASTER_TOKEN", "").strip()
        config.report_format = env.get("REPORT_FORMAT", "auto").strip().lower() or "auto"
        if config.report_format not in ("auto", "1.1.0", "2024"):
            raise ConfigError(
                f"REPORT_FORMAT={config.report_format!r}: expected auto, 1.1.0 or 2024"
            )
        raw = env.get("SIGNATURE_LAYOUTS", "").strip()
        if raw:
            layouts = tuple(x.strip().lower() for x in raw.split(",") if x.strip())
            if not layouts or any(x not in SIGNATURE_LAYOUTS for x in layouts):
                names = ", ".join(SIGNATURE_LAYOUTS)
                raise ConfigError(f"SIGNATURE_LAYOUTS={raw!r}: expected a list of {names}")
            config.signature_layouts = layouts
        health = env.get("MODEL_HEALTH_ENDPOINT", "").strip()
        if health:
            if not health.startswith("/"):
                url("MODEL_HEALTH_ENDPOINT", health)
            config.model_health_endpoint = health
        config.force_update_file = env.get("FORCE_UPDATE_FILE", "").strip() or "/.force_update"
        cache = env.get("BENCHMARK_CACHE", "").strip()
        if cache:
            config.benchmark_cache = None if cache.lower() == "off" else cache
        if env.get("WORKER_HTTP_PORT", "").strip():
            config.worker_http_port = integer("WORKER_HTTP_PORT", 0, 1, 65535)
        config.model_api_wait = integer("MODEL_API_WAIT", int(MODEL_API_WAIT), 0, 7 * 24 * 3600)
        return config


# Backend parts: the worker's state ###############################################################
# Backend composes the parts below, one job each; each can be built and tested alone.


class State(enum.Enum):
    LOADING = "loading"
    BENCHMARKING = "benchmarking"
    READY = "ready"
    ERRORED = "errored"


class Lifecycle:
    """Where the worker is: loading -> benchmarking -> ready, or errored for good; the
    benchmark's figure, and how long the worker took to become ready. With a health check
    (needs_health), ready also waits for the model's first healthy answer."""

    def __init__(self) -> None:
        self.state = State.LOADING
        self.error_msg = ""
        self.max_perf = 0.0  # workload per second, from the benchmark
        self.started_at = time.monotonic()
        self.loaded_at: float | None = None  # when the model's log said it loaded
        self.loadtime: float | None = None  # seconds from start to ready, once ready
        self.needs_health = False
        self.healthy = False  # the model's health endpoint answered 200 at least once
        self._benchmarked = False
        self.changed: list[Callable[[], None]] = []  # told when the state changes
        # told when the benchmark is done and only the health check's 200 is missing: the
        # health check asks at once instead of at its next poll, up to 10 s later
        self.health_wanted: list[Callable[[], None]] = []

    def _tell(self) -> None:
        for listener in self.changed:
            listener()

    def model_loaded(self) -> bool:
        """Loading -> benchmarking; False when the worker was not loading (a repeated line)."""
        if self.state is not State.LOADING:
            return False
        self.state = State.BENCHMARKING
        self.loaded_at = time.monotonic()
        self._tell()
        return True

    def benchmarked(self, max_perf: float) -> None:
        self.max_perf = max_perf
        self._benchmarked = True
        self._maybe_ready()

    def health_ok(self) -> None:
        if not self.healthy:
            self.healthy = True
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.state is State.BENCHMARKING and self._benchmarked:
            if self.needs_health and not self.healthy:
                log.info("benchmark done; waiting for the model's health endpoint")
                for ask in self.health_wanted:
                    ask()
                return
            self.state = State.READY
            self.loadtime = time.monotonic() - self.started_at
            log.info("worker ready after %.1fs (max_perf=%.2f)", self.loadtime, self.max_perf)
            self._tell()

    def errored(self, message: str) -> None:
        if self.state is not State.ERRORED:
            log.error("worker errored: %s", message)
            self.state = State.ERRORED
            self.error_msg = message
            self._tell()


class BackgroundTasks:
    """The backend's background tasks. None may die silently: a failure is logged and marks
    the worker errored; stop() cancels them all and waits, bounded."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: typing.Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._done)
        self._tasks.add(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("background task %s failed", task.get_coro(), exc_info=exc)
        self._lifecycle.errored(f"internal error: {exc!r}")

    async def stop(self, timeout: float = 5.0) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a task that ignores its cancellation must not hang the exit
            _, stuck = await asyncio.wait(tasks, timeout=timeout)
            for task in stuck:
                log.error("background task %s did not stop", task.get_coro())
        self._tasks.clear()


# Backend parts: metrics ##########################################################################


class Histogram:
    """A Prometheus histogram with fixed buckets (seconds)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, value)] += 1  # the first bound >= value
        self.total += value

    def render(self, name: str, labels: str) -> list[str]:
        lines: list[str] = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip((*self.BUCKETS, math.inf), self.counts):
            cumulative += count
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        lines.append(f"{name}_count{{{labels}}} {cumulative}")
        return lines


@dataclasses.dataclass
class Tally:
    """A request count and its workload."""

    requests: int = 0
    workload: float = 0.0

    def add(self, workload: float) -> None:
        self.requests += 1
        self.workload += workload


class Metrics:
    """Request and workload bookkeeping, and its Prometheus rendering. Every accepted request
    is in exactly one of in_flight, served, errored, cancelled:
    received = in_flight + served + errored + cancelled.
    """

    def __init__(self) -> None:
        self.received = Tally()
        self.in_flight = Tally()
        self.serial = Tally()  # of in_flight: the one-at-a-time routes' (the FIFO, and its turn)
        self.queued = 0
        self.served = Tally()
        self.errored = Tally()
        self.cancelled = Tally()
        self.rejected = 0  # 429 answers: never accepted, so never received
        self.refused = Tally()  # 401 and 429 answers, with the workload they claimed
        self.sessions_open = 0
        self.sessions_ended: collections.Counter[str] = collections.Counter()  # by cause
        self.working: collections.Counter[int] = collections.Counter()  # request_idx in flight
        self.by_route_status: collections.Counter[tuple[str, int]] = collections.Counter()
        self.duration: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.queue_wait = Histogram()
        self.first_byte = Histogram()
        self.signature_failures: collections.Counter[str] = collections.Counter()  # by label

    def start(self, workload: float) -> None:
        self.received.add(workload)
        self.in_flight.add(workload)

    def finish(self, workload: float, outcome: str) -> None:
        self.in_flight.requests -= 1
        self.in_flight.workload -= workload
        if outcome == "served":
            self.served.add(workload)
        elif outcome == "errored":
            self.errored.add(workload)
        else:
            self.cancelled.add(workload)

    def record(self, route: str, status: int, duration: float) -> None:
        """One answered request (duration 0.0: refused before it reached the model)."""
        self.by_route_status[(route, status)] += 1
        if duration:
            self.duration[route].observe(duration)

    @property
    def load_total(self) -> float:
        """Workload received minus cancelled: what the autoscaler calls load."""
        return self.received.workload - self.cancelled.workload

    @property
    def finished(self) -> int:
        return self.served.requests + self.errored.requests + self.cancelled.requests

    def consistent(self) -> bool:
        """The invariant above; the tests and the soak check it after every kind of ending."""
        parts = (self.in_flight, self.served, self.errored, self.cancelled)
        return self.received.requests == sum(t.requests for t in parts) and math.isclose(
            self.received.workload, sum(t.workload for t in parts), abs_tol=1e-6
        )

    def render(self, lifecycle: Lifecycle) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        by_status = sorted(self.by_route_status.items())
        metric(
            "pyworker_requests_total",
            "counter",
            "Requests answered, by route and status.",
            (f'pyworker_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in by_status),
        )
        for name, value, help_text in (
            ("in_flight", self.in_flight.requests, "Requests being served."),
            ("queued", self.queued, "Requests waiting for the model."),
        ):
            metric(
                f"pyworker_requests_{name}",
                "gauge",
                help_text,
                [f"pyworker_requests_{name} {value}"],
            )
        tallies = {"received": self.received, "served": self.served, "errored": self.errored}
        tallies["cancelled"] = self.cancelled
        metric(
            "pyworker_workload_total",
            "counter",
            "Workload of accepted requests, by outcome.",
            (
                f'pyworker_workload_total{{outcome="{k}"}} {t.workload:g}'
                for k, t in tallies.items()
            ),
        )
        name = "pyworker_request_duration_seconds"
        metric(
            name,
            "histogram",
            "Time from request to the end of its answer.",
            (
                line
                for route, hist in sorted(self.duration.items())
                for line in hist.render(name, f'route="{route}"')
            ),
        )
        for name, hist, help_text in (
            ("pyworker_queue_wait_seconds", self.queue_wait, "Time waiting for the model."),
            (
                "pyworker_stream_first_byte_seconds",
                self.first_byte,
                "Time from forwarding a stream request to its first chunk.",
            ),
        ):
            metric(name, "histogram", help_text, hist.render(name, ""))
        metric(
            "pyworker_sessions_open",
            "gauge",
            "Sessions open.",
            [f"pyworker_sessions_open {self.sessions_open}"],
        )
        metric(
            "pyworker_sessions_ended_total",
            "counter",
            "Sessions ended, by cause.",
            (
                f'pyworker_sessions_ended_total{{cause="{cause}"}} {self.sessions_ended[cause]}'
                for cause in ("ended", "expired", "drained")
            ),
        )
        metric(
            "pyworker_signature_failures_total",
            "counter",
            "Signed requests refused, by reason.",
            (
                f'pyworker_signature_failures_total{{reason="{r}"}} {self.signature_failures[r]}'
                for r in ("no_layout", "replayed", "malformed", "no_key")
            ),
        )
        state = lifecycle.state
        metric(
            "pyworker_state",
            "gauge",
            "The worker's state (1 for the current one).",
            (f'pyworker_state{{state="{s.value}"}} {int(s is state)}' for s in State),
        )
        metric(
            "pyworker_max_perf",
            "gauge",
            "Benchmark throughput, workload per second.",
            [f"pyworker_max_perf {lifecycle.max_perf:g}"],
        )
        return "\n".join(out) + "\n"


# Backend parts: the model's log ##################################################################


class LineSplitter:
    """Bytes in, complete lines out (without their newline). A line only counts once it ends;
    an over-long one is handed out once, cut to MAX_LOG_LINE, and the rest of it is skipped,
    so memory stays bounded whatever the log holds."""

    def __init__(self) -> None:
        self._partial = b""
        self._skipping = False  # inside the rest of an over-long line, already handed out

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data, self._skipping = data[newline + 1 :], False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LOG_LINE:
            lines.append(self._partial)
            self._partial, self._skipping = b"", True
        return [line[:MAX_LOG_LINE] for line in lines]


class ModelLogWatcher:
    """Follows the model server's log file and acts on its lines: `actions` pairs a LogAction
    with the text that triggers it; on_loaded(line) and on_error(line) are called for the
    lines that say the model loaded or broke."""

    def __init__(
        self,
        path: str,
        actions: Sequence[tuple[LogAction, str]],
        *,
        on_loaded: Callable[[str], None],
        on_error: Callable[[str], None],
        poll_interval: float = 0.2,
    ) -> None:
        self.path = path
        self.actions = list(actions)
        self.on_loaded = on_loaded
        self.on_error = on_error
        self.poll_interval = poll_interval

    async def run(self) -> None:
        """Follow the log from its start: appends, truncation, rotation, partial lines.

        Polls with os.stat and reads with os.pread in steps of at most 1 MiB, so the event
        loop never blocks (the 2024 public PyWorker slept inside it and served ~100 requests a
        second). Errors reading the file are logged and retried, never fatal.
        """
        path = self.path
        fd: int | None = None
        inode: int | None = None
        pos = 0
        lines = LineSplitter()
        problem = ""
        warned = 0.0
        try:
            while True:
                try:
                    st = os.stat(path)
                    if st.st_ino != inode:
                        if fd is not None:  # rotated: finish the old file, then the new one
                            while data := os.pread(fd, 1024 * 1024, pos):
                                pos += len(data)
                                self._handle_lines(lines.feed(data))
                            os.close(fd)
                            fd = None
                            log.info("model log %s was replaced; reading the new file", path)
                        fd = os.open(path, os.O_RDONLY)
                        inode, pos = os.fstat(fd).st_ino, 0
                        lines = LineSplitter()
                    elif st.st_size < pos:
                        log.info("model log %s was truncated; reading it from the start", path)
                        pos, lines = 0, LineSplitter()
                    if fd is not None and st.st_size > pos:
                        data = os.pread(fd, min(st.st_size - pos, 1024 * 1024), pos)
                        pos += len(data)
                        self._handle_lines(lines.feed(data))
                        await asyncio.sleep(0)  # a big backlog is read in steps
                        continue
                    problem = ""
                except FileNotFoundError:
                    now = time.monotonic()
                    if problem != "missing" or now - warned >= MISSING_LOG_WARNING:
                        log.warning("the model log %s does not exist (yet); waiting", path)
                        problem, warned = "missing", now
                except OSError as exc:
                    if problem != str(exc):  # say it once, keep trying
                        log.warning("cannot read the model log %s: %s", path, exc)
                        problem = str(exc)
                await asyncio.sleep(self.poll_interval)
        finally:
            if fd is not None:
                os.close(fd)

    def _handle_lines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.handle_line(line.decode("utf-8", "replace").rstrip())

    def handle_line(self, line: str) -> None:
        for action, text in self.actions:
            if text not in line:
                continue
            if action is LogAction.ModelLoaded:
                self.on_loaded(line)
            elif action is LogAction.ModelError:
                self.on_error(line[:1000])
            else:
                log.info("model: %s", line[:1000])


# Backend parts: benchmark and health check #######################################################


class StoppingRule:
    """When the benchmark has measured enough: fed the benchmark's finished requests, it
    says when their figure is stable, and what it is. Pure (no clock, no I/O): the tests
    feed it times.

    The benchmark keeps `concurrency` (N) requests in flight, sending the next one as one
    finishes, and sends at most `limit` = runs x N in all (the seed's rounds' worth). Each
    finished request is fed in as finished(index, sent, ended, workload): its place in the
    order of sending (0, 1, ...), when it was sent and answered (seconds, on any one clock),
    and its workload, 0.0 when it failed. finished() returns the figure once it is stable,
    else None; final() gives the figure when all `limit` requests have finished without it.

    The figure is Little's law: with N requests always in flight, the model completes
    N / (the mean time a request takes) requests a second, and N x sum(workload) /
    sum(time taken) workload a second, over a run of requests. The runs it weighs:

    - not the opening burst, the first N, sent at once: those wait for the model's queue
      to fill and empty (with 10 sent to a model serving 4, the first four take one service
      time, the last two three) and so take less time than a request in a steady queue;
    - in the order they were sent, only up to the oldest one still in flight (a later one
      that is already back is a quick one; counting it without the slower one before it
      would flatter the model);
    - the window: the newest half of those, but at least 2 x max(MIN_HALF, ceil(HALF_WINDOW
      x N)) of them (16 for N = 10 and for N = 1: eight a half whatever N, or a standard
      error from four alike requests would be 0 and stop it on no evidence).

    It stops at the first finished request after which, over the window, (1) every request
    succeeded with some workload (a quick refusal says nothing of the model's time), (2) the
    older and the newer half agree within TOLERANCE of the window's figure (no trend: a
    model still speeding up does not stop it), and (3) the figure's standard error, from how
    much single requests spread, is at most MAX_ERROR of it (not noisy). Then the figure is
    the whole steady run's, every request after the burst, when that agrees with the
    window's within TOLERANCE (the window that first passes is chosen by passing, and a high
    one passes a little more easily: the older requests, chosen by nothing, take that bias
    out); else the window's (the model changed earlier in the run, a slow first request say,
    and the window is the model as it is now). If it never stops, the figure is the whole
    run's, like one long round of the seed's: all successful workload over the time from
    the first request sent to the last answer. Nothing succeeded: 0.0. A workload that is
    not a finite positive number counts as a failure, and a request answered no later than
    it was sent adds no time, so that the figure is never NaN, infinite, or a 1e9 made of a
    zero time.
    """

    TOLERANCE = 0.10  # the window's halves agree within 10% of its figure
    MAX_ERROR = 0.05  # the figure's standard error, relative, at most
    # Requests in each half of the window, in rounds' worth (of N): the least evidence that
    # kept the figure within 10% on a model serving 4 at a time with +-15% jitter, and within
    # the issue's time (a third of the seed's); tests/bench_cold_start.py measures both.
    HALF_WINDOW = 0.7
    # ... and at least this many requests, whatever N: a standard error from a handful of
    # requests says little (four of a model answering in 0.1 s or 1.0 s at random are all
    # alike one time in eight; sixteen, once in 33,000).
    MIN_HALF = 8

    def __init__(self, *, runs: int, concurrency: int) -> None:
        self.concurrency = max(concurrency, 1)
        self.limit = max(runs, 0) * self.concurrency  # requests sent at most
        self.half = max(self.MIN_HALF, math.ceil(self.HALF_WINDOW * self.concurrency))
        self.finished_count = 0
        self.stable = False
        self.halves = (0.0, 0.0)  # the last window's older and newer half's figures
        self.error = math.inf  # the last window's relative standard error
        self.window = 0.0  # the last window's figure
        self._waiting: dict[int, tuple[float, float]] = {}  # finished out of order
        self._next = 0  # the oldest index not yet taken into the run
        self._run: list[tuple[float, float]] = []  # (time taken, workload) after the burst
        self._first_sent = math.inf
        self._last_ended = -math.inf
        self._workload = 0.0  # all successful workload, the burst's too

    def finished(self, index: int, sent: float, ended: float, workload: float) -> float | None:
        """Take one finished request; the figure if it is now stable, else None."""
        if not (math.isfinite(workload) and workload > 0):
            workload = 0.0  # failed, or a payload whose workload is no number: no evidence
        self.finished_count += 1
        self._first_sent = min(self._first_sent, sent)
        self._last_ended = max(self._last_ended, ended)
        self._workload += workload
        self._waiting[index] = (max(ended - sent, 0.0), workload)
        grew = False
        while self._next in self._waiting:
            sample = self._waiting.pop(self._next)
            if self._next >= self.concurrency:  # past the opening burst
                self._run.append(sample)
                grew = True
            self._next += 1
        if not grew or len(self._run) < 2 * self.half:
            return None
        window = self._run[-max(2 * self.half, len(self._run) // 2) :]
        figure = self.window = self._figure(window)
        middle = len(window) // 2
        self.halves = (self._figure(window[:middle]), self._figure(window[middle:]))
        self.error = self._error(window, figure)
        if (
            figure > 0
            and all(w > 0 for _, w in window)
            and abs(self.halves[1] - self.halves[0]) <= self.TOLERANCE * figure
            and self.error <= self.MAX_ERROR
        ):
            self.stable = True
            steady = self._figure(self._run)
            return steady if abs(steady - figure) <= self.TOLERANCE * figure else figure
        return None

    def final(self) -> float:
        """The whole run's figure: successful workload / (last answer - first send)."""
        span = self._last_ended - self._first_sent
        if self._workload <= 0 or not span > 0:
            return 0.0
        figure = self._workload / span
        return figure if math.isfinite(figure) else 0.0

    def _figure(self, run: Sequence[tuple[float, float]]) -> float:
        """Little's law over `run`: N x workload / time taken."""
        taken = sum(t for t, _ in run)
        return self.concurrency * sum(w for _, w in run) / taken if taken > 0 else 0.0

    def _error(self, run: Sequence[tuple[float, float]], figure: float) -> float:
        """The relative standard error of a ratio of sums (the delta method)."""
        n = len(run)
        if figure <= 0 or n < 2:
            return math.inf
        residuals = sum((self.concurrency * w - figure * t) ** 2 for t, w in run)
        mean_taken = sum(t for t, _ in run) / n
        return math.sqrt(residuals / (n * (n - 1))) / mean_taken / figure


class Benchmark:
    """Measures the model's throughput (SPEC section 6, issue 19) with the handler's
    benchmark payloads, sent straight to the model: after one warm-up request,
    `concurrency` requests kept in flight (the next sent as one is answered) until
    StoppingRule finds their figure stable, at most `runs` rounds' worth (runs x
    concurrency requests); the figure, workload per second, is max_perf. Requests still in
    flight then are cancelled: from there on the model's time is the clients'.

    The figure is cached in a file (`cache_path`; None: no cache) with what produced it: the
    worker file, the benchmark route and the model URL. The next start takes it from there
    only when all three are the same, so that another worker started in the same directory
    does not inherit a throughput it never had."""

    def __init__(
        self,
        client: HttpClient,
        handler: EndpointHandler[Any],
        *,
        runs: int,
        concurrency: int,
        cache_path: str | None,
        warmup: bool = True,
    ) -> None:
        self.client = client
        self.handler = handler
        self.runs = runs
        self.concurrency = concurrency
        self.cache_path = cache_path
        self.warmup = warmup
        module = sys.modules.get(type(handler).__module__)
        worker = os.path.abspath(getattr(module, "__file__", None) or type(handler).__module__)
        self.identity = {"worker": worker, "route": _endpoint_of(handler)}
        self.identity["model"] = client.base_url

    def cached(self) -> float:
        """The cached max_perf, if this very worker measured it; else 0.0."""
        if self.cache_path is None:
            return 0.0
        try:
            with open(self.cache_path, "rb") as f:
                data: Any = json_loads(f.read(64 * 1024))
        except (OSError, *_JSON_DECODE_ERRORS):
            return 0.0
        if not isinstance(data, dict):
            return 0.0  # an older bare number: whose, nobody knows
        record = typing.cast(dict[str, Any], data)
        value = record.get("max_perf")
        if any(record.get(k) != v for k, v in self.identity.items()):
            log.info("benchmark: %s was measured by another worker; measuring", self.cache_path)
            return 0.0
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return 0.0
        return float(value) if math.isfinite(value) and value > 0 else 0.0

    def save(self, max_perf: float) -> None:
        if self.cache_path is None:
            return
        try:
            with open(self.cache_path, "wb") as f:
                f.write(json_dumps({"max_perf": max_perf, **self.identity}) + b"\n")
        except OSError as exc:
            log.warning("benchmark: cannot write the cache %s: %s", self.cache_path, exc)

    async def run(self) -> float:
        """max_perf in workload per second; 0.0 when no request to the model succeeded."""
        handler = self.handler
        cached = self.cached()
        if self.warmup:
            await self._request(handler.make_benchmark_payload())  # warm-up, discarded
        if cached:
            log.info("benchmark: using cached max_perf=%.2f from %s", cached, self.cache_path)
            return cached
        rule = StoppingRule(runs=self.runs, concurrency=self.concurrency)
        figure = await self._measure(rule)
        max_perf = figure if figure is not None else rule.final()
        if not (max_perf > 0 and math.isfinite(max_perf)):  # NaN passes `<= 0`: never kept
            return 0.0
        self.save(max_perf)
        if rule.stable:
            log.info(
                "benchmark: stable after %d of at most %d requests, %d at a time; "
                "workload/s %.2f (halves %.2f and %.2f, standard error %.1f%%)",
                rule.finished_count,
                rule.limit,
                self.concurrency,
                max_perf,
                *rule.halves,
                100 * rule.error,
            )
        else:
            log.info(
                "benchmark: %d requests, %d at a time, never stable; workload/s %.2f over "
                "the whole run",
                rule.finished_count,
                self.concurrency,
                max_perf,
            )
        return max_perf

    async def _measure(self, rule: StoppingRule) -> float | None:
        """Keep `concurrency` requests in flight, feeding each finished one to the rule,
        until it has a figure (returned) or all `rule.limit` requests are done (None)."""
        in_flight: dict[asyncio.Future[tuple[float, float, bool]], tuple[int, ApiPayload]] = {}
        sent = 0

        def send() -> None:
            nonlocal sent
            payload = self.handler.make_benchmark_payload()
            in_flight[asyncio.ensure_future(self._timed(payload))] = (sent, payload)
            sent += 1

        try:
            while sent < min(self.concurrency, rule.limit):  # the opening burst
                send()
            while in_flight:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index, payload = in_flight.pop(future)
                    started, ended, ok = future.result()
                    workload = payload.count_workload() if ok else 0.0
                    figure = rule.finished(index, started, ended, workload)
                    if figure is not None:
                        return figure
                    if sent < rule.limit:
                        send()
            return None
        finally:  # stable (or cancelled): what is still in flight is not needed
            for future in in_flight:
                future.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _timed(self, payload: ApiPayload) -> tuple[float, float, bool]:
        """One request: when it was sent and answered (time.monotonic()), whether it succeeded."""
        started = time.monotonic()
        ok = await self._request(payload)
        return started, time.monotonic(), ok

    async def _request(self, payload: ApiPayload) -> bool:
        """Send one payload straight to the model; whether it answered 2xx in full."""
        content_type, body = model_request_body(self.handler.model_body(payload))
        try:
            async with await self.client.request(
                "POST",
                self.identity["route"],
                body,
                headers=self.handler.model_headers(payload),
                content_type=content_type,
                timeout=BENCHMARK_TIMEOUT,
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except UpstreamError as exc:
            log.warning("benchmark request failed: %s", exc)
            return False


class ModelApiWait:
    """After the model's loaded line, waits until its API answers, before the benchmark.

    Some model servers log their ready line before their API listens: ComfyUI behind the
    platform image's API wrapper does (vast-ai/pyworker#85), and a benchmark sent at once
    meets a closed port and errors the worker for good.

    The probe is a GET of the benchmark route, retried: a connection and a request, no
    inference. Not a bare connect: a wrapper (nginx, the image's API proxy) listens before
    the model behind it is up, and answers 502 meanwhile. Not the benchmark's own POST: on
    an image model one request can take a minute, and every probe that got through would
    add one. Not open: the connection refused or dropped before any answer
    (UpstreamUnreachable), or 502/503/504 (a wrapper whose model is not up yet). Any other
    answer means something serves the route (a 405 for the GET is the usual one); the
    benchmark then meets the API, and when it fails, the error says what the probe got.
    The probe carries the header fields the benchmark's requests do (the handler's
    model_headers for a benchmark payload): a proxy in front of the model that wants its API
    key answers 401, or 502/503 for a request without it, and would never seem open.

    Retries back off from RETRY_FIRST to RETRY_MAX seconds, up to `limit` seconds in all
    (MODEL_API_WAIT); a line every `log_interval` seconds says what it waits for."""

    RETRY_FIRST, RETRY_MAX = 0.25, 5.0
    NOT_OPEN = frozenset({502, 503, 504})

    def __init__(
        self,
        client: HttpClient,
        handler: EndpointHandler[Any],
        *,
        limit: float,
        log_interval: float = 10.0,
    ) -> None:
        self.client = client
        self.handler = handler
        self.route = _endpoint_of(handler)
        self.limit = limit
        self.log_interval = log_interval
        self.last = ""  # what the last probe got: "status 200", or the connection's error
        self._headers: Sequence[tuple[str, str]] | None = None  # the benchmark's, at the 1st probe

    @property
    def target(self) -> str:
        return self.client.base_url + self.route

    async def probe(self) -> bool:
        """One GET of the route; whether the API is open (self.last: what it answered)."""
        if self._headers is None:  # a worker's failure here is the benchmark's: not caught
            handler = self.handler
            self._headers = tuple(handler.model_headers(handler.make_benchmark_payload()))
        try:
            request = self.client.request("GET", self.route, headers=self._headers, timeout=10.0)
            async with await request as resp:
                await resp.read()
        except UpstreamUnreachable as exc:
            self.last = str(exc)
            return False
        except UpstreamError as exc:  # it took the request (a timeout, broken HTTP): open
            self.last = str(exc)
            return True
        self.last = f"status {resp.status}"
        return resp.status not in self.NOT_OPEN

    async def wait(self) -> str | None:
        """None once the API is open; else why it did not open within `limit` seconds."""
        started = time.monotonic()
        pause = self.RETRY_FIRST
        said = -math.inf
        while not await self.probe():
            waited = time.monotonic() - started
            if waited >= self.limit:
                return (
                    f"the model's API at {self.target} did not open within {self.limit:.0f}s "
                    f"of its loaded line ({self.last}); MODEL_API_WAIT sets how long to wait"
                )
            if waited - said >= self.log_interval:
                first, said = said == -math.inf, waited
                log.info(
                    "%s the model's API at %s to open (%s): %.0fs of %.0fs (MODEL_API_WAIT)",
                    "model loaded; waiting for" if first else "still waiting for",
                    self.target,
                    self.last,
                    waited,
                    self.limit,
                )
            await asyncio.sleep(min(pause, max(self.limit - waited, 0.0)))
            pause = min(pause * 2, self.RETRY_MAX)
        if said > -math.inf:
            log.info(
                "the model's API at %s is open after %.1fs (%s)",
                self.target,
                time.monotonic() - started,
                self.last,
            )
        return None


class HealthCheck:
    """The model's health endpoint (GET), polled every `interval` seconds from the start
    (SPEC 11.6), and at once when the benchmark is done and only this 200 is missing. The
    worker is not ready before its first 200; with a model log, that 200 must come within
    `start_timeout` seconds of the model loading, or the worker is errored.
    Once healthy, `max_failures` failures in a row (non-2xx, timeout, refused) mark it
    errored: one slow answer from a busy model does not lose the worker.

    `endpoint` is a path on the model server (asked with `client`) or a whole URL.
    `on_first_ok` runs at the first 200 (without a model log, that is the model loading)."""

    def __init__(
        self,
        client: HttpClient,
        endpoint: str,
        lifecycle: Lifecycle,
        *,
        interval: float,
        start_timeout: float = 300.0,
        max_failures: int = 3,
        on_first_ok: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.path = endpoint
        self.client = self._model = client
        if not endpoint.startswith("/"):  # a URL of its own
            self.client = HttpClient(endpoint, max_idle=1)
            self.path = "" if self.client.prefix else "/"
        self.lifecycle = lifecycle
        self.interval = interval
        self.start_timeout = start_timeout
        self.max_failures = max_failures
        self.on_first_ok = on_first_ok
        self._asked = asyncio.Event()  # poll now: readiness waits on nothing but this
        lifecycle.health_wanted.append(self._asked.set)
        self.log_interval = 10.0  # a "waiting for its first 200" line this often, at most

    async def close(self) -> None:
        if self.client is not self._model:  # a URL of its own: its own connections
            await self.client.close()

    async def _get(self) -> Response:
        """One GET of the health endpoint, read whole; UpstreamError when it fails."""
        async with await self.client.request("GET", self.path, timeout=10.0) as resp:
            return Response(resp.status, await resp.read(), content_type=_relayed_type(resp))

    async def ask(self) -> Response:
        """The model's health answer as it is (the worker's /healthcheck route)."""
        try:
            return await self._get()
        except UpstreamError as exc:
            return error_response(exc.status, "model healthcheck failed: " + str(exc))

    async def probe(self) -> str | None:
        """One health request: None when healthy (200), else why not."""
        try:
            status = (await self._get()).status
        except UpstreamError as exc:
            return str(exc)
        return None if status == 200 else f"status {status}"

    async def run(self) -> None:
        life = self.lifecycle
        failures = 0
        said = -math.inf  # when the last "waiting for the health endpoint" line was written
        while life.state is not State.ERRORED:
            why = await self.probe()
            if why is None:
                failures = 0
                if not life.healthy:
                    log.info("model health endpoint %s answered 200", self.path or "/")
                    life.health_ok()
                    if self.on_first_ok is not None:
                        self.on_first_ok()
            elif life.healthy:
                failures += 1
                if failures >= self.max_failures:
                    life.errored(f"model healthcheck failed {failures} times in a row: {why}")
            elif life.loaded_at is not None:
                waited = time.monotonic() - life.loaded_at
                if waited > self.start_timeout:
                    life.errored(
                        f"model not healthy {waited:.0f}s after it loaded: {why} "
                        "(MODEL_API_WAIT sets how long to wait)"
                    )
                elif waited - said >= self.log_interval:
                    said = waited
                    log.info(
                        "waiting for the model's health endpoint %s to answer 200 (%s): "
                        "%.0fs of %.0fs",
                        self.path or "/",
                        why,
                        waited,
                        self.start_timeout,
                    )
            await _nap(self._asked, self.interval)


# Backend parts: readiness ########################################################################


class ModelReadiness:
    """How the worker becomes ready, wired once by start(): the model loads (its log's
    loaded line, or Backend.model_loaded called by the worker file, or without a log the
    health route's first 200); then ModelApiWait waits for its API to open and Benchmark
    measures it; the Lifecycle is told the figure. The HealthCheck polls the model from the
    start (ready waits for its first 200); the ModelLogWatcher also tells the model's errors.
    Each failure marks the worker errored, with the reason."""

    def __init__(self, lifecycle: Lifecycle, tasks: BackgroundTasks) -> None:
        self.lifecycle = lifecycle
        self.tasks = tasks
        self.health: HealthCheck | None = None
        self.config = Config()
        self.client: HttpClient | None = None
        self.handler: EndpointHandler[Any] | None = None  # the benchmark's
        self.runs = 8
        self.concurrency = 1
        self._early: str | None = None  # loaded before start(): the reason, acted on then
        # True: the worker file says when the model has loaded (Backend.model_loaded, from a
        # lifecycle context it enters): the log's loaded lines and the health route's first
        # 200 do not count then, and neither a log nor a health route is needed.
        self.told = False

    def start(
        self,
        client: HttpClient,
        config: Config,
        handler: EndpointHandler[Any],
        *,
        runs: int,
        concurrency: int,
        model_log: str | None,
        log_actions: Sequence[tuple[LogAction, str]],
        health: str | None,
    ) -> None:
        """Spawn the health check and the log watcher; returns at once."""
        self.client, self.config, self.handler = client, config, handler
        self.runs, self.concurrency = runs, concurrency
        if health:
            self.lifecycle.needs_health = True
            self.health = HealthCheck(
                client,
                health,
                self.lifecycle,
                interval=config.healthcheck_interval,
                start_timeout=(
                    config.model_api_wait
                    if config.health_start_timeout is None
                    else config.health_start_timeout
                ),
                max_failures=config.health_failures,
                on_first_ok=None if model_log or self.told else self._healthy_without_log,
            )
            self.tasks.spawn(self.health.run())
        if self._early is not None:  # loaded before the worker started: benchmark now
            self.loaded(self._early)
        if model_log:
            watcher = ModelLogWatcher(
                model_log,
                log_actions,
                on_loaded=self._told_by_line if self.told else self.loaded,
                on_error=self.lifecycle.errored,
                poll_interval=config.log_poll_interval,
            )
            self.tasks.spawn(watcher.run())
        elif health and not self.told:
            log.info("no MODEL_LOG: the model counts as loaded at its first healthy answer")
        elif self._early is None and not self.told:
            log.error("neither MODEL_LOG nor a health endpoint: the worker cannot become ready")

    def _healthy_without_log(self) -> None:
        self.loaded("the model's health endpoint answered 200")

    def _told_by_line(self, line: str) -> None:
        log.info("the model's log says it loaded; the worker file tells when: %s", line[:200])

    def loaded(self, reason: str) -> None:
        """The model has loaded (`reason` is logged): the benchmark starts. Once: later
        calls, and calls after an error, do nothing. Before start(): acted on at start."""
        if self.client is None:
            self._early = self._early or reason
        elif self.lifecycle.model_loaded():
            log.info("model loaded: %s", reason[:200])
            self.tasks.spawn(self._benchmark())

    async def _benchmark(self) -> None:
        assert self.client is not None and self.handler is not None
        api = ModelApiWait(
            self.client,
            self.handler,
            limit=self.config.model_api_wait,
            log_interval=self.config.model_api_log_interval,
        )
        why = await api.wait()
        if why is not None:
            self.lifecycle.errored(why)
            return
        benchmark = Benchmark(
            self.client,
            self.handler,
            runs=self.runs,
            concurrency=self.concurrency,
            cache_path=self.config.benchmark_cache,
            warmup=bool(handler_setting(self.handler, "do_warmup_benchmark")),
        )
        max_perf = await benchmark.run()
        if max_perf <= 0:
            self.lifecycle.errored(
                "benchmark: no request to the model succeeded (its API at "
                f"{api.target} is open: a GET got {api.last})"
            )
        else:
            self.lifecycle.benchmarked(max_perf)

    async def close(self) -> None:
        if self.health is not None:
            await self.health.close()


# Backend parts: load reports #####################################################################


async def _nap(wake: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `wake` is set (a reporter told of a state change: the
    autoscaler learns at once that the worker is ready, not up to a second later)."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
    wake.clear()


def _disk_used(path: str = ".") -> int:
    """Bytes used on the filesystem of `path` (shutil.disk_usage's figure, without importing
    shutil: with the compression modules it pulls in, half a megabyte of RSS)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclasses.dataclass
class ReportTarget:
    """One autoscaler address and what it was last told (its report window's start)."""

    client: HttpClient
    since: float = dataclasses.field(default_factory=time.monotonic)
    load_total: float = 0.0
    served_total: float = 0.0
    finished: int = 0
    disk_used: int = dataclasses.field(default_factory=_disk_used)
    loadtime_sent: bool = False
    error_msg: str = ""  # the error_msg it was last told
    failing: bool = False
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # a state change
    warned: float = 0.0


class LoadReporter:
    """Reports the worker's load to each autoscaler in REPORT_ADDR (POST /worker_status/),
    each in a loop of its own, so that a slow one never delays the others' reports."""

    def __init__(self, config: Config, metrics: Metrics, lifecycle: Lifecycle) -> None:
        self.config = config
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.targets = [ReportTarget(HttpClient(a, max_idle=2)) for a in config.report_addrs]
        self.clients = [t.client for t in self.targets]
        lifecycle.changed.append(self._state_changed)
        log.info("load reports in format 2024 to %s", ", ".join(config.report_addrs))

    def report_body(self, target: ReportTarget, disk: int | None = None) -> dict[str, Any]:
        """The load report for one autoscaler (SPEC section 7), fields spelled as it expects.

        Rates are over the time since the last report that autoscaler accepted.
        """
        disk = _disk_used() if disk is None else disk
        m = self.metrics
        life = self.lifecycle
        elapsed = max(time.monotonic() - target.since, 1e-6)
        loadtime = life.loadtime if life.loadtime and not target.loadtime_sent else 0.0
        return {
            "id": self.config.container_id,
            "loadtime": loadtime,
            # A request cancelled after the last report lowers this window: never below 0.
            "cur_load": max(m.load_total - target.load_total, 0.0) / elapsed,
            "error_msg": life.error_msg,
            "max_perf": life.max_perf,
            "cur_perf": (m.served.workload - target.served_total) / elapsed,
            "cur_capacity": 0,
            "max_capacity": 0,
            "num_requests_working": m.in_flight.requests,
            "num_requests_recieved": m.received.requests,  # sic: the wire name
            "additional_disk_usage": max(disk - target.disk_used, 0) / 1e9,
            "url": self.config.public_url,
        }

    async def send_report(self) -> bool:
        """Report to every address at once; whether at least one accepted it."""
        results = await asyncio.gather(*(self.report_to(t) for t in self.targets))
        return any(results)

    async def report_to(self, target: ReportTarget) -> bool:
        """POST a report with retries; once accepted, this autoscaler's window starts anew
        (counters move on only after a successful send, so an outage loses nothing)."""
        m = self.metrics
        now, load, served, finished = time.monotonic(), m.load_total, m.served.workload, m.finished
        disk = _disk_used()
        body_obj = self.report_body(target, disk)
        body = json_dumps(body_obj)
        delay = self.config.report_backoff
        why = ""
        for attempt in range(REPORT_ATTEMPTS):
            try:
                async with await target.client.request(
                    "POST", "/worker_status/", body, timeout=self.config.report_timeout
                ) as resp:
                    await resp.read()
                if 200 <= resp.status < 300:
                    break
                why = f"status {resp.status}"
            except UpstreamError as exc:
                why = str(exc)
            if attempt + 1 < REPORT_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        else:
            if not target.failing or time.monotonic() - target.warned > 60:
                log.warning("load report to %s failed: %s", target.client.base_url, why)
                target.warned = time.monotonic()
            target.failing = True
            return False
        if target.failing:
            log.info("load reports to %s work again", target.client.base_url)
            target.failing = False
        target.since, target.load_total, target.served_total = now, load, served
        target.finished, target.disk_used = finished, disk
        target.loadtime_sent = target.loadtime_sent or bool(body_obj["loadtime"])
        target.error_msg = body_obj["error_msg"]
        return True

    def _state_changed(self) -> None:
        for target in self.targets:
            target.wake.set()

    async def run(self, target: ReportTarget) -> None:
        """Report to one autoscaler when something changed, else every report_max_interval."""
        while True:
            await _nap(target.wake, self.config.report_check_interval)
            due = time.monotonic() - target.since >= self.config.report_max_interval
            news = self.metrics.finished > target.finished
            new_loadtime = self.lifecycle.loadtime is not None and not target.loadtime_sent
            new_error = self.lifecycle.error_msg != target.error_msg
            if due or news or new_loadtime or new_error:
                await self.report_to(target)

    async def close(self) -> None:
        for target in self.targets:
            await target.client.close()


def _masked(secret: str) -> str:
    """A secret as it may appear in a log: its first four characters at most."""
    return secret[:4] + "..." if len(secret) > 8 else "***"


class PlatformReporter:
    """Load reports in today's format "1.1.0" (SPEC 11.3) and completion reports (11.4), in
    one loop: the addresses in REPORT_ADDR are alternatives, tried in order until one
    accepts. Amounts (new_load, rej_load, cur_perf, additional_disk_usage) are since the
    last accepted report; a failed report loses nothing, the next one carries it.

    Completion entries wait in a queue of at most MAX_PENDING while no address accepts
    them; past that the oldest are dropped, and the log says how many."""

    VERSION = "1.1.0"
    MAX_PENDING = 10_000
    REMEMBERED = 100_000  # request_idx already reported, to report each once
    COMPLETIONS_SKIP = "https://cloud.vast.ai/api/v0"  # takes load reports only (SPEC 11.4)

    def __init__(self, config: Config, metrics: Metrics, lifecycle: Lifecycle) -> None:
        self.config = config
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.clients = [HttpClient(a, max_idle=2) for a in config.report_addrs]
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.dropped = 0
        self._since = time.monotonic()  # the last accepted report: its time and amounts
        self._load = self._refused = self._served = 0.0
        self._disk = _disk_used("/")  # SPEC 11.3: GB used on /
        self._snapshot: tuple[Any, ...] = ()
        self._failing = ""
        self._arrived = asyncio.Event()  # completion entries are waiting
        self._reported: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._wake = asyncio.Event()
        lifecycle.changed.append(self._wake.set)
        log.info(
            "load reports in format %s to %s (mtoken %s)",
            self.VERSION,
            ", ".join(config.report_addrs),
            _masked(config.master_token),
        )

    def completed(self, entry: dict[str, Any]) -> None:
        """Queue one finished request's completion entry: once per request_idx (a ticket
        retried after a 429, or sent twice, is reported at its first end only)."""
        idx = entry["request_idx"]
        if idx in self._reported:
            return
        self._reported[idx] = None
        if len(self._reported) > self.REMEMBERED:
            self._reported.popitem(last=False)
        self.pending.append(entry)
        self._arrived.set()
        if len(self.pending) > self.MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("completion reports: %d dropped, none accepted", self.dropped)

    def report_body(self) -> dict[str, Any]:
        m, life = self.metrics, self.lifecycle
        disk = _disk_used("/")
        return {
            "id": self.config.container_id,
            "mtoken": self.config.master_token,
            "version": self.VERSION,
            "loadtime": life.loadtime or 0.0,
            "cur_load": m.in_flight.workload,
            "rej_load": m.refused.workload - self._refused,
            "new_load": max(m.load_total - self._load, 0.0),
            "error_msg": life.error_msg,
            "max_perf": life.max_perf,
            "cur_perf": m.served.workload - self._served,
            "cur_capacity": 0,
            "max_capacity": 0,
            "num_requests_working": m.in_flight.requests,
            "num_requests_recieved": m.received.requests,  # sic: the wire name
            "additional_disk_usage": max(disk - self._disk, 0) / 1e9,
            "disk_usage": disk / 1e9,
            "working_request_idxs": sorted(m.working),
            "url": self.config.public_url,
        }

    def _state(self) -> tuple[Any, ...]:
        """What a report says that is worth a report of its own when it changes."""
        m, life = self.metrics, self.lifecycle
        return (m.received.requests, m.finished, m.refused.requests, life.state, life.error_msg)

    async def send_report(self) -> bool:
        m = self.metrics
        load, refused, served, snapshot = (
            m.load_total,
            m.refused.workload,
            m.served.workload,
            self._state(),
        )
        body = self.report_body()
        if not await self._post("/worker_status/", body, self.clients):
            return False
        self._since, self._load, self._refused, self._served = (
            time.monotonic(),
            load,
            refused,
            served,
        )
        self._disk = int(body["disk_usage"] * 1e9)
        self._snapshot = snapshot
        return True

    async def send_completions(self) -> bool:
        entries = list(self.pending)
        dropped = self.dropped
        body: dict[str, Any] = {"worker_id": self.config.container_id, "requests": entries}
        body["mtoken"] = self.config.master_token
        clients = [c for c in self.clients if c.base_url != self.COMPLETIONS_SKIP]
        if not clients or not await self._post("/delete_requests/", body, clients):
            return False
        # Those sent leave the queue; newer ones stay. Entries dropped meanwhile (the queue was
        # full) were among the oldest, the ones sent: fewer are left to take out.
        for _ in range(max(len(entries) - (self.dropped - dropped), 0)):
            self.pending.popleft()
        return True

    async def _post(self, path: str, body: dict[str, Any], clients: list[HttpClient]) -> bool:
        """POST to the first address that accepts; REPORT_ATTEMPTS rounds with backoff."""
        data = json_dumps(body)
        delay = self.config.report_backoff
        why = ""
        for attempt in range(REPORT_ATTEMPTS):
            for client in clients:
                try:
                    async with await client.request(
                        "POST", path, data, timeout=self.config.report_timeout
                    ) as resp:
                        await resp.read()
                    if 200 <= resp.status < 300:
                        if self._failing:
                            log.info("reports to the autoscaler work again")
                            self._failing = ""
                        return True
                    why = f"{client.base_url}: status {resp.status}"
                except UpstreamError as exc:
                    why = str(exc)
            if attempt + 1 < REPORT_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        if self._failing != why:  # once per kind of failure, not once a second
            log.warning("report %s failed: %s", path, why)
            self._failing = why
        return False

    async def run(self) -> None:
        """Every check interval, a load report when something changed (once ready; before,
        only the state), else every max interval."""
        while True:
            await _nap(self._wake, self.config.report_check_interval)
            now = time.monotonic()
            due = now - self._since >= self.config.report_max_interval
            state = self._state()
            ready = self.lifecycle.state in (State.READY, State.ERRORED)
            changed = state != self._snapshot if ready else state[3:] != self._snapshot[3:]
            if due or changed:
                await self.send_report()

    async def run_completions(self) -> None:
        """Completion entries go out as they come, in batches at most every second (and,
        while no address accepts them, again every second)."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            started = time.monotonic()
            if self.pending:
                await self.send_completions()
            await asyncio.sleep(max(COMPLETION_INTERVAL - (time.monotonic() - started), 0.0))
            if self.pending:
                self._arrived.set()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


# Backend parts: requests in flight ##############################################################


Completions = Callable[[dict[str, Any]], None]  # where finished requests' reports go
_COMPLETION_STATUS = {"served": "Success", "errored": "Error", "cancelled": "Cancelled"}


def completion(
    request_idx: int, status: str, entered: float, started: float = 0.0, completed: float = 0.0
) -> dict[str, Any]:
    """One entry of a completion report (SPEC 11.4); times in epoch seconds, 0.0 for a time
    that never came. The platform counts a cancelled request as a success."""
    return {
        "request_idx": request_idx,
        "success": status in ("Success", "Cancelled"),
        "status": status,
        "entered_queue_at": entered,
        "work_started_at": started,
        "work_completed_at": completed,
    }


class _Job:
    """One accepted request on its way through the backend; finish() settles it once."""

    __slots__ = (
        "completions",
        "done",
        "first_byte",
        "metrics",
        "model_start",
        "request_idx",
        "route",
        "serial",
        "start",
        "wall_start",
        "workload",
    )

    def __init__(
        self,
        metrics: Metrics,
        route: str,
        workload: float,
        request_idx: int | None = None,
        completions: Completions | None = None,
        *,
        serial: bool = False,
    ) -> None:
        self.metrics = metrics
        self.route = route
        self.workload = workload
        self.serial = serial  # a one-at-a-time route's: counted in metrics.serial too
        self.start = time.monotonic()
        self.wall_start = time.time()
        self.model_start = self.start
        self.first_byte: float | None = None
        self.done = False
        self.request_idx = request_idx
        self.completions = completions
        metrics.start(workload)
        if serial:
            metrics.serial.add(workload)
        if request_idx is not None:
            metrics.working[request_idx] += 1

    def finish(self, outcome: str, status: int) -> None:
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        metrics = self.metrics
        metrics.finish(self.workload, outcome)
        if self.serial:
            serial = metrics.serial
            serial.requests -= 1
            # a running sum drifts (1e9 + 0.1 - 1e9 is not 0.1): none in flight, none ahead
            serial.workload = serial.workload - self.workload if serial.requests else 0.0
        metrics.record(self.route, status, now - self.start)
        idx = self.request_idx
        if idx is not None:
            metrics.working[idx] -= 1
            if metrics.working[idx] <= 0:
                del metrics.working[idx]
            if self.completions is not None:
                wall = self.wall_start - self.start  # monotonic -> epoch
                started = self.model_start + wall if self.model_start > self.start else 0.0
                self.completions(
                    completion(
                        idx, _COMPLETION_STATUS[outcome], self.wall_start, started, now + wall
                    )
                )
        if access_log.isEnabledFor(logging.INFO):
            queue = self.model_start - self.start
            total = now - self.start
            note = "" if outcome == "served" else f" ({outcome})"
            _access_log_line(
                f"{self.route} {status} workload={self.workload:g} queue={queue:.3f}s"
                f" total={total:.3f}s{note}"
            )


class _AccountedStream:
    """A model stream relayed to a client, settling its job exactly once however it ends:
    served at the end, errored if the model breaks off, cancelled if the client leaves
    (aclose() before the end), even if it was never iterated at all. It is also the boundary
    where the model's failure becomes the client's: an HttpError the server can answer."""

    def __init__(
        self,
        job: _Job,
        model_response: ClientResponse,
        inner: AsyncIterator[bytes],
        release: Callable[[], None],
    ) -> None:
        self._job = job
        self._model_response = model_response
        # relay_stream's boundary does what this does: one step a chunk, not two
        self._inner = inner.chunks if isinstance(inner, _ToClient) else inner
        self._release = release

    def __aiter__(self) -> _AccountedStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._inner.__anext__()
        except StopAsyncIteration:
            status = self._model_response.status
            self._settle("served" if 200 <= status < 300 else "errored", status)
            raise
        except asyncio.CancelledError:
            self._settle("cancelled", 499)
            raise
        except UpstreamError as exc:
            self._settle("errored", exc.status)
            raise HttpError(exc.status, _upstream_message(exc)) from exc
        except HttpError as exc:
            self._settle("errored", exc.status)
            raise
        except Exception:
            self._settle("errored", 500)
            raise
        job = self._job
        if job.first_byte is None:
            job.first_byte = time.monotonic()
            job.metrics.first_byte.observe(job.first_byte - job.model_start)
        return data

    async def aclose(self) -> None:
        self._settle("cancelled", 499)
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()

    def _settle(self, outcome: str, status: int) -> None:
        if self._job.done:
            return
        self._model_response.close()
        self._release()
        self._job.finish(outcome, status)


def _nothing() -> None:
    return None


class ModelQueue:
    """Forwards accepted requests to the model server. A route that takes one request at a
    time waits in the one FIFO queue shared by every such route (one of their requests at
    the model at a time, in arrival order); a parallel route goes straight to the model. It
    relays the answer through the handler and settles each request's job exactly once,
    however it ends; a stream settles it (and frees the model) when it ends."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.lock = asyncio.Lock()  # asyncio.Lock wakes its waiters in FIFO order
        self.client: HttpClient | None = None  # the model server (set by Backend.start)

    async def forward(
        self,
        handler: EndpointHandler[Any],
        endpoint: str,
        payload: ApiPayload,
        request: Request,
        job: _Job,
        *,
        one_at_a_time: bool,
    ) -> Response:
        lock = self.lock if one_at_a_time else None
        holding = False
        try:
            if self.client is None:
                raise RuntimeError("Backend.start() has not run")
            if lock is not None:  # one at a time: asyncio.Lock wakes waiters in FIFO order
                self.metrics.queued += 1
                try:
                    await lock.acquire()
                finally:
                    self.metrics.queued -= 1
                holding = True
            job.model_start = time.monotonic()
            self.metrics.queue_wait.observe(job.model_start - job.start)
            content_type, body = model_request_body(handler.model_body(payload))
            model_response = await self.client.request(
                "POST",
                endpoint,
                body,
                headers=handler.model_headers(payload),
                content_type=content_type,
                timeout=handler.model_timeout,
            )
            try:
                response = await handler.generate_client_response(request, model_response)
            except BaseException:
                model_response.close()
                raise
            if response.stream is None:
                model_response.close()
                ok = 200 <= model_response.status < 300
                job.finish("served" if ok else "errored", response.status)
                return response
            if request.response_started:  # it began an answer, then returned another
                model_response.close()
                raise RuntimeError(
                    f"{type(handler).__name__}.generate_client_response began its answer"
                    " (StreamResponse.prepare) and returned another: return the one it began"
                )
            release = lock.release if holding and lock is not None else _nothing
            holding = False  # the stream releases the model when it ends
            response.stream = _AccountedStream(job, model_response, response.stream, release)
            return response
        except UpstreamError as exc:  # the boundary: the model's failure, told to the client
            job.finish("errored", exc.status)
            log.warning("%s: model request failed: %s", job.route, exc)
            if request.response_started:  # the handler's own stream broke off: it is cut
                raise HttpError(exc.status, _upstream_message(exc)) from exc
            return error_response(exc.status, _upstream_message(exc))
        except HttpError as exc:  # raised by the worker's own handler code
            job.finish("errored", exc.status)
            raise
        except asyncio.CancelledError:
            job.finish("cancelled", 499)
            raise
        except ConnectionError:  # the handler's own writes (StreamResponse.write) failed
            proto = request.connection
            transport = proto.conn_transport if proto is not None else None
            if transport is not None and transport.is_closing():  # the client went away
                job.finish("cancelled", 499)
            else:
                job.finish("errored", 500)
            raise
        except BaseException:
            job.finish("errored", 500)
            raise
        finally:
            if holding and lock is not None:
                lock.release()


# Backend parts: sessions #########################################################################
# A client opens a session on this worker and sends several requests into it (SPEC 11.5). The
# platform's own worker checks no signature at create and calls back any URL a client names;
# here a session is created only with a verified auth_data, and its close callback goes to the
# model server only.

_SESSION_TARGET = re.compile(r"/[\x21-\x7e]*")  # a path: printable ASCII, no spaces


@dataclasses.dataclass
class SessionPayload:
    """The `payload` of POST /session/create."""

    lifetime: float = 60.0  # seconds; every request in the session extends it by as much
    on_close_route: str | None = None  # a path on the model server, or a URL with its origin
    on_close_payload: dict[str, Any] | None = None

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> SessionPayload:
        return from_json_fields(cls, json_msg)


@dataclasses.dataclass(eq=False)
class Session:
    """One open session: what it was created with, and the requests being served in it."""

    session_id: str
    auth_data: Any  # as the client sent it: /session/get, /health and /end compare to it
    auth_key: bytes  # auth_data in one canonical encoding, for a constant-time comparison
    lifetime: float
    expiration: float  # epoch seconds
    created_at: float
    on_close_route: str | None  # the path on the model server, resolved at create
    on_close_payload: dict[str, Any]
    job: _Job  # the session itself counts as one request in flight
    requests: dict[_Job, asyncio.Task[Any]] = dataclasses.field(
        default_factory=dict[_Job, "asyncio.Task[Any]"]
    )

    def details(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "auth_data": self.auth_data,
            "lifetime": self.lifetime,
            "expiration": self.expiration,
            "created_at": self.created_at,
            "on_close_route": self.on_close_route,
            "on_close_payload": self.on_close_payload,
        }


def _auth_key(auth_data: Any, *, for_keeping: bool = False) -> bytes | None:
    """auth_data in one canonical encoding; None when it cannot be encoded (nested past
    the encoder's depth), which no session's key can equal. for_keeping: it must also
    encode as an answer (json_dumps' depth may be lower), since /session/get returns it."""
    try:
        if for_keeping:
            json_dumps(auth_data)
        return json.dumps(auth_data, sort_keys=True, separators=(",", ":")).encode()
    except Exception:  # RecursionError, or the encoder's own error for nesting
        return None


class SessionTable:
    """The open sessions: created, looked up, extended, and ended, once each, by the client
    (/session/end), by expiry (collected every `gc_interval` seconds) or by shutdown
    (drained). Ending a session cancels its requests in flight and runs its close
    callback: on_close_payload plus session_id, POSTed to the model server, bounded by
    SESSION_CALLBACK_TIMEOUT, its failures logged."""

    ENDED_REMEMBERED = 1024  # recently ended ids, to answer 410 rather than 400

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_sessions: int,
        gc_interval: float = SESSION_GC_INTERVAL,
        model: HttpClient | None = None,
    ) -> None:
        self.model = model  # the model server: where close callbacks go (set by Backend.start)
        self.metrics = metrics
        self.callbacks: set[asyncio.Task[None]] = set()
        self.max_sessions = max_sessions
        self.gc_interval = gc_interval
        self.open: dict[str, Session] = {}
        self.ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.held = 0.0  # the open sessions' workload, in flight while they are open

    def full(self) -> bool:
        if 0 < self.max_sessions <= len(self.open):
            self._end_expired()  # an expired session must not hold its slot until the next GC
        return 0 < self.max_sessions <= len(self.open)

    def check(self, payload: SessionPayload) -> str | None:
        """A session's payload checked beyond its types: its close route, resolved.
        Raises JsonDataException naming each bad field (of the payload)."""
        errors: dict[str, str] = {}
        if not 0 < payload.lifetime <= MAX_SESSION_LIFETIME:
            errors["lifetime"] = f"expected seconds, above 0 and at most {MAX_SESSION_LIFETIME:g}"
        route: str | None = None
        try:
            route = self.resolve_route(payload.on_close_route)
        except ValueError as exc:
            errors["on_close_route"] = str(exc)
        if errors:
            raise JsonDataException(errors)
        return route

    def resolve_route(self, route: str | None) -> str | None:
        """The model-server path of an on_close_route; ValueError for anything that is not
        a path on the model server or a URL with the model server's own origin."""
        if route is None:
            return None
        if not route.startswith("/"):
            try:
                scheme, host, port, path = split_url(route)
            except ValueError:
                raise ValueError("expected a path or a URL of the model server") from None
            model = self.model
            if model is None:
                raise ValueError("no model server to call back")
            if (scheme, host.lower(), port) != (model.scheme, model.host.lower(), model.port):
                raise ValueError("a URL must have the model server's origin")
            if not path.startswith(model.prefix):
                raise ValueError("a URL must be under the model server's URL")
            route = path[len(model.prefix) :] or "/"  # a path: the client adds the prefix
        if not _SESSION_TARGET.fullmatch(route):
            raise ValueError("expected a path without spaces or control characters")
        return route

    def create(
        self, auth_data: Any, key: bytes, payload: SessionPayload, route: str | None, job: _Job
    ) -> Session:
        now = time.time()
        session = Session(
            session_id=secrets.token_urlsafe(18),
            auth_data=auth_data,
            auth_key=key,
            lifetime=payload.lifetime,
            expiration=now + payload.lifetime,
            created_at=now,
            on_close_route=route,
            on_close_payload=dict(payload.on_close_payload or {}),
            job=job,
        )
        self.open[session.session_id] = session
        self.metrics.sessions_open += 1
        self.held += job.workload
        return session

    def get(self, session_id: str) -> Session | None:
        """The open session of that id; an expired one is ended here and then."""
        session = self.open.get(session_id)
        if session is not None and session.expiration <= time.time():
            self.end(session, "expired")
            return None
        return session

    def authorized(self, session: Session, session_auth: Any) -> bool:
        key = _auth_key(session_auth)
        return key is not None and hmac.compare_digest(session.auth_key, key)

    def enter(self, session: Session, job: _Job) -> None:
        """A request served inside `session`: extends it, and is cancelled if it ends."""
        now = time.time()
        session.expiration = min(session.expiration + session.lifetime, now + MAX_SESSION_LIFETIME)
        task = asyncio.current_task()
        for done in [j for j in session.requests if j.done]:
            del session.requests[done]
        if task is not None:
            session.requests[job] = task

    def end(self, session: Session, cause: str) -> bool:
        """End a session once (False if it had ended already)."""
        if self.open.pop(session.session_id, None) is None:
            return False
        self.ended[session.session_id] = None
        if len(self.ended) > self.ENDED_REMEMBERED:
            self.ended.popitem(last=False)
        self.metrics.sessions_open -= 1
        self.metrics.sessions_ended[cause] += 1
        self.held = max(self.held - session.job.workload, 0.0) if self.open else 0.0
        for job, task in session.requests.items():
            if not job.done:  # the connection's task: its model request is abandoned
                task.cancel()
        session.requests.clear()
        session.job.finish("served", 200)
        log.info("session %s... ended (%s)", session.session_id[:6], cause)
        if session.on_close_route is not None:
            task = asyncio.get_running_loop().create_task(self._call_back(session))
            self.callbacks.add(task)
            task.add_done_callback(self.callbacks.discard)
        return True

    async def _call_back(self, session: Session) -> None:
        body = json_dumps({**session.on_close_payload, "session_id": session.session_id})
        route = session.on_close_route or "/"
        if self.model is None:
            return
        try:
            async with await self.model.request(
                "POST", route, body, timeout=SESSION_CALLBACK_TIMEOUT
            ) as resp:
                await resp.read()
            if resp.status >= 400:
                log.warning("session close callback %s: status %d", route, resp.status)
        except Exception as exc:  # logged, never raised: the session has ended either way
            log.warning("session close callback %s failed: %s", route, exc)

    async def collect(self) -> None:
        """End expired sessions every gc_interval seconds."""
        while True:
            await asyncio.sleep(self.gc_interval)
            self._end_expired()

    def _end_expired(self) -> None:
        now = time.time()
        for session in [s for s in self.open.values() if s.expiration <= now]:
            self.end(session, "expired")

    # /session/get, /session/health, /session/end (SPEC 11.5)

    def _asked(self, request: Request) -> tuple[str, Session | None, Any] | Response:
        """The session_id a /session/* request names, its open session, its session_auth."""
        try:
            msg = decode_client_json(request.body)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        session_id = msg.get("session_id")
        if type(session_id) is not str or not session_id:
            return error_response(422, "missing session_id")
        return session_id, self.get(session_id), msg.get("session_auth")

    async def handle_get(self, request: Request) -> Response:
        asked = self._asked(request)
        if isinstance(asked, Response):
            return asked
        _, session, session_auth = asked
        if session is None:
            return error_response(400, "session does not exist")
        if not self.authorized(session, session_auth):
            return error_response(401, "session_auth is not valid")
        return json_response(session.details())

    async def handle_health(self, request: Request) -> Response:
        asked = self._asked(request)
        if isinstance(asked, Response):
            return asked
        _, session, session_auth = asked
        if session is None:
            return json_response({"ok": False})
        if not self.authorized(session, session_auth):
            return error_response(401, "session_auth is not valid")
        return json_response({"ok": True})

    async def handle_end(self, request: Request) -> Response:
        asked = self._asked(request)
        if isinstance(asked, Response):
            return asked
        session_id, session, session_auth = asked
        if session is None:
            if session_id in self.ended:
                return error_response(410, "session already closed")
            return error_response(400, "session does not exist")
        if not self.authorized(session, session_auth):
            return error_response(401, "session_auth is not valid")
        if not self.end(session, "ended"):
            return error_response(410, "session already closed")
        return json_response({"ended": True, "removed_session": session_id})

    async def drain(self) -> None:
        """End every session (shutdown), and give their callbacks their time."""
        for session in list(self.open.values()):
            self.end(session, "drained")
        if self.callbacks:
            await asyncio.wait(set(self.callbacks), timeout=SESSION_CALLBACK_TIMEOUT + 1)


# Backend parts: admission ########################################################################
# What a client's signed request meets before the model: Admission lets it in or answers it.


@dataclasses.dataclass
class _Admitted(Generic[_T]):
    """A request past Admission.admit: signed (unless UNSECURED), its payload parsed."""

    msg: dict[str, Any]
    payload: _T
    auth: AuthData | None
    idx: int | None  # the request_idx to report it under (None inside a session)
    session: Session | None  # the session it is served in
    replay: bool  # its ticket is spent when accepted (not a session's own, sent again)


class Admission:
    """The steps every signed request takes first (readiness, JSON, session, signature,
    payload), and the refusals: each counted, logged, and reported to the autoscaler
    (`completions`, today's platform; set by Backend.start with `config`). POST
    /session/create is admission and nothing more: a verified ticket opens a session."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        signatures: SignatureChecker,
        sessions: SessionTable,
        metrics: Metrics,
    ) -> None:
        self.lifecycle = lifecycle
        self.signatures = signatures
        self.sessions = sessions
        self.metrics = metrics
        self.config = Config()
        self.completions: Completions | None = None
        self._code_warned: set[tuple[str, str]] = set()  # (route, what raised): said once

    def code_failed(self, route: str, what: str, error: BaseException, status: int) -> None:
        """The worker's own code (its payload class, its handler) raised on a request: a
        WARNING with the traceback, once per route and part (a bug repeats on every request;
        one traceback says it). The client gets `status` with a generic message, never the
        exception's text, which may carry the client's data."""
        key = (route, what)
        if key in self._code_warned:
            return
        self._code_warned.add(key)
        log.warning(
            "%s: the worker's %s raised %s; answered %d (said once per route)",
            route,
            what,
            type(error).__name__,
            status,
            exc_info=(type(error), error, error.__traceback__),
        )

    def admit(
        self, route: str, body: bytes, parse: Callable[[dict[str, Any]], _T], *, sessions: bool
    ) -> _Admitted[_T] | Response:
        """The steps every signed request takes first: readiness (a loading worker says so,
        whatever it was sent), the JSON, the session it names (model routes), the signature,
        the payload. A refusal comes back as its Response, counted and reported."""
        refusal = self.not_ready()
        try:
            msg = decode_client_json(body)
        except HttpError as exc:
            return self.refuse(route, refusal or error_response(exc.status, exc.message))
        session_id = msg.get("session_id") if sessions else None
        in_session = type(session_id) is str  # its ticket is the session's: reported once
        if refusal is not None:
            return self.refuse(route, refusal, None if in_session else peek_auth(msg)[0])
        session: Session | None = None
        replay = True
        if type(session_id) is str:
            session = self.sessions.get(session_id)
            if session is None:
                return self.refuse(route, error_response(410, "invalid session"))
            # Inside a session the client sends the session's ticket again, by design.
            replay = not self.sessions.authorized(session, msg.get("auth_data"))
        try:
            checker = None if self.config.unsecured else self.signatures
            payload, auth = parse_client_request(parse, msg, checker, replay=replay)
        except HttpError as exc:  # 401: the claimed cost counts only if it was signed
            idx, claimed = (None, 0.0) if in_session else peek_auth(msg)
            claimed = claimed if exc.message in REPLAY_REASONS else 0.0
            return self.refuse(route, error_response(exc.status, exc.message), idx, claimed)
        except JsonDataException as exc:
            idx = None if in_session else peek_auth(msg)[0]
            if isinstance(exc, PayloadUnreadable):
                self.code_failed(route, exc.what, exc.error, 422)
            return self.refuse(route, json_response(exc.message, 422), idx)
        if in_session:
            idx = None
        elif auth is not None:
            idx = auth.request_idx
        else:  # UNSECURED: the request_idx, unchecked
            idx = peek_auth(msg)[0]
        return _Admitted(msg, payload, auth, idx, session, replay)

    def not_ready(self) -> Response | None:
        life = self.lifecycle
        if life.state is not State.READY:
            reason = life.error_msg if life.state is State.ERRORED else "model not ready"
            return error_response(503, reason, state=life.state.value)
        if not self.config.unsecured and self.signatures.pubkey is None:
            self.signatures.watch.failed("no_key")
            return error_response(503, "no public key yet", state="no_pubkey")
        return None

    def refuse(
        self, route: str, response: Response, idx: int | None = None, workload: float = 0.0
    ) -> Response:
        """Count, log and report a request answered without reaching the model (401, 422,
        429, 503). 401 and 429 are rejections: their workload counts in rej_load."""
        status = response.status
        self.metrics.record(route, status, 0.0)
        if status in (401, 429):
            self.metrics.refused.add(workload)
        if idx is not None and self.completions is not None:
            outcome = "Error" if status == 422 else "Rejected"
            self.completions(completion(idx, outcome, time.time()))
        if access_log.isEnabledFor(logging.INFO):
            _access_log_line(f"{route} {response.status} (refused)")
        return response

    async def handle_session_create(self, request: Request) -> Response:
        """POST /session/create: auth_data verified like any model request's, then a session
        that counts as one request in flight (workload `cost`) until it ends."""
        route = request.path

        def parse(msg: dict[str, Any]) -> tuple[SessionPayload, str | None]:
            payload = SessionPayload.from_json_msg(msg)
            return payload, self.sessions.check(payload)  # the close route, resolved

        admitted = self.admit(route, request.body, parse, sessions=False)
        if isinstance(admitted, Response):
            return admitted
        (payload, on_close), auth, idx = admitted.payload, admitted.auth, admitted.idx
        msg, claimed = admitted.msg, peek_auth(admitted.msg)[1]
        auth_data = msg.get("auth_data")
        key = _auth_key(auth_data, for_keeping=True)
        if key is None:
            why = {"auth_data": "nested too deeply to keep"}
            return self.refuse(route, json_response(why, 422), idx)
        if self.sessions.full():
            max_sessions = self.sessions.max_sessions
            answer = error_response(429, "too many sessions", max_sessions=max_sessions)
            return self.refuse(route, answer, idx, claimed)
        if auth is not None:
            self.signatures.spend(auth)
        job = _Job(self.metrics, "/session", claimed, idx, self.completions)
        session = self.sessions.create(auth_data, key, payload, on_close, job)
        reply = {"session_id": session.session_id, "expiration": session.expiration}
        return json_response(reply, 201)


# Backend #########################################################################################
# The request pipeline, and the wiring of the parts above.


class Backend:
    """The worker's core: the request pipeline (Admission: readiness, signature, payload;
    then the queue limit, and ModelQueue to the model and back) and the parts it wires
    together (Lifecycle, SignatureChecker, ModelReadiness, LoadReporter or PlatformReporter,
    SessionTable, Metrics).

    model_server_url       the model API's base URL (MODEL_SERVER_URL overrides it)
    model_log_file         the model server's log (MODEL_LOG overrides it)
    allow_parallel_requests  False: one request at a time to the model, FIFO
    benchmark_handler      the route whose payloads measure the model's throughput
    log_actions            [(LogAction, substring)] matched against each model-log line
    max_queue_time         seconds of estimated wait past which a request gets 429
                           (max_wait_time: the 2025 library's name for it)
    healthcheck_endpoint   the model's health route (GET), polled once ready; None: none
    benchmark_runs         the most rounds' worth the benchmark sends (8; it stops sooner
                           once its figure is stable: StoppingRule)
    max_sessions           sessions open at once at most (10; 0: no limit)

    A handler's own settings win over these (see EndpointHandler): allow_parallel_requests
    and max_queue_time for its route, and the benchmark handler's benchmark_runs for the
    benchmark (the more particular setting: one rule for every handler setting).
    healthcheck_endpoint, not a handler setting, defaults to the benchmark handler's
    attribute, where the 2024 library kept it.
    """

    def __init__(
        self,
        model_server_url: str,
        model_log_file: str | None,
        allow_parallel_requests: bool,
        benchmark_handler: EndpointHandler[Any],
        log_actions: Sequence[tuple[LogAction, str]],
        max_queue_time: float | None = None,
        *,
        healthcheck_endpoint: str | None = None,
        benchmark_runs: int | None = None,
        max_sessions: int = 10,
        max_wait_time: float | None = None,
    ) -> None:
        self.model_server_url = model_server_url
        self.model_log_file = model_log_file
        self.allow_parallel_requests = allow_parallel_requests
        self.benchmark_handler = benchmark_handler
        self.log_actions = list(log_actions)
        # max_wait_time: the 2025 library's name for it
        self.max_queue_time = max_queue_time if max_queue_time is not None else max_wait_time
        old: Any = benchmark_handler  # the 2024 places, read once here
        self.healthcheck_endpoint: str | None = healthcheck_endpoint or getattr(
            old, "healthcheck_endpoint", None
        )
        runs = handler_setting(benchmark_handler, "benchmark_runs") or benchmark_runs
        self.benchmark_runs: int = runs or 8  # the handler's own, else the Backend's, else 8
        self.max_sessions = max_sessions
        self.config = Config()
        self.metrics = Metrics()
        self.lifecycle = Lifecycle()
        self.signatures = SignatureChecker(failures=self.metrics.signature_failures)
        self.queue = ModelQueue(self.metrics)
        self.reporter: LoadReporter | PlatformReporter | None = None
        self.sessions = SessionTable(self.metrics, max_sessions=max_sessions)
        self.tasks = BackgroundTasks(self.lifecycle)
        self.readiness = ModelReadiness(self.lifecycle, self.tasks)
        self.admission = Admission(self.lifecycle, self.signatures, self.sessions, self.metrics)
        self._client: HttpClient | None = None

    # The state, as earlier versions kept it on Backend itself ----------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @state.setter
    def state(self, state: State) -> None:
        self.lifecycle.state = state

    @property
    def max_perf(self) -> float:
        return self.lifecycle.max_perf

    @max_perf.setter
    def max_perf(self, value: float) -> None:
        self.lifecycle.max_perf = value

    @property
    def error_msg(self) -> str:
        return self.lifecycle.error_msg

    @property
    def pubkey(self) -> RsaPublicKey | None:
        return self.signatures.pubkey

    @property
    def health(self) -> HealthCheck | None:
        """The model's health check, when it has a health route (set by start())."""
        return self.readiness.health

    @property
    def client(self) -> HttpClient:
        """The pooled connections to the model server."""
        if self._client is None:
            raise RuntimeError("Backend.start() has not run")
        return self._client

    @property
    def session(self) -> ModelSession:
        """The model server for a worker's own routes, with aiohttp's ClientSession names
        (the 2024 library's `backend.session`; see Compatibility: the 2024 lib)."""
        return ModelSession(lambda: self.client, self.config.max_body)

    def _parallel(self, handler: EndpointHandler[Any]) -> bool:
        """Whether a route's model requests go straight to the model (else: FIFO)."""
        own = handler_setting(handler, "allow_parallel_requests")
        return self.allow_parallel_requests if own is None else bool(own)

    # The request pipeline ---------------------------------------------------------------------

    def create_handler(self, handler: EndpointHandler[Any]) -> Handler:
        """The server-side handler for a route forwarding to `handler.endpoint`."""
        endpoint = _endpoint_of(handler)  # checked now: a mistake stops the worker at start
        payload_cls = handler.payload_cls()
        limit = handler_setting(handler, "max_queue_time")  # None: the Backend's, when asked
        limit = None if limit is None else float(limit)
        parallel = self._parallel(handler)
        return functools.partial(self._handle, handler, endpoint, payload_cls, parallel, limit)

    async def _handle(
        self,
        handler: EndpointHandler[Any],
        endpoint: str,
        payload_cls: type[ApiPayload],
        parallel: bool,
        max_queue_time: float | None,
        request: Request,
    ) -> Response:
        route = request.path
        admission = self.admission
        admitted = admission.admit(route, request.body, payload_cls.from_json_msg, sessions=True)
        if isinstance(admitted, Response):
            return admitted
        payload, auth, idx = admitted.payload, admitted.auth, admitted.idx
        try:
            workload = float(payload.count_workload())
        except _PAYLOAD_READ_ERRORS as exc:  # a payload its own class cannot weigh: as above
            admission.code_failed(route, "payload class's count_workload", exc, 422)
            return admission.refuse(route, json_response({"payload": "invalid payload"}, 422), idx)
        if not 0.0 <= workload <= MAX_WORKLOAD:  # NaN is neither
            why = f"workload {workload:g} is not a number from 0 to {MAX_WORKLOAD:g} (MAX_WORKLOAD)"
            return admission.refuse(route, json_response({"payload": why}, 422), idx)
        if max_queue_time is None:
            max_queue_time = self.max_queue_time
        if max_queue_time is not None:
            wait = self.estimated_wait(parallel)
            if wait > max_queue_time:
                self.metrics.rejected += 1
                wait = min(wait, MAX_RETRY_AFTER)
                retry = str(max(1, math.ceil(wait - max_queue_time)))
                why = {"error": "queue too long", "estimated_wait": round(wait, 3)}
                answer = json_response(why, 429, [("Retry-After", retry)])
                return admission.refuse(route, answer, idx, workload)
        if auth is not None and admitted.replay:  # accepted: from now on the ticket is spent
            self.signatures.spend(auth)
        job = _Job(self.metrics, route, workload, idx, admission.completions, serial=not parallel)
        if admitted.session is not None:
            self.sessions.enter(admitted.session, job)
        try:
            return await self.queue.forward(
                handler, endpoint, payload, request, job, one_at_a_time=not parallel
            )
        except HttpError:
            raise
        except Exception as exc:  # the worker's own code (model_body, generate_payload_json,
            # generate_client_response): the job is settled, errored; a traceback once a route
            if request.response_started:
                raise  # its own stream began: the server cuts it
            admission.code_failed(route, "handler", exc, 500)
            raise HttpError(500, "internal error") from exc

    def estimated_wait(self, parallel: bool) -> float:
        """Seconds a new request on a parallel (or a serial) route is estimated to wait:
        the workload ahead of it over max_perf (0.0 before the benchmark's figure). What it
        assumes: the model shares max_perf among the requests at it. A parallel request has
        ahead of it the parallel routes' requests in flight, not the FIFO's waiting ones
        (they wait in the worker, not at the model; its one at the model is left out too). A
        serial request waits for the whole FIFO, served one at a time at max_perf: measured
        one at a time when the benchmark route is serial, else at the benchmark's
        concurrency, and then the wait is underestimated (one at a time, the model is
        slower). Open sessions hold their cost in flight but no model time: left out."""
        perf = self.lifecycle.max_perf
        if not perf > 0:
            return 0.0
        metrics = self.metrics
        if parallel:
            ahead = metrics.in_flight.workload - metrics.serial.workload - self.sessions.held
        else:
            ahead = metrics.serial.workload
        return max(ahead, 0.0) / perf

    # Life -------------------------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        """Start the background work; returns at once (nothing here waits on the network)."""
        self.config = self.admission.config = config
        self.lifecycle.started_at = time.monotonic()
        self._client = HttpClient(config.model_server_url or self.model_server_url)
        self.queue.client = self.sessions.model = self._client
        self.signatures.layouts = config.signature_layouts
        watch = self.signatures.watch
        watch.interval, watch.window = config.signature_warn_interval, config.key_refetch_quiet
        watch.doubt_after = config.key_refetch_failures
        self.signatures.refetch_interval = config.key_refetch_interval
        self.sessions.gc_interval = config.session_gc_interval
        self.tasks.spawn(self.sessions.collect())
        if config.platform_reports:
            self.reporter = PlatformReporter(config, self.metrics, self.lifecycle)
            self.admission.completions = self.reporter.completed
            self.tasks.spawn(self.reporter.run())
            self.tasks.spawn(self.reporter.run_completions())
        else:
            self.reporter = LoadReporter(config, self.metrics, self.lifecycle)
            for target in self.reporter.targets:
                self.tasks.spawn(self.reporter.run(target))
        if config.model_log is not None:
            self.model_log_file = config.model_log
        if config.unsecured:
            log.warning(
                "!!! UNSECURED=true: requests are NOT checked for the autoscaler's "
                "signature; anyone who can reach this port can use the model !!!"
            )
        elif config.pubkey_file:
            self.signatures.load_file(config.pubkey_file)
            self.tasks.spawn(
                self.signatures.watch_file(config.pubkey_file, config.pubkey_file_poll)
            )
        else:
            self.signatures.spawn = self.tasks.spawn  # to fetch it again (issue 18)
            self.tasks.spawn(self.signatures.fetch(self.reporter.clients[0]))
        health = config.model_health_endpoint or self.healthcheck_endpoint
        base = self.model_server_url.rstrip("/")
        if health and config.model_server_url and health.startswith(base + "/"):
            # A URL on the worker file's model server, which MODEL_SERVER_URL moved: its path
            health = health[len(base) :]
        handler = self.benchmark_handler
        concurrency = handler_setting(handler, "concurrency")
        self.readiness.start(
            self.client,
            config,
            handler,
            runs=self.benchmark_runs,
            concurrency=concurrency or (10 if self._parallel(handler) else 1),
            model_log=self.model_log_file,
            log_actions=self.log_actions,
            health=health,
        )

    def model_loaded(self, reason: str) -> None:
        """The model has loaded (`reason` is logged): the benchmark starts, then the worker
        is ready. The model log's loaded line takes the same path (ModelReadiness.loaded);
        only the first call counts."""
        self.readiness.loaded(reason)

    async def stop(self) -> None:
        """End the sessions, cancel background work, send a last load report, close
        connections."""
        await self.sessions.drain()
        await self.tasks.stop()
        self.signatures.watch.close()
        reporter = self.reporter
        if reporter is not None:  # the last word: nothing in flight any more
            last = [reporter.send_report()]
            if isinstance(reporter, PlatformReporter) and reporter.pending:
                last.append(reporter.send_completions())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*last), FINAL_REPORT_TIMEOUT)
            await reporter.close()
        await self.readiness.close()
        if self._client is not None:
            await self._client.close()


# Server and run() ################################################################################


class RunningWorker:
    """A running worker: the HTTP server and the backend behind it."""

    def __init__(
        self,
        backend: Backend,
        server: HttpServer,
        port: int,
        plain: HttpServer | None = None,
        plain_port: int | None = None,
    ) -> None:
        self.backend = backend
        self.server = server
        self.port = port
        self.plain = plain  # beside TLS: /session/end in plain HTTP, as the platform calls it
        self.plain_port = plain_port

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace`), report, close."""
        if self.plain is not None:
            await self.plain.shutdown(0.0)
        await self.server.shutdown(grace)
        await self.backend.stop()


def builtin_routes(backend: Backend, config: Config) -> list[Route]:
    """The worker's own routes beside the model's: /ping, /healthcheck, /metrics, the
    sessions of SPEC 11.5, and with a MASTER_TOKEN, POST /pyworker/update (SPEC 11.6)."""

    async def ping(request: Request) -> Response:
        return Response(200, b"pong", content_type="text/plain; charset=utf-8")

    async def healthcheck(request: Request) -> Response:
        if backend.health is None:
            life = backend.lifecycle
            return json_response({"state": life.state.value, "error_msg": life.error_msg})
        return await backend.health.ask()

    async def metrics(request: Request) -> Response:
        text = backend.metrics.render(backend.lifecycle)
        return Response(200, text.encode(), content_type="text/plain; version=0.0.4")

    async def update(request: Request) -> Response:
        # The platform asks for the worker's update; the flag file tells its start script.
        expected = f"Bearer {config.master_token}".encode()
        given = (request.headers.get("authorization") or "").encode("latin-1")
        if not config.master_token or not hmac.compare_digest(given, expected):
            return error_response(401, "unauthorized")
        path = config.force_update_file
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError as exc:
            log.error("update requested, but %s cannot be created: %s", path, exc)
            return error_response(500, "cannot create the update flag file")
        log.info("update requested: %s created", path)
        return json_response({"ok": True})

    routes = [
        get("/ping", ping),
        get("/healthcheck", healthcheck),
        get("/metrics", metrics),
        post("/session/create", backend.admission.handle_session_create),
        post("/session/get", backend.sessions.handle_get),
        post("/session/health", backend.sessions.handle_health),
        post("/session/end", backend.sessions.handle_end),
    ]
    if config.master_token:
        routes.append(post("/pyworker/update", update))
    return routes


class PortInUse(OSError):
    """The port the worker must listen on is held by another process."""

    def __init__(self, port: int, variable: str) -> None:
        super().__init__(errno.EADDRINUSE, f"port {port} ({variable}) is in use")
        self.port = port
        self.variable = variable

    def __str__(self) -> str:
        return (
            f"port {self.port} ({self.variable}) is held by another process, maybe another "
            "worker already running on this machine"
        )


async def _start_side_port(
    backend: Backend, config: Config, host: str | None, port: int, main_port: int
) -> tuple[HttpServer | None, int | None]:
    """The plain-HTTP server for /session/end beside TLS (WORKER_HTTP_PORT); when that port is
    taken, a warning and none: /session/end answers on WORKER_PORT as well, and a TLS worker
    that exits over its side port never serves at all."""
    plain = HttpServer([post("/session/end", backend.sessions.handle_end)], max_body=64 * 1024)
    try:
        bound = await plain.start(config.host if host is None else host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning(
            "port %d (WORKER_HTTP_PORT, WORKER_PORT + 1 unless set) is held by another "
            "process: /session/end is not served in plain HTTP; it answers on port %d "
            "(WORKER_PORT, TLS) as every route does",
            port,
            main_port,
        )
        return None, None
    log.info("/session/end also served in plain HTTP on port %d", bound)
    return plain, bound


def _server_tls_context(config: Config) -> ssl.SSLContext:
    for name, path in (("WORKER_SSL_CERT", config.ssl_cert), ("WORKER_SSL_KEY", config.ssl_key)):
        if not os.path.isfile(path):
            raise ConfigError(f"USE_SSL=true but {path!r} does not exist (set {name})")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_cert, config.ssl_key)
    return context


async def start_worker(
    backend: Backend,
    routes: Iterable[Route],
    config: Config | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> RunningWorker:
    """Listen and start the backend; /ping answers before anything else finishes."""
    config = config or Config.from_env()
    routes, builtin = list(routes), builtin_routes(backend, config)
    # A worker file's own route wins over a built-in one on the same method and path: the
    # file says so explicitly (2024 worker files serve their own /ping and /healthcheck).
    own = {(r.method, r.path) for r in routes}
    for route in builtin:
        if (route.method, route.path) in own:
            log.info("%s %s: the worker file's own route serves it", route.method, route.path)
    server = HttpServer([*builtin, *routes], max_body=config.max_body)
    ssl_context = None
    if config.use_ssl:
        ssl_context = _server_tls_context(config)
    wanted = config.worker_port if port is None else port
    try:
        bound = await server.start(
            config.host if host is None else host, wanted, ssl_context=ssl_context
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(wanted, "WORKER_PORT") from None
        raise
    plain: HttpServer | None = None
    plain_port: int | None = None
    if ssl_context is not None:  # the platform ends sessions over plain HTTP (SPEC 11.5)
        side = config.worker_http_port
        if side is None:
            side = 0 if port == 0 else config.worker_port + 1
        try:
            plain, plain_port = await _start_side_port(backend, config, host, side, bound)
        except BaseException:
            await server.shutdown(0.0)
            raise
    await backend.start(config)
    log.info("pyworker listening on port %d (%s)", bound, "TLS" if ssl_context else "plain HTTP")
    return RunningWorker(backend, server, bound, plain, plain_port)


class _LogHandler(logging.Handler):
    """Log lines to stdout, gathered in a buffer of its own: warnings and errors are written
    at once, other lines at most every LOG_FLUSH_INTERVAL (or every LOG_FLUSH_LINES lines).
    Not stdout's buffer: with PYTHONUNBUFFERED=1, common in images, each access-log line
    would be a system call per request.

    Lines are `time level logger: message`, formatted directly (the generic Formatter looks
    up its format fields per line), with the time text made once a second."""

    _tracebacks = logging.Formatter()

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[str] = []
        self._write_failed = False
        self._second = -1
        self._second_text = ""

    def _time_text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._second_text},{int((created - second) * 1000):03d}"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self._time_text(record.created)} {record.levelname} {record.name}: "
        text += record.getMessage()
        if record.exc_info:  # tracebacks as the standard Formatter has them
            text += "\n" + self._tracebacks.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        return text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._pending) >= LOG_FLUSH_LINES:
            self.flush()

    def access(self, message: str) -> None:
        """An access-log line, without the LogRecord (the caller checked the level)."""
        with self.lock:  # pyright: ignore[reportOptionalContextManager]
            self._pending.append(
                f"{self._time_text(time.time())} INFO {access_log.name}: {message}\n"
            )
            if len(self._pending) >= LOG_FLUSH_LINES:
                self.flush()

    def flush(self) -> None:
        with self.lock:  # pyright: ignore[reportOptionalContextManager]
            if not self._pending:
                return
            text, self._pending = "".join(self._pending), []
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError) as exc:  # stdout closed or broken
                if not self._write_failed:  # say so once, where it can still be seen
                    self._write_failed = True
                    with contextlib.suppress(OSError, ValueError):
                        sys.stderr.write(f"pyworker: cannot write the log to stdout: {exc!r}\n")

    def close(self) -> None:
        self.flush()
        super().close()

    async def flush_periodically(self) -> None:
        while True:  # so that a quiet worker's last lines do not wait in the buffer
            await asyncio.sleep(LOG_FLUSH_INTERVAL)
            self.flush()


FAILED_START_REPORT_TIMEOUT = 10.0  # seconds a failed start may spend telling the autoscaler


def _lenient_config(env: Mapping[str, str]) -> Config:
    """What a failed-start report needs, from an environment Config.from_env refused: each
    value taken if it is good, else its default."""
    config = Config()
    addrs = [a.strip().rstrip("/") for a in env.get("REPORT_ADDR", "").split(",") if a.strip()]
    good: list[str] = []
    for addr in addrs:
        with contextlib.suppress(ValueError):
            split_url(addr)
            good.append(addr)
    if "REPORT_ADDR" in env:  # only its good addresses; none good: nowhere to report
        config.report_addrs = good
    raw_id = env.get("CONTAINER_ID", "").strip()
    config.container_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() else 0
    config.master_token = env.get("MASTER_TOKEN", "").strip()
    ip, port = env.get("PUBLIC_IPADDR", "").strip() or "127.0.0.1", env.get("WORKER_PORT", "3000")
    config.public_url = f"http://{ip}:{port.strip()}"
    return config


async def report_failed_start(config: Config, message: str) -> bool:
    """Tell the autoscaler why this worker cannot start (SPEC 11.6: the start script's own
    failure report), so that its console shows the reason instead of "loading" for ever.
    REPORT_ADDR's addresses are tried in order; FAILED_START_REPORT_TIMEOUT bounds it all."""
    body = json_dumps(
        {
            "id": config.container_id,
            "mtoken": config.master_token,
            "version": PlatformReporter.VERSION,
            "error_msg": message,
            "url": config.public_url,
        }
    )

    async def send() -> bool:
        for addr in config.report_addrs:
            client = HttpClient(addr, max_idle=0)
            try:
                async with await client.request("POST", "/worker_status/", body) as resp:
                    await resp.read()
                if 200 <= resp.status < 300:
                    return True
            except UpstreamError as exc:  # the reason is logged already; this is a best effort
                log.debug("failed-start report to %s: %s", addr, exc)
            finally:
                await client.close()
        return False

    try:
        return await asyncio.wait_for(send(), FAILED_START_REPORT_TIMEOUT)
    except asyncio.TimeoutError:
        return False


def usage(program: str) -> str:
    """What `--help` prints: how to run a worker file, and the environment it reads."""
    doc = __doc__ or ""
    environment = doc[doc.index("Environment (") :].split("\n\n", 2)  # intro, table, rest
    return (
        f"usage: python {program} [-h]\n\n"
        "Runs the worker until SIGTERM or SIGINT. It takes no arguments: everything comes\n"
        "from the environment:\n\n" + environment[1] + "\n"
    )


def _arguments(argv: Sequence[str]) -> None:
    """A worker file takes no arguments but --help: anything else is refused, not ignored
    (a worker started by mistake would listen on all interfaces and call the autoscaler)."""
    program = os.path.basename(argv[0]) if argv else "worker.py"
    if any(a in ("-h", "--help") for a in argv[1:]):
        sys.stdout.write(usage(program))
        sys.exit(0)
    if len(argv) > 1:
        sys.stderr.write(f"{program}: unknown argument {argv[1]!r}\n" + usage(program))
        sys.exit(2)


def _read_config() -> Config | str:
    """The environment, read and checked; the one-line message of a bad value instead."""
    try:
        return Config.from_env()
    except ConfigError as exc:
        return f"bad configuration: {exc}"


def _start_failed(message: str) -> Config:
    """A start that cannot go on: its one line on stderr, and what the failed-start report
    needs (the caller awaits report_failed_start in its loop, then exits 1)."""
    print(f"pyworker: {message}", file=sys.stderr, flush=True)
    return _lenient_config(os.environ)


def _configure() -> tuple[Config, _LogHandler]:
    """The environment, read and checked (a bad value exits with one line and a failed-start
    report), and the worker's logging set up: what run() does first, outside any loop."""
    config = _read_config()
    if isinstance(config, str):
        asyncio.run(report_failed_start(_start_failed(config), config))
        sys.exit(1)
    return config, _set_up_logging(config)


async def _configure_in_loop() -> tuple[Config, _LogHandler]:
    """_configure in a running event loop (serve, Worker.run_async): the report awaited."""
    config = _read_config()
    if isinstance(config, str):
        await report_failed_start(_start_failed(config), config)
        raise SystemExit(1)
    return config, _set_up_logging(config)


def _set_up_logging(config: Config) -> _LogHandler:
    """The worker's log handler on the root logger at LOG_LEVEL, and the access log's shortcut."""
    handler = _LogHandler()
    root = logging.getLogger()
    if root.handlers:
        # The worker file set up logging itself (the 2024 files call logging.basicConfig(
        # level=logging.DEBUG) at import): its own lines keep going to its handlers, and
        # pyworker's go to pyworker's handler at LOG_LEVEL, once (not also through the
        # root's, at the worker's level).
        for old in [h for h in log.handlers if isinstance(h, _LogHandler)]:
            log.removeHandler(old)
        log.addHandler(handler)
        log.setLevel(config.log_level)
        log.propagate = False
        alone = log.handlers == [handler]
    else:
        logging.basicConfig(level=config.log_level, handlers=[handler])
        alone = root.handlers == [handler]
    if alone and not access_log.handlers:
        _access_log_line.direct = handler.access  # the access log went nowhere else
    # The Logging HOWTO's "Optimization" knobs: a record per request need not look up its
    # caller's source line, thread, process (the format shows none of them).
    logging._srcfile = None  # pyright: ignore[reportPrivateUsage]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return handler


async def serve(
    backend: Backend,
    routes: Iterable[Route],
    config: Config | None = None,
    log_handler: _LogHandler | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, in the running event loop; run() without its own loop.
    Without a config, the environment is read now (not when the worker file was imported);
    without a log handler, logging is set up here (a config given is kept)."""
    if config is None or log_handler is None:
        configured, new_handler = await _configure_in_loop()
        config = configured if config is None else config
        log_handler = new_handler if log_handler is None else log_handler
    handler = log_handler
    routes = list(routes)
    try:
        worker = await start_worker(backend, routes, config)
    except (OSError, KeyFormatError, ssl.SSLError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        handler.flush()
        await report_failed_start(config, f"cannot start: {exc}")
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    flusher = loop.create_task(handler.flush_periodically())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: finishing %d requests in flight", worker.server.busy_connections)
        await worker.stop()
        log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        flusher.cancel()


def run(backend: Backend, routes: Iterable[Route]) -> None:
    """Run a worker until SIGTERM or SIGINT: the entry point of a worker file."""
    _run(functools.partial(serve, backend, routes))


def _run(main: Callable[[Config, _LogHandler], Coroutine[Any, Any, None]]) -> None:
    """What run() does, for any worker form: the arguments checked, the environment read and
    logging set up (outside any loop), uvloop if it is there, then `main` in a new loop."""
    _arguments(sys.argv)
    config, handler = _configure()
    if install_uvloop():
        log.debug("using uvloop")
    asyncio.run(main(config, handler))


# Compatibility: the 2024 lib ####################################################################
# Worker files written for the platform's 2024 `lib/` (on aiohttp) run on pyworker with their
# imports changed: `from lib.backend import Backend, LogAction`, `from lib.data_types import
# ...` and `from lib.server import start_server` become `from pyworker import ...` with the
# same names, and `from aiohttp import web, ClientResponse` becomes `from pyworker import web,
# ClientResponse`. What follows is aiohttp's names for what the core does: the core's
# Request, Route and ClientResponse already answer to them (query_string, json(), content,
# content_type ...); the answers (web.Response, web.StreamResponse) and backend.session are
# shaped here. No second server: the same path, limits and accounting as a native worker.

SESSION_TIMEOUT = 300.0  # seconds a worker's own request through backend.session may take
# What a head can hold as "name:value" (or "Reason:phrase"): a token, then Latin-1 text
_SENDABLE = re.compile(rf"{_TCHAR.decode()}+:[\t\x20-\x7e\x80-\xff]*")


def _header_fields(
    headers: Mapping[str, str] | None,
    charset: str | None,
    content_type: str | None,
    reason: str | None,
) -> tuple[list[tuple[str, str]], str | None]:
    """aiohttp's headers={...}: the fields to send, and a Content-Type among them (taken
    out: the core sends the content type once; a Content-Length is the core's to write).
    A field or reason= that no head can hold is refused here, as aiohttp does: a ValueError
    in the handler (its 500), not a connection cut without an answer."""
    fields = list((headers or {}).items())
    given = next((v for k, v in fields if k.lower() == "content-type"), None)
    fields = [(k, v) for k, v in fields if k.lower() not in ("content-type", "content-length")]
    media = content_type or given
    if media is not None and charset and "charset=" not in media.lower():
        media = f"{media}; charset={charset}"
    for name, value in [*fields, ("Content-Type", media or ""), ("Reason", reason or "")]:
        if not _SENDABLE.fullmatch(f"{name}:{value}"):
            raise ValueError(f"{name!r}: {value!r} cannot be sent (Latin-1, no control bytes)")
    return fields, media


class _AioResponse(Response):
    """aiohttp.web.Response: body= (bytes, a str, or an answer's .content: streamed), text=,
    status=, reason=, content_type=, charset=, headers= (a dict)."""

    def __init__(
        self,
        *,
        body: Any = None,
        status: int = 200,
        reason: str | None = None,
        text: str | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        charset: str | None = None,
    ) -> None:
        if text is not None and body is not None:
            raise ValueError("body and text are not allowed together")
        stream = body.iter_any() if isinstance(body, BodyStream) else None
        if text is not None or isinstance(body, str):
            charset = charset or "utf-8"
            data = typing.cast(str, text if text is not None else body).encode(charset)
            default = "text/plain"
        elif stream or body is None or isinstance(body, (bytes, bytearray, memoryview)):
            data = b"" if stream else bytes(typing.cast("bytes | bytearray | None", body) or b"")
            default = "application/octet-stream"
        else:
            raise TypeError(f"web.Response body: bytes or str, not {type(body).__name__}")
        fields, media = _header_fields(headers, charset, content_type, reason)
        if media is None:
            media = f"{default}; charset={charset}" if charset else default
        super().__init__(
            status, data, content_type=media, headers=fields, stream=stream, reason=reason
        )


def _aio_json_response(
    data: Any = None,
    *,
    content_type: str = "application/json",
    dumps: Callable[[Any], str] | None = None,
    **options: Any,
) -> _AioResponse:
    """aiohttp.web.json_response(data=..., status=...): text=, body=, status=, reason=,
    headers= as web.Response takes them."""
    if options.get("body") is None and options.get("text") is None:
        options["body"] = json_dumps(data) if dumps is None else dumps(data).encode()
    return _AioResponse(content_type=content_type, **options)


class _AioStreamResponse(Response):
    """aiohttp.web.StreamResponse: set content_type, `await prepare(request)` (the head goes
    to the client at once), `await write(data)` (each piece goes out as it is written),
    `await write_eof()`, return it. It is the request's EarlyResponse underneath: when the
    handler returns, the stream ends; if the handler raises (the model broke off), it is
    cut. Prepared outside a server's request, the writes become the body."""

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        fields, media = _header_fields(headers, None, None, reason)
        media = media or "application/octet-stream"
        super().__init__(status, content_type=media, headers=fields, reason=reason)
        self.prepared = False
        self._early: EarlyResponse | None = None

    @property
    def body(self) -> bytes:  # joined when read, not at each write (that was quadratic)
        self._pieces = [b"".join(self._pieces)]
        return self._pieces[0]

    @body.setter
    def body(self, value: bytes) -> None:
        self._pieces = [value]

    async def prepare(self, request: Request) -> None:
        if not self.prepared:
            self._early = request.responder
            if self._early is not None:  # a head that cannot be sent raises: not prepared
                fields = [("Content-Type", self.content_type), *self.headers]
                self._early.start(self.status, fields, self.reason)
            self.prepared = True

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.prepared:
            raise RuntimeError("StreamResponse.write before prepare()")
        if self._early is not None:
            await self._early.write(bytes(data))
        else:
            self._pieces.append(bytes(data))

    async def write_eof(self, data: bytes = b"") -> None:
        """The end comes when the handler returns; this only writes the last `data`."""
        if data:
            await self.write(data)


class _SessionResponse:
    """backend.session's answer: awaited (or entered with `async with`), it is asked and
    read whole; then it has aiohttp's ClientResponse names (status, reason, headers,
    content_type, content, read(), json(), text())."""

    status: int
    reason: str
    headers: Headers
    content_type: str

    def __init__(self, ask: Callable[[], Awaitable[tuple[ClientResponse, bytes]]]) -> None:
        self._ask = ask
        self._body = b""

    async def _asked(self) -> _SessionResponse:
        resp, self._body = await self._ask()
        self.status, self.reason, self.headers = resp.status, resp.reason, resp.headers
        self.content_type = resp.content_type
        return self

    def __await__(self) -> typing.Generator[Any, None, _SessionResponse]:
        return self._asked().__await__()

    async def __aenter__(self) -> _SessionResponse:
        return await self._asked()

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    @property
    def content(self) -> BodyStream:
        async def whole() -> AsyncIterator[bytes]:
            yield self._body

        return BodyStream(whole())

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return _decode_text(self._body, self.headers.get("content-type"))

    async def json(self) -> Any:
        return _upstream_json(self._body)

    def release(self) -> None:
        return None

    close = release


def _session_target(base_url: str, url: str, params: Mapping[str, str] | None) -> str:
    """What backend.session asks the model server for: a path as it is, or a whole URL on
    the model server (its scheme, host and port, under its path); then params=."""
    import urllib.parse

    if not url.startswith("/"):
        parts = urllib.parse.urlsplit(url)
        scheme, host, port, prefix = split_url(base_url)
        try:
            same = split_url(f"{parts.scheme}://{parts.netloc}")[:3] == (scheme, host, port)
        except ValueError:
            same = False
        path = parts.path or "/"
        if not (same and (path + "/").startswith(prefix + "/")):
            raise ValueError(
                f"backend.session asks the model server ({base_url}) only: {url!r} is not"
                " on it; give a path such as '/healthcheck'"
            )
        url = path[len(prefix) :] + (f"?{parts.query}" if parts.query else "")
    if params:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
    return url


class ModelSession:
    """backend.session: the model server with aiohttp's ClientSession names (get, post, put,
    delete, request), over the backend's pooled connections: `url` is a path, or a whole URL
    on the model server (no other host), a query and params= as aiohttp takes them. Each
    answer is read whole, at most max_body bytes (MAX_BODY_BYTES, 16 MiB; past it an
    UpstreamError, a 502): for a worker's own routes (/healthcheck, a /view proxy); model
    routes relay streams through their handlers."""

    def __init__(self, client: Callable[[], HttpClient], max_body: int = MAX_BODY) -> None:
        self._client = client
        self.max_body = max_body

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = SESSION_TIMEOUT,
    ) -> _SessionResponse:
        body = json_dumps(json) if json is not None else data
        body = body.encode() if isinstance(body, str) else body
        fields = [(k, v) for k, v in (headers or {}).items() if k.lower() != "content-type"]
        content_type = next(
            (v for k, v in (headers or {}).items() if k.lower() == "content-type"),
            "application/json" if json is not None else "application/octet-stream",
        )

        async def ask() -> tuple[ClientResponse, bytes]:
            client = self._client()
            target = _session_target(client.base_url, url, params)
            resp = await client.request(
                method, target, body, headers=fields, content_type=content_type, timeout=timeout
            )
            async with resp:
                try:
                    return resp, await resp.read(self.max_body)
                except UpstreamError as exc:  # the same kind (a timeout stays a 504), said where
                    raise type(exc)(f"backend.session {method} {target}: {exc}") from None

        return _SessionResponse(ask)

    get = functools.partialmethod(request, "GET")
    post = functools.partialmethod(request, "POST")
    put = functools.partialmethod(request, "PUT")
    delete = functools.partialmethod(request, "DELETE")


class web:  # lower-case: it stands for the module of `from aiohttp import web`
    """aiohttp.web's names that worker files use, over the core's."""

    Request = Request
    Response = _AioResponse
    StreamResponse = _AioStreamResponse
    RouteDef = Route
    json_response = staticmethod(_aio_json_response)
    post = staticmethod(post)
    get = staticmethod(get)


def start_server(backend: Backend, routes: Iterable[Route]) -> None:
    """The 2024 library's name for run(backend, routes): serve until SIGTERM."""
    run(backend, routes)


# Compatibility: today's vastai workers ###########################################################
# A worker file written for the platform's library (vastai 1.9.1, `from vastai import Worker,
# WorkerConfig, HandlerConfig, BenchmarkConfig, LogActionConfig`) runs on pyworker with that one
# import changed. The configuration classes have vastai's fields and defaults; Worker turns them
# into the core's Backend, handlers and routes, and runs serve(). Nothing here reads the
# environment before run() (such files set variables after their imports).

DEFAULT_WORKLOAD = 100.0  # vastai's: a route without a usable workload_calculator counts this


@dataclasses.dataclass
class LogActionConfig:
    """The model-log lines that mean loaded, errored, or worth echoing (substrings)."""

    on_load: list[str] = dataclasses.field(default_factory=list[str])
    on_error: list[str] = dataclasses.field(default_factory=list[str])
    on_info: list[str] = dataclasses.field(default_factory=list[str])

    @property
    def log_actions(self) -> list[tuple[LogAction, str]]:
        return [
            *((LogAction.ModelLoaded, text) for text in self.on_load),
            *((LogAction.ModelError, text) for text in self.on_error),
            *((LogAction.Info, text) for text in self.on_info),
        ]


@dataclasses.dataclass
class BenchmarkConfig:
    """The benchmark's payloads (a dataset to pick from, or a generator of them), its rounds,
    and the requests per round when the route allows parallel requests (else 1)."""

    dataset: list[dict[str, Any]] | None = None
    generator: Callable[[], dict[str, Any]] | None = None
    runs: int = 8
    concurrency: int | None = 10
    do_warmup: bool = True


@dataclasses.dataclass
class HandlerConfig:
    """One route, forwarded to the same path on the model server. Without a payload_class the
    payload is the client's JSON object (request_parser's result, if given), its workload
    workload_calculator's; without a response_generator the model's answer is relayed as it is.
    remote_function and is_remote_dispatch (the platform's "deployments") are not supported."""

    route: str
    healthcheck: str | None = None
    allow_parallel_requests: bool = False
    max_queue_time: float | None = 30.0  # None: no limit
    benchmark_config: BenchmarkConfig | None = None
    handler_class: type[EndpointHandler[Any]] | None = None
    payload_class: type[ApiPayload] | None = None
    request_parser: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    response_generator: Callable[[Request, ClientResponse], Awaitable[Any]] | None = None
    workload_calculator: Callable[[dict[str, Any]], float] | None = None
    is_remote_dispatch: bool = False
    remote_function: Callable[..., Any] | None = None


@dataclasses.dataclass
class WorkerConfig:
    """The worker: the model server (MODEL_SERVER_URL and MODEL_LOG override the file's
    values), its routes, log lines, sessions, and an optional lifecycle: an async context
    manager entered in the background once the worker serves, exited when it stops (see
    _ContextBackend); the model counts as loaded once it is entered, and a model log is
    still read for its errors. A handler's `healthcheck` is the model's health route when
    model_healthcheck_url is not given. benchmark_data and benchmark_route are accepted and
    unused, as in vastai 1.9.1: a route's BenchmarkConfig says what the benchmark sends."""

    model_server_url: str | None = None
    model_server_port: int | None = None
    model_log_file: str | None = None
    benchmark_data: list[dict[str, Any]] = dataclasses.field(default_factory=list[dict[str, Any]])
    handlers: list[HandlerConfig] = dataclasses.field(default_factory=list[HandlerConfig])
    model_healthcheck_url: str | None = None
    benchmark_route: str | None = None
    log_action_config: LogActionConfig = dataclasses.field(default_factory=LogActionConfig)
    max_sessions: int | None = 10  # None: no limit
    lifecycle: contextlib.AbstractAsyncContextManager[Any] | None = None


class _ConfigPayload(ApiPayload):
    """A route's payload without a payload_class: the client's JSON object, passed through
    request_parser, sent to the model as it is. Each route has its own subclass (settings)."""

    settings: ClassVar[HandlerConfig]
    warned: ClassVar[bool] = False  # a bad workload_calculator is logged once per route

    def __init__(self, data: dict[str, Any]) -> None:
        self.input = data

    @classmethod
    def for_test(cls) -> Self:
        bench = cls.settings.benchmark_config
        if bench is not None and bench.dataset:
            return cls(dict(random.choice(bench.dataset)))
        if bench is not None and bench.generator is not None:
            return cls(dict(bench.generator()))
        raise TypeError(f"route {cls.settings.route}: no BenchmarkConfig to make payloads from")

    @classmethod
    def from_json_msg(cls, json_msg: dict[str, Any]) -> Self:
        parse = cls.settings.request_parser
        if parse is not None:
            try:
                json_msg = parse(json_msg)
            except JsonDataException:
                raise
            except Exception as exc:  # the author's parser on the client's data: a bad payload
                # (or the parser's bug: the operator's log says which, once; the exception's
                # text may carry the client's data, so the client is not told it)
                why = {"payload": {"request_parser": "could not read this payload"}}
                raise PayloadUnreadable(exc, "request_parser", why) from None
            if not isinstance(json_msg, dict):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise JsonDataException({"request_parser": "did not return a JSON object"})
        return cls(json_msg)

    def generate_payload_json(self) -> dict[str, Any]:
        return self.input

    def count_workload(self) -> float:
        calculate = self.settings.workload_calculator
        if calculate is None:
            return DEFAULT_WORKLOAD
        try:
            workload = float(calculate(self.input))
        except Exception as exc:
            return self._fallback(f"raised {type(exc).__name__}: {exc}")
        if not math.isfinite(workload) or workload < 0:
            return self._fallback(f"returned {workload!r}")
        return workload

    def _fallback(self, what: str) -> float:
        cls = type(self)
        if not cls.warned:  # the first time only: a calculator that fails, fails every time
            cls.warned = True
            log.warning(
                "workload_calculator of %s %s: counting %s (said once per route)",
                self.settings.route,
                what,
                DEFAULT_WORKLOAD,
            )
        return DEFAULT_WORKLOAD


class _ConfigHandler(EndpointHandler[Any]):
    """A HandlerConfig's route: the model's path is the route, its settings the handler's."""

    def __init__(self, settings: HandlerConfig) -> None:
        self.endpoint = settings.route
        self.settings = settings
        self.allow_parallel_requests = settings.allow_parallel_requests
        self.max_queue_time = (
            math.inf if settings.max_queue_time is None else settings.max_queue_time
        )
        bench = settings.benchmark_config
        if bench is not None:  # as vastai: `concurrency` at once only on a parallel route
            self.benchmark_runs = bench.runs
            self.concurrency = (bench.concurrency or 10) if self.allow_parallel_requests else 1
            self.do_warmup_benchmark = bench.do_warmup

    async def generate_client_response(
        self, client_request: Request, model_response: ClientResponse
    ) -> Response:
        generate = self.settings.response_generator
        if generate is None:
            return await relay(model_response)
        return await generate(client_request, model_response)


LIFECYCLE_CANCEL_TIMEOUT = 5.0  # seconds an __aenter__ still running at the stop gets to end


class _ContextBackend(Backend):
    """The Backend of a WorkerConfig, with its lifecycle context (if any) around the model:
    entered in the background once the worker listens (it answers /ping and reports
    "loading" meanwhile, for as long as the model takes to start); the model counts as
    loaded when __aenter__ returns; an __aenter__ that raises marks the worker errored (503
    with the reason, reported), and the worker stays up. __aexit__(None, None, None) runs
    once, at the stop, after the requests in flight and the sessions are done; an
    __aenter__ still running then is cancelled first (LIFECYCLE_CANCEL_TIMEOUT), and
    __aexit__ runs all the same, to undo what it began. Not after an __aenter__ that
    raised: that context was never entered (as `async with` has it)."""

    context: contextlib.AbstractAsyncContextManager[Any] | None = None
    _entering: asyncio.Task[bool] | None = None  # True once entered, False when it raised

    async def start(self, config: Config) -> None:
        self.readiness.told = self.context is not None
        await super().start(config)
        if self.context is not None:
            self._entering = asyncio.get_running_loop().create_task(self._enter(self.context))

    async def _enter(self, context: contextlib.AbstractAsyncContextManager[Any]) -> bool:
        try:
            await context.__aenter__()
        except Exception as exc:
            self.lifecycle.errored(f"the lifecycle context failed: {exc!r}")
            return False
        self.model_loaded("the lifecycle context was entered")
        return True

    async def stop(self) -> None:
        entering, context = self._entering, self.context
        self._entering = self.context = None  # once
        if entering is not None and not entering.done():
            log.info("stopping: the lifecycle context is still being entered; cancelled")
            entering.cancel()
            await asyncio.wait({entering}, timeout=LIFECYCLE_CANCEL_TIMEOUT)
            if not entering.done():
                log.error("the lifecycle's __aenter__ did not stop when cancelled")
        await super().stop()
        if context is None or entering is None:
            return
        if entering.done() and not entering.cancelled() and not entering.result():
            return  # __aenter__ raised: nothing to exit
        try:
            await context.__aexit__(None, None, None)
        except Exception:
            log.exception("the lifecycle's __aexit__ failed")


class Worker:
    """A worker file's WorkerConfig, served: Worker(config).run(), or awaited in a running
    event loop with `await Worker(config).run_async()`. The backend and routes are made here;
    a mistake in the configuration stops the worker when it runs, with one line."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.error: str | None = None  # what stops the worker at run(), if anything
        self.backend: Backend | None = None
        self.routes: list[Route] = []
        try:
            self.backend, self.routes = self._build(config)
        except (TypeError, ValueError) as exc:
            self.error = str(exc)

    @staticmethod
    def _handler(settings: HandlerConfig) -> EndpointHandler[Any]:
        if settings.remote_function is not None or settings.is_remote_dispatch:
            raise ValueError(
                f"route {settings.route}: remote_function / is_remote_dispatch (the platform's "
                "deployments) are not supported by pyworker"
            )
        if not settings.route.startswith("/"):
            raise ValueError(f'route {settings.route!r}: expected a path such as "/generate"')
        if settings.handler_class is not None:
            return settings.handler_class()
        payload = settings.payload_class
        if payload is None:
            attributes = {"settings": settings, "__module__": "__main__"}
            payload = typing.cast(type[ApiPayload], type("Payload", (_ConfigPayload,), attributes))
        attributes = {"payload_class": payload, "__module__": "__main__"}
        handler_cls = type(f"Handler{settings.route}", (_ConfigHandler,), attributes)
        return typing.cast(_ConfigHandler, handler_cls(settings))

    @classmethod
    def _build(cls, config: WorkerConfig) -> tuple[Backend, list[Route]]:
        # No handlers: vastai's default, one route "/" (which still needs a benchmark).
        settings = config.handlers or [HandlerConfig("/", healthcheck=config.model_healthcheck_url)]
        handlers = [cls._handler(s) for s in settings]
        routes = [s.route for s in settings]
        if len(set(routes)) < len(routes):
            raise ValueError(f"two handlers for one route: {routes}")
        benchmarked = [
            (s, h)
            for s, h in zip(settings, handlers)
            if s.benchmark_config is not None
            or (s.handler_class is not None and getattr(h, "has_benchmark", True))
        ]
        if len(benchmarked) != 1:
            found = ", ".join(s.route for s, _ in benchmarked) or "none"
            raise ValueError(f"exactly one HandlerConfig needs a benchmark_config (found: {found})")
        bench_settings, bench_handler = benchmarked[0]
        bench = bench_settings.benchmark_config
        if bench is not None and not bench.dataset and bench.generator is None:
            raise ValueError(
                f"route {bench_settings.route}: BenchmarkConfig has no dataset or generator"
            )
        url = config.model_server_url or "http://127.0.0.1"
        if config.model_server_port is not None:
            url = f"{url}:{config.model_server_port}"
        health = config.model_healthcheck_url or next(
            (s.healthcheck for s in settings if s.healthcheck), None
        )
        backend = _ContextBackend(
            model_server_url=url,
            model_log_file=config.model_log_file,
            allow_parallel_requests=False,  # vastai's handlers' default
            benchmark_handler=bench_handler,
            log_actions=config.log_action_config.log_actions,
            healthcheck_endpoint=health,
            benchmark_runs=bench.runs if bench is not None else None,
            max_sessions=config.max_sessions or 0,
        )
        backend.context = config.lifecycle
        return backend, [
            post(s.route, backend.create_handler(h)) for s, h in zip(settings, handlers)
        ]

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (the environment is read now): the core's run()."""
        _run(self._serve)

    async def run_async(self) -> None:
        """run() in the running event loop."""
        await self._serve(*await _configure_in_loop())

    async def _serve(self, config: Config, log_handler: _LogHandler) -> None:
        if self.error is not None:  # a mistake in the configuration: one line, and exit 1
            await report_failed_start(_start_failed(self.error), self.error)
            raise SystemExit(1)
        backend = self.backend
        assert backend is not None
        if self.config.benchmark_data or self.config.benchmark_route:
            log.warning(
                "WorkerConfig.benchmark_data / benchmark_route are not used (as in vastai "
                "1.9.1): the route's BenchmarkConfig says what the benchmark sends"
            )
        await serve(backend, self.routes, config, log_handler)


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        sys.stdout.write(
            "pyworker.py is the library a worker file imports; run a worker file instead,\n"
            "such as hello_world.py (the example; copy it to write yours).\n\n"
            + usage("hello_world.py")
        )
        sys.exit(0)
    sys.stderr.write("pyworker.py: run a worker file, such as hello_world.py; --help says more\n")
    sys.exit(2)
