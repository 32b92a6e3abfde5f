"""What the guest build modules share: their error, the progress callback and the
helpers that run host programs and handle files."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from sandbox.guest import GuestError
from sandbox.guest import sha256_file as sha256_file

ProgressFn = Callable[[str], None]


class GuestBuildError(GuestError):
    """Building the guest assets failed."""


def run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise GuestBuildError(f"{' '.join(argv[:3])} failed: {' / '.join(tail)}")
    return proc.stdout


def decompress_cli(argv: Sequence[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        raise GuestBuildError(f"{argv[0]} is needed to decompress the kernel; install it")
    proc = subprocess.run(list(argv), input=data, capture_output=True, check=False)
    # Trailing bytes after the stream make some tools complain; the output still counts.
    if not proc.stdout:
        raise GuestBuildError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def cache_root(kind: str) -> Path:
    """Where builds of ``kind`` (the kernel, the VMM) are cached: ``~/.cache/clearcri/``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clearcri" / kind


def compiler_version() -> str:
    """The host compiler's version line: part of every compiled component's inputs."""
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "none"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"
