"""Guest copies of atomically written volumes (agent/guest/watched.py): kept in step with
their source the way kubelet writes it, with the inotify events kubelet's writes make."""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from agent.guest import watched
from agent.guest.errors import OpError
from cri.runtime.containers import is_atomic_volume
from tests.atomic_writer import write_version

IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK


def inotify_events(fd: int) -> list[tuple[int, str]]:
    events: list[tuple[int, str]] = []
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return events
    offset = 0
    while offset < len(data):
        _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
        events.append((mask, name))
        offset += 16 + length
    return events


def test_copy_follows_versions_and_fires_inotify(tmp_path: Path) -> None:
    source, mirror = tmp_path / "source", tmp_path / "mirror"
    write_version(source, "2026_1", {"mode": "v1", "level": "debug"})
    assert watched.sync(str(source), str(mirror))
    assert (mirror / "mode").read_text() == "v1"
    assert os.readlink(mirror / "mode") == "..data/mode"
    assert not watched.sync(str(source), str(mirror))  # nothing new

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, str(mirror).encode(), IN_MOVED_TO | IN_CREATE) >= 0
        write_version(source, "2026_2", {"mode": "v2"})
        assert watched.sync(str(source), str(mirror))
        events = inotify_events(fd)
    finally:
        os.close(fd)
    assert (IN_MOVED_TO, "..data") in events, events
    assert (mirror / "mode").read_text() == "v2"
    assert not (mirror / "level").exists()  # a key that went away
    assert sorted(p.name for p in mirror.iterdir()) == ["..2026_2", "..data", "mode"]


def test_modes_and_owners_are_kept(tmp_path: Path) -> None:
    source, mirror = tmp_path / "source", tmp_path / "mirror"
    write_version(source, "1", {"token": "secret"})
    token = source / "..1" / "token"
    token.chmod(0o400)
    os.chown(token, 1000, 2000)
    watched.sync(str(source), str(mirror))
    st = (mirror / "..1" / "token").stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o400, 1000, 2000)


def test_a_bad_data_link_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "..data").symlink_to("/etc")
    with pytest.raises(ValueError):
        watched.sync(str(source), str(tmp_path / "mirror"))
    volumes = watched.WatchedVolumes(interval=3600)
    with pytest.raises(OpError):
        volumes.add(str(source), str(tmp_path / "mirror2"))


def test_poller_tracks_and_forgets(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_version(source, "1", {"k": "a"})
    volumes = watched.WatchedVolumes(interval=3600)
    mirror = tmp_path / "bundle" / "watched" / "0"
    volumes.add(str(source), str(mirror))
    write_version(source, "2", {"k": "b"})
    assert volumes.poll_once() == 1
    assert (mirror / "k").read_text() == "b"
    volumes.remove_under(str(tmp_path / "bundle"))
    write_version(source, "3", {"k": "c"})
    assert volumes.poll_once() == 0


def test_only_kubelets_atomic_volumes_are_followed(tmp_path: Path) -> None:
    pod = tmp_path / "pods" / "uid" / "volumes"
    configmap = pod / "kubernetes.io~configmap" / "settings"
    write_version(configmap, "1", {"k": "v"})
    assert is_atomic_volume(configmap)
    empty_dir = pod / "kubernetes.io~empty-dir" / "data"
    empty_dir.mkdir(parents=True)
    (empty_dir / "..data").symlink_to("x")
    assert not is_atomic_volume(empty_dir)
    plain = tmp_path / "plain"
    write_version(plain, "1", {"k": "v"})
    assert not is_atomic_volume(plain)


def test_the_poller_stops_when_nothing_is_followed(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_version(source, "1", {"k": "a"})
    volumes = watched.WatchedVolumes(interval=0.01)
    volumes.add(str(source), str(tmp_path / "b" / "watched" / "0"))
    thread = volumes._thread
    assert thread is not None and thread.is_alive()
    volumes.remove_under(str(tmp_path / "b"))
    thread.join(5)
    assert not thread.is_alive() and volumes._thread is None
    volumes.add(str(source), str(tmp_path / "c" / "watched" / "0"))
    assert volumes._thread is not None and volumes._thread.is_alive()


def test_one_volume_that_breaks_the_sync_stops_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever one volume's sync raises, the poller goes on with the others (it follows
    every watched volume of the VM), and a poller thread that ended is started again."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_version(good, "1", {"k": "a"})
    write_version(bad, "1", {"k": "a"})
    volumes = watched.WatchedVolumes(interval=0.01)
    real_sync = watched.sync

    def sync(source: str, mirror: str) -> bool:
        if source == str(bad):
            raise RuntimeError("not an OSError")
        return real_sync(source, mirror)

    volumes.add(str(bad), str(tmp_path / "b" / "watched" / "0"))
    monkeypatch.setattr(watched, "sync", sync)
    volumes.add(str(good), str(tmp_path / "g" / "watched" / "0"))
    write_version(good, "2", {"k": "b"})
    mirror = tmp_path / "g" / "watched" / "0" / "k"
    deadline = time.monotonic() + 5
    while mirror.read_text() != "b":
        assert time.monotonic() < deadline, "the poller stopped following the good volume"
        time.sleep(0.01)
    thread = volumes._thread
    assert thread is not None and thread.is_alive()


def test_a_poller_thread_that_died_is_started_again(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_version(source, "1", {"k": "a"})
    volumes = watched.WatchedVolumes(interval=3600)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    volumes._thread = dead  # as a thread ended by an exception leaves it
    volumes.add(str(source), str(tmp_path / "b" / "watched" / "0"))
    assert volumes._thread is not dead and volumes._thread.is_alive()
