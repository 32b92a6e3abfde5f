"""Benchmark: pull a ~100 MB image from a local docker-registry, and build its erofs rootfs.

Prints pull seconds and MB/s (compressed bytes fetched, verified and stored), the erofs
conversion time (unpack + mkfs.erofs), and, when skopeo is installed, the time of
``skopeo copy docker://... dir:...`` for the same image in the same run and our ratio
to it. Medians over --runs.

    PYTHONPATH=. python3 tests/bench/bench_pull.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cri.images.store import ImageStore
from cri.store import Store
from tests.registry import Entry, Layer, RegistryServer, busybox_layer, push_image

FILE_SIZE = 256 << 10


def build_layers(total_mb: int, layers: int = 4) -> list[Layer]:
    """Random (incompressible) files spread over ``layers`` layers, plus busybox."""
    per_layer = (total_mb << 20) // layers
    result = [busybox_layer()]
    for n in range(layers):
        entries = [Entry(f"data{n}", "dir", mode=0o755)]
        entries += [
            Entry(f"data{n}/f{i:05d}", data=os.urandom(FILE_SIZE))
            for i in range(per_layer // FILE_SIZE)
        ]
        result.append(Layer(entries))
    return result


async def one_run(registry: RegistryServer, ref: str, workdir: Path) -> tuple[float, float, int]:
    images = ImageStore(Store(workdir / "state.db"), workdir / "images", unpack_on_pull=False)
    try:
        started = time.perf_counter()
        record = await images.pull(ref)
        pulled = time.perf_counter() - started
        started = time.perf_counter()
        await images.rootfs_image(record.id)
        converted = time.perf_counter() - started
        return pulled, converted, record.size
    finally:
        await images.aclose()


def skopeo_run(registry: RegistryServer, path: str, workdir: Path) -> float:
    dest = workdir / "skopeo"
    started = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{registry.host}/{path}",
            f"dir:{dest}",
        ],
        check=True,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=100, help="image size in MB (default 100)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clearcri-bench-") as tmp:
        base = Path(tmp)
        registry = RegistryServer(base / "registry")
        try:
            layers = build_layers(args.mb)
            asyncio.run(push_image(registry.host, "bench/big", ["1"], layers))
            ref = f"{registry.host}/bench/big:1"
            pulls, converts, skopeos = [], [], []
            size = 0
            for run in range(args.runs):
                workdir = base / f"run{run}"
                pulled, converted, size = asyncio.run(one_run(registry, ref, workdir))
                pulls.append(pulled)
                converts.append(converted)
                if shutil.which("skopeo"):
                    skopeos.append(skopeo_run(registry, "bench/big:1", workdir))
                shutil.rmtree(workdir)
        finally:
            registry.stop()
    pull = statistics.median(pulls)
    mb = size / 1e6
    print(f"image            {mb:.1f} MB compressed, {len(layers)} layers")
    print(
        f"pull             {pull:.2f} s  ({mb / pull:.0f} MB/s)  runs: "
        + ", ".join(f"{p:.2f}" for p in pulls)
    )
    print(
        f"erofs conversion {statistics.median(converts):.2f} s  runs: "
        + ", ".join(f"{c:.2f}" for c in converts)
    )
    if skopeos:
        sk = statistics.median(skopeos)
        print(f"skopeo copy      {sk:.2f} s  ({mb / sk:.0f} MB/s)")
        print(f"pull / skopeo    {pull / sk:.2f}")
    else:
        print("skopeo copy      (skopeo not installed: apt-get install skopeo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
