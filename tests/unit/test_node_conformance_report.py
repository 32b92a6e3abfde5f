"""Reading ginkgo's JSON report of a node conformance run, and the tables made of it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance import check, table
from tests.e2e import node_conformance

REPORT = [
    {
        "SuiteDescription": "E2eNode Suite",
        "SpecReports": [
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
            {
                "LeafNodeType": "It",
                "ContainerHierarchyTexts": ["[sig-node]", " Pods"],
                "LeafNodeText": "should be updated [NodeConformance]",
                "State": "passed",
                "RunTime": 12_500_000_000,
            },
            {
                "LeafNodeType": "It",
                "ContainerHierarchyTexts": ["[sig-node] Probing container"],
                "LeafNodeText": "should be restarted",
                "State": "failed",
                "RunTime": 60_000_000_000,
                "Failure": {"Message": "Timed out after 60.001s.\nmore"},
            },
            {
                "LeafNodeType": "It",
                "ContainerHierarchyTexts": ["[sig-node] AppArmor"],
                "LeafNodeText": "should enforce",
                "State": "skipped",
                "Failure": {"Message": "Only supported on AppArmor hosts"},
            },
            {
                # not selected by focus and skip: no part of the run
                "LeafNodeType": "It",
                "ContainerHierarchyTexts": ["[sig-node] Serial thing"],
                "LeafNodeText": "x [Serial]",
                "State": "skipped",
            },
        ],
    }
]


def test_report_keeps_run_specs_with_their_exact_text(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    results = node_conformance.read_json_report(path)
    assert [(r.name, r.outcome) for r in results] == [
        ("[sig-node]  Pods should be updated [NodeConformance]", "passed"),
        ("[sig-node] Probing container should be restarted", "failed"),
        ("[sig-node] AppArmor should enforce", "skipped"),
    ]
    assert results[0].seconds == 12.5
    assert results[1].message == "Timed out after 60.001s."
    assert check.summary_line(results) == "1 passed, 1 failed, 1 skipped"
    # a focus built from the names selects exactly these texts
    focus = check.focus_regex([results[0].name], suite=node_conformance.SUITE)
    assert focus == r"^E2eNode Suite (\[sig-node\]  Pods should be updated \[NodeConformance\])$"


def test_table_reads_results_json(tmp_path: Path) -> None:
    results = {
        "suite_seconds": 120,
        "specs": [
            {"name": "a | b", "outcome": "passed", "seconds": 1.0, "message": ""},
            {"name": "c", "outcome": "failed", "seconds": 2.0, "message": "boom"},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    text = table.render([("clearcri", path)])
    assert "| a \\| b | pass |" in text
    assert "| c | **FAIL** |" in text
    assert "| **total** | 1 passed, 1 failed, 0 skipped |" in text
    assert "| **suite wall time** | 2.0 min |" in text
