"""The benchmarks' PNG plots (bench/plots.py), drawn from made-up figures, and the
``--plot`` options of `clearcri bench boot` and `clearcri bench density`."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench.plots import (
    PNG_MAGIC,
    BootBar,
    DensityStep,
    PlotError,
    boot_phases_plot,
    density_plot,
    medians,
    require_matplotlib,
)
from cri.cli import build_parser

pytest.importorskip("matplotlib", reason="pip install -e '.[bench]'")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_density_plot(tmp_path: Path) -> None:
    starts = [0.45 + 0.002 * i + (0.2 if i % 7 == 0 else 0.0) for i in range(60)]
    steps = [
        DensityStep(
            pods=n,
            start_median=0.45 + 0.002 * n,
            start_max=0.7 + 0.003 * n,
            pss_per_pod_mib=60 - n / 10,
            drop_per_pod_mib=38 + n / 100,
            cpu_busy=0.05 + n / 400,
        )
        for n in range(10, 61, 10)
    ]
    path = tmp_path / "plots" / "density.png"  # the directory is made
    density_plot(steps, starts, path, title="made-up figures")
    width, height = png_size(path)
    assert width > 600 and height > 300


def test_boot_phases_plot(tmp_path: Path) -> None:
    cold = medians({"vmm_spawn": [0.05, 0.04, 0.06], "firmware": [0.1], "kernel": [1.2, 1.3]})
    assert cold == {"vmm_spawn": 0.05, "firmware": 0.1, "kernel": 1.25}
    bars = [
        BootBar("floor", {"floor": 1.3}, 1.3),
        BootBar("cold", {**cold, "agent_ready": 1.4}, 2.8),
        BootBar("clone", {"vmm_spawn": 0.08, "restore": 0.02, "agent_ready": 0.4}, 0.5),
        # a phase without a colour of its own is drawn in a shared one
        BootBar("odd", {"a phase of its own": 0.3}, 0.3),
    ]
    path = tmp_path / "boot.png"
    boot_phases_plot(bars, path, title="made-up figures")
    width, height = png_size(path)
    assert width > 500 and height > 300


def test_medians_leave_out_empty_series() -> None:
    assert medians({"a": [3.0, 1.0, 2.0], "b": []}) == {"a": 2.0}


def test_without_matplotlib_a_plot_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(PlotError, match="pip install"):
        require_matplotlib()
    args = build_parser().parse_args(["bench", "density", "--plot", "x.png"])
    with pytest.raises(SystemExit, match="matplotlib"):
        args.func(args)


def test_plot_options() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "boot"]).plot == ""
    assert parser.parse_args(["bench", "density"]).plot == ""
    args = parser.parse_args(["bench", "boot", "--runs", "3", "--plot", "docs/boot-phases.png"])
    assert args.plot == "docs/boot-phases.png"
    assert parser.parse_args(["bench", "density", "--plot", "d.png"]).plot == "d.png"
