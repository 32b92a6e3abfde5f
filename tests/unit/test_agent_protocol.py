"""Framing, resynchronisation and the shared records of the agent protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import (
    CLOSE,
    DATA,
    EVENT,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    REQUEST,
    RESPONSE,
    SYNC,
    SYNC_MARKER,
    ContainerInfo,
    ContainerSpec,
    ExecSpec,
    ExitStatus,
    Frame,
    FrameDecoder,
    Mount,
    ProtocolError,
    ReadyInfo,
    Record,
    Resources,
    Rlimit,
    StatsReport,
    encode_close,
    encode_data,
    encode_frame,
    encode_json,
    iter_records,
)


def synced() -> FrameDecoder:
    decoder = FrameDecoder()
    assert decoder.feed(SYNC_MARKER) == [Frame(SYNC, 0, b"")]
    return decoder


def test_encode_decode_every_kind() -> None:
    frames = [
        encode_json(REQUEST, 0, {"id": 1, "op": "hello", "args": {}}),
        encode_json(RESPONSE, 0, {"id": 1, "ok": True, "result": None}),
        encode_json(EVENT, 7, {"event": "container_exited"}),
        encode_data(7, 1, b"\x00binary\xff"),
        encode_close(7, 0),
        encode_frame(DATA, 2**32 - 1, b""),
    ]
    decoded = synced().feed(b"".join(frames))
    assert [(f.kind, f.stream) for f in decoded] == [
        (REQUEST, 0),
        (RESPONSE, 0),
        (EVENT, 7),
        (DATA, 7),
        (CLOSE, 7),
        (DATA, 2**32 - 1),
    ]
    assert decoded[3].payload == b"\x01\x00binary\xff"
    assert json.loads(decoded[0].payload)["op"] == "hello"
    assert frames[0][:2] == MAGIC and len(frames[4]) == HEADER_SIZE + 1


def test_decoder_handles_byte_by_byte_input() -> None:
    stream = SYNC_MARKER + encode_data(3, 1, b"x" * 1000) + encode_close(3, 1)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert [f.kind for f in out] == [SYNC, DATA, CLOSE]
    assert out[1].payload == b"\x01" + b"x" * 1000


def test_everything_before_the_first_sync_is_discarded() -> None:
    decoder = FrameDecoder()
    tail_of_old_frame = encode_data(1, 1, b"stale")[5:]
    assert decoder.feed(tail_of_old_frame + encode_data(1, 1, b"also stale")) == []
    out = decoder.feed(SYNC_MARKER + encode_data(2, 1, b"fresh"))
    assert [(f.kind, f.payload) for f in out] == [(SYNC, b""), (DATA, b"\x01fresh")]
    assert decoder.discarded > 0


def test_resync_after_garbage_between_frames() -> None:
    decoder = synced()
    garbage = os.urandom(300).replace(MAGIC, b"zz") + MAGIC + b"\x09"  # bad version
    out = decoder.feed(encode_data(1, 1, b"a") + garbage + encode_data(1, 1, b"b"))
    assert [f.payload for f in out] == [b"\x01a", b"\x01b"]
    assert decoder.discarded >= 300


def test_sync_marker_cuts_a_partial_frame_short() -> None:
    decoder = synced()
    # A dead host's frame promised 4000 bytes but only 10 arrived.
    partial = encode_frame(REQUEST, 0, b"y" * 4000)[: HEADER_SIZE + 10]
    assert decoder.feed(partial) == []
    hello = encode_json(REQUEST, 0, {"id": 1, "op": "hello"})
    out = decoder.feed(SYNC_MARKER + hello)
    assert [f.kind for f in out] == [SYNC, REQUEST]
    assert json.loads(out[1].payload)["op"] == "hello"


def test_sync_marker_split_across_reads() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b"junk" + SYNC_MARKER[:7])
    assert out == []
    out = decoder.feed(SYNC_MARKER[7:] + encode_close(1, 0))
    assert [f.kind for f in out] == [SYNC, CLOSE]


def test_max_payload_is_enforced() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(DATA, 1, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        encode_frame(99, 1, b"")
    decoder = FrameDecoder(synced=True, max_payload=16)
    oversized = encode_frame(DATA, 1, b"x" * 17)
    out = decoder.feed(oversized + encode_frame(DATA, 1, b"ok"))
    assert [f.payload for f in out] == [b"ok"]


def test_decoder_does_not_grow_without_sync() -> None:
    decoder = FrameDecoder()
    for _ in range(100):
        decoder.feed(os.urandom(4096).replace(SYNC_MARKER[:2], b"qq"))
    assert decoder.buffered < len(SYNC_MARKER)


def full_spec() -> ContainerSpec:
    return ContainerSpec(
        args=["/bin/sh", "-c", "echo hi"],
        env=["A=1", "PATH=/bin"],
        cwd="/work",
        image_id="img",
        uid=1000,
        gid=1000,
        additional_gids=[10, 20],
        capabilities=["CAP_CHOWN"],
        rlimits=[Rlimit(type="RLIMIT_NOFILE", soft=1024, hard=4096)],
        no_new_privs=True,
        readonly_rootfs=True,
        masked_paths=["/proc/kcore"],
        readonly_paths=["/proc/sys"],
        seccomp="runtime/default",
        apparmor="runtime/default",
        mounts=[Mount(destination="/data", source="/run/vol", options=["ro"])],
        tty=True,
        stdin=True,
        stdin_once=True,
        resources=Resources(
            cpu_shares=512,
            cpu_quota=50000,
            cpu_period=100000,
            cpuset_cpus="0",
            cpuset_mems="0",
            memory_limit=64 << 20,
            pids_limit=100,
        ),
        oom_score_adj=500,
        sysctls={"net.ipv4.ip_forward": "1"},
        annotations={"io.kubernetes.pod.name": "p"},
        pid_namespace="pod",
        pod_etc_files=False,
    )


@pytest.mark.parametrize(
    "record",
    [
        full_spec(),
        ContainerSpec(args=["true"]),
        ExecSpec(args=["ls"], env=["X=1"], uid=5, tty=True, stdin=True, timeout=1.5),
        ExitStatus(exit_code=137, signal=9, started_at_ns=1, finished_at_ns=2, reason="Error"),
        ReadyInfo(agent_version="1", protocol_version=1, boot_times={"x": 1.5}, dax=True),
        ContainerInfo(id="c", state="exited", exit_status=ExitStatus(exit_code=0)),
        StatsReport(),
    ],
)
def test_records_round_trip_through_json(record: Record) -> None:
    wire = json.loads(json.dumps(record.to_dict()))
    assert type(record).from_dict(wire) == record


def test_records_ignore_unknown_fields_and_reject_missing_ones() -> None:
    spec = ContainerSpec.from_dict({"args": ["x"], "from_the_future": 1})
    assert spec == ContainerSpec(args=["x"])
    with pytest.raises(ValueError):
        ContainerSpec.from_dict({"env": []})
    with pytest.raises(ValueError):
        ContainerSpec.from_dict({"args": ["x"], "mounts": "not a list"})


def test_record_defaults_are_not_shared() -> None:
    a, b = ContainerSpec(args=["x"]), ContainerSpec(args=["x"])
    a.env.append("A=1")
    assert b.env == []


def test_every_record_has_a_usable_default_or_required_field() -> None:
    names = {cls.__name__ for cls in iter_records()}
    assert {"ContainerSpec", "ExecSpec", "ExitStatus", "ReadyInfo", "Mount"} <= names


def test_protocol_md_lists_every_operation_the_agent_serves() -> None:
    """agent/PROTOCOL.md's operation table and the agent's own dispatch table agree (read
    from the class: a Server instance would start a reaper thread in this process)."""
    import re

    from agent.guest.server import Server

    text = (Path(__file__).parents[2] / "agent" / "PROTOCOL.md").read_text()
    table = text.split("| op | args | result |", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
    assert sorted(documented) == sorted(Server.OPERATIONS)
    assert len(documented) == len(set(documented))
    for name in Server.OPERATIONS:
        assert callable(getattr(Server, f"op_{name}")), name


def test_short_ops_of_a_clones_start_are_answered_on_the_reader_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hello, ping, reseed, sync_clock and set_pod_config are answered before
    handle_request returns, without a thread of their own (a thread is a cost on a cloned
    pod's start); every other operation gets one."""
    from agent.guest import server

    started: list[str] = []

    class RecordedThread:
        def __init__(self, *, target: Any, args: tuple[Any, ...], name: str, daemon: bool) -> None:
            self.name = name

        def start(self) -> None:
            started.append(self.name)

    sent: list[bytes] = []

    class Writer:
        def send(self, data: bytes, generation: int = 0) -> None:
            sent.append(data)

    monkeypatch.setattr("agent.guest.server.threading.Thread", RecordedThread)
    agent = server.Server.__new__(server.Server)
    agent.generation = 1
    agent.writer = Writer()  # type: ignore[assignment]
    agent._ops = {name: (lambda args, generation: {}) for name in server.Server.OPERATIONS}
    for number, op in enumerate(sorted(server.INLINE_OPS)):
        agent.handle_request(json.dumps({"id": number, "op": op, "args": {}}).encode())
        assert len(sent) == number + 1, f"{op} was not answered at once"
    assert started == []
    agent.handle_request(json.dumps({"id": 99, "op": "create_container", "args": {}}).encode())
    assert started == ["op-create_container"]
    assert {"hello", "ping", "reseed", "sync_clock", "set_pod_config"} == server.INLINE_OPS
