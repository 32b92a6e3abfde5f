"""`clearcri bench density --starts-csv`: a row per start, with its phases."""

from __future__ import annotations

from bench.density import START_COLUMNS, start_row
from sandbox.api import BootTimes


def test_a_row_has_the_pod_the_time_and_each_phase() -> None:
    boot = BootTimes(vmm_spawn=0.05, restore=0.015, agent_ready=0.09, hotplug=0.12, total=0.2)
    row = start_row(7, 12.5, boot).split(",")
    assert len(row) == len(START_COLUMNS)
    values = {name: float(value) for name, value in zip(START_COLUMNS, row, strict=True)}
    assert values == {
        "pod": 7,
        "at_s": 12.5,
        "total_s": 0.2,
        "vmm_spawn_s": 0.05,
        "restore_s": 0.015,
        "agent_s": 0.09,
        "hotplug_s": 0.12,
    }
