"""CRI log format: full and partial lines, long lines, reopen after rotation."""

from __future__ import annotations

import re
from pathlib import Path

from cri.runtime.logs import MAX_LINE, ContainerLog, rfc3339_nano

LINE_RE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (F|P) (.*)$")


def _records(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        match = LINE_RE.match(line)
        assert match, line
        out.append((match.group(1), match.group(2), match.group(3)))
    return out


def test_rfc3339_nano() -> None:
    assert rfc3339_nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"


def test_lines_split_across_chunks(tmp_path: Path) -> None:
    log = ContainerLog(tmp_path / "c.log")
    log.write("stdout", b"hel")
    log.write("stderr", b"oops\n")
    log.write("stdout", b"lo\nwor")
    log.write("stdout", b"ld\n\n")
    log.close()
    assert _records(tmp_path / "c.log") == [
        (b"stderr", b"F", b"oops"),
        (b"stdout", b"F", b"hello"),
        (b"stdout", b"F", b"world"),
        (b"stdout", b"F", b""),
    ]


def test_unfinished_line_is_partial_at_close(tmp_path: Path) -> None:
    log = ContainerLog(tmp_path / "c.log")
    log.write("stdout", b"no newline")
    log.close()
    assert _records(tmp_path / "c.log") == [(b"stdout", b"P", b"no newline")]


def test_long_line_is_split_into_partials(tmp_path: Path) -> None:
    log = ContainerLog(tmp_path / "c.log")
    log.write("stdout", b"x" * (MAX_LINE * 2 + 5) + b"\n")
    log.close()
    recs = _records(tmp_path / "c.log")
    assert [r[1] for r in recs] == [b"P", b"P", b"F"]
    assert b"".join(r[2] for r in recs) == b"x" * (MAX_LINE * 2 + 5)


def test_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(path)
    log.write("stdout", b"one\n")
    path.rename(tmp_path / "c.log.new")
    log.reopen()
    log.write("stdout", b"two\n")
    log.close()
    assert _records(tmp_path / "c.log.new") == [(b"stdout", b"F", b"one")]
    assert _records(path) == [(b"stdout", b"F", b"two")]


def test_unknown_stream_refused(tmp_path: Path) -> None:
    log = ContainerLog(tmp_path / "c.log")
    try:
        log.write("stdin", b"x")
    except ValueError as exc:
        assert "stdin" in str(exc)
    else:
        raise AssertionError("stdin accepted")
    finally:
        log.close()
