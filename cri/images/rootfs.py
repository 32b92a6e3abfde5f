"""An image's root filesystem as the file sandboxes attach: ONE read-only erofs file per
container image on the host, shared by every pod that runs it (a ``RootfsImage``,
sandbox/api.py; docs/images.md). Also the small busybox root the demo, the benchmarks,
the tests and `clearcri image push-busybox` use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from agent.protocol import ErrorCode
from cri.images.errors import ImageError
from sandbox.api import RootfsImage, align_up

MKFS_EROFS = "mkfs.erofs"


class RootfsBuildError(ImageError):
    """Building the erofs image of a container rootfs failed."""

    code = ErrorCode.INTERNAL


def image_id_for(key: str) -> str:
    """A short stable id (safe as a QEMU id and a guest directory name) for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_rootfs_image(source_dir: Path, dest: Path, *, image_id: str) -> RootfsImage:
    """Make ``dest`` an erofs image of ``source_dir`` (idempotent, atomic).

    Inline tail data is disabled (it defeats DAX for small files), timestamps and
    UUID are fixed so that the same tree always gives the same bytes, and the file
    is padded to the 2 MiB alignment a persistent-memory device needs.
    """
    if dest.exists():
        return RootfsImage(image_id, dest)
    if not source_dir.is_dir():
        raise RootfsBuildError(f"{source_dir} is not a directory")
    if shutil.which(MKFS_EROFS) is None:
        raise RootfsBuildError("mkfs.erofs not found: install erofs-utils")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        proc = subprocess.run(
            [
                MKFS_EROFS,
                "-Enoinline_data",
                "-T0",
                "-U",
                "00000000-0000-0000-0000-000000000000",
                "--quiet",
                str(tmp),
                str(source_dir),
            ],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RootfsBuildError(
                f"mkfs.erofs failed for {source_dir}: {proc.stderr.decode(errors='replace')}"
            )
        size = tmp.stat().st_size
        os.truncate(tmp, align_up(size))
        os.chmod(tmp, 0o444)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return RootfsImage(image_id, dest)


BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh",
    "ash",
    "cat",
    "echo",
    "ls",
    "sleep",
    "env",
    "id",
    "ps",
    "kill",
    "tty",
    "stty",
    "true",
    "false",
    "printf",
    "wc",
    "grep",
    "head",
    "tail",
    "mkdir",
    "rm",
    "touch",
    "hostname",
    "wget",
    "httpd",
    "nc",
    "date",
    "uname",
    "test",
    "[",
    "dd",
    "mount",
    "pgrep",
    "top",
    "yes",
    "sync",
    "ip",
    "ping",
    "seq",
    "sort",
    "tr",
    "cut",
)


def make_busybox_tree(dest: Path, busybox: Path = BUSYBOX) -> Path:
    """A minimal container root: static busybox, its applets, /etc/passwd and group.

    Used by `clearcri demo`, the benchmarks and the tests; real workloads come from
    pulled images.
    """
    if not busybox.exists():
        raise RootfsBuildError(f"{busybox} not found: install busybox-static")
    for sub in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/nobody"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = dest / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "www-data:x:33:33:www-data:/var/www:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/home/nobody:/bin/sh\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n")
    os.chmod(dest / "tmp", 0o1777)
    return dest
