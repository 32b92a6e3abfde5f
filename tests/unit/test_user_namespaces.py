"""Pod user namespaces: which CRI options are accepted, and what reaches crun."""

from __future__ import annotations

import pytest
from cri_api.v1 import api_pb2

from agent.guest import oci
from agent.protocol import ContainerSpec
from cri.images.manifest import ImageConfig
from cri.runtime.convert import check_user_namespace, container_spec


def pod(
    mode: int | None, uids: list[tuple[int, int, int]], gids: list[tuple[int, int, int]]
) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig()
    if mode is not None:
        userns = config.linux.security_context.namespace_options.userns_options
        userns.mode = mode  # type: ignore[assignment]
        for c, h, n in uids:
            userns.uids.add(container_id=c, host_id=h, length=n)
        for c, h, n in gids:
            userns.gids.add(container_id=c, host_id=h, length=n)
    return config


ONE = [(0, 1000, 100000)]


def test_accepted_modes() -> None:
    assert check_user_namespace(pod(None, [], [])) is None  # not asked for
    assert check_user_namespace(pod(api_pb2.NODE, [], [])) is None
    assert check_user_namespace(pod(api_pb2.POD, ONE, ONE)) is None


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (pod(api_pb2.POD, [*ONE, (0, 2000, 100000)], ONE), "exactly one uid mapping"),
        (pod(api_pb2.POD, [(1, 1000, 100000)], [(1, 1000, 100000)]), "container id 0"),
        (pod(api_pb2.POD, [], []), "exactly one uid mapping"),
        (pod(api_pb2.POD, ONE, [(0, 2**32 - 10, 100)]), "out of range"),
        (pod(api_pb2.CONTAINER, [], []), "CONTAINER is not supported"),
        (pod(api_pb2.TARGET, [], []), "TARGET is not supported"),
        (pod(api_pb2.NODE, ONE, ONE), "NODE takes no"),
    ],
)
def test_refused_options(config: api_pb2.PodSandboxConfig, words: str) -> None:
    problem = check_user_namespace(config)
    assert problem is not None and words in problem


def test_pod_mode_reaches_the_oci_config() -> None:
    ctr = api_pb2.ContainerConfig(command=["cat", "/proc/self/uid_map"])
    spec = container_spec(
        pod=pod(api_pb2.POD, ONE, [(0, 5000, 70000)]),
        config=ctr,
        image=ImageConfig(),
        uid=0,
        gid=0,
        additional_gids=[],
    )
    assert spec.uid_mappings == [[0, 1000, 100000]]
    assert spec.gid_mappings == [[0, 5000, 70000]]
    config = oci.build_oci_config(spec, rootfs="/r", cgroup_path=None)
    assert {"type": "user"} in config["linux"]["namespaces"]
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 100000}]
    assert config["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 5000, "size": 70000}]
    # NODE: no user namespace of its own
    plain = container_spec(
        pod=pod(api_pb2.NODE, [], []),
        config=ctr,
        image=ImageConfig(),
        uid=0,
        gid=0,
        additional_gids=[],
    )
    plain_config = oci.build_oci_config(plain, rootfs="/r", cgroup_path=None)
    assert not any(ns["type"] == "user" for ns in plain_config["linux"]["namespaces"])
    assert "uidMappings" not in plain_config["linux"]


def test_bad_mapping_is_refused_by_the_agent() -> None:
    spec = ContainerSpec(args=["true"], uid_mappings=[[0, 1000]], gid_mappings=[[0, 1000, 1]])
    with pytest.raises(ValueError, match="id mapping"):
        oci.build_oci_config(spec, rootfs="/r", cgroup_path=None)


def test_joining_the_pods_user_namespace_writes_no_mappings() -> None:
    spec = ContainerSpec(args=["true"], uid_mappings=[[0, 1000, 10]], gid_mappings=[[0, 1000, 10]])
    config = oci.build_oci_config(
        spec, rootfs="/r", cgroup_path=None, user_namespace_path="/proc/9/ns/user"
    )
    assert {"type": "user", "path": "/proc/9/ns/user"} in config["linux"]["namespaces"]
    assert "uidMappings" not in config["linux"] and "gidMappings" not in config["linux"]
