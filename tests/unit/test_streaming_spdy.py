"""SPDY/3.1 codec against byte sequences built by hand from the draft 3 layout."""

from __future__ import annotations

import struct
import zlib

import pytest

from cri.streaming import spdy


def compress_block(pairs: list[tuple[bytes, bytes]], *, count: int | None = None) -> bytes:
    raw = struct.pack(">I", len(pairs) if count is None else count)
    for name, value in pairs:
        raw += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    z = zlib.compressobj(zdict=spdy.DICTIONARY)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


def control(kind: int, flags: int, payload: bytes, version: int = 3) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, (flags << 24) | len(payload)) + payload


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.DICTIONARY) == 1423
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    assert zlib.adler32(spdy.DICTIONARY) == 3821447106


def test_syn_stream_with_compressed_headers() -> None:
    block = compress_block([(b"streamtype", b"error"), (b"port", b"8080"), (b"requestid", b"0")])
    frame = control(spdy.SYN_STREAM, 0, struct.pack(">IIBB", 1, 0, 0x40, 0) + block)
    (parsed,) = spdy.FrameParser().feed(frame)
    assert parsed.kind == spdy.SYN_STREAM
    assert parsed.stream_id == 1
    assert parsed.priority == 2
    assert parsed.headers == [("streamtype", "error"), ("port", "8080"), ("requestid", "0")]
    assert parsed.header("StreamType") == "error"


def test_header_context_is_shared_across_frames() -> None:
    z = zlib.compressobj(zdict=spdy.DICTIONARY)
    frames = b""
    for sid, kind in ((1, b"error"), (3, b"stdout")):
        raw = struct.pack(">I", 1) + struct.pack(">I", 10) + b"streamtype"
        raw += struct.pack(">I", len(kind)) + kind
        block = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
        frames += control(spdy.SYN_STREAM, 0, struct.pack(">IIBB", sid, 0, 0, 0) + block)
    parser = spdy.FrameParser()
    parsed = [f for b in frames for f in parser.feed(bytes([b]))]  # one byte at a time
    assert [(f.stream_id, f.header("streamtype")) for f in parsed] == [(1, "error"), (3, "stdout")]


def test_data_frame_and_fin() -> None:
    frame = struct.pack(">II", 5, (spdy.FLAG_FIN << 24) | 3) + b"abc"
    (parsed,) = spdy.FrameParser().feed(frame)
    assert (parsed.kind, parsed.stream_id, parsed.data, parsed.fin) == (spdy.DATA, 5, b"abc", True)
    assert spdy.data_frame(5, b"abc", fin=True) == frame


def test_ping_rst_goaway_round_trip() -> None:
    ping = control(spdy.PING, 0, struct.pack(">I", 7))
    rst = control(spdy.RST_STREAM, 0, struct.pack(">II", 3, spdy.CANCEL))
    goaway = control(spdy.GOAWAY, 0, struct.pack(">II", 9, spdy.GOAWAY_OK))
    assert spdy.ping_frame(7) == ping
    assert spdy.rst_stream_frame(3, spdy.CANCEL) == rst
    assert spdy.goaway_frame(9) == goaway
    p, r, g = spdy.FrameParser().feed(ping + rst + goaway)
    assert (p.kind, p.ping_id) == (spdy.PING, 7)
    assert (r.kind, r.stream_id, r.status) == (spdy.RST_STREAM, 3, spdy.CANCEL)
    assert (g.kind, g.last_good_id, g.status) == (spdy.GOAWAY, 9, 0)


def test_our_syn_reply_decodes_with_plain_zlib() -> None:
    comp = spdy.HeaderCompressor()
    frame = spdy.syn_reply_frame(comp, 1, [("X-Test", "yes")])
    first, second = struct.unpack(">II", frame[:8])
    assert first == 0x80030002 and second & 0xFFFFFF == len(frame) - 8
    assert struct.unpack(">I", frame[8:12])[0] == 1
    z = zlib.decompressobj(zdict=spdy.DICTIONARY)
    raw = z.decompress(frame[12:])
    assert raw == struct.pack(">I", 1) + b"\x00\x00\x00\x06x-test\x00\x00\x00\x03yes"


def test_settings_and_window_update_are_parsed_and_ignored_types() -> None:
    settings = control(spdy.SETTINGS, 0, struct.pack(">I", 1) + struct.pack(">II", 7, 65536))
    window = control(spdy.WINDOW_UPDATE, 0, struct.pack(">II", 1, 1000))
    unknown = control(0x55, 0, b"whatever")
    frames = spdy.FrameParser().feed(settings + window + unknown)
    assert [f.kind for f in frames] == [spdy.SETTINGS, spdy.WINDOW_UPDATE]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(control(spdy.PING, 0, b"\x00\x00\x00\x01", version=2), id="version-2"),
        pytest.param(control(spdy.PING, 0, b"\x00\x01"), id="short-ping"),
        pytest.param(control(spdy.RST_STREAM, 0, b"\x00" * 4), id="short-rst"),
        pytest.param(control(spdy.SYN_STREAM, 0, b"\x00" * 6), id="short-syn"),
        pytest.param(
            control(spdy.SYN_STREAM, 0, struct.pack(">IIBB", 1, 0, 0, 0) + b"not zlib at all"),
            id="garbage-headers",
        ),
        pytest.param(
            control(
                spdy.SYN_STREAM,
                0,
                struct.pack(">IIBB", 1, 0, 0, 0) + compress_block([(b"a", b"b")], count=3),
            ),
            id="truncated-block",
        ),
        pytest.param(
            control(
                spdy.SYN_STREAM,
                0,
                struct.pack(">IIBB", 1, 0, 0, 0) + compress_block([(b"a", b"b")] * 300),
            ),
            id="too-many-pairs",
        ),
        pytest.param(struct.pack(">II", 1, 0xFFFFFF), id="oversized-data"),
        pytest.param(struct.pack(">HHI", 0x8003, 1, 0xFFFFFF), id="oversized-control"),
    ],
)
def test_malformed_frames_raise_spdy_error(frame: bytes) -> None:
    with pytest.raises(spdy.SpdyError):
        spdy.FrameParser().feed(frame)


def test_header_bomb_is_refused() -> None:
    # 64 MiB of one repeated header value compresses to ~64 KiB... keep it below the
    # control frame limit but far above the decompressed limit.
    raw = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 8 << 20)
    z = zlib.compressobj(9, zdict=spdy.DICTIONARY)
    block = z.compress(raw) + z.compress(b"\0" * (8 << 20)) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(block) < spdy.MAX_CONTROL_LENGTH
    frame = control(spdy.SYN_STREAM, 0, struct.pack(">IIBB", 1, 0, 0, 0) + block)
    with pytest.raises(spdy.SpdyError, match="inflates beyond"):
        spdy.FrameParser().feed(frame)


def test_partial_frames_wait_for_more() -> None:
    parser = spdy.FrameParser()
    frame = spdy.data_frame(1, b"x" * 100)
    assert parser.feed(frame[:50]) == []
    assert parser.buffered == 50
    (parsed,) = parser.feed(frame[50:])
    assert parsed.data == b"x" * 100
    assert parser.buffered == 0
