"""The Helm chart: lint and render with Helm's own engine (helm-python-sdk, no helm binary),
validate every object strictly against the Kubernetes 1.30-1.37 schemas
(kubernetes-validate), and check what the objects say for several values combinations."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from cri.config import load_config
from cri.images.hosts import RegistryHosts
from deploy.node_label import LABEL

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "clearcri"

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
yaml: Any = pytest.importorskip("yaml", reason="pip install PyYAML")
# Loaded by name: kubernetes-validate ships no type information.
kv: Any = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
kv_utils: Any = importlib.import_module("kubernetes_validate.utils")

#: Kubernetes minor versions the chart must be valid for.
KUBE_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]
#: Kinds from CRDs, which kubernetes-validate has no schema for.
CRD_KINDS = {"ServiceMonitor"}

VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "metrics-off": {"metrics": {"enabled": False}},
    "metrics-host-ip": {"metrics": {"address": "hostIP"}},
    "dashboard-off": {"dashboard": {"enabled": False}},
    "tcg-tuned": {"config": {"vm": {"tcgTbSizeMiB": 16, "jitFlushIdleSeconds": 7.5}}},
    "no-jit-flush": {"config": {"vm": {"jitFlushIdleSeconds": 0}}},
    "api-server": {"apiServer": {"host": "10.0.0.5", "port": 6443}},
    "mirrors": {
        "registry": {
            "mirrors": {
                "docker.io": ["https://mirror.corp:5000", "http://10.0.0.5:5000"],
                "registry.k8s.io": ["https://k8s-mirror.corp"],
            },
            "insecure": ["registry.lab:5000"],
        }
    },
    "tolerations": {
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
        ],
        "nodeSelector": {"kubernetes.io/os": "linux", "node-role.example/vm-host": "true"},
    },
    "everything": {
        "image": {"repository": "registry.corp/clearcri-node", "tag": "0.1.0-1"},
        "imagePullSecrets": [{"name": "corp-pull"}],
        "install": {"cni": True, "cniSubnet": "10.244.0.0/16", "requireKubeletRuntime": False},
        "ksm": {"enableOnHost": True, "mergeGuestMemory": False, "pagesToScan": 2000},
        "config": {
            "logLevel": "debug",
            "cgroupDriver": "systemd",
            "vm": {"accel": "kvm", "defaultVcpus": 2, "defaultMemoryMiB": 512, "maxVcpus": 8},
            "extra": '[registry.configs."registry.corp"]\nca_file = "/etc/clearcri/ca.pem"\n',
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "runtimeClass": {"overhead": {"memory": "96Mi", "cpu": "300m"}},
        "podAnnotations": {"example.com/team": "nodes"},
        "dashboard": {
            "label": "example.com/dashboard",
            "labelValue": "clearcri",
            "labels": {"team": "nodes"},
            "annotations": {"grafana_folder": "clearcri"},
            "namespace": "monitoring",
        },
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kvm", "operator": "In", "values": ["y"]}]}
                    ]
                }
            }
        },
    },
}


@cache
def _render(name: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(
            copy.deepcopy(VALUES[name]), name="clearcri", namespace="kube-system", is_install=True
        )
    return rendered


def all_objects(name: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for template, text in sorted(_render(name).items()):
        if template.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def is_hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def objects(name: str) -> list[dict[str, Any]]:
    """The release's objects (Helm's hooks are not: see ``all_objects``)."""
    return [d for d in all_objects(name) if not is_hook(d)]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} objects {kind}/{name}"
    return found[0]


def chart_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap with the daemon's config and the install script."""
    return named(docs, "ConfigMap", "clearcri")


def dashboard_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return named(docs, "ConfigMap", "clearcri-dashboard")


def rendered_config(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(chart_config(docs)["data"]["config.toml"])
    return path


def node_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


# -- lint and schemas ------------------------------------------------------------------


def test_helm_bundles_its_own_engine() -> None:
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_lint_is_clean(kube: str) -> None:
    report = helm.lint(CHART, strict=True, namespace="kube-system", kube_version=f"v{kube}.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("name", sorted(VALUES))
def test_lint_is_clean_with_values(name: str) -> None:
    report = helm.lint(CHART, copy.deepcopy(VALUES[name]), strict=True, namespace="kube-system")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_validator_ships_every_kubernetes_version_we_target() -> None:
    shipped = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    assert set(KUBE_VERSIONS) <= shipped


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_object_is_valid_for_kubernetes_1_30_to_1_37(name: str) -> None:
    docs = all_objects(name)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for kube in KUBE_VERSIONS:
            try:
                validated = kv_utils.validate(doc, kube, strict=True)
            except kv_utils.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {kube}: {exc.message}")
            assert validated == kube  # checked against that version's own schema


def test_servicemonitor_is_a_wellformed_monitoring_object() -> None:
    monitor = one(objects("everything"), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = one(objects("everything"), "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"vm": {"accel": "xen"}}},
        {"config": {"vm": {"tcgTbSizeMiB": 0}}},
        {"config": {"vm": {"jitFlushIdleSeconds": -1}}},
        {"runtimeClass": {"overhead": {"memory": "lots"}}},
        {"metrics": {"port": 70000}},
        {"registry": {"mirrors": {"docker.io": "https://not-a-list"}}},
        {"dashboard": {"label": "not a label"}},
        {"dashboard": {"labelValue": 1}},
        {"dashboard": {"namespace": "Not_A_Namespace"}},
        {"unknownKey": True},
    ],
)
def test_schema_rejects_wrong_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.render(values, name="clearcri", namespace="kube-system")


# -- what the objects say --------------------------------------------------------------


def test_default_objects() -> None:
    assert kinds(objects("defaults")) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "ConfigMap",
        "DaemonSet",
        "RuntimeClass",
        "Service",
        "ServiceAccount",
    ]


def test_runtimeclass_places_pods_on_labelled_nodes_and_counts_the_vm() -> None:
    rc = one(objects("defaults"), "RuntimeClass")
    assert rc["metadata"]["name"] == "clearcri"
    assert rc["handler"] == "clearcri"
    assert rc["scheduling"]["nodeSelector"] == {LABEL: "true"}
    assert rc["overhead"]["podFixed"] == {"memory": "208Mi", "cpu": "250m"}
    assert one(objects("everything"), "RuntimeClass")["overhead"]["podFixed"] == {
        "memory": "96Mi",
        "cpu": "300m",
    }


def test_rbac_is_get_list_and_patch_on_nodes_only() -> None:
    docs = objects("defaults")
    role = one(docs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch"]}
    ]
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kube-system"}
    ]
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_uninstall_hook_unlabels_every_node_with_rbac_of_its_own() -> None:
    hooks = [d for d in all_objects("api-server") if is_hook(d)]
    assert sorted(d["kind"] for d in hooks) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Job",
        "ServiceAccount",
    ]
    for hook in hooks:
        annotations = hook["metadata"]["annotations"]
        # after the release's own RBAC is gone, so no labeler can put the label back
        assert annotations["helm.sh/hook"] == "post-delete"
        assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    weight = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert weight["ServiceAccount"] < weight["Job"] and weight["ClusterRoleBinding"] < weight["Job"]
    job = next(d for d in hooks if d["kind"] == "Job")
    account = next(d for d in hooks if d["kind"] == "ServiceAccount")["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    binding = next(d for d in hooks if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == account
    container = pod["containers"][0]
    assert container["command"] == ["python3", "-m", "deploy.node_label", "unlabel-all"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"KUBERNETES_SERVICE_HOST": "10.0.0.5", "KUBERNETES_SERVICE_PORT": "6443"}


def test_daemonset_is_node_critical_rolling_and_probes_the_cri_socket() -> None:
    ds = one(objects("defaults"), "DaemonSet")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["hostPID"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    container = node_container(objects("defaults"))
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:4] == ["python3", "-m", "deploy.node_label", "probe"]
    assert probe[-1] == "/run/clearcri/clearcri.sock"
    assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "unlabel"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_api_server_address_overrides_the_service_for_the_labeler() -> None:
    env = {e["name"]: e for e in node_container(objects("api-server"))["env"]}
    assert env["KUBERNETES_SERVICE_HOST"]["value"] == "10.0.0.5"
    assert env["KUBERNETES_SERVICE_PORT"]["value"] == "6443"
    defaults = {e["name"] for e in node_container(objects("defaults"))["env"]}
    assert "KUBERNETES_SERVICE_HOST" not in defaults


def test_install_script_enters_the_host_and_refuses_too_few_capabilities() -> None:
    script = chart_config(objects("defaults"))["data"]["install.sh"]
    assert "nsenter --target 1 --mount --uts --ipc --net -- env" in script
    # without systemd the supervisor starts from the pod: it needs every capability
    check = script.index("test -d /run/systemd/system")
    assert "CapBnd" in script[check:] and "privileged: true" in script[check:]
    assert script.index("exit 1") < script.index("node_install upgrade")


def test_installer_has_named_capabilities_not_privileged() -> None:
    context = node_container(objects("defaults"))["securityContext"]
    assert context["privileged"] is False
    assert context["capabilities"] == {
        "drop": ["ALL"],
        "add": ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT"],
    }
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_host_paths_are_only_the_stage_and_the_socket_dir() -> None:
    pod = one(objects("defaults"), "DaemonSet")["spec"]["template"]["spec"]
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/var/lib/clearcri-deploy", "/run/clearcri"}
    mounts = {m["mountPath"]: m for m in node_container(objects("defaults"))["volumeMounts"]}
    assert mounts["/run/clearcri"]["readOnly"] is True


def test_default_config_is_a_valid_daemon_config(tmp_path: Path) -> None:
    config = load_config(rendered_config(objects("defaults"), tmp_path))
    assert config.daemon.socket == Path("/run/clearcri/clearcri.sock")
    assert config.vm.guest_dir == Path("/opt/clearcri/guest")
    assert config.vm.default_memory_mib == 256 and config.vm.mem_merge
    assert config.vm.standby == 1 and config.vm.standby_burst == 1
    assert config.vm.tcg_tb_size_mib == 48 and config.vm.jit_flush_idle_s == 60.0
    assert config.vm.max_clone_memory_mib == 0
    assert not config.vm.host_ksm and config.vm.ksm_pages_to_scan == 0
    assert config.metrics.enabled and config.metrics.address == "0.0.0.0"
    assert config.metrics.port == 9464
    assert config.registry == {}


def test_metrics_service_and_scrape_annotations() -> None:
    docs = objects("defaults")
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    assert pod["spec"]["hostNetwork"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert node_container(docs)["ports"][0]["containerPort"] == 9464


def test_metrics_on_the_node_ip(tmp_path: Path) -> None:
    docs = objects("metrics-host-ip")
    text = chart_config(docs)["data"]["config.toml"]
    assert 'address = "@HOST_IP@"' in text
    # what install.sh does on each node with the pod's status.hostIP
    script = chart_config(docs)["data"]["install.sh"]
    assert 'sed "s/@HOST_IP@/$HOST_IP/g" /etc/clearcri-chart/config.toml' in script
    path = tmp_path / "config.toml"
    path.write_text(text.replace("@HOST_IP@", "10.1.2.3"))
    assert load_config(path).metrics.address == "10.1.2.3"
    # the default render has nothing to replace
    assert "@HOST_IP@" not in chart_config(objects("defaults"))["data"]["config.toml"]


def test_metrics_off(tmp_path: Path) -> None:
    docs = objects("metrics-off")
    assert "Service" not in kinds(docs)
    pod = one(docs, "DaemonSet")["spec"]["template"]
    assert "hostNetwork" not in pod["spec"]
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"]["annotations"])
    assert "ports" not in node_container(docs)
    assert not load_config(rendered_config(docs, tmp_path)).metrics.enabled


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    config_map = dashboard_config(objects("defaults"))
    meta = config_map["metadata"]
    assert meta["namespace"] == "kube-system"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "clearcri"
    assert "annotations" not in meta
    assert list(config_map["data"]) == ["clearcri.json"]
    shipped = json.loads((CHART / "dashboards" / "clearcri.json").read_text())
    assert json.loads(config_map["data"]["clearcri.json"]) == shipped


def test_dashboard_label_annotations_and_namespace() -> None:
    meta = dashboard_config(objects("everything"))["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["example.com/dashboard"] == "clearcri"
    assert meta["labels"]["team"] == "nodes"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "clearcri"}


@pytest.mark.parametrize("name", ["dashboard-off", "metrics-off"])
def test_no_dashboard(name: str) -> None:
    assert [d for d in objects(name) if d["metadata"]["name"].endswith("-dashboard")] == []
    assert kinds(objects(name)).count("ConfigMap") == 1


def test_translation_cache_values_reach_the_daemon_config(tmp_path: Path) -> None:
    config = load_config(rendered_config(objects("tcg-tuned"), tmp_path))
    assert config.vm.tcg_tb_size_mib == 16 and config.vm.jit_flush_idle_s == 7.5
    config = load_config(rendered_config(objects("no-jit-flush"), tmp_path))
    assert config.vm.jit_flush_idle_s == 0


def test_registry_mirrors_reach_the_daemon_config(tmp_path: Path) -> None:
    config = load_config(rendered_config(objects("mirrors"), tmp_path))
    hosts = RegistryHosts.from_dict(config.registry)
    assert [e.url for e in hosts.endpoints("docker.io") if e.mirror] == [
        "https://mirror.corp:5000",
        "http://10.0.0.5:5000",
    ]
    assert [e.url for e in hosts.endpoints("registry.k8s.io") if e.mirror] == [
        "https://k8s-mirror.corp"
    ]
    assert "registry.lab:5000" in hosts.insecure


def test_tolerations_and_node_selector() -> None:
    pod = one(objects("tolerations"), "DaemonSet")["spec"]["template"]["spec"]
    assert pod["tolerations"] == VALUES["tolerations"]["tolerations"]
    # Helm merges maps with the defaults (a default key is dropped by setting it to null).
    assert pod["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node-role.example/vm-host": "true",
    }


def test_everything_set(tmp_path: Path) -> None:
    docs = objects("everything")
    config = load_config(rendered_config(docs, tmp_path))
    assert (config.daemon.log_level, config.daemon.cgroup_driver) == ("debug", "systemd")
    assert (config.vm.accel, config.vm.default_vcpus, config.vm.default_memory_mib) == (
        "kvm",
        2,
        512,
    )
    assert config.vm.max_vcpus == 8 and not config.vm.mem_merge
    assert config.vm.host_ksm and config.vm.ksm_pages_to_scan == 2000
    hosts = RegistryHosts.from_dict(config.registry)
    assert hosts.ca_files == {"registry.corp": Path("/etc/clearcri/ca.pem")}
    container = node_container(docs)
    assert container["image"] == "registry.corp/clearcri-node:0.1.0-1"
    pod = one(docs, "DaemonSet")["spec"]["template"]
    assert pod["metadata"]["annotations"]["example.com/team"] == "nodes"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "corp-pull"}]
    assert pod["spec"]["affinity"] == VALUES["everything"]["affinity"]
    script = chart_config(docs)["data"]["install.sh"]
    assert "--cni --cni-subnet 10.244.0.0/16" in script
    assert '--require-runtime ""' in script


# -- the install script ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_install_script_is_valid_sh(name: str, tmp_path: Path) -> None:
    script = tmp_path / "install.sh"
    script.write_text(chart_config(objects(name))["data"]["install.sh"])
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_install_script_runs_the_node_install_and_the_labeler() -> None:
    script = chart_config(objects("defaults"))["data"]["install.sh"]
    assert "nsenter --target 1 --mount" in script
    assert "python3 -m deploy.node_install upgrade --install --release" in script
    assert "--update-config" in script
    assert "exec python3 -m deploy.node_label watch" in script
    assert "--require-runtime clearcri" in script
    assert "ksm" not in script and "--cni --cni-subnet" not in script
    # The options the script passes exist.
    from cri.cli import build_parser

    args = build_parser().parse_args(
        [
            "node",
            "upgrade",
            "--install",
            "--release",
            "/r",
            "--isolated",
            "--config-from",
            "/r/config.toml",
            "--update-config",
            "--cni",
            "--cni-subnet",
            "10.1.0.0/16",
        ]
    )
    assert args.install and args.update_config and args.isolated


def test_config_change_rolls_the_pods() -> None:
    def checksum(name: str) -> str:
        pod = one(objects(name), "DaemonSet")["spec"]["template"]
        value: str = pod["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum("defaults") != checksum("mirrors")


def test_notes_say_how_to_point_kubelet_at_clearcri() -> None:
    notes = _render("defaults")["clearcri/templates/NOTES.txt"]
    assert "--container-runtime-endpoint=unix:///run/clearcri/clearcri.sock" in notes
    assert "containerRuntimeEndpoint: unix:///run/clearcri/clearcri.sock" in notes
    assert "runtimeClassName: clearcri" in notes
    with helm.Chart.load(CHART) as chart:
        other = chart.render(None, name="x", namespace="default")
    assert "install into kube-system" in other["clearcri/templates/NOTES.txt"]


def test_chart_metadata() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["appVersion"] == pyproject["project"]["version"]
    assert meta["kubeVersion"] == ">=1.30.0-0"
    assert importlib.util.find_spec("deploy.node_label") is not None
