"""Container images in the guest (the ``mount_image`` op): each is mounted read-only at
``<run>/images/<image_id>`` from the source the host names (agent.protocol.ImageSource).
"""

from __future__ import annotations

import errno
import os
import time

from agent.guest import system
from agent.guest.errors import invalid
from agent.protocol import ImageSource

#: seconds to wait for a hot-plugged virtio-pmem device to show up
PMEM_TIMEOUT = 5.0
#: how often a mount of a device that has its node but no disk yet is tried again
ENXIO_RETRY_S = 0.01


def image_source(raw: object) -> ImageSource:
    """The ImageSource of a request's ``source``; INVALID_ARGUMENT unless it names
    exactly one location with fields of the right types."""
    if not isinstance(raw, dict):
        raise invalid("source must be an object")
    try:
        source: ImageSource = ImageSource.from_dict(raw)
    except ValueError as exc:
        raise invalid(f"source: {exc}") from exc
    for name in ("pci_path", "device", "fstype", "options", "dir"):
        if not isinstance(getattr(source, name), str):
            raise invalid(f"source: {name} must be a string")
    timeout = source.timeout
    if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
        raise invalid("source: timeout must be a number of seconds")
    if len(source.locations) != 1:
        raise invalid("source needs exactly one of pci_path, device or dir")
    return source


def mount(source: ImageSource, target: str) -> None:
    """Mount the image of ``source`` read-only at ``target`` (an existing directory)."""
    if source.pci_path:
        timeout = PMEM_TIMEOUT if source.timeout is None else float(source.timeout)
        deadline = time.monotonic() + timeout
        device = system.find_pmem_device(source.pci_path, timeout=timeout)
        _mount_new_device(device, target, deadline)
    elif source.device:
        fstype = source.fstype or "erofs"
        system.mount(source.device, target, fstype, system.MS_RDONLY, source.options)
    else:
        if not os.path.isdir(source.dir):
            raise invalid(f"{source.dir!r} is not a directory")
        system.mount(source.dir, target, None, system.MS_BIND | system.MS_REC)
        system.mount("none", target, None, system.MS_BIND | system.MS_REMOUNT | system.MS_RDONLY)


def _mount_new_device(device: str, target: str, deadline: float) -> None:
    """Mount a just hot-plugged pmem disk. Its /dev node appears as the kernel adds the
    disk, a moment before the disk can be opened: until then a mount fails with ENXIO,
    so that is tried again until ``deadline``."""
    while True:
        try:
            system.mount(device, target, "erofs", system.MS_RDONLY, "dax=always")
            return
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(ENXIO_RETRY_S)
