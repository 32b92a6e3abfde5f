"""The guest's single writer: ordering, bounded buffering, reconnect behaviour."""

from __future__ import annotations

import json
import socket
import time

from agent.guest.channel import Writer
from agent.protocol import (
    DATA,
    EVENT,
    EVENT_OUTPUT_DROPPED,
    RESPONSE,
    SYNC,
    Frame,
    FrameDecoder,
    encode_data,
    encode_json,
)


def read_frames(sock: socket.socket, decoder: FrameDecoder, count: int) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + 5
    sock.settimeout(0.2)
    while len(frames) < count and time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        frames += decoder.feed(data)
    return frames


def test_nothing_is_written_until_a_host_says_hello() -> None:
    guest, host = socket.socketpair()
    writer = Writer(guest.fileno())
    writer.send(encode_json(EVENT, 0, {"event": "early"}))
    host.settimeout(0.2)
    try:
        host.recv(100)
        raise AssertionError("the writer wrote while disconnected")
    except TimeoutError:
        pass
    writer.resync(1)
    frames = read_frames(host, FrameDecoder(), 2)
    assert [f.kind for f in frames] == [SYNC, EVENT]


def test_oldest_output_is_dropped_and_reported() -> None:
    guest, host = socket.socketpair()
    writer = Writer(guest.fileno(), max_data_bytes=10_000)
    for i in range(20):
        writer.send_data(5, encode_data(5, 1, bytes([i]) * 1000))
    writer.send(encode_json(EVENT, 5, {"event": "container_exited"}))
    writer.resync(1)
    frames = read_frames(host, FrameDecoder(), 12)
    data = [f for f in frames if f.kind == DATA]
    assert data and data[-1].payload[1:2] == bytes([19])  # the newest survived
    assert data[0].payload[1] > 0  # the oldest went
    events = [json.loads(f.payload) for f in frames if f.kind == EVENT]
    assert events[0]["event"] == "container_exited"  # never dropped
    assert any(e["event"] == EVENT_OUTPUT_DROPPED and e["frames"] > 0 for e in events)


def test_replies_for_a_previous_host_are_discarded() -> None:
    guest, host = socket.socketpair()
    writer = Writer(guest.fileno())
    writer.send(encode_json(RESPONSE, 0, {"id": 1, "for": "old host"}), generation=1)
    writer.resync(2)
    writer.send(encode_json(RESPONSE, 0, {"id": 1, "for": "old host"}), generation=1)
    writer.send(encode_json(RESPONSE, 0, {"id": 2, "for": "new host"}), generation=2)
    frames = read_frames(host, FrameDecoder(), 2)
    assert [f.kind for f in frames] == [SYNC, RESPONSE]
    assert json.loads(frames[1].payload)["for"] == "new host"
