"""The JSON reader: the json module's path reads a client's body as orjson does, so that a
worker run on a bare interpreter gets the same payload, and the same 422s, as one with orjson
installed. Guards the field checks: a 2**64 max_response_tokens is a float to orjson (a 422 for
an int field); read as an int by the json module, it reached the model (seen on Python 3.10
without orjson, in tests/test_abuse.py)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

import pyworker

CASES: list[tuple[bytes, Any]] = [
    (b"1", 1),
    (b"-1", -1),
    (b"18446744073709551615", 2**64 - 1),  # the largest unsigned 64-bit integer: an int
    (b"-9223372036854775808", -(2**63)),  # the smallest signed 64-bit integer: an int
    (b"18446744073709551616", float(2**64)),  # one past: a float
    (b"-9223372036854775809", float(-(2**63) - 1)),
    (b"100000000000000000000000", 1e23),
    (b"1.5", 1.5),
    (b'{"a": [1, 2.5, "x", null, true]}', {"a": [1, 2.5, "x", None, True]}),
]

REFUSED = [b"NaN", b"-Infinity", b"Infinity", b"1e400", b"-1e400", b"1" + b"0" * 400]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_numbers_read_as_orjson_reads_them(text: bytes, expected: Any) -> None:
    value = pyworker.stdlib_json_loads(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", REFUSED)
def test_non_finite_numbers_are_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        pyworker.stdlib_json_loads(text)


@pytest.mark.skipif(importlib.util.find_spec("orjson") is None, reason="orjson not installed")
@pytest.mark.parametrize("text", [c[0] for c in CASES] + REFUSED)
def test_the_same_as_orjson(text: bytes) -> None:
    import orjson

    try:
        expected: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        with pytest.raises(ValueError):
            pyworker.stdlib_json_loads(text)
        return
    value = pyworker.stdlib_json_loads(text)
    assert (value, type(value)) == (expected, type(expected))
