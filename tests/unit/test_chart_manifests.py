"""manifests/ is the chart's default render (scripts/render-manifests.py), and valid."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
KUBE_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]

pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
yaml: Any = pytest.importorskip("yaml", reason="pip install PyYAML")
kv_utils: Any = pytest.importorskip(
    "kubernetes_validate.utils", reason="pip install kubernetes-validate"
)


def render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "scripts" / "render-manifests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_manifests_equal_a_fresh_render() -> None:
    wanted: dict[str, str] = render_script().manifest_files()
    present = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    assert sorted(present) == sorted(wanted), "run scripts/render-manifests.py"
    for name, text in wanted.items():
        assert present[name] == text, f"manifests/{name} is stale: run scripts/render-manifests.py"


def test_check_mode_agrees() -> None:
    assert render_script().main(["--check"]) == 0


def test_manifests_hold_the_objects_for_kubectl_apply() -> None:
    docs = [
        doc
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "ConfigMap",
        "DaemonSet",
        "RuntimeClass",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "RuntimeClass"):
            assert doc["metadata"]["namespace"] == "kube-system"


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_are_valid_for(kube: str) -> None:
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            try:
                assert kv_utils.validate(doc, kube, strict=True) == kube
            except kv_utils.ValidationError as exc:
                pytest.fail(f"{path.name}: {doc['kind']} on {kube}: {exc.message}")
