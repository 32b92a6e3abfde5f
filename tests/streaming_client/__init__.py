"""The Go streaming test client (client-go's remotecommand and portforward) and a
backend that runs real local processes, for the streaming tests and benchmark."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("CLEARCRI_CACHE", Path.home() / ".cache" / "clearcri"))


def client_path() -> Path:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((SOURCE_DIR / name).read_bytes())
    return CACHE_DIR / f"streaming_client-{digest.hexdigest()[:16]}"


def build_client() -> Path:
    """Build the client (once per source version) into the cache dir; returns its path.
    Raises RuntimeError when Go is missing or the build fails."""
    target = client_path()
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain is needed to build tests/streaming_client")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    result = subprocess.run(
        [go, "build", "-o", str(tmp), "."],
        cwd=SOURCE_DIR,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build failed:\n{result.stderr[-4000:]}")
    tmp.replace(target)
    return target
