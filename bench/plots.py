"""PNG plots of the `clearcri bench` figures (docs/benchmarks.md shows them).

Drawn with matplotlib's object API on a figure of its own (no pyplot, no global state,
no display needed). matplotlib is optional (``pip install -e '.[bench]'``): the
benchmarks call ``require_matplotlib`` before they start when a plot is asked for, so a
long run never ends without the plot it was started for.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: One colour per boot phase, the same in every bar (tab10 colours).
PHASE_COLOURS = {
    "floor": "#7f7f7f",
    "vmm_spawn": "#1f77b4",
    "restore": "#9467bd",
    "firmware": "#ff7f0e",
    "kernel": "#d62728",
    "agent_ready": "#2ca02c",
}
PHASE_LABELS = {
    "floor": "floor: kernel + trivial /init",
    "vmm_spawn": "vmm_spawn: QEMU started until QMP answers",
    "restore": "restore: template device state",
    "firmware": "firmware (qboot)",
    "kernel": "kernel (guest clock at /init)",
    "agent_ready": "agent_ready: until the agent answers",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 110


class PlotError(RuntimeError):
    """A plot was asked for and cannot be drawn (matplotlib missing)."""


def require_matplotlib() -> None:
    """Raise ``PlotError`` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotError(
            "--plot needs matplotlib: pip install -e '.[bench]' (or pip install matplotlib)"
        ) from exc


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)


# -- bench density --------------------------------------------------------------------


@dataclass(frozen=True)
class DensityStep:
    """The figures of one step of `clearcri bench density`."""

    pods: int
    start_median: float  # seconds, the last step's pods
    start_max: float
    pss_per_pod_mib: float  # qemu PSS summed over the running VMs, divided by ``pods``
    drop_per_pod_mib: float  # MemAvailable drop since before the first pod, per pod
    cpu_busy: float  # the host's busy share, 0..1


def _against_pod_count(ax: Any, ylabel: str, title: str, *, legend_at: str) -> None:
    """Axes of a figure against the number of pod VMs running, from zero."""
    ax.set_xlabel("pod VMs running")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_at)
    ax.set_title(title, fontsize=10)


def density_plot(
    steps: Sequence[DensityStep], starts: Sequence[float], path: Path, *, title: str
) -> None:
    """Start time per pod and host memory per pod against the number of pods running.

    ``starts`` holds every pod's start time in the order they started (pod n started
    with n - 1 already running)."""
    fig = _figure(11, 4.6)
    ax_start, ax_mem = fig.subplots(1, 2)
    counts = [s.pods for s in steps]

    ax_start.scatter(
        range(1, len(starts) + 1), starts, s=6, color="#1f77b4", alpha=0.35, label="each pod"
    )
    ax_start.plot(
        counts, [s.start_median for s in steps], "o-", color="#1f77b4", label="median of the step"
    )
    ax_start.plot(counts, [s.start_max for s in steps], "v--", color="#d62728", label="max")
    _against_pod_count(
        ax_start,
        "start time (s): spawn until agent ready",
        "start time of the next pod",
        legend_at="upper left",
    )

    ax_mem.plot(counts, [s.pss_per_pod_mib for s in steps], "o-", color="#2ca02c", label="qemu PSS")
    ax_mem.plot(
        counts,
        [s.drop_per_pod_mib for s in steps],
        "s--",
        color="#ff7f0e",
        label="host MemAvailable drop",
    )
    for step in steps[-1:]:
        ax_mem.annotate(
            f"{step.pss_per_pod_mib:.1f}",
            (step.pods, step.pss_per_pod_mib),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    _against_pod_count(ax_mem, "MiB per pod", "host memory per idle pod", legend_at="lower right")

    fig.suptitle(title, fontsize=10)
    _save(fig, path)


# -- bench boot -----------------------------------------------------------------------


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of every series, in the mapping's order."""
    return {name: statistics.median(values) for name, values in samples.items() if values}


@dataclass(frozen=True)
class BootBar:
    """One kind of start: the median of each phase (seconds, bottom to top in the
    mapping's order; names from ``PHASE_COLOURS``) and the median of the totals."""

    label: str
    phases: Mapping[str, float]
    total: float


def boot_phases_plot(bars: Sequence[BootBar], path: Path, *, title: str) -> None:
    """One stacked bar of phases per kind of start, its median total written above it
    (medians do not add up: the stack can differ from it by a few milliseconds)."""
    fig = _figure(8.5, 5)
    ax = fig.subplots()
    shown: set[str] = set()
    top = 0.0
    for x, bar in enumerate(bars):
        bottom = 0.0
        for phase, seconds in bar.phases.items():
            label = PHASE_LABELS.get(phase, phase) if phase not in shown else None
            shown.add(phase)
            ax.bar(
                x,
                seconds,
                0.6,
                bottom=bottom,
                color=PHASE_COLOURS.get(phase, "#bcbd22"),
                edgecolor="white",
                linewidth=0.5,
                label=label,
            )
            bottom += seconds
        ax.annotate(
            f"{bar.total:.3f} s",
            (x, max(bottom, bar.total)),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )
        top = max(top, bottom, bar.total)
    ax.set_xticks(range(len(bars)), [bar.label for bar in bars], fontsize=8)
    ax.set_ylabel("seconds: median of each phase; median total above")
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    # legend in phase order, whichever bar showed a phase first
    handles, labels = ax.get_legend_handles_labels()
    order = {label: i for i, label in enumerate(PHASE_LABELS.values())}
    pairs = sorted(zip(labels, handles, strict=True), key=lambda p: order.get(p[0], len(order)))
    ax.legend([h for _, h in pairs], [lab for lab, _ in pairs], fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
