"""Guest assets as the runtime finds them: the files every pod VM boots, under the guest
directory with the ``manifest.json`` that describes them.

* ``vmlinux``: the guest kernel, an uncompressed PVH-bootable ELF;
* ``initrd.img``: the initramfs (busybox, the kernel modules the guest needs, ``/init``);
* ``os.img``: a read-only erofs image with python3, crun, busybox and the agent, mapped
  into every VM with DAX from this one host file;
* ``floor-initrd.img``: the same kernel's trivial ``/init`` (the benchmark floor);
* ``qemu-system-x86_64``: the VMM that runs them, QEMU with the qemu-lite machine's
  devices only, linked statically (guestbuild/vmm.py).

`clearcri guest build` (guestbuild/) makes them; this module only finds them and checks
them against their manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_GUEST_DIR = Path("/var/lib/clearcri/guest")

#: "clearcri": our own kernel from linux-source-6.1 and guestbuild/guest_kernel.config
#: (everything built in, 9p for the pod's share); "debian": Debian's cloud kernel with
#: its modules loaded by the initramfs (no 9p: pods cannot mount host paths).
KERNEL_FLAVORS: tuple[str, ...] = ("clearcri", "debian")
DEFAULT_KERNEL_FLAVOR = "clearcri"
#: Each flavor's timer frequency (CONFIG_HZ): guestbuild/guest_kernel.config's, Debian's.
KERNEL_HZ = {"clearcri": 100, "debian": 250}

#: The components of a build and their files in the guest directory.
COMPONENTS: tuple[str, ...] = ("kernel", "initrd", "floor_initrd", "os_image", "vmm")
OUTPUT_FILES: Mapping[str, str] = {
    "kernel": "vmlinux",
    "initrd": "initrd.img",
    "floor_initrd": "floor-initrd.img",
    "os_image": "os.img",
    "vmm": "qemu-system-x86_64",
}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


class GuestError(Exception):
    """Base class of guest asset errors."""


class GuestAssetsMissing(GuestError):
    """The guest assets are not built (or are incomplete)."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    os_image: Path
    floor_initrd: Path
    kernel_version: str
    version: str
    kernel_flavor: str = DEFAULT_KERNEL_FLAVOR
    #: the guest directory's own QEMU build (None: the host's QEMU runs the VMs)
    vmm: Path | None = None

    @property
    def hz(self) -> int:
        return KERNEL_HZ.get(self.kernel_flavor, 100)

    @property
    def share(self) -> bool:
        """Whether the guest kernel mounts the pod's 9p share (host-path mounts)."""
        return self.kernel_flavor == "clearcri"


def load_manifest(guest_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((guest_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def locate_guest(guest_dir: Path = DEFAULT_GUEST_DIR) -> GuestAssets:
    """The built guest assets; raises GuestAssetsMissing if they are not (fully) built."""
    hint = "run `clearcri guest build`"
    manifest = load_manifest(guest_dir)
    if manifest is None or not manifest.get("complete"):
        raise GuestAssetsMissing(f"guest assets are not built in {guest_dir}: {hint}")
    components = manifest.get("components", {})
    paths: dict[str, Path] = {}
    for name in COMPONENTS:
        entry = components.get(name)
        path = guest_dir / OUTPUT_FILES[name]
        if not isinstance(entry, dict) or not path.is_file():
            raise GuestAssetsMissing(f"guest asset {path} is missing: {hint}")
        if path.stat().st_size != entry.get("size"):
            raise GuestAssetsMissing(f"guest asset {path} does not match its manifest: {hint}")
        paths[name] = path
    return GuestAssets(
        kernel=paths["kernel"],
        initrd=paths["initrd"],
        os_image=paths["os_image"],
        floor_initrd=paths["floor_initrd"],
        kernel_version=str(manifest["kernel_version"]),
        version=str(manifest["version"]),
        kernel_flavor=str(manifest.get("kernel_flavor", "debian")),
        vmm=paths["vmm"],
    )


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB chunks (assets are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hash(directory: Path, pattern: str = "*.py") -> str:
    """Hash of every file matching ``pattern`` below ``directory`` (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob(pattern)):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def agent_hash(agent_dir: Path) -> str:
    """What a guest's manifest records (``agent_hash``) of the agent its OS image carries:
    the hashes of the agent package's Python and C sources."""
    return tree_hash(agent_dir) + tree_hash(agent_dir, "*.c")
