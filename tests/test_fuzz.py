"""Seeded, bounded fuzzing of pyworker's HTTP framing (h11's rule: any input either parses or
raises the one protocol error, never anything else, never a hang).

Inputs are mutations of valid request heads, response heads, chunk-size lines and chunked
bodies (byte flips, inserted CR / LF / NUL / SP / HTAB / ':' / '0x', truncations, duplicated
slices, random header fields, huge numbers) plus purely random bytes. Parsers must return a
self-consistent result or raise pyworker.HttpError; stream readers may also raise
asyncio.IncompleteReadError (the peer closed early), nothing else. Each reader run is bounded
by asyncio.wait_for. A parsed head is re-serialised and parsed again: the fields must match.

PYWORKER_FUZZ_ITERATIONS (default 1500 per target) makes a run longer; PYWORKER_FUZZ_SEED picks
another seed (the failing seed and input are in each assertion message).
"""

from __future__ import annotations

import asyncio
import os
import random
import tracemalloc
from collections.abc import Callable, Sequence

import pytest

import pyworker
from pyworker import ClientResponseHead, HttpError, Request

ITERATIONS = int(os.environ.get("PYWORKER_FUZZ_ITERATIONS", "1500"))
SEED = int(os.environ.get("PYWORKER_FUZZ_SEED", "20240607"))
READ_BOUND = 2.0  # seconds one reader run may take on bytes already fed: far more than needed

# Seeds: valid inputs the mutations start from ####################################################

REQUEST_HEADS: list[bytes] = [
    b"POST /generate HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\n\r\n",
    b"POST /generate_stream HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n",
    b"GET /ping HTTP/1.0\r\n\r\n",
    b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAccept: */*\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: w\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    b"PUT /x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0005\r\nX-Empty:\r\n\r\n",
]

RESPONSE_HEADS: list[bytes] = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n",
    b"HTTP/1.0 500 Internal Server Error\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 302\r\nLocation: /x\r\nContent-Length: 0, 0\r\n\r\n",
]

CHUNK_LINES: list[bytes] = [
    b"0\r\n",
    b"1a\r\n",
    b"FFFF\r\n",
    b"10;name=value\r\n",
    b"3 ;ext\r\n",
    b"ffffffffffffffff\r\n",
]

CHUNKED_BODIES: list[bytes] = [
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"1\r\na\r\n2;x=y\r\nbc\r\n0\r\nTrailer: t\r\n\r\n",
    b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n",
    b"10\r\n" + b"z" * 16 + b"\r\n0\r\nA: 1\r\nB: 2\r\n\r\n",
]

# Mutations #######################################################################################

SPECIAL: list[bytes] = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"0x",
    b"+",
    b"-",
    b"_",
    b";",
    b",",
    b"\r\n ",  # obs-fold
    b"\xff",
    b"\x7f",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: -1\r\n",
    b"Host: dup\r\n",
]

HUGE_NUMBERS: list[bytes] = [
    b"9" * 19,
    b"9" * 20,
    b"9" * 400,
    b"f" * 16,
    b"f" * 17,
    b"1" + b"0" * 64,
    b"18446744073709551616",
    b"-0",
]

HEADER_NAME_ALPHABET = (
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _random_header(rng: random.Random) -> bytes:
    if rng.random() < 0.3:  # a framing header with an odd value
        name = rng.choice([b"Content-Length", b"Transfer-Encoding", b"Host", b"Connection"])
    else:
        length = rng.randint(0, 12)
        name = bytes(rng.choice(HEADER_NAME_ALPHABET) for _ in range(length))
    value_kind = rng.random()
    if value_kind < 0.3:
        value = rng.choice(HUGE_NUMBERS)
    elif value_kind < 0.5:
        value = rng.choice([b"chunked", b"gzip, chunked", b"chunked, chunked", b"close", b""])
    else:
        value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
    return name + rng.choice([b": ", b":", b" : ", b":\t"]) + value + b"\r\n"


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        pos = rng.randint(0, len(out))
        if kind == 0 and out:  # flip bits of one byte
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # insert a byte that matters to the grammar
            out[pos:pos] = rng.choice(SPECIAL)
        elif kind == 2 and out:  # truncate
            del out[rng.randrange(len(out)) :]
        elif kind == 3 and out:  # duplicate a slice
            start = rng.randrange(len(out))
            end = min(len(out), start + rng.randint(1, 40))
            out[pos:pos] = out[start:end]
        elif kind == 4:  # a random header field, after the first line when there is one
            first = out.find(b"\r\n")
            at = first + 2 if first >= 0 and rng.random() < 0.8 else pos
            out[at:at] = _random_header(rng)
        elif kind == 5:  # replace a run of digits or hex with a huge number
            i = rng.randrange(len(out)) if out else 0
            j = i
            while j < len(out) and chr(out[j]) in "0123456789abcdefABCDEF":
                j += 1
            out[i:j] = rng.choice(HUGE_NUMBERS)
        elif kind == 6 and out:  # delete a few bytes
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 4)]
        else:  # insert random bytes
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(out)


def random_bytes(rng: random.Random) -> bytes:
    alphabet = rng.choice([None, b"\r\n: 0123456789abcdefxHTP/.", b"0123456789abcdef;\r\n"])
    length = rng.randint(0, 200)
    if alphabet is None:
        return bytes(rng.randrange(256) for _ in range(length))
    return bytes(rng.choice(alphabet) for _ in range(length))


def inputs(corpus: Sequence[bytes], salt: int) -> list[bytes]:
    """The fuzz inputs for one target: the seeds, their mutations and random bytes."""
    rng = random.Random(SEED * 1000 + salt)
    out = list(corpus)
    for _ in range(ITERATIONS):
        if rng.random() < 0.85:
            out.append(mutate(rng.choice(corpus), rng))
        else:
            out.append(random_bytes(rng))
    return out


def _mutation_count(data: Sequence[bytes], corpus: Sequence[bytes]) -> int:
    return sum(1 for d in data if d not in corpus)


# Re-serialisation: a parsed head written out again must parse to the same thing #################


def serialise_request(req: Request) -> bytes:
    lines = [f"{req.method} {req.target} {req.version}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in req.headers.items()]
    return ("".join(lines) + "\r\n").encode("latin-1")


def serialise_response(head: ClientResponseHead, version: bytes) -> bytes:
    reason = f" {head.reason}" if head.reason else ""
    lines = [f"{version.decode()} {head.status:03d}{reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in head.headers.items()]
    return ("".join(lines) + "\r\n").encode("latin-1")


def request_fields(req: Request) -> tuple[object, ...]:
    return (
        req.method,
        req.target,
        req.version,
        req.headers.items(),
        req.framing,
        req.keep_alive,
        req.expect_continue,
    )


def check_request(data: bytes) -> str:
    try:
        req = pyworker.parse_request_head(data)
    except HttpError as exc:
        assert 400 <= exc.status < 600, (data, exc.status)
        return "error"
    # What was accepted is well-formed by construction of the grammar:
    assert data.endswith(b"\r\n\r\n"), data
    assert b"\x00" not in data, data
    assert req.version in ("HTTP/1.0", "HTTP/1.1"), data
    assert req.target.startswith("/"), data
    assert req.framing.kind in ("length", "chunked"), data
    assert req.framing.length >= 0, data
    assert not ("transfer-encoding" in req.headers and "content-length" in req.headers), (
        f"smuggling setup accepted: {data!r}"
    )
    assert len(list(req.headers.values("host"))) <= 1, data
    for name, value in req.headers.items():
        assert name == name.lower() and name, data
        assert value == value.strip(" \t"), data
        assert "\r" not in value and "\n" not in value and "\x00" not in value, data
    again = pyworker.parse_request_head(serialise_request(req))
    assert request_fields(again) == request_fields(req), data
    return "parsed"


def check_response(data: bytes) -> str:
    try:
        head = pyworker.parse_response_head(data)
    except HttpError as exc:
        assert 400 <= exc.status < 600, (data, exc.status)
        return "error"
    # RFC 9110 15: "All valid status codes are within the range of 100 to 599, inclusive."
    assert 100 <= head.status <= 599, data
    assert head.framing.kind in ("length", "chunked", "close"), data
    assert head.framing.length >= 0, data
    if head.framing.kind == "close":
        assert not head.keep_alive, data
    again = pyworker.parse_response_head(serialise_response(head, data[:8]))
    assert (again.status, again.reason, again.headers.items(), again.framing) == (
        head.status,
        head.reason,
        head.headers.items(),
        head.framing,
    ), data
    assert again.keep_alive == head.keep_alive, data
    return "parsed"


def check_chunk_size(data: bytes) -> str:
    try:
        size = pyworker.parse_chunk_size(data)
    except HttpError as exc:
        assert exc.status == 400, (data, exc.status)
        return "error"
    assert 0 <= size < 16**pyworker.MAX_CHUNK_SIZE_DIGITS, data
    digits = data[:-2].partition(b";")[0].rstrip(b" \t")
    # Only plain hex digits may have been accepted: no 0x, sign, underscore or space inside.
    assert digits and all(chr(c) in "0123456789abcdefABCDEF" for c in digits), data
    assert int(digits, 16) == size, data
    assert pyworker.parse_chunk_size(b"%x\r\n" % size) == size, data
    return "parsed"


@pytest.mark.parametrize(
    ("name", "salt", "corpus", "check"),
    [
        ("request head", 1, REQUEST_HEADS, check_request),
        ("response head", 2, RESPONSE_HEADS, check_response),
        ("chunk size line", 3, CHUNK_LINES, check_chunk_size),
    ],
)
def test_parser_parses_or_raises_http_error(
    name: str, salt: int, corpus: list[bytes], check: Callable[[bytes], str]
) -> None:
    """Guards the h11 rule for the sans-IO parsers: no exception but HttpError, and what is
    accepted survives a round trip (a parser that accepts what it cannot reproduce is
    ambiguous, the root of request smuggling)."""
    data = inputs(corpus, salt=salt)
    outcomes = {"parsed": 0, "error": 0}
    for item in data:
        try:
            outcomes[check(item)] += 1
        except HttpError:
            raise
        except AssertionError:
            raise
        except Exception as exc:  # anything else is the bug this test is for
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc} on {item!r}") from exc
    # The fuzzer must exercise both sides, or it tests nothing.
    assert outcomes["parsed"] >= len(corpus), outcomes
    assert outcomes["error"] >= ITERATIONS // 4, outcomes
    assert _mutation_count(data, corpus) >= ITERATIONS // 2


# Stream readers ##################################################################################


async def _feed(reader: asyncio.StreamReader, data: bytes, rng: random.Random) -> None:
    """Feed `data` in random pieces, yielding to the loop between them, then EOF."""
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 7, 64, len(data)])
        reader.feed_data(data[pos : pos + step])
        pos += step
        await asyncio.sleep(0)
    reader.feed_eof()


async def _read_head(data: bytes, limit: int, first_line: int, rng: random.Random) -> bytes:
    reader = asyncio.StreamReader(limit=limit)
    feeder = asyncio.ensure_future(_feed(reader, data, rng))
    try:
        return await asyncio.wait_for(
            pyworker.read_head(reader, first_line_limit=first_line), READ_BOUND
        )
    finally:
        await feeder


async def _read_chunked(data: bytes, max_size: int | None, piece: int, rng: random.Random) -> bytes:
    reader = asyncio.StreamReader(limit=256)
    feeder = asyncio.ensure_future(_feed(reader, data, rng))

    async def consume() -> bytes:
        parts: list[bytes] = []
        async for part in pyworker.read_chunked(reader, max_size=max_size, piece=piece):
            assert 0 < len(part) <= piece, (data, len(part))
            parts.append(part)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(consume(), READ_BOUND)
    finally:
        await feeder


def test_read_head_parses_or_raises_http_error() -> None:
    """read_head on a StreamReader: a head ending in CRLF CRLF, HttpError 414/431 past the
    limits, or IncompleteReadError at EOF. LimitOverrunError must not escape (it would reach
    the server's generic handler and drop the connection without an answer)."""
    corpus = [h + b"x" * 10 for h in REQUEST_HEADS + RESPONSE_HEADS]  # trailing body bytes
    data = inputs(corpus, salt=11)
    rng = random.Random(SEED + 1)
    seen: dict[str, int] = {"head": 0, "http_error": 0, "incomplete": 0}

    async def main() -> None:
        for item in data:
            limit = rng.choice([64, 128, 4096])
            first_line = rng.choice([16, 32, limit])
            try:
                head = await _read_head(item, limit, first_line, rng)
            except HttpError as exc:
                assert exc.status in (414, 431), (item, exc.status)
                seen["http_error"] += 1
                continue
            except asyncio.IncompleteReadError:
                assert b"\r\n\r\n" not in item[: limit + 4], item
                seen["incomplete"] += 1
                continue
            except Exception as exc:
                raise AssertionError(f"{type(exc).__name__}: {exc} on {item!r}") from exc
            assert head.endswith(b"\r\n\r\n"), item
            assert item.startswith(head), item
            assert head.count(b"\r\n\r\n") == 1, item  # the first CRLF CRLF, not a later one
            seen["head"] += 1

    asyncio.run(main())
    assert all(count > 0 for count in seen.values()), seen


def _reference_dechunk(data: bytes) -> bytes | None:
    """A plain, strict reading of RFC 9112 7.1 to compare with; None when invalid."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size_text = data[pos:end].partition(b";")[0].rstrip(b" \t")
        if not size_text or len(size_text) > 16:
            return None
        if not all(chr(c) in "0123456789abcdefABCDEF" for c in size_text):
            return None
        size = int(size_text, 16)
        pos = end + 2
        if size == 0:
            break
        if data[pos + size : pos + size + 2] != b"\r\n":
            return None
        out += data[pos : pos + size]
        pos += size + 2
    while True:  # trailers
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        if end == pos:
            return bytes(out)
        pos = end + 2


def test_read_chunked_parses_or_raises_http_error() -> None:
    """read_chunked on a StreamReader: the decoded body, HttpError (400/413/431), or
    IncompleteReadError at EOF; never another exception, never a hang; pieces never exceed
    `piece` (memory stays bounded); a decoded body agrees with a reference decoder and
    survives re-encoding."""
    data = inputs(CHUNKED_BODIES, salt=23)
    rng = random.Random(SEED + 2)
    seen: dict[str, int] = {"body": 0, "http_error": 0, "incomplete": 0}

    async def main() -> None:
        for item in data:
            max_size = rng.choice([None, 8, 1 << 20])
            piece = rng.choice([1, 3, 65536])
            try:
                body = await _read_chunked(item, max_size, piece, rng)
            except HttpError as exc:
                assert exc.status in (400, 413, 431), (item, exc.status)
                seen["http_error"] += 1
                continue
            except asyncio.IncompleteReadError:
                seen["incomplete"] += 1
                continue
            except Exception as exc:
                raise AssertionError(f"{type(exc).__name__}: {exc} on {item!r}") from exc
            seen["body"] += 1
            if max_size is not None:
                assert len(body) <= max_size, item
            reference = _reference_dechunk(item)
            # The reference reads only what is in `item`; a trailer line the reader accepted
            # must also be a header line the reference would skip.
            assert reference == body, (item, body, reference)
            if body:
                again = await _read_chunked(
                    pyworker.encode_chunk(body) + pyworker.LAST_CHUNK, None, piece, rng
                )
                assert again == body, item

    asyncio.run(main())
    assert all(count > 0 for count in seen.values()), seen


def test_read_chunked_huge_declared_chunk_is_bounded() -> None:
    """A chunk that declares 2**64 - 1 bytes and then trickles: the reader must refuse it at
    max_size before reading, and with no max_size hand out bounded pieces (memory bounded)."""

    async def main() -> tuple[int, int]:
        reader = asyncio.StreamReader(limit=256)
        reader.feed_data(b"ffffffffffffffff\r\n" + b"a" * 100)
        reader.feed_eof()
        with pytest.raises(HttpError) as info:
            async for _ in pyworker.read_chunked(reader, max_size=1 << 20):
                pass
        status = info.value.status

        reader = asyncio.StreamReader(limit=256)
        reader.feed_data(b"ffffffffffffffff\r\n")
        tracemalloc.start()
        try:
            got = 0
            block = b"b" * 65536

            async def consume() -> None:
                nonlocal got
                async for part in pyworker.read_chunked(reader, max_size=None, piece=4096):
                    assert len(part) <= 4096
                    got += len(part)

            task = asyncio.ensure_future(consume())
            for _ in range(64):  # 4 MiB in all, fed as the reader consumes it
                reader.feed_data(block)
                await asyncio.sleep(0)
            reader.feed_eof()
            with pytest.raises(asyncio.IncompleteReadError):
                await asyncio.wait_for(task, READ_BOUND)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got >= 63 * 65536
        return status, peak

    status, peak = asyncio.run(main())
    assert status == 413
    assert peak < 2 * 1024 * 1024, peak  # 4 MiB went through; far less was ever held


@pytest.mark.parametrize("status", [b"000", b"004", b"099", b"600", b"700", b"999"])
def test_response_status_outside_100_to_599_is_refused(status: bytes) -> None:
    """Found by the response-head fuzz: a status code outside 100-599 (RFC 9110 15: "All valid
    status codes are within the range of 100 to 599") must be a protocol error (502 upstream),
    not a response the worker relays with a status line its clients cannot parse."""
    with pytest.raises(HttpError):
        pyworker.parse_response_head(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 0\r\n\r\n")
