"""WebSocket (RFC 6455) framing: masking, fragmentation, control frames, limits."""

from __future__ import annotations

import struct

import pytest

from cri.streaming import websocket as ws

MASK = bytes.fromhex("37fa213d")


def test_accept_key_example_from_rfc() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_masked_text_frame_from_rfc() -> None:
    frame = bytes.fromhex("818537fa213d7f9f4d5158")
    (message,) = ws.FrameParser().feed(frame)
    assert (message.opcode, message.data) == (ws.TEXT, b"Hello")
    assert ws.encode_frame(ws.TEXT, b"Hello", mask=MASK) == frame


def test_unmasked_server_frames_and_lengths() -> None:
    assert ws.encode_frame(ws.BINARY, b"\x01hi") == b"\x82\x03\x01hi"
    medium = ws.encode_frame(ws.BINARY, b"x" * 300)
    assert medium[:4] == b"\x82\x7e" + struct.pack(">H", 300)
    large = ws.encode_frame(ws.BINARY, b"x" * 70000)
    assert large[:10] == b"\x82\x7f" + struct.pack(">Q", 70000)
    parser = ws.FrameParser(require_mask=False)
    assert [len(m.data) for m in parser.feed(medium + large)] == [300, 70000]


def test_fragmented_message_with_ping_in_between() -> None:
    first = ws.encode_frame(ws.BINARY, b"Hel", fin=False, mask=MASK)
    ping = ws.encode_frame(ws.PING, b"p", mask=MASK)
    last = ws.encode_frame(ws.CONTINUATION, b"lo", mask=MASK)
    parser = ws.FrameParser()
    messages = [m for b in first + ping + last for m in parser.feed(bytes([b]))]
    assert [(m.opcode, m.data) for m in messages] == [(ws.PING, b"p"), (ws.BINARY, b"Hello")]


def test_large_masked_payload_round_trip() -> None:
    payload = bytes(range(256)) * 1000
    (message,) = ws.FrameParser().feed(ws.encode_frame(ws.BINARY, payload, mask=MASK))
    assert message.data == payload


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(b"\x82\x02hi", ws.PROTOCOL_ERROR, id="unmasked"),
        pytest.param(
            ws.encode_frame(ws.PING, b"x" * 126, mask=MASK), ws.PROTOCOL_ERROR, id="long-ping"
        ),
        pytest.param(
            ws.encode_frame(ws.PING, b"x", fin=False, mask=MASK),
            ws.PROTOCOL_ERROR,
            id="fragmented-ping",
        ),
        pytest.param(
            ws.encode_frame(ws.CONTINUATION, b"x", mask=MASK),
            ws.PROTOCOL_ERROR,
            id="lone-continuation",
        ),
        pytest.param(b"\xc2\x80" + MASK, ws.PROTOCOL_ERROR, id="reserved-bit"),
        pytest.param(ws.encode_frame(0x3, b"", mask=MASK), ws.PROTOCOL_ERROR, id="opcode-3"),
        pytest.param(
            ws.encode_frame(ws.TEXT, b"\xff\xfe", mask=MASK), ws.INVALID_PAYLOAD, id="bad-utf8"
        ),
        pytest.param(
            b"\x82\xff" + struct.pack(">Q", 1 << 40) + MASK, ws.MESSAGE_TOO_BIG, id="too-big"
        ),
        pytest.param(
            ws.encode_frame(ws.CLOSE, b"\x03", mask=MASK), ws.PROTOCOL_ERROR, id="close-1-byte"
        ),
    ],
)
def test_protocol_errors(frame: bytes, code: int) -> None:
    with pytest.raises(ws.WebSocketError) as info:
        ws.FrameParser().feed(frame)
    assert info.value.code == code


def test_new_message_inside_fragmented_one_is_an_error() -> None:
    parser = ws.FrameParser()
    parser.feed(ws.encode_frame(ws.BINARY, b"a", fin=False, mask=MASK))
    with pytest.raises(ws.WebSocketError):
        parser.feed(ws.encode_frame(ws.BINARY, b"b", mask=MASK))


def test_fragments_count_against_the_message_limit() -> None:
    parser = ws.FrameParser(max_message=10)
    parser.feed(ws.encode_frame(ws.BINARY, b"x" * 8, fin=False, mask=MASK))
    with pytest.raises(ws.WebSocketError) as info:
        parser.feed(ws.encode_frame(ws.CONTINUATION, b"x" * 8, mask=MASK))
    assert info.value.code == ws.MESSAGE_TOO_BIG
