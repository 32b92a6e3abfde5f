"""Pods and containers as the CRI sees them, kept in memory and in SQLite.

Every change goes to the database in a transaction before the call returns, so a
daemon killed at any point restarts with what it had promised. Reads are served from
memory (List/Status calls must stay in the low milliseconds with hundreds of pods).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from cri_api.v1 import api_pb2

from cri.store import Store

POD_READY = api_pb2.SANDBOX_READY
POD_NOTREADY = api_pb2.SANDBOX_NOTREADY

CREATED = api_pb2.CONTAINER_CREATED
RUNNING = api_pb2.CONTAINER_RUNNING
EXITED = api_pb2.CONTAINER_EXITED
UNKNOWN = api_pb2.CONTAINER_UNKNOWN


def encode_proto(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


@dataclass
class PodRecord:
    id: str
    name: str
    uid: str
    namespace: str
    attempt: int
    created_at_ns: int
    runtime_handler: str
    config: str  # base64 PodSandboxConfig
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    state: int = POD_READY
    reason: str = ""
    ips: list[str] = field(default_factory=list)
    vm_pid: int = 0
    boot_seconds: float = 0.0

    def pod_config(self) -> api_pb2.PodSandboxConfig:
        config = api_pb2.PodSandboxConfig()
        config.ParseFromString(base64.b64decode(self.config))
        return config

    def metadata(self) -> api_pb2.PodSandboxMetadata:
        return api_pb2.PodSandboxMetadata(
            name=self.name, uid=self.uid, namespace=self.namespace, attempt=self.attempt
        )


@dataclass
class ContainerRecord:
    id: str
    pod_id: str
    name: str
    attempt: int
    created_at_ns: int
    config: str  # base64 ContainerConfig
    image: str  # the image as the user named it
    image_id: str  # config digest
    image_ref: str  # repo digest (or the id when the image has none)
    log_path: str = ""  # absolute path on the host, "" for none
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    state: int = CREATED
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    user_uid: int = 0
    user_gid: int = 0
    user_gids: list[int] = field(default_factory=list)
    resources: str = ""  # base64 LinuxContainerResources, "" for none
    stop_signal: str = ""

    def container_config(self) -> api_pb2.ContainerConfig:
        config = api_pb2.ContainerConfig()
        config.ParseFromString(base64.b64decode(self.config))
        return config

    def metadata(self) -> api_pb2.ContainerMetadata:
        return api_pb2.ContainerMetadata(name=self.name, attempt=self.attempt)


def labels_match(labels: dict[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_matches(
    ctr: ContainerRecord, id_prefix: str, pod_prefix: str, selector: Mapping[str, str]
) -> bool:
    """The id, pod and label part of CRI's container filters (ids match by prefix)."""
    return (
        ctr.id.startswith(id_prefix)
        and ctr.pod_id.startswith(pod_prefix)
        and labels_match(ctr.labels, selector)
    )


R = TypeVar("R", PodRecord, ContainerRecord)


def _load(cls: type[R], text: str) -> R:
    data = json.loads(text)
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


class RuntimeState:
    """The pod and container records: memory for reads, SQLite for durability."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self.pods: dict[str, PodRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        for row in store.query("SELECT data FROM pods"):
            pod = _load(PodRecord, row["data"])
            self.pods[pod.id] = pod
        for row in store.query("SELECT data FROM containers"):
            ctr = _load(ContainerRecord, row["data"])
            self.containers[ctr.id] = ctr

    def save_pod(self, pod: PodRecord) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pods (id, data) VALUES (?, ?)",
                (pod.id, json.dumps(asdict(pod))),
            )
        self.pods[pod.id] = pod

    def delete_pod(self, pod_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM containers WHERE pod_id = ?", (pod_id,))
            conn.execute("DELETE FROM pods WHERE id = ?", (pod_id,))
        self.pods.pop(pod_id, None)
        for cid in [c.id for c in self.containers.values() if c.pod_id == pod_id]:
            del self.containers[cid]

    def save_container(self, ctr: ContainerRecord) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO containers (id, pod_id, data) VALUES (?, ?, ?)",
                (ctr.id, ctr.pod_id, json.dumps(asdict(ctr))),
            )
        self.containers[ctr.id] = ctr

    def delete_container(self, container_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))
        self.containers.pop(container_id, None)

    def pod_containers(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self.containers.values() if c.pod_id == pod_id]

    def find_pod(self, id_or_prefix: str) -> PodRecord | None:
        """A pod by full id or unique id prefix (crictl passes prefixes)."""
        return _find(self.pods, id_or_prefix)

    def find_container(self, id_or_prefix: str) -> ContainerRecord | None:
        return _find(self.containers, id_or_prefix)


def _find(records: dict[str, R], key: str) -> R | None:
    if not key:
        return None
    exact = records.get(key)
    if exact is not None:
        return exact
    matches = [r for k, r in records.items() if k.startswith(key)]
    return matches[0] if len(matches) == 1 else None
