"""Pod start, exec and stop of clearcri next to containerd with runc and with gVisor.

    make guest tools peers
    PYTHONPATH=. python3 tests/bench/bench_peers.py [--rounds 9] [--out-dir docs]

The peers are containerd v2 with two runtime handlers, ``runc`` (Debian's runc) and
``runsc`` (gVisor, systrap platform), built from the Go module proxy by
``scripts/build-peers.sh`` (``make peers``). All three runtimes are started once, each
with a CNI bridge network of its own and the same offline registry and images (the
conformance image set of tests/conformance/images.py). Every runtime runs one warm-up
pod that is not counted (image pull, clearcri's VM template), then ``--rounds`` rounds:
in each round every runtime, in an order rotated round by round, does one whole pod over
its CRI socket:

1. RunPodSandbox;
2. CreateContainer + StartContainer of busybox ``sh -c 'echo hi; sleep 3600'``;
3. poll the container's CRI log file until the line ``hi`` is in it;
4. ExecSync ``true``;
5. StopPodSandbox + RemovePodSandbox.

Prints the median (min-max) of every figure per runtime and the clearcri / gVisor and
clearcri / runc ratios, then where clearcri's time goes: its boot phases, the time the
daemon spent in each call and the steps of the first container, from its Prometheus
metrics (docs/metrics.md) read between pods, and its network setup's steps from the
verbose PodSandboxStatus. Writes ``peers.json`` (every sample, the medians, the versions of every
component, the load of the machine) and ``peers.png`` (a grouped bar chart with min-max
error bars; needs matplotlib: ``pip install -e '.[bench]'``) to ``--out-dir``. Every pod,
process, bridge, mount and cgroup the run made is removed at the end, also on Ctrl-C or
a failure. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.conformance import images
from tests.conformance.run import (
    GUEST_DIR,
    LOCK_FILE,
    PEERS_BIN_DIR,
    REPO,
    Clearcri,
    CniNetwork,
    ContainerdV2,
    LocalRegistry,
    Runtime,
    build_tools,
    free_port,
    log,
    stop_on_signal,
    wait_for_lock,
    work_dir,
)

BUSYBOX = "registry.k8s.io/" + images.E2E + "busybox:1.29-2"
COMMAND = ["sh", "-c", "echo hi; sleep 3600"]
NETWORKS = {
    "clearcri": CniNetwork("ccpeers0", "10.231.10.0/24"),
    "runc": CniNetwork("ccpeers1", "10.231.11.0/24"),
    "runsc": CniNetwork("ccpeers2", "10.231.12.0/24"),
}
CGROUP_ROOT = Path("/sys/fs/cgroup")
LOG_TIMEOUT_S = 60.0

# (key, label): the figures of the table, the JSON and the plot, in order
FIGURES = (
    ("run_pod", "RunPodSandbox"),
    ("create_start", "first container Create+Start"),
    ("first_log", "RunPodSandbox to first log line"),
    ("exec", "ExecSync `true`"),
    ("stop_remove", "StopPodSandbox + RemovePodSandbox"),
)
# how the first Create+Start splits, measured on every runtime
SPLIT = (("create", "CreateContainer"), ("start", "StartContainer"))

# clearcri's own account of a pod. From its metrics: {key: (histogram, label value)};
# every step of clearcri_container_phase_seconds comes as ``container_<step>``.
BOOT = "clearcri_sandbox_boot_seconds"
REQUEST = "clearcri_cri_request_duration_seconds"
CONTAINER_STEP = "clearcri_container_phase_seconds"
METRICS = {
    "vmm_spawn": (BOOT, "vmm_spawn"),
    "restore": (BOOT, "restore"),
    "firmware": (BOOT, "firmware"),
    "kernel": (BOOT, "kernel"),
    "agent_ready": (BOOT, "agent_ready"),
    "sandbox_start": ("clearcri_sandbox_start_seconds", ""),
    "daemon_create": (REQUEST, "CreateContainer"),
    "daemon_start": (REQUEST, "StartContainer"),
    "daemon_exec": (REQUEST, "ExecSync"),
    "daemon_stop": (REQUEST, "StopPodSandbox"),
    "daemon_remove": (REQUEST, "RemovePodSandbox"),
}
# (key, what) in the order printed; the steps are those of docs/metrics.md
PHASES = (
    ("vmm_spawn", "boot: QEMU spawned to QMP"),
    ("restore", "boot: template state restored"),
    ("firmware", "boot: firmware (cold boot)"),
    ("kernel", "boot: kernel (cold boot)"),
    ("agent_ready", "boot: agent ready"),
    ("sandbox_start", "RunPodSandbox in the daemon"),
    ("boot_rest", "  of which not boot"),  # sandbox_start less the boot phases
    # from the verbose PodSandboxStatus (networkSeconds)
    ("net_cni_add", "  network: CNI ADD (while the VM boots)"),
    ("net_guest", "  network: guest NIC setup by the agent"),
    ("daemon_create", "CreateContainer in the daemon"),
    ("container_image_attach", "  image hot-plug and mount"),
    ("container_agent_create", "  agent call create"),
    ("container_layer", "    guest: layer"),
    ("container_overlay", "    guest: overlay"),
    ("container_mounts", "    guest: mounts"),
    ("container_config", "    guest: config"),
    ("container_crun_create", "    guest: crun create"),
    ("daemon_start", "StartContainer in the daemon"),
    ("container_agent_start", "  agent call start"),
    ("container_release", "    guest: release the init"),
    ("container_crun_start", "    guest: crun start"),
    ("daemon_exec", "ExecSync in the daemon"),
    ("daemon_stop", "StopPodSandbox in the daemon"),
    ("daemon_remove", "RemovePodSandbox in the daemon"),
)
BOOT_PHASES = ("vmm_spawn", "restore", "firmware", "kernel", "agent_ready")


@dataclass
class Peer:
    """One runtime under test: where to reach it and how its pods are asked for."""

    key: str  # "clearcri", "runsc", "runc"
    label: str
    runtime: Runtime
    handler: str  # the RunPodSandbox runtime handler
    metrics_url: str | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    phases: dict[str, list[float]] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cgroup_root(self) -> str:
        """The top cgroup of this runtime's pods (each pod's parent is below it)."""
        return f"clearcri-peers-{self.key}"


# --------------------------------------------------------------------------- one pod


def pod_config(peer: Peer, name: str, logs: Path) -> api_pb2.PodSandboxConfig:
    uid = f"{peer.key}-{name}"
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=uid),
        hostname=name,
        log_directory=str(logs / peer.key / name),
        # as kubelet's cgroupfs driver would give it: a pod cgroup of its own
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"/{peer.cgroup_root}/pod{uid}"),
    )


def container_config() -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="c"),
        image=api_pb2.ImageSpec(image=BUSYBOX),
        command=COMMAND,
        log_path="c.log",
    )


def wait_for_line(path: Path, line: str, timeout: float) -> None:
    """Until a CRI log file (``<time> <stream> <tag> <text>``) holds the text ``line``."""
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            seen = f.read()
        if any(entry.split(b" ", 3)[3:] == [line.encode()] for entry in seen.splitlines()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no line {line!r} in {path} within {timeout:.0f} s: {seen!r}")
        time.sleep(0.002)


def one_pod(peer: Peer, rt: Any, name: str, logs: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """One whole pod; returns its figures in seconds, and for clearcri what its verbose
    PodSandboxStatus says of the VM (accelerator, template clone, boot and network
    seconds)."""
    vm: dict[str, Any] = {}
    config = pod_config(peer, name, logs)
    Path(config.log_directory).mkdir(parents=True)
    clock = time.perf_counter
    t0 = clock()
    pod_id = rt.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=config, runtime_handler=peer.handler)
    ).pod_sandbox_id
    try:
        t1 = clock()
        cid = rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container_config(), sandbox_config=config
            )
        ).container_id
        t2 = clock()
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        t3 = clock()
        wait_for_line(Path(config.log_directory) / "c.log", "hi", LOG_TIMEOUT_S)
        t4 = clock()
        result = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60))
        t5 = clock()
        if result.exit_code != 0:
            raise RuntimeError(f"{peer.label}: `true` exited {result.exit_code}: {result.stderr!r}")
        if peer.metrics_url is not None:  # not timed: what clearcri says of the pod
            status = rt.PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
            )
            info = json.loads(status.info.get("info", "{}")).get("vm", {})
            keys = ("accelerator", "fromTemplate", "fromStandby", "bootSeconds", "networkSeconds")
            vm = {k: info.get(k) for k in keys}
    except BaseException:
        with contextlib.suppress(grpc.RpcError):
            rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        raise
    t6 = clock()
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    t7 = clock()
    return {
        "run_pod": t1 - t0,
        "create": t2 - t1,
        "start": t3 - t2,
        "create_start": t3 - t1,
        "first_log": t4 - t0,
        "exec": t5 - t4,
        "stop_remove": t7 - t6,
    }, vm


# --------------------------------------------------------------------------- clearcri's metrics


def scrape(url: str) -> dict[tuple[str, str], float]:
    """The ``_sum`` and ``_count`` of every histogram series: {(sample name, label): value}
    (the label is a histogram's ``phase`` or ``method``, or "")."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                label = sample.labels.get("phase", sample.labels.get("method", ""))
                out[(sample.name, label)] = sample.value
    return out


def pod_phases(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, float]:
    """What the daemon observed for the one pod between two scrapes; ``boot_rest`` is
    the part of RunPodSandbox outside the boot phases."""
    sources = dict(METRICS)
    for name, label in after:
        if name == f"{CONTAINER_STEP}_count":
            sources[f"container_{label}"] = (CONTAINER_STEP, label)
    phases = {}
    for key, (metric, label) in sources.items():
        count = after.get((f"{metric}_count", label), 0) - before.get((f"{metric}_count", label), 0)
        if count == 1:
            total = after[(f"{metric}_sum", label)] - before.get((f"{metric}_sum", label), 0)
            phases[key] = total
    if "sandbox_start" in phases:
        boot = sum(phases.get(key, 0.0) for key in BOOT_PHASES)
        phases["boot_rest"] = phases["sandbox_start"] - boot
    return phases


# --------------------------------------------------------------------------- the run


def measured_pod(peer: Peer, rt: Any, name: str, logs: Path, counted: bool) -> None:
    before = scrape(peer.metrics_url) if peer.metrics_url else {}
    figures, vm = one_pod(peer, rt, name, logs)
    log(f"{peer.label} {name}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in figures.items()))
    if not counted:
        return
    if vm:
        peer.info.append(vm)
        network = vm.get("networkSeconds") or {}
        for key, step in (("net_cni_add", "cni_add"), ("net_guest", "guest")):
            if step in network:
                peer.phases.setdefault(key, []).append(float(network[step]))
    for key, value in figures.items():
        peer.samples.setdefault(key, []).append(value)
    if peer.metrics_url:
        for key, value in pod_phases(before, scrape(peer.metrics_url)).items():
            peer.phases.setdefault(key, []).append(value)


def run_rounds(peers: list[Peer], rounds: int, logs: Path) -> list[list[str]]:
    """The warm-up pods, then the rounds; returns each round's order."""
    orders = []
    with contextlib.ExitStack() as stack:
        stubs = {}
        for peer in peers:
            channel = stack.enter_context(grpc.insecure_channel(peer.runtime.endpoint()))
            rt = api_pb2_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
            stubs[peer.key] = rt
            img = api_pb2_grpc.ImageServiceStub(channel)  # type: ignore[no-untyped-call]
            img.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=BUSYBOX)))
        for peer in peers:
            measured_pod(peer, stubs[peer.key], "warmup", logs, counted=False)
        for i in range(rounds):
            order = peers[i % len(peers) :] + peers[: i % len(peers)]
            orders.append([peer.key for peer in order])
            log(f"round {i + 1}/{rounds}: {', '.join(p.label for p in order)}; load {loadavg()}")
            for peer in order:
                measured_pod(peer, stubs[peer.key], f"r{i}", logs, counted=True)
    return orders


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- clean-up


def remove_cgroups(names: list[str]) -> None:
    """Remove the cgroup trees ``names`` (and everything below them) in every hierarchy;
    what cannot be removed is logged."""
    tops = [CGROUP_ROOT / name for name in names]
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir() and not hierarchy.is_symlink():
            tops += [hierarchy / name for name in names]
    for top in tops:
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                log(f"cannot remove cgroup {dirpath}: {exc}")


@contextlib.contextmanager
def started(what: str, start: Callable[[], Runtime]) -> Iterator[Runtime]:
    log(f"starting {what}")
    runtime = start()
    try:
        yield runtime
    finally:
        runtime.stop()


# --------------------------------------------------------------------------- report


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def versions() -> dict[str, str]:
    def git(*args: str) -> str:
        return first_line(["git", "-C", str(REPO), *args])

    # the code, not the documentation (where this benchmark writes its results)
    code = [".", ":(exclude)docs", ":(exclude)*.md"]
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", *code], capture_output=True
    ).returncode
    runc = shutil.which("runc") or "/usr/sbin/runc"
    stamps = {
        name: (PEERS_BIN_DIR / f".{name}.stamp").read_text().strip()
        for name in ("gvisor", "containerd")
        if (PEERS_BIN_DIR / f".{name}.stamp").exists()
    }
    return {
        "clearcri": git("rev-parse", "HEAD")
        + (" (code with uncommitted changes)" if dirty else ""),
        "containerd": first_line([str(PEERS_BIN_DIR / "containerd"), "--version"]),
        "runsc": first_line([str(PEERS_BIN_DIR / "runsc"), "--version"]),
        "gvisor_build": stamps.get("gvisor", "unknown"),
        "containerd_build": stamps.get("containerd", "unknown"),
        "runc": first_line([runc, "--version"]),
        "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "host_kernel": f"{platform.system()} {platform.release()}",
        "guest_dir": str(GUEST_DIR),
        "python": platform.python_version(),
    }


def guest_build() -> str:
    """The guest assets' build (manifest version and agent hash): another build
    installed during a run would make its figures a mix of two."""
    try:
        manifest = json.loads((GUEST_DIR / "manifest.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return f"{manifest.get('version')} agent {str(manifest.get('agent_hash'))[:16]}"


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    s = summary(values)
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def print_table(peers: list[Peer], rounds: int, load: tuple[str, str]) -> None:
    by_key = {p.key: p for p in peers}
    cc, gv, rc = by_key["clearcri"], by_key["runsc"], by_key["runc"]
    print(f"\nPod figures, ms: median (min-max) of {rounds} interleaved rounds")
    print(f"load average before {load[0]}, after {load[1]}")
    head = f"  {'':<36}" + "".join(f"{p.label:>24}" for p in peers)
    print(head + f"{'clearcri/gVisor':>17}{'clearcri/runc':>15}")
    for key, label in (*FIGURES, *SPLIT):
        row = f"  {label:<36}" + "".join(f"{cell(p.samples.get(key)):>24}" for p in peers)
        mine = statistics.median(cc.samples[key])
        row += f"{mine / statistics.median(gv.samples[key]):>17.2f}"
        row += f"{mine / statistics.median(rc.samples[key]):>15.2f}"
        print(row)
    if cc.phases:
        print("\nclearcri, where a pod's time goes (daemon metrics), ms: median (min-max)")
        known = {key for key, _ in PHASES}
        more = [(key, f"  {key}") for key in sorted(cc.phases) if key not in known]
        for key, what in (*PHASES, *more):
            if key in cc.phases:
                print(f"  {what:<40}{cell(cc.phases[key]):>24}")
    if cc.info:
        taken = sum(1 for pod in cc.info if pod.get("fromStandby"))
        print(f"\nclearcri pods that took over a standby VM: {taken} of {len(cc.info)}")


def results_json(peers: list[Peer], args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    by_key = {p.key: p for p in peers}
    cc = by_key["clearcri"]
    ratios: dict[str, dict[str, float]] = {}
    for key, _ in (*FIGURES, *SPLIT):
        mine = statistics.median(cc.samples[key])
        ratios[key] = {
            "clearcri/gvisor": mine / statistics.median(by_key["runsc"].samples[key]),
            "clearcri/runc": mine / statistics.median(by_key["runc"].samples[key]),
        }
    return {
        "benchmark": "tests/bench/bench_peers.py",
        "rounds": args.rounds,
        "unit": "ms",
        "command": list(COMMAND),
        "image": BUSYBOX,
        "runtimes": {
            p.key: {
                "label": p.label,
                "samples": {k: [round(v * 1000, 2) for v in vs] for k, vs in p.samples.items()},
                "summary": {k: summary(vs) for k, vs in p.samples.items()},
            }
            for p in peers
        },
        "ratios": ratios,
        "clearcri_phases": {
            "samples": {k: [round(v * 1000, 2) for v in vs] for k, vs in cc.phases.items()},
            "summary": {k: summary(vs) for k, vs in cc.phases.items()},
            "pods": cc.info,
        },
        **extra,
    }


def plot(peers: list[Peer], rounds: int, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        stats = [summary(peer.samples[key]) for key, _ in FIGURES]
        med = [s["median"] for s in stats]
        low = [s["median"] - s["min"] for s in stats]
        high = [s["max"] - s["median"] for s in stats]
        xs = [x + (i - (len(peers) - 1) / 2) * width for x in range(len(FIGURES))]
        ax.bar(xs, med, width, yerr=[low, high], capsize=3, label=peer.label)
        for x, s in zip(xs, stats, strict=True):
            ax.annotate(f"{s['median']:.0f}", (x, s["max"]), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale): median, bars min-max")
    ax.set_xticks(range(len(FIGURES)), [label for _, label in FIGURES], fontsize=8)
    ax.set_title(f"{title}; {rounds} interleaved rounds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--out-dir", type=Path, default=REPO / "docs", help="where peers.json and peers.png go"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (the runtimes' logs)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (CNI, containerd, pod VMs)")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if not have_matplotlib():
        log("matplotlib is missing, so no plot will be written: pip install -e '.[bench]'")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    # the conformance runs and the other benchmarks share the registry port and the CPU
    wait_for_lock(LOCK_FILE, f"another run (conformance or benchmark) holds {LOCK_FILE}; waiting")
    build_tools()
    cgroups = [f"clearcri-peers-{key}" for key in ("clearcri", "runsc", "runc")]
    try:
        with contextlib.ExitStack() as stack:
            work = stack.enter_context(work_dir(args.keep))
            registry = LocalRegistry(work)
            stack.callback(registry.stop)
            log(f"pushing the image set to {registry.host}")
            inputs = images.Inputs(images.DEFAULT_CACHE)
            inputs.prepare()
            images.push_all(registry.host, images.image_set(inputs))
            port = free_port()
            for sub in ("clearcri", "containerd"):
                (work / sub).mkdir()
            clearcri = stack.enter_context(
                started(
                    "clearcri",
                    lambda: Clearcri(
                        work / "clearcri",
                        registry.host,
                        network=NETWORKS["clearcri"],
                        metrics_port=port,
                    ),
                )
            )
            containerd = stack.enter_context(
                started(
                    "containerd v2 (runc, runsc)",
                    lambda: ContainerdV2(
                        work / "containerd",
                        registry.host,
                        networks={"runc": NETWORKS["runc"], "runsc": NETWORKS["runsc"]},
                    ),
                )
            )
            peers = [
                Peer(
                    "clearcri",
                    "clearcri",
                    clearcri,
                    "",
                    metrics_url=f"http://127.0.0.1:{port}/metrics",
                ),
                Peer("runsc", "containerd + gVisor", containerd, "runsc"),
                Peer("runc", "containerd + runc", containerd, "runc"),
            ]
            load_before, guest_before = loadavg(), guest_build()
            started_at = datetime.datetime.now(datetime.UTC)
            orders = run_rounds(peers, args.rounds, work / "logs")
            load_after, guest_after = loadavg(), guest_build()
    finally:
        remove_cgroups(cgroups)
    print_table(peers, args.rounds, (load_before, load_after))
    accelerators = sorted({str(i.get("accelerator")) for i in peers[0].info})
    components = {**versions(), "guest": guest_before}
    if guest_after != guest_before:
        components["guest_after"] = guest_after
        log(f"the guest assets changed during the run ({guest_before} -> {guest_after})")
    extra: dict[str, Any] = {
        "date": started_at.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "clearcri_accelerator": accelerators,
        },
        "orders": orders,
        "versions": components,
    }
    out = args.out_dir / "peers.json"
    out.write_text(json.dumps(results_json(peers, args, extra), indent=1) + "\n")
    print(f"\nwrote {out}")
    png = args.out_dir / "peers.png"
    title = (
        f"Pod start, exec, stop on {os.cpu_count()} cores (clearcri under "
        f"{'/'.join(accelerators).upper()}), {started_at:%Y-%m-%d}"
    )
    if plot(peers, args.rounds, png, title):
        print(f"wrote {png}")
    else:
        log("matplotlib is missing: pip install -e '.[bench]' (or pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
