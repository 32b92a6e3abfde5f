"""Compare a critest JUnit report with the list of specs expected to pass.

The list (``expected-pass.txt``, one spec name per line, ``#`` comments) only grows: a
spec on it that did not pass in the report fails the check, with the reason critest
gave. Specs that passed but are not on the list are printed so they can be added
(``--update`` adds them and never removes a line).

    python3 -m tests.conformance.check REPORT.xml [--expected FILE] [--update]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

EXPECTED_PASS = Path(__file__).resolve().parent / "expected-pass.txt"
SUITE = "CRI validation"  # critest's ginkgo suite description
IGNORED = ("[BeforeSuite]", "[AfterSuite]", "[SynchronizedBeforeSuite]", "[ReportAfterSuite]")


@dataclass(frozen=True)
class SpecResult:
    name: str  # the spec text, without ginkgo's "[It] " node prefix
    outcome: str  # "passed", "failed" or "skipped"
    seconds: float
    message: str  # first line of the failure or skip message


def spec_name(testcase_name: str) -> str:
    return testcase_name.removeprefix("[It] ").strip()


def read_report(path: Path) -> list[SpecResult]:
    """The specs in a ginkgo JUnit report (suite set-up nodes left out)."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if name.startswith(IGNORED):
            continue
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            outcome, node = "failed", failure
        elif skipped is not None:
            outcome, node = "skipped", skipped
        else:
            outcome, node = "passed", None
        message = ""
        if node is not None:
            text = (node.get("message") or node.text or "").strip()
            message = text.splitlines()[0] if text else ""
        results.append(
            SpecResult(spec_name(name), outcome, float(case.get("time", "0") or 0), message)
        )
    return results


def summary_line(results: list[SpecResult]) -> str:
    counts = {outcome: 0 for outcome in ("passed", "failed", "skipped")}
    for result in results:
        counts[result.outcome] += 1
    return f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"


def write_results(
    report_dir: Path, runtime: str, results: list[SpecResult], seconds: float, total: float
) -> str:
    """``summary.txt`` (the summary line, returned) and ``results.json`` (the specs and the
    suite's and the whole command's wall times) beside a run's report."""
    line = summary_line(results)
    (report_dir / "summary.txt").write_text(f"{line}\n")
    data = {
        "runtime": runtime,
        "suite_seconds": round(seconds, 1),
        "total_seconds": round(total, 1),
        "specs": [dict(asdict(r), seconds=round(r.seconds, 2)) for r in results],
    }
    (report_dir / "results.json").write_text(json.dumps(data, indent=1))
    return line


def read_expected(path: Path = EXPECTED_PASS) -> list[str]:
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def focus_regex(names: list[str], suite: str = SUITE) -> str:
    """A ginkgo focus expression (Go RE2) that selects exactly these specs. ginkgo
    matches it against the suite description, a space and the spec text; the JUnit
    name adds " [Serial]" for serial specs, which is no part of that text."""
    special = set("\\.+*?()|[]{}^$")
    texts = (name.removesuffix(" [Serial]") for name in names)
    quoted = ("".join("\\" + c if c in special else c for c in text) for text in texts)
    return f"^{suite} (" + "|".join(quoted) + ")$"


def update_expected(path: Path, additions: list[str]) -> None:
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "".join(f"{name}\n" for name in sorted(additions)))


def check(report: Path, expected_path: Path, update: bool = False) -> int:
    results = read_report(report)
    print(f"{report}: {summary_line(results)}; ", end="")
    return compare(results, expected_path, update)


def compare(
    results: list[SpecResult], expected_path: Path, update: bool, selected: Path | None = None
) -> int:
    """1 when a spec of the expected-pass list (those also listed in ``selected``, for a
    run limited to them) did not pass; prints (with ``update`` adds) the passing specs
    that are not on the list yet."""
    by_name = {result.name: result for result in results}
    listed = read_expected(expected_path)
    expected = listed
    if selected is not None:
        chosen = set(read_expected(selected))
        expected = [name for name in listed if name in chosen]
    broken = []
    for name in expected:
        result = by_name.get(name)
        if result is None:
            broken.append(f"  {name}\n      not run (missing from the report)")
        elif result.outcome != "passed":
            broken.append(f"  {name}\n      {result.outcome}: {result.message}")
    newly = sorted(r.name for r in results if r.outcome == "passed" and r.name not in listed)
    print(f"{len(expected)} expected to pass")
    if newly:
        print(f"{len(newly)} passing spec(s) not yet on {expected_path.name}:")
        for name in newly:
            print(f"  {name}")
        if update:
            update_expected(expected_path, newly)
            print(f"added them to {expected_path}")
    if broken:
        print(f"{len(broken)} spec(s) expected to pass did not:")
        print("\n".join(broken))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a critest JUnit report.")
    parser.add_argument("report", type=Path)
    parser.add_argument("--expected", type=Path, default=EXPECTED_PASS)
    parser.add_argument("--update", action="store_true", help="add newly passing specs")
    args = parser.parse_args(argv)
    return check(args.report, args.expected, args.update)


if __name__ == "__main__":
    sys.exit(main())
