"""The node labeler against a fake CoreV1Api (read_node / patch_node)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deploy import node_label
from deploy.node_label import LABEL, label_node, unlabel_node, watch


class FakeNodes:
    """A node store that applies strategic-merge label patches like the API server."""

    def __init__(self, runtime: str = "clearcri://0.1.0", labels: dict[str, str] | None = None):
        self.labels = dict(labels or {"kubernetes.io/hostname": "n1"})
        self.runtime = runtime
        self.patches: list[Any] = []
        self.reads = 0

    def read_node(self, name: str) -> Any:
        assert name == "n1"
        self.reads += 1
        return SimpleNamespace(
            metadata=SimpleNamespace(name=name, labels=dict(self.labels)),
            status=SimpleNamespace(
                node_info=SimpleNamespace(container_runtime_version=self.runtime)
            ),
        )

    def patch_node(self, name: str, body: Any) -> Any:
        assert name == "n1"
        self.patches.append(copy.deepcopy(body))
        assert set(body) == {"metadata"} and set(body["metadata"]) == {"labels"}
        for key, value in body["metadata"]["labels"].items():
            if value is None:
                self.labels.pop(key, None)
            else:
                self.labels[key] = value
        return self.read_node(name)


def test_labels_a_node_whose_kubelet_uses_clearcri() -> None:
    api = FakeNodes()
    assert label_node(api, "n1")
    assert api.labels[LABEL] == "true"
    assert api.labels["kubernetes.io/hostname"] == "n1"
    assert api.patches == [{"metadata": {"labels": {LABEL: "true"}}}]


def test_labelling_again_does_not_patch() -> None:
    api = FakeNodes(labels={LABEL: "true"})
    assert label_node(api, "n1")
    assert api.patches == []


def test_a_node_whose_kubelet_uses_another_runtime_is_not_labelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakeNodes(runtime="containerd://1.7.24")
    assert not label_node(api, "n1")
    assert LABEL not in api.labels and api.patches == []
    assert "containerd://1.7.24" in caplog.text and "--container-runtime-endpoint" in caplog.text
    # ...and loses a label it should not have.
    api.labels[LABEL] = "true"
    assert not label_node(api, "n1")
    assert LABEL not in api.labels


def test_the_runtime_check_can_be_skipped() -> None:
    api = FakeNodes(runtime="containerd://1.7.24")
    assert label_node(api, "n1", require_runtime="")
    assert api.labels[LABEL] == "true"


def test_unlabel_removes_only_our_label() -> None:
    api = FakeNodes(labels={LABEL: "true", "zone": "a"})
    assert unlabel_node(api, "n1")
    assert api.labels == {"zone": "a"}
    assert api.patches == [{"metadata": {"labels": {LABEL: None}}}]
    assert not unlabel_node(api, "n1")
    assert len(api.patches) == 1


def test_watch_follows_the_daemon_and_survives_api_errors(tmp_path: Path) -> None:
    api = FakeNodes()
    answers = iter([False, True, "boom", True, False])
    stop = threading.Event()

    def ready(_socket: Path) -> bool:
        answer = next(answers, None)
        if answer is None:
            stop.set()
            return False
        if answer == "boom":
            raise ConnectionError("API server unreachable")
        return bool(answer)

    history: list[bool] = []
    original = api.patch_node

    def patch(name: str, body: Any) -> Any:
        history.append(body["metadata"]["labels"][LABEL] is not None)
        return original(name, body)

    api.patch_node = patch  # type: ignore[method-assign]
    watch(
        api,
        "n1",
        tmp_path / "s.sock",
        interval=0,
        require_runtime="clearcri",
        stop=stop,
        ready=ready,
    )
    assert history == [True, False]  # labelled when ready, unlabelled when it stopped
    assert LABEL not in api.labels


def test_probe_fails_without_a_socket(tmp_path: Path) -> None:
    assert node_label.main(["probe", "--socket", str(tmp_path / "none.sock")]) == 1
    assert not node_label.cri_ready(tmp_path / "none.sock")


def test_commands_that_talk_to_the_api_need_a_node_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(SystemExit):
        node_label.main(["label"])


def test_label_command_uses_in_cluster_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeNodes()
    monkeypatch.setattr(node_label, "in_cluster_api", lambda: api)
    assert node_label.main(["label", "--node", "n1"]) == 0
    assert api.labels[LABEL] == "true"
    assert node_label.main(["unlabel", "--node", "n1"]) == 0
    assert LABEL not in api.labels


def test_probe_succeeds_when_a_cri_server_answers(tmp_path: Path) -> None:
    from concurrent import futures

    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    class Runtime(api_pb2_grpc.RuntimeServiceServicer):  # type: ignore[misc,unused-ignore]
        def Version(self, request: Any, context: Any) -> Any:
            return api_pb2.VersionResponse(runtime_name="clearcri")

    socket = tmp_path / "cri.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    add: Any = api_pb2_grpc.add_RuntimeServiceServicer_to_server
    add(Runtime(), server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        assert node_label.cri_ready(socket)
        assert node_label.main(["probe", "--socket", str(socket)]) == 0
    finally:
        server.stop(None)


class FakeCluster:
    """Nodes by name, listed by label selector (an existence selector, as the hook's)."""

    def __init__(self, labels: dict[str, dict[str, str]]) -> None:
        self.labels = labels
        self.patched: list[str] = []

    def list_node(self, *, label_selector: str) -> Any:
        items = [
            SimpleNamespace(metadata=SimpleNamespace(name=name, labels=dict(labels)))
            for name, labels in self.labels.items()
            if label_selector in labels
        ]
        return SimpleNamespace(items=items)

    def read_node(self, name: str) -> Any:
        return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=self.labels[name]))

    def patch_node(self, name: str, body: Any) -> Any:
        self.patched.append(name)
        for key, value in body["metadata"]["labels"].items():
            assert value is None
            self.labels[name].pop(key, None)
        return self.read_node(name)


def test_unlabel_all_removes_the_label_from_every_node_that_has_it() -> None:
    from deploy.node_label import unlabel_all

    api = FakeCluster(
        {
            "n1": {LABEL: "true", "zone": "a"},
            "n2": {"zone": "b"},
            "n3": {LABEL: "true"},
        }
    )
    assert unlabel_all(api) == ["n1", "n3"]
    assert api.patched == ["n1", "n3"]
    assert api.labels == {"n1": {"zone": "a"}, "n2": {"zone": "b"}, "n3": {}}
    assert unlabel_all(api) == []
