"""deploy/kubelet_runtime.py: the kubelet configuration edit of the runtime switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.kubelet_runtime import (
    BACKUP_SUFFIX,
    RUNTIME_ENDPOINT,
    KubeletConfigError,
    main,
    set_endpoint,
)

yaml = pytest.importorskip("yaml")

CONFIG = {
    "apiVersion": "kubelet.config.k8s.io/v1beta1",
    "kind": "KubeletConfiguration",
    "cgroupDriver": "cgroupfs",
    "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
    "evictionHard": {"memory.available": "200Mi"},
}


def test_yaml_config_gets_both_endpoints_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    original = yaml.safe_dump(CONFIG, sort_keys=False)
    path.write_text(original)
    path.chmod(0o600)
    assert set_endpoint(path, RUNTIME_ENDPOINT)
    data = yaml.safe_load(path.read_text())
    assert data["containerRuntimeEndpoint"] == RUNTIME_ENDPOINT
    assert data["imageServiceEndpoint"] == RUNTIME_ENDPOINT
    assert data["evictionHard"] == {"memory.available": "200Mi"}
    assert list(data)[:3] == ["apiVersion", "kind", "cgroupDriver"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ("config.yaml" + BACKUP_SUFFIX)).read_text() == original
    # again: nothing to do; and back: the first backup is kept
    assert not set_endpoint(path, RUNTIME_ENDPOINT)
    assert set_endpoint(path, "unix:///run/containerd/containerd.sock")
    assert (tmp_path / ("config.yaml" + BACKUP_SUFFIX)).read_text() == original
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_json_config_stays_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    assert main(["--config", str(path)]) == 0
    assert json.loads(path.read_text())["imageServiceEndpoint"] == RUNTIME_ENDPOINT


@pytest.mark.parametrize(
    ("content", "endpoint", "message"),
    [
        ("kind: Pod\n", RUNTIME_ENDPOINT, "no KubeletConfiguration"),
        ("{not yaml: [", RUNTIME_ENDPOINT, "neither JSON nor YAML"),
        (json.dumps(CONFIG), "/run/clearcri/clearcri.sock", "no scheme"),
    ],
)
def test_bad_input_is_refused_and_the_file_left_alone(
    tmp_path: Path, content: str, endpoint: str, message: str
) -> None:
    path = tmp_path / "config"
    path.write_text(content)
    with pytest.raises(KubeletConfigError, match=message):
        set_endpoint(path, endpoint)
    assert path.read_text() == content
    assert main(["--config", str(path), "--endpoint", endpoint]) == 2


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KubeletConfigError, match="cannot read"):
        set_endpoint(tmp_path / "absent.yaml", RUNTIME_ENDPOINT)
