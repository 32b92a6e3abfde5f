#!/usr/bin/env python3
"""Render manifests/ from the Helm chart's defaults (for `kubectl apply -f manifests/`).

    scripts/render-manifests.py          rewrite manifests/
    scripts/render-manifests.py --check  exit 1 if manifests/ differs from a fresh render

The chart is rendered offline with helm-python-sdk (Helm's own Go engine, no helm
binary), release name `clearcri`, namespace `kube-system` (where the priority class
system-node-critical is admitted). tests/unit/test_chart_manifests.py checks that the
committed files equal a fresh render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "clearcri"
MANIFESTS = ROOT / "manifests"
RELEASE = "clearcri"
NAMESPACE = "kube-system"

HEADER = """\
# Generated from charts/clearcri with its default values by scripts/render-manifests.py
# (release {release}, namespace {namespace}); do not edit: change the chart and re-run it.
"""


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """``{template name: rendered text}`` of every template (NOTES.txt included)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    prefix = f"{chart_name()}/templates/"
    return {name.removeprefix(prefix): text for name, text in rendered.items()}


def chart_name() -> str:
    for line in (CHART / "Chart.yaml").read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{CHART}/Chart.yaml has no name")


def manifest_files() -> dict[str, str]:
    """``{file name under manifests/: content}`` from the default render."""
    files: dict[str, str] = {}
    header = HEADER.format(release=RELEASE, namespace=NAMESPACE)
    for name, text in sorted(render_chart().items()):
        if not name.endswith(".yaml"):
            continue  # NOTES.txt
        body = text.strip("\n")
        if not any(
            line.strip() and not line.lstrip().startswith("#") for line in body.splitlines()
        ):
            continue  # disabled by default (e.g. the ServiceMonitor)
        if "helm.sh/hook:" in body:
            continue  # Helm's own (the uninstall hook): kubectl apply would run it now
        files[name] = header + "---\n" + body + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    wanted = manifest_files()
    present = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    if args.check:
        stale = sorted(n for n in wanted.keys() | present.keys() if wanted.get(n) != present.get(n))
        for name in stale:
            print(f"manifests/{name} differs from the chart's render", file=sys.stderr)
        if stale:
            print("run scripts/render-manifests.py", file=sys.stderr)
        return 1 if stale else 0
    MANIFESTS.mkdir(exist_ok=True)
    for name in present.keys() - wanted.keys():
        (MANIFESTS / name).unlink()
    for name, text in wanted.items():
        (MANIFESTS / name).write_text(text)
    print(f"wrote {len(wanted)} files to {MANIFESTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
