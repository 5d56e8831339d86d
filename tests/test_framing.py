"""Sans-IO tests of pyworker's HTTP framing: bytes in, values (or one HttpError) out.

Byte-level cases go through an in-memory asyncio.StreamReader three ways: fed whole, fed one
byte at a time while the reader waits, and followed by trailing bytes that must stay unread
(for a request: the next pipelined request, which must still parse).

The MALFORMED table is shared with tests/test_http_server.py, which replays it over sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from support import Runner

import pyworker
from pyworker import HttpError

T = TypeVar("T")

# The body limit the malformed table assumes; test_http_server starts its server with it.
SMALL_MAX_BODY = 1024
# A whole second request: what "trailing bytes" are for a request (pipelining).
NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: next\r\n\r\n"
FEED_MODES = ["whole", "bytewise", "trailing"]


async def _fed(
    data: bytes,
    consume: Callable[[asyncio.StreamReader], Awaitable[T]],
    mode: str,
    *,
    trailing: bytes = NEXT_REQUEST,
    limit: int = pyworker.MAX_HEAD,
) -> tuple[T, asyncio.StreamReader]:
    """Run `consume` on a reader fed `data` in `mode` and then EOF; return its result and the
    reader, whose unread rest the caller checks."""
    reader = asyncio.StreamReader(limit=limit)
    task = asyncio.ensure_future(consume(reader))
    if mode == "bytewise":
        # One byte at a time for small inputs; big inputs (limit tests) in small pieces.
        step = 1 if len(data) <= 4096 else 997
        for i in range(0, len(data), step):
            if task.done():
                break
            reader.feed_data(data[i : i + step])
            await asyncio.sleep(0)
        reader.feed_eof()
    elif mode == "whole":
        reader.feed_data(data)
        reader.feed_eof()
    else:
        reader.feed_data(data + trailing)
        reader.feed_eof()
    return await asyncio.wait_for(task, 5), reader


run = Runner(timeout=10.0)


@dataclasses.dataclass
class ParsedRequest:
    request: pyworker.Request
    body: bytes


async def read_request(
    reader: asyncio.StreamReader, max_body: int = SMALL_MAX_BODY
) -> ParsedRequest:
    """One request the way the server frames it, from the public framing functions."""
    head = await pyworker.read_head(reader, first_line_limit=pyworker.MAX_REQUEST_LINE)
    request = pyworker.parse_request_head(head)
    if request.framing.kind == "chunked":
        parts = [d async for d in pyworker.read_chunked(reader, max_size=max_body)]
        body = b"".join(parts)
    else:
        body = await reader.readexactly(request.framing.length)
    return ParsedRequest(request, body)


# Valid requests ##################################################################################


@dataclasses.dataclass
class Valid:
    id: str
    raw: bytes
    method: str = "GET"
    target: str = "/"
    version: str = "HTTP/1.1"
    body: bytes = b""
    keep_alive: bool = True
    expect_continue: bool = False
    headers: dict[str, str] = dataclasses.field(default_factory=dict[str, str])


MANY_FIELDS = b"".join(b"X-F%d: %d\r\n" % (i, i) for i in range(pyworker.MAX_HEADERS - 1))
LONGEST_TARGET = b"/" + b"a" * (pyworker.MAX_REQUEST_LINE - len(b"GET / HTTP/1.1"))

VALID = [
    Valid("get", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", headers={"host": "x"}),
    Valid(
        "post_content_length",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        method="POST",
        target="/generate",
        body=b"hello",
    ),
    Valid(
        "post_chunked_ext_trailers",
        b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6 ; a=b\r\n world\r\nA\r\n0123456789\r\n"
        b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n",
        method="POST",
        target="/s",
        body=b"hello world0123456789",
    ),
    Valid(
        "chunked_uppercase_leading_zeros",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
        b"0000000000000003\r\nabc\r\n0B\r\n0123456789a\r\n0000000000000000\r\n\r\n",
        method="POST",
        body=b"abc0123456789a",
    ),
    Valid("http10_no_host_closes", b"GET / HTTP/1.0\r\n\r\n", version="HTTP/1.0", keep_alive=False),
    Valid(
        "http10_keep_alive",
        b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        version="HTTP/1.0",
    ),
    Valid(
        "http11_connection_close",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n",
        keep_alive=False,
    ),
    Valid(
        "expect_100_continue",
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\nhi",
        method="POST",
        body=b"hi",
        expect_continue=True,
    ),
    Valid(
        "expect_ignored_on_http10",
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        method="POST",
        version="HTTP/1.0",
        body=b"hi",
        keep_alive=False,
    ),
    Valid(
        "duplicate_equal_content_length",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\nContent-Length: 003\r\n\r\nabc",
        method="POST",
        body=b"abc",
    ),
    Valid(
        "ows_htab_obs_text",
        b"GET / HTTP/1.1\r\nHost:x\r\nX-A: \t a\tb \t\r\nX-B: caf\xe9\r\nX-Empty:\r\n\r\n",
        headers={"x-a": "a\tb", "x-b": "caf\xe9", "x-empty": "", "host": "x"},
    ),
    Valid(
        "query_and_token_method",
        b"M-SEARCH /a/b?c=d&e=%20 HTTP/1.1\r\nHost: x\r\n\r\n",
        method="M-SEARCH",
        target="/a/b?c=d&e=%20",
    ),
    Valid(
        "max_header_fields",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + MANY_FIELDS + b"\r\n",
        headers={"x-f98": "98"},
    ),
    Valid(
        "longest_request_line",
        b"GET " + LONGEST_TARGET + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        target=LONGEST_TARGET.decode(),
    ),
]


@pytest.mark.parametrize("mode", FEED_MODES)
@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_valid_request(case: Valid, mode: str) -> None:
    async def main() -> None:
        parsed, reader = await _fed(case.raw, read_request, mode)
        req = parsed.request
        assert (req.method, req.target, req.version) == (case.method, case.target, case.version)
        assert parsed.body == case.body
        assert req.keep_alive is case.keep_alive
        assert req.expect_continue is case.expect_continue
        for name, value in case.headers.items():
            assert req.headers.get(name) == value
        if mode == "trailing":
            # The next pipelined request starts exactly where this one ended.
            nxt = await read_request(reader)
            assert nxt.request.target == "/next"
        assert await reader.read() == b""

    run(main())


def test_request_path_strips_query() -> None:
    req = pyworker.parse_request_head(b"GET /generate?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert req.path == "/generate"
    assert list(req.headers.values("host")) == ["a"]
    assert "host" in req.headers and len(req.headers) == 1


# Malformed requests ##############################################################################


@dataclasses.dataclass
class Bad:
    id: str
    raw: bytes
    status: int
    # "framing": the public framing functions reject it; "server": only HttpServer does
    # (a policy such as its max_body on Content-Length, checked before reading the body).
    layer: str = "framing"


def _post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST / " + version + b"\r\nHost: x\r\n" + headers + b"\r\n" + body


def _chunked(body: bytes) -> bytes:
    return _post(b"Transfer-Encoding: chunked\r\n", body)


def _get_with(line: bytes) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n"


TOO_MANY_FIELDS = b"".join(b"X-F%d: %d\r\n" % (i, i) for i in range(pyworker.MAX_HEADERS))
HUGE_HEADER = b"X-Big: " + b"b" * (pyworker.MAX_HEAD + 100) + b"\r\n"

MALFORMED = [
    # Request smuggling (RFC 9112 6.1, 6.3): ambiguous or unsupported body framing.
    Bad(
        "cl_then_te",
        _post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
    ),
    Bad(
        "te_then_cl",
        _post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        400,
    ),
    Bad(
        "cl_duplicates_differ", _post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400
    ),
    Bad("cl_list_differs", _post(b"Content-Length: 5, 6\r\n", b"hello!"), 400),
    Bad("te_gzip", _post(b"Transfer-Encoding: gzip\r\n"), 501),
    Bad("te_gzip_then_chunked", _post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501),
    Bad("te_chunked_then_gzip", _post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"), 400),
    Bad(
        "te_chunked_not_last_two_fields",
        _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n"),
        400,
    ),
    Bad(
        "te_in_http10",
        _post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", version=b"HTTP/1.0"),
        400,
    ),
    # Chunk grammar: 1-16 hex digits exactly (not http.client's int(line, 16)).
    Bad("chunk_size_0x", _chunked(b"0x1a\r\n" + b"a" * 26 + b"\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_plus", _chunked(b"+1a\r\n" + b"a" * 26 + b"\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_underscore", _chunked(b"1_a\r\n" + b"a" * 26 + b"\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_negative", _chunked(b"-1\r\na\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_leading_space", _chunked(b" 1a\r\n" + b"a" * 26 + b"\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_17_digits", _chunked(b"00000000000000001\r\na\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_empty", _chunked(b"\r\na\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_not_hex", _chunked(b"g\r\na\r\n0\r\n\r\n"), 400),
    Bad("chunk_size_bare_lf", _chunked(b"1\na\r\n0\r\n\r\n"), 400),
    Bad("chunk_data_without_crlf", _chunked(b"3\r\nabcX\r\n0\r\n\r\n"), 400),
    Bad("chunk_data_bare_lf", _chunked(b"3\r\nabc\n0\r\n\r\n"), 400),
    Bad("chunk_ext_control_byte", _chunked(b"3;a=\x01\r\nabc\r\n0\r\n\r\n"), 400),
    Bad("chunk_trailer_no_colon", _chunked(b"3\r\nabc\r\n0\r\nnot a field\r\n\r\n"), 400),
    Bad("chunked_body_over_max", _chunked(b"401\r\n" + b"a" * 1025 + b"\r\n0\r\n\r\n"), 413),
    # Line ends and bytes in the head (RFC 9112 2.2, 5.1, 5.2; RFC 9110 5.5).
    Bad("bare_lf_line_end", b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
    Bad("bare_lf_header_end", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    Bad("bare_cr", b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400),
    Bad("obs_fold", _get_with(b"X-A: one\r\n two"), 400),
    Bad("nul_in_value", _get_with(b"X-A: a\x00b"), 400),
    Bad("control_in_value", _get_with(b"X-A: a\x1bb"), 400),
    Bad("del_in_value", _get_with(b"X-A: a\x7fb"), 400),
    Bad("control_in_name", _get_with(b"X-\x01A: b"), 400),
    Bad("nul_in_name", _get_with(b"X\x00: b"), 400),
    Bad("space_before_colon", _get_with(b"X-A : b"), 400),
    Bad("space_in_name", _get_with(b"X A: b"), 400),
    Bad("empty_name", _get_with(b": b"), 400),
    Bad("field_without_colon", _get_with(b"X-A b"), 400),
    Bad("empty_request", b"\r\n\r\n", 400),
    # The request line (RFC 9112 3).
    Bad("bad_method_token", b"GE(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("empty_method", b" / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("two_spaces", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("tab_separated", b"GET\t/\tHTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("missing_version", b"GET /\r\nHost: x\r\n\r\n", 400),
    Bad("absolute_form_target", b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("asterisk_target", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("authority_form_target", b"CONNECT x:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("non_ascii_target", b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("http_2_0", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    Bad("http_1_2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    Bad("http_0_9", b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    Bad("version_lowercase", b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
    Bad("version_two_digits", b"GET / HTTP/1.10\r\nHost: x\r\n\r\n", 400),
    Bad("version_garbage", b"GET / FOO\r\nHost: x\r\n\r\n", 400),
    # Host, Expect (RFC 9112 3.2, RFC 9110 10.1.1).
    Bad("missing_host_http11", b"GET / HTTP/1.1\r\n\r\n", 400),
    Bad("two_hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    Bad("expect_other", _post(b"Expect: 200-ok\r\nContent-Length: 2\r\n", b"hi"), 417),
    # Limits.
    Bad(
        "request_line_too_long",
        b"GET /" + b"a" * pyworker.MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
    ),
    Bad(
        "request_line_past_max_head",
        b"GET /" + b"a" * (pyworker.MAX_HEAD + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
    ),
    Bad("header_block_too_large", b"GET / HTTP/1.1\r\nHost: x\r\n" + HUGE_HEADER + b"\r\n", 431),
    Bad("too_many_fields", b"GET / HTTP/1.1\r\nHost: x\r\n" + TOO_MANY_FIELDS + b"\r\n", 431),
    Bad(
        "too_many_trailers",
        _chunked(b"0\r\n" + b"X-T: 1\r\n" * (pyworker.MAX_TRAILERS + 1) + b"\r\n"),
        431,
    ),
    Bad(
        "content_length_over_max",
        _post(b"Content-Length: %d\r\n" % (SMALL_MAX_BODY + 1)),
        413,
        "server",
    ),
    # Content-Length is 1*DIGIT (RFC 9110 8.6).
    Bad("cl_not_digits", _post(b"Content-Length: 5a\r\n", b"hello"), 400),
    Bad("cl_negative", _post(b"Content-Length: -5\r\n", b"hello"), 400),
    Bad("cl_plus", _post(b"Content-Length: +5\r\n", b"hello"), 400),
    Bad("cl_hex", _post(b"Content-Length: 0x5\r\n", b"hello"), 400),
    Bad("cl_empty", _post(b"Content-Length: \r\n", b"hello"), 400),
    Bad("cl_20_digits", _post(b"Content-Length: 10000000000000000000\r\n"), 400),
    Bad("cl_empty_list_item", _post(b"Content-Length: 5,\r\n", b"hello"), 400),
]
assert len(MALFORMED) >= 30
FRAMING_MALFORMED = [c for c in MALFORMED if c.layer == "framing"]


@pytest.mark.parametrize("mode", FEED_MODES)
@pytest.mark.parametrize("case", FRAMING_MALFORMED, ids=[c.id for c in FRAMING_MALFORMED])
def test_malformed_request(case: Bad, mode: str) -> None:
    async def main() -> None:
        with pytest.raises(HttpError) as info:
            await _fed(case.raw, read_request, mode)
        assert info.value.status == case.status, info.value.message

    run(main())


def test_content_length_over_max_is_framing_valid() -> None:
    # The framing layer reports the length; refusing it (413, before reading) is the server's.
    raw = next(c.raw for c in MALFORMED if c.id == "content_length_over_max")
    req = pyworker.parse_request_head(raw)
    assert req.framing == pyworker.BodyFraming("length", SMALL_MAX_BODY + 1)


def test_truncated_requests_raise_incomplete_read() -> None:
    """A peer that closes early is not a protocol error: IncompleteReadError, never a parse."""
    for raw in (
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel",
        _chunked(b"5\r\nhel"),
        _chunked(b"5\r\nhello\r\n"),
        _chunked(b"0\r\nX-T: 1\r\n"),
    ):
        for mode in ("whole", "bytewise"):
            with pytest.raises(asyncio.IncompleteReadError):
                run(_fed(raw, read_request, mode))


def test_fuzzed_requests_parse_or_raise_http_error() -> None:
    """h11's fuzz rule: any input parses or raises the one protocol error, nothing else."""
    rng = random.Random(20240601)
    seeds = [c.raw for c in VALID if len(c.raw) < 2000] + [
        c.raw for c in MALFORMED if len(c.raw) < 2000
    ]
    alphabet = b"\r\n :;,\t\x00\x7f\x80-0aAfF/HTTP1."

    async def main() -> None:
        for _ in range(1500):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data) + 1)
                op = rng.randrange(3)
                if op == 0:
                    data[pos:pos] = bytes([rng.choice(alphabet)])
                elif op == 1 and pos < len(data):
                    del data[pos]
                elif pos < len(data):
                    data[pos] = rng.choice(alphabet)
            try:
                await _fed(bytes(data), read_request, "whole")
            except (HttpError, asyncio.IncompleteReadError):
                pass

    run(main())


# read_head on its own ############################################################################


@pytest.mark.parametrize("mode", FEED_MODES)
def test_read_head_leaves_the_rest(mode: str) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    async def consume(reader: asyncio.StreamReader) -> bytes:
        return await pyworker.read_head(reader, first_line_limit=64)

    async def main() -> None:
        got, reader = await _fed(head, consume, mode, trailing=b"BODY\r\n\r\nmore")
        assert got == head
        assert await reader.read() == (b"BODY\r\n\r\nmore" if mode == "trailing" else b"")

    run(main())


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n", 414),  # no line end within the limit
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 300 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 60 + b"\r\n", 431),
    ],
    ids=["long_line", "long_field", "many_fields"],
)
def test_read_head_limits(data: bytes, status: int) -> None:
    async def consume(reader: asyncio.StreamReader) -> bytes:
        return await pyworker.read_head(reader, first_line_limit=100)

    async def main() -> None:
        for mode in ("whole", "bytewise"):
            with pytest.raises(HttpError) as info:
                await _fed(data, consume, mode, limit=256)
            assert info.value.status == status

    run(main())


# Chunk sizes #####################################################################################


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"0\r\n", 0),
        (b"1a\r\n", 26),
        (b"1A\r\n", 26),
        (b"001a\r\n", 26),
        (b"ffffffffffffffff\r\n", 2**64 - 1),
        (b"5;ext\r\n", 5),
        (b'5;a=b;c="d e"\r\n', 5),
        (b"5 ;a=b\r\n", 5),
        (b"5\t;a\r\n", 5),
    ],
)
def test_parse_chunk_size(line: bytes, size: int) -> None:
    assert pyworker.parse_chunk_size(line) == size


@pytest.mark.parametrize(
    "line",
    [
        b"0x1a\r\n",
        b"+1a\r\n",
        b"1_a\r\n",
        b"-1\r\n",
        b" 1a\r\n",
        b"\t1a\r\n",
        b"1" * 17 + b"\r\n",
        b"\r\n",
        b";ext\r\n",
        b"1a",
        b"1a\n",
        b"1a\r",
        b"1 a\r\n",
        b"g\r\n",
        b"1a;\x00\r\n",
        b"1a;a\rb\r\n",
        b"\xef\xbc\x91\r\n",  # a fullwidth digit: int() would take it, the grammar does not
        b"\xd9\xa1\r\n",  # Arabic-Indic one
    ],
)
def test_parse_chunk_size_rejects(line: bytes) -> None:
    with pytest.raises(HttpError) as info:
        pyworker.parse_chunk_size(line)
    assert info.value.status == 400


CHUNKED_BODIES = [
    (b"0\r\n\r\n", [b""]),
    (b"3\r\nabc\r\n0\r\n\r\n", [b"abc"]),
    (b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", [b"abc", b"de"]),
    (b"3;x=y\r\nabc\r\n0;z\r\nTrailer: 1\r\n\r\n", [b"abc"]),
    (b"a\r\n" + b"\r\n" * 5 + b"\r\n0\r\n\r\n", [b"\r\n" * 5]),  # CRLFs as data
]


@pytest.mark.parametrize("mode", FEED_MODES)
@pytest.mark.parametrize(
    ("raw", "chunks"), CHUNKED_BODIES, ids=["empty", "one", "two", "ext", "crlf"]
)
def test_read_chunked(raw: bytes, chunks: list[bytes], mode: str) -> None:
    async def consume(reader: asyncio.StreamReader) -> list[bytes]:
        return [d async for d in pyworker.read_chunked(reader, max_size=None)]

    async def main() -> None:
        got, reader = await _fed(raw, consume, mode, trailing=b"HTTP/1.1 200 OK\r\n")
        assert b"".join(got) == b"".join(chunks)
        if mode == "whole":
            assert got == [c for c in chunks if c]  # one piece per chunk, no empty pieces
        rest = await reader.read()
        assert rest == (b"HTTP/1.1 200 OK\r\n" if mode == "trailing" else b"")

    run(main())


def test_read_chunked_yields_each_chunk_as_it_arrives() -> None:
    """A slow stream is relayed chunk by chunk, not buffered to its end."""

    async def main() -> None:
        reader = asyncio.StreamReader()
        chunks = pyworker.read_chunked(reader, max_size=None)
        reader.feed_data(b"5\r\nfirst\r\n")
        assert await asyncio.wait_for(chunks.__anext__(), 1) == b"first"
        reader.feed_data(b"6\r\nsecond\r\n")
        assert await asyncio.wait_for(chunks.__anext__(), 1) == b"second"
        reader.feed_data(b"0\r\n\r\n")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(chunks.__anext__(), 1)

    run(main())


def test_read_chunked_splits_big_chunks_into_pieces() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"a\r\n0123456789\r\n0\r\n\r\n")
        reader.feed_eof()
        got = [d async for d in pyworker.read_chunked(reader, max_size=None, piece=4)]
        assert got == [b"0123", b"4567", b"89"]

    run(main())


def test_read_chunked_checks_max_size_before_reading() -> None:
    """413 comes from the size line alone: the data of an oversized chunk is never awaited."""

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"4\r\nabcd\r\nffffffff\r\n")  # no data follows, nor EOF
        with pytest.raises(HttpError) as info:
            await asyncio.wait_for(_collect(pyworker.read_chunked(reader, max_size=100)), 1)
        assert info.value.status == 413

    run(main())


async def _collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [d async for d in chunks]


# ChunkedDecoder: the same grammar, sans-IO, as the client's relay uses it.

BAD_CHUNKED = [
    b"0x3\r\nabc\r\n0\r\n\r\n",
    b"+3\r\nabc\r\n0\r\n\r\n",
    b"-1\r\n",
    b"1_0\r\n",
    b"3\r\nabcX\r\n0\r\n\r\n",  # data not followed by CRLF
    b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
    b"1" * 17 + b"\r\n",  # more than 16 hex digits
    b"\r\n",  # no size at all
    b"0\r\nBad Trailer: x\r\n\r\n",
    b"3\r\nabc\r\n0\r\n" + b"T: 1\r\n" * 101 + b"\r\n",
    b"1" * (pyworker.MAX_CHUNK_LINE + 10),  # a size line that never ends
]


def _decode(raw: bytes, step: int) -> tuple[list[bytes], pyworker.ChunkedDecoder]:
    decoder = pyworker.ChunkedDecoder()
    out: list[bytes] = []
    for i in range(0, len(raw), step):
        out += decoder.feed(raw[i : i + step])
    out += decoder.feed(b"")  # raises an error kept back behind good data
    return out, decoder


@pytest.mark.parametrize("step", [1, 2, 7, 1 << 20])
@pytest.mark.parametrize(("raw", "chunks"), CHUNKED_BODIES)
def test_chunked_decoder(raw: bytes, chunks: list[bytes], step: int) -> None:
    got, decoder = _decode(raw + b"NEXT", step)
    assert b"".join(got) == b"".join(chunks)
    assert decoder.done
    assert decoder.trailing == b"NEXT"
    assert all(got), "no empty pieces"


def test_chunked_decoder_keeps_bytes_after_the_end() -> None:
    got, decoder = _decode(b"3\r\nabc\r\n0\r\n\r\nextra", 1 << 20)
    assert got == [b"abc"] and decoder.done and decoder.trailing == b"extra"


def test_chunked_decoder_coalesces_nothing_it_has_not_seen() -> None:
    """Data is handed out as soon as it is fed: a relay never waits for a chunk's end."""
    decoder = pyworker.ChunkedDecoder()
    assert decoder.feed(b"a\r\n01234") == [b"01234"]
    assert decoder.feed(b"56789\r\n3\r\nabc") == [b"56789", b"abc"]
    assert not decoder.done


@pytest.mark.parametrize("step", [1, 5, 1 << 20])
@pytest.mark.parametrize("raw", BAD_CHUNKED)
def test_chunked_decoder_rejects(raw: bytes, step: int) -> None:
    with pytest.raises(HttpError) as info:
        _decode(raw, step)
    assert info.value.status in (400, 431)


def test_chunked_decoder_max_size() -> None:
    decoder = pyworker.ChunkedDecoder(max_size=5)
    assert decoder.feed(b"3\r\nabc\r\n3\r\n") == [b"abc"]  # the good data first
    assert decoder.error is not None and decoder.error.status == 413
    with pytest.raises(HttpError) as info:
        decoder.feed(b"def\r\n")
    assert info.value.status == 413


# Responses (the client's side) ###################################################################


@dataclasses.dataclass
class ValidResponse:
    id: str
    raw: bytes
    status: int
    framing: pyworker.BodyFraming
    keep_alive: bool
    reason: str = "OK"
    method: str = "POST"


VALID_RESPONSES = [
    ValidResponse(
        "content_length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: application/json\r\n\r\n",
        200,
        pyworker.BodyFraming("length", 12),
        True,
    ),
    ValidResponse(
        "chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        200,
        pyworker.BodyFraming("chunked"),
        True,
    ),
    ValidResponse(
        "close_delimited",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        200,
        pyworker.BodyFraming("close"),
        False,
    ),
    ValidResponse(
        "other_coding_is_close_delimited",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        200,
        pyworker.BodyFraming("close"),
        False,
    ),
    ValidResponse(
        "connection_close",
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        500,
        pyworker.BodyFraming("length", 0),
        False,
        reason="Internal Server Error",
    ),
    ValidResponse(
        "http10_closes",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
        200,
        pyworker.BodyFraming("length", 2),
        False,
    ),
    ValidResponse(
        "http10_keep_alive",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
        200,
        pyworker.BodyFraming("length", 2),
        True,
    ),
    ValidResponse(
        "no_reason",
        b"HTTP/1.1 204\r\n\r\n",
        204,
        pyworker.BodyFraming("length", 0),
        True,
        reason="",
    ),
    ValidResponse(
        "head_has_no_body",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        200,
        pyworker.BodyFraming("length", 0),
        True,
        method="HEAD",
    ),
    ValidResponse(
        "not_modified_has_no_body",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
        304,
        pyworker.BodyFraming("length", 0),
        True,
        reason="Not Modified",
    ),
    ValidResponse(
        "continue",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        100,
        pyworker.BodyFraming("length", 0),
        True,
        reason="Continue",
    ),
]


@pytest.mark.parametrize("mode", FEED_MODES)
@pytest.mark.parametrize("case", VALID_RESPONSES, ids=[c.id for c in VALID_RESPONSES])
def test_parse_response_head(case: ValidResponse, mode: str) -> None:
    async def consume(reader: asyncio.StreamReader) -> pyworker.ClientResponseHead:
        head = await pyworker.read_head(reader, first_line_limit=pyworker.MAX_HEAD)
        return pyworker.parse_response_head(head, request_method=case.method)

    async def main() -> None:
        got, reader = await _fed(case.raw, consume, mode, trailing=b"body")
        assert (got.status, got.reason) == (case.status, case.reason)
        assert got.framing == case.framing
        assert got.keep_alive is case.keep_alive
        assert await reader.read() == (b"body" if mode == "trailing" else b"")

    run(main())


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 99 Low\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
def test_parse_response_head_rejects(raw: bytes) -> None:
    with pytest.raises(HttpError):
        pyworker.parse_response_head(raw)


# Writers #########################################################################################


def test_response_head_content_length() -> None:
    head = pyworker.response_head(
        200, [("Content-Type", "application/json")], content_length=7, keep_alive=True
    )
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    assert b"Content-Type: application/json" in lines
    assert b"Content-Length: 7" in lines
    assert not any(line.lower().startswith(b"connection:") for line in lines)
    assert not any(line.lower().startswith(b"transfer-encoding:") for line in lines)
    assert any(line.startswith(b"Date: ") for line in lines)
    # What we write, we can read back.
    parsed = pyworker.parse_response_head(head)
    assert parsed.framing == pyworker.BodyFraming("length", 7)
    assert parsed.keep_alive


def test_response_head_chunked_close() -> None:
    head = pyworker.response_head(
        429, [("Retry-After", "3")], content_length=None, keep_alive=False
    )
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    lines = head[:-4].split(b"\r\n")
    assert b"Transfer-Encoding: chunked" in lines
    assert b"Connection: close" in lines
    assert b"Retry-After: 3" in lines
    assert not any(line.lower().startswith(b"content-length:") for line in lines)
    parsed = pyworker.parse_response_head(head)
    assert parsed.framing == pyworker.BodyFraming("chunked")
    assert not parsed.keep_alive


@pytest.mark.parametrize(
    "field", [("X-A", "a\r\nSet-Cookie: x"), ("X-A", "a\nb"), ("X-A", "a\rb"), ("X\r\nB", "c")]
)
def test_response_head_refuses_response_splitting(field: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        pyworker.response_head(200, [field], content_length=0, keep_alive=True)


def test_response_head_unknown_status_still_valid() -> None:
    head = pyworker.response_head(599, [], content_length=0, keep_alive=True)
    assert pyworker.parse_response_head(head).status == 599


@pytest.mark.parametrize(
    ("data", "encoded"),
    [
        (b"a", b"1\r\na\r\n"),
        (b"hello", b"5\r\nhello\r\n"),
        (b"x" * 26, b"1a\r\n" + b"x" * 26 + b"\r\n"),
        (b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n"),  # data that looks like framing
        (b"z" * 4096, b"1000\r\n" + b"z" * 4096 + b"\r\n"),
    ],
)
def test_encode_chunk(data: bytes, encoded: bytes) -> None:
    assert pyworker.encode_chunk(data) == encoded

    async def main() -> None:
        # Round trip through the reader.
        reader = asyncio.StreamReader()
        reader.feed_data(encoded + pyworker.LAST_CHUNK)
        reader.feed_eof()
        assert b"".join(await _collect(pyworker.read_chunked(reader, max_size=None))) == data

    run(main())


def test_encode_chunk_refuses_empty() -> None:
    # An empty chunk is the last chunk: writing one would end the body early.
    with pytest.raises(ValueError):
        pyworker.encode_chunk(b"")
    assert pyworker.LAST_CHUNK == b"0\r\n\r\n"
