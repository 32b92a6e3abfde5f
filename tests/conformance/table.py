"""Render the per-spec comparison tables of docs/conformance.md from run reports.

    python3 -m tests.conformance.table clearcri=build/conformance/clearcri/junit.xml \\
        containerd+runc=build/conformance/containerd/junit.xml
    python3 -m tests.conformance.table \\
        clearcri=build/node-conformance/clearcri/results.json \\
        containerd+runc=build/node-conformance/containerd/results.json

Prints a Markdown table: one row per spec, one column per runtime (pass, FAIL, skip),
then a row of pass counts and the suite's wall time, read from the results.json that
the runners (tests/conformance/run.py, tests/e2e/node_conformance.py) write beside each
JUnit report. A report named ``*.json`` is such a results.json itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conformance.check import SpecResult, read_report

CELL = {"passed": "pass", "failed": "**FAIL**", "skipped": "skip"}


def minutes(report: Path) -> str:
    results = report if report.suffix == ".json" else report.with_name("results.json")
    if not results.exists():
        return "?"
    data = json.loads(results.read_text())
    seconds = float(data.get("suite_seconds", 0))
    return f"{seconds / 60:.1f} min"


def read_results(path: Path) -> list[SpecResult]:
    if path.suffix != ".json":
        return read_report(path)
    specs = json.loads(path.read_text())["specs"]
    return [
        SpecResult(s["name"], s["outcome"], float(s["seconds"]), s.get("message", ""))
        for s in specs
    ]


def render(columns: list[tuple[str, Path]]) -> str:
    reports: list[dict[str, SpecResult]] = [
        {r.name: r for r in read_results(path)} for _, path in columns
    ]
    names = sorted({name for report in reports for name in report})
    lines = [
        "| spec | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = [CELL[r[name].outcome] if name in r else "-" for r in reports]
        escaped = name.replace("|", "\\|")
        lines.append(f"| {escaped} | " + " | ".join(cells) + " |")
    counts = [
        f"{sum(r.outcome == 'passed' for r in report.values())} passed, "
        f"{sum(r.outcome == 'failed' for r in report.values())} failed, "
        f"{sum(r.outcome == 'skipped' for r in report.values())} skipped"
        for report in reports
    ]
    lines.append("| **total** | " + " | ".join(counts) + " |")
    lines.append("| **suite wall time** | " + " | ".join(minutes(p) for _, p in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in arg for arg in args):
        print(__doc__, file=sys.stderr)
        return 2
    columns = [(title, Path(path)) for title, path in (arg.split("=", 1) for arg in args)]
    sys.stdout.write(render(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
