"""What kubelet's atomic writer leaves in a ConfigMap, Secret, projected or downward API
volume, for tests and benchmarks: each version in a timestamped directory, ``..data``
swapped to the new one by renaming ``..data_tmp`` over it, one ``key -> ..data/key``
link per key, the old version removed."""

from __future__ import annotations

import os
from pathlib import Path


def write_version(directory: Path, stamp: str, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    version = directory / f"..{stamp}"
    version.mkdir()
    for name, value in files.items():
        (version / name).write_text(value)
    (directory / "..data_tmp").symlink_to(version.name)
    (directory / "..data_tmp").rename(data)
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old:
        for path in sorted((directory / old).rglob("*"), reverse=True):
            path.unlink()
        (directory / old).rmdir()
