"""The host side of a pod VM's share: real bind mounts below a temporary directory
(the tests run as root, as the daemon does)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import GUEST_SHARE_DIR
from sandbox import mounts
from sandbox.share import PodShare, ShareError


@pytest.fixture
def share(tmp_path: Path) -> Iterator[PodShare]:
    pod = PodShare(tmp_path / "share")
    pod.create()
    yield pod
    mounts.remove_tree(pod.root)


def test_entries_are_the_hosts_own_files_both_ways(share: PodShare, tmp_path: Path) -> None:
    volume = tmp_path / "emptydir"
    volume.mkdir()
    (volume / "from-host").write_text("v1")
    guest = share.bind("c1-0", volume, readonly=False, propagation="rprivate")
    assert guest == f"{GUEST_SHARE_DIR}/c1-0"
    entry = share.root / "c1-0"
    assert (entry / "from-host").read_text() == "v1"
    (volume / "from-host").write_text("v2")
    assert (entry / "from-host").read_text() == "v2"
    (entry / "from-pod").write_text("hello")
    assert (volume / "from-pod").read_text() == "hello"
    # a single file (termination log, /etc/hosts) is shared as a file
    log = tmp_path / "termination-log"
    log.write_text("")
    share.bind("c1-1", log, readonly=False, propagation="rprivate")
    (share.root / "c1-1").write_text("bye")
    assert log.read_text() == "bye"


def test_readonly_entry_refuses_writes(share: PodShare, tmp_path: Path) -> None:
    config = tmp_path / "configmap"
    config.mkdir()
    (config / "key").write_text("value")
    share.bind("c2-0", config, readonly=True, propagation="rprivate")
    with pytest.raises(OSError) as err:
        (share.root / "c2-0" / "key").write_text("changed")
    assert err.value.errno == 30  # EROFS
    assert (config / "key").read_text() == "value"


def test_removal_unmounts_and_never_deletes_host_files(tmp_path: Path) -> None:
    volume = tmp_path / "data"
    volume.mkdir()
    (volume / "precious").write_text("keep")
    share = PodShare(tmp_path / "run" / "share")
    (tmp_path / "run").mkdir()
    share.create()
    share.bind("c3-0", volume, readonly=False, propagation="rprivate")
    share.bind("c3-1", volume / "precious", readonly=True, propagation="rprivate")
    # removing the pod's whole run directory detaches the share first
    mounts.remove_tree(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert (volume / "precious").read_text() == "keep"
    assert mounts.mounts_under(tmp_path) == []


def test_unbind_drops_one_entry(share: PodShare, tmp_path: Path) -> None:
    volume = tmp_path / "v"
    volume.mkdir()
    (volume / "f").write_text("x")
    share.bind("c4-0", volume, readonly=False, propagation="rprivate")
    share.unbind(["c4-0", "unknown", "../escape"])
    assert share.keys() == []
    assert (volume / "f").read_text() == "x"


def test_special_files_are_bound_without_being_read(share: PodShare, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def bind_all() -> None:
        share.bind("c5-0", Path("/proc"), readonly=True, propagation="rprivate")
        share.bind("c5-1", fifo, readonly=False, propagation="rprivate")
        share.bind("c5-2", Path("/proc/kmsg"), readonly=True, propagation="rprivate")
        done.set()

    worker = threading.Thread(target=bind_all, daemon=True)
    worker.start()
    assert done.wait(10), "binding /proc or a FIFO blocked"
    assert (share.root / "c5-0" / "self").exists()


def test_bad_keys_and_sources_are_refused(share: PodShare, tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="bad share key"):
        share.bind("../x", tmp_path, readonly=False, propagation="rprivate")
    with pytest.raises(ShareError, match="host path"):
        share.bind("c6-0", tmp_path / "missing", readonly=False, propagation="rprivate")
    with pytest.raises(ShareError, match="rshared"):
        share.bind("c6-1", tmp_path, readonly=False, propagation="rshared")
    share.bind("c6-2", tmp_path, readonly=False, propagation="rprivate")
    with pytest.raises(ShareError, match="in use"):
        share.bind("c6-2", tmp_path, readonly=False, propagation="rprivate")
    assert share.keys() == ["c6-2"]


def test_host_to_container_entries_receive_later_host_mounts(
    share: PodShare, tmp_path: Path
) -> None:
    source = tmp_path / "shared-src"
    source.mkdir()
    mounts.bind(source, source, recursive=False)
    try:
        mounts.set_propagation(source, "rshared")
        share.bind("c7-0", source, readonly=False, propagation="rslave")
        (source / "sub").mkdir()
        inner = tmp_path / "inner"
        inner.mkdir()
        (inner / "marker").write_text("m")
        mounts.bind(inner, source / "sub")
        assert (share.root / "c7-0" / "sub" / "marker").read_text() == "m"
    finally:
        share.unbind(["c7-0"])
        mounts.unmount_under(source)


def test_user_namespace_pods_see_owners_ids(share: PodShare, tmp_path: Path) -> None:
    """An idmapped entry: host uid 1234 appears as 2234 (the guest id the container's
    1234 maps to); what the container's root (guest 1000) creates is root's on the host."""
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "owned").write_text("x")
    os.chown(volume / "owned", 1234, 1234)
    mappings = [[0, 1000, 65536]]
    share.bind(
        "c8-0", volume, readonly=False, propagation="rprivate", id_mappings=(mappings, mappings)
    )
    entry = share.root / "c8-0"
    assert (entry / "owned").stat().st_uid == 2234
    assert entry.stat().st_uid == 1000
    # as QEMU's passthrough creates a file for the guest: as root, then chown
    os.close(os.open(entry / "made-in-pod", os.O_CREAT | os.O_WRONLY, 0o644))
    os.chown(entry / "made-in-pod", 1000, 1000)
    assert (volume / "made-in-pod").stat().st_uid == 0
    assert (entry / "made-in-pod").stat().st_uid == 1000


def test_the_creators_mapping_is_added_beside_the_pods() -> None:
    from sandbox.userns import with_creator

    assert with_creator([[0, 1000, 65536]]) == [[0, 1000, 65536], [65536, 0, 1]]
    assert with_creator([[0, 0, 10]]) == [[0, 0, 10]]
    jailed = 0x7000_0005
    assert with_creator([[0, 1000, 65536]], jailed) == [[0, 1000, 65536], [65536, jailed, 1]]


def test_a_run_directory_goes_with_the_run_roots_link_to_it(tmp_path: Path) -> None:
    # a pod on a standby VM: its run directory is the standby's, the run root links to it
    standby_dir = tmp_path / "standby" / "standby-1"
    (standby_dir / "vmm").mkdir(parents=True)
    link = tmp_path / "run" / "pod-1"
    link.parent.mkdir()
    link.symlink_to(standby_dir)
    mounts.remove_tree_and_link(standby_dir, link)
    assert not standby_dir.exists() and not os.path.lexists(link)
    # a pod of its own: its run directory is the run root's entry, no link to remove
    own = tmp_path / "run" / "pod-2"
    own.mkdir()
    mounts.remove_tree_and_link(own, own)
    assert not own.exists()
