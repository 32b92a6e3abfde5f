"""The e2e suite's waiting: what is not reported yet is asked for again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.cluster import ClusterError
from tests.e2e.workloads import Workloads


class QuietWorkloads(Workloads):
    def describe(self) -> str:
        return "(pods)"


def _workloads() -> Workloads:
    cluster: Any = None  # nothing here reaches the cluster
    return QuietWorkloads(cluster, "t-wait", "busybox")


def test_a_check_that_cannot_read_yet_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.e2e.workloads.time.sleep", lambda _s: None)
    answers: list[ClusterError | bool] = [
        ClusterError("pod over has no status for container main"),
        False,
        True,
    ]

    def check() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, ClusterError):
            raise answer
        return answer

    _workloads().wait("terminated", check, 60)


def test_a_check_that_never_reads_fails_at_the_timeout_saying_why() -> None:
    def check() -> bool:
        raise ClusterError("pod over has no status for container main")

    with pytest.raises(ClusterError, match=r"not reached within 1 s \(last: pod over has no"):
        _workloads().wait("terminated", check, 1.0)
