"""The guest's image mounts (agent/guest/images.py), with the kernel calls faked."""

from __future__ import annotations

import errno

import pytest

from agent.guest import images, system
from agent.protocol import ImageSource


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, failures: list[int]) -> list[str]:
    """A pmem disk that is found at once and whose mounts fail with ``failures`` first."""
    mounted: list[str] = []
    monkeypatch.setattr(system, "find_pmem_device", lambda pci, timeout: "/dev/pmem1")

    def mount(source: str, target: str, *args: object) -> None:
        if failures:
            raise OSError(failures.pop(0), "mount")
        mounted.append(f"{source} {target}")

    monkeypatch.setattr(system, "mount", mount)
    monkeypatch.setattr(images, "ENXIO_RETRY_S", 0.0)
    return mounted


def test_a_hot_plugged_disk_not_yet_openable_is_mounted_once_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # its /dev node comes a moment before the disk: the mount meanwhile says ENXIO
    mounted = _fake_kernel(monkeypatch, [errno.ENXIO, errno.ENXIO, errno.ENXIO])
    images.mount(ImageSource(pci_path="0000:00:08.0/0000:01:00.0"), "/run/images/i")
    assert mounted == ["/dev/pmem1 /run/images/i"]


def test_a_disk_that_never_opens_fails_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(monkeypatch, [errno.ENXIO] * 1_000_000)
    with pytest.raises(OSError) as caught:
        images.mount(ImageSource(pci_path="0000:00:08.0/0000:01:00.0", timeout=0.05), "/x")
    assert caught.value.errno == errno.ENXIO


def test_other_mount_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    failures = [errno.EINVAL, errno.ENXIO]
    _fake_kernel(monkeypatch, failures)
    with pytest.raises(OSError) as caught:
        images.mount(ImageSource(pci_path="0000:00:08.0/0000:01:00.0"), "/x")
    assert caught.value.errno == errno.EINVAL
    assert failures == [errno.ENXIO]
