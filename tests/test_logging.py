"""The worker's log handler and its access-log path, fed records and lines directly.

The handler gathers lines in a buffer of its own (so PYTHONUNBUFFERED=1 does not turn each
access-log line into a system call) and writes them to stdout in order; warnings go at once.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator

import pytest

import pyworker

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ([\w.]+): (.*)")


@pytest.fixture
def handler() -> Iterator[pyworker._LogHandler]:  # pyright: ignore[reportPrivateUsage]
    h = pyworker._LogHandler()  # pyright: ignore[reportPrivateUsage]
    yield h
    h.close()


def record(level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pyworker", level, "", 0, message, args, None)


def test_info_waits_in_the_buffer_until_a_flush(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler.handle(record(logging.INFO, "one %d", 1))
    handler.access("/generate 200 workload=3")
    assert capsys.readouterr().out == ""
    handler.flush()
    lines = capsys.readouterr().out.splitlines()
    assert [LINE.fullmatch(x).groups() for x in lines] == [  # type: ignore[union-attr]
        ("INFO", "pyworker", "one 1"),
        ("INFO", "pyworker.access", "/generate 200 workload=3"),
    ]


def test_a_warning_writes_itself_and_everything_before_it(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler.access("/a 200")
    handler.handle(record(logging.INFO, "two"))
    handler.handle(record(logging.WARNING, "three"))
    out = capsys.readouterr().out
    assert [m.group(3) for m in LINE.finditer(out)] == ["/a 200", "two", "three"]
    handler.flush()  # nothing left over
    assert capsys.readouterr().out == ""


def test_the_buffer_is_bounded_by_lines(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(pyworker.LOG_FLUSH_LINES + 1):
        handler.access(f"/generate 200 n={i}")
    written = capsys.readouterr().out.splitlines()
    assert pyworker.LOG_FLUSH_LINES <= len(written) <= pyworker.LOG_FLUSH_LINES + 1
    assert written[0].endswith(" INFO pyworker.access: /generate 200 n=0")


def test_a_traceback_is_kept(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        raise KeyError("boom")
    except KeyError:
        rec = logging.LogRecord("pyworker", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    handler.handle(rec)
    out = capsys.readouterr().out
    assert " ERROR pyworker: failed\nTraceback (most recent call last):" in out
    assert "KeyError: 'boom'" in out


def test_a_broken_message_is_reported_not_raised(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
) -> None:
    raise_exceptions = logging.raiseExceptions
    logging.raiseExceptions = True
    try:
        handler.handle(record(logging.INFO, "%d", "not a number"))
    finally:
        logging.raiseExceptions = raise_exceptions
    captured = capsys.readouterr()
    assert "--- Logging error ---" in captured.err
    handler.handle(record(logging.WARNING, "still working"))
    assert "still working" in capsys.readouterr().out


def test_access_lines_go_through_logging_unless_pointed_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = pyworker._access_log_line  # pyright: ignore[reportPrivateUsage]
    assert line.direct is None  # only run() sets it
    with caplog.at_level(logging.INFO, logger="pyworker.access"):
        line("/generate 200 100% done")  # a % in the text is not a format
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("pyworker.access", "/generate 200 100% done")
    ]
    taken: list[str] = []
    line.direct = taken.append
    try:
        caplog.clear()
        line("/generate 200 direct")
        assert taken == ["/generate 200 direct"] and caplog.records == []
        # A filter on the access logger is honoured: the line goes through logging again.
        only_errors = logging.Filter("nothing")
        pyworker.access_log.addFilter(only_errors)
        try:
            with caplog.at_level(logging.INFO, logger="pyworker.access"):
                line("/generate 200 filtered")
        finally:
            pyworker.access_log.removeFilter(only_errors)
        assert taken == ["/generate 200 direct"] and caplog.records == []
    finally:
        line.direct = None


def test_a_broken_stdout_is_reported_once_on_stderr(
    handler: pyworker._LogHandler,  # pyright: ignore[reportPrivateUsage]
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Broken())
    for i in range(3):
        handler.handle(record(logging.WARNING, "lost %d", i))
    err = capsys.readouterr().err
    assert err.count("pyworker: cannot write the log to stdout: BrokenPipeError") == 1, err
