"""Run critest offline against clearcri (or Debian's containerd + runc for comparison).

One command does it all and cleans up after itself:

1. builds crictl, critest and ginkgo once (``scripts/build-cri-tools.sh``, cached);
2. starts Debian's ``docker-registry`` on 127.0.0.1 (port 5000, or a free port when
   5000 is taken) with its storage in the work directory, and pushes the image set of
   ``tests/conformance/images.py``;
3. starts the runtime under test with registry.k8s.io, gcr.io and k8s.gcr.io mirrored
   to that registry and a CNI bridge network of the run's own: ``clearcri serve`` with a
   config of its own, or ``containerd`` with a certs.d ``hosts.toml`` per registry;
4. runs critest (serially unless ``--parallel N``), writing ``junit.xml``,
   ``critest.log`` and ``summary.txt`` (``N passed, M failed, K skipped``) to the report
   directory;
5. removes every pod it left, stops the runtime and the registry by PID, and removes
   the work directory.

    python3 -m tests.conformance.run [--runtime clearcri|containerd] [--expected-only]
        [--focus REGEX] [--skip REGEX] [--parallel N] [--flake-attempts N]
        [--report-dir DIR] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.mountapi import unmount_under as detach_all
from tests.conformance import check, images

REPO = Path(__file__).resolve().parents[2]
TOOLS_DIR = Path.home() / ".cache" / "clearcri" / "bin"
PEERS_BIN_DIR = Path.home() / ".cache" / "clearcri" / "peers" / "bin"  # scripts/build-peers.sh
GUEST_DIR = Path(os.environ.get("CLEARCRI_GUEST_DIR", "/var/lib/clearcri/guest"))
MIRRORED = ("registry.k8s.io", "gcr.io", "k8s.gcr.io")
SANDBOX_IMAGE = f"registry.k8s.io/{images.SANDBOX_IMAGE_PATH}"
# Pinned to an upstream digest, so it cannot pass offline.
ALWAYS_SKIP = ("public image with digest",)
HOST_PORTS = (12000, 12001, 12002, 12003)  # critest binds these on the host
LOCK_FILE = "/run/lock/clearcri-conformance.lock"
# The runs' CNI network: a bridge and subnet nothing else on these hosts uses.
BRIDGE = "ccconf0"
SUBNET = "10.231.0.0/24"


def log(message: str) -> None:
    print(f"conformance: {message}", file=sys.stderr, flush=True)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        if ready():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready within {timeout:.0f} s")


class Process:
    """A child process started here and stopped here, by its PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=cwd
            )
        log(f"started {name} (pid {self.proc.pid})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        log(f"stopped {self.name} (pid {self.proc.pid})")


# --------------------------------------------------------------------------- registry


class LocalRegistry:
    def __init__(self, work: Path) -> None:
        port = 5000 if port_free(5000) else free_port()
        self.host = f"127.0.0.1:{port}"
        config = work / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {work / 'registry'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )
        self.process = Process(
            "docker-registry", ["docker-registry", "serve", str(config)], work / "registry.log"
        )
        wait_for("docker-registry", self._answers, self.process.proc, 30)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        self.process.stop()


# --------------------------------------------------------------------------- runtimes


class Runtime(ABC):
    """A CRI runtime started for one run, with its own state under the work dir."""

    name = ""
    socket: Path
    process: Process

    def __init__(self, work: Path, registry: str) -> None:
        self.work = work

    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @abstractmethod
    def stop(self) -> None: ...


def crictl(work: Path, endpoint: str, *args: str, timeout: float = 300) -> str:
    config = work / "crictl.yaml"
    if not config.exists():
        config.write_text(
            f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 120\n"
        )
    result = subprocess.run(
        [str(TOOLS_DIR / "crictl"), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout


def remove_all_pods(work: Path, endpoint: str) -> None:
    """What a failed or interrupted spec left behind."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        pods = crictl(work, endpoint, "pods", "-q").split()
        if pods:
            log(f"removing {len(pods)} pod(s) left behind")
            crictl(work, endpoint, "rmp", "-f", *pods)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (children of what this run started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def unmount_under(root: Path) -> None:
    """Detach every mount at or below ``root``; what cannot be is left (logged by the
    caller's later removal)."""
    with contextlib.suppress(OSError):
        detach_all(root)


@dataclass(frozen=True)
class CniNetwork:
    """A CNI bridge network of a run's own: a bridge and subnet nothing else uses."""

    bridge: str
    subnet: str


CONFORMANCE_NETWORK = CniNetwork(BRIDGE, SUBNET)


def write_cni_config(work: Path, network: CniNetwork = CONFORMANCE_NETWORK) -> Path:
    """A CNI config directory of its own for ``network`` (IPAM state under ``work``)
    with hostPort support; returns the directory."""
    cni_conf = work / "cni" / network.bridge
    cni_conf.mkdir(parents=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": f"clearcri-{network.bridge}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": network.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(work / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (cni_conf / "10-conformance.conflist").write_text(json.dumps(conflist, indent=2))
    return cni_conf


def remove_bridge(bridge: str = BRIDGE) -> None:
    subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)


class Clearcri(Runtime):
    name = "clearcri"

    def __init__(
        self,
        work: Path,
        registry: str,
        *,
        network: CniNetwork = CONFORMANCE_NETWORK,
        metrics_port: int | None = None,
    ) -> None:
        """``metrics_port``: serve the Prometheus metrics on 127.0.0.1 at that port
        (docs/metrics.md); off when None."""
        self.work = work
        self.network = network
        self.socket = work / "run" / "clearcri.sock"
        lines = [
            "[daemon]",
            f'socket = "{self.socket}"',
            f'state_dir = "{work / "state"}"',
            f'run_dir = "{work / "run"}"',
            f'log_dir = "{work / "log"}"',
            f'sandbox_image = "{SANDBOX_IMAGE}"',
            "[vm]",
            f'guest_dir = "{GUEST_DIR}"',
            "[vm.network]",
            f'conf_dirs = ["{write_cni_config(work, network)}"]',
            'bin_dirs = ["/usr/lib/cni"]',
            "[streaming]",
            'address = "127.0.0.1"',
            "[metrics]",
        ]
        if metrics_port is None:
            lines.append("enabled = false")
        else:
            lines += ['address = "127.0.0.1"', f"port = {metrics_port}"]
        for host in MIRRORED:
            lines += [f'[registry.mirrors."{host}"]', f'endpoints = ["http://{registry}"]']
        config = work / "clearcri.toml"
        config.write_text("\n".join(lines) + "\n")
        self.process = Process(
            "clearcri serve",
            [sys.executable, "-m", "cri.cli", "serve", "--config", str(config)],
            work / "runtime.log",
            cwd=REPO,
        )
        wait_for("clearcri serve", self._serving, self.process.proc, 120)

    def _serving(self) -> bool:
        return self.socket.exists() and bool(crictl(self.work, self.endpoint(), "version"))

    def stop(self) -> None:
        remove_all_pods(self.work, self.endpoint())
        self.process.stop()
        # The daemon leaves pod VMs running for its successor; this run has none.
        for pid in processes_mentioning(str(self.work / "run")):
            log(f"killing leftover VM process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_bridge(self.network.bridge)


def write_registry_hosts(certs: Path, registry: str) -> Path:
    """A containerd certs.d directory sending the mirrored registries to ``registry``."""
    for host in MIRRORED:
        (certs / host).mkdir(parents=True)
        (certs / host / "hosts.toml").write_text(
            f'server = "https://{host}"\n\n[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
    return certs


class Containerd(Runtime):
    """Debian's containerd 1.6 with runc: the baseline the table compares against."""

    name = "containerd"

    def __init__(self, work: Path, registry: str) -> None:
        self.work = work
        base = work / "containerd"
        self.socket = base / "containerd.sock"
        certs = write_registry_hosts(work / "certs.d", registry)
        cni_conf = write_cni_config(work)
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        config = work / "containerd.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\n'
            f'state = "{base / "state"}"\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  level = "warn"\n'
            f"{cri}\n"
            f'  sandbox_image = "{SANDBOX_IMAGE}"\n'
            "  restrict_oom_score_adj = true\n"
            f"{cri[:-1]}.containerd]\n"
            '  default_runtime_name = "runc"\n'
            f"{cri[:-1]}.containerd.runtimes.runc]\n"
            '  runtime_type = "io.containerd.runc.v2"\n'
            f"{cri[:-1]}.cni]\n"
            '  bin_dir = "/usr/lib/cni"\n'
            f'  conf_dir = "{cni_conf}"\n'
            f"{cri[:-1]}.registry]\n"
            f'  config_path = "{certs}"\n'
        )
        self.process = Process(
            "containerd", ["containerd", "--config", str(config)], work / "runtime.log"
        )
        wait_for("containerd", self._serving, self.process.proc, 60)

    def _serving(self) -> bool:
        return self.socket.exists() and bool(crictl(self.work, self.endpoint(), "version"))

    def stop(self) -> None:
        remove_all_pods(self.work, self.endpoint())
        self.process.stop()
        for pid in processes_mentioning(str(self.socket)):  # shims of this containerd
            log(f"stopping leftover shim {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.work)
        remove_bridge()


class ContainerdV2(Runtime):
    """containerd v2 with two runtime handlers, ``runc`` (Debian's runc) and ``runsc``
    (gVisor, systrap platform), each with a CNI bridge network of its own: the peers of
    tests/bench/bench_peers.py. containerd, its runc shim, runsc and the gVisor shim are
    what scripts/build-peers.sh builds into ``bin_dir``."""

    name = "containerd-v2"
    handlers = ("runc", "runsc")

    def __init__(
        self,
        work: Path,
        registry: str,
        *,
        networks: dict[str, CniNetwork],
        bin_dir: Path = PEERS_BIN_DIR,
    ) -> None:
        self.work = work
        self.networks = networks
        self.base = base = work / "containerd"
        self.socket = base / "containerd.sock"
        missing = [
            name
            for name in (
                "containerd",
                "containerd-shim-runc-v2",
                "runsc",
                "containerd-shim-runsc-v1",
            )
            if not (bin_dir / name).is_file()
        ]
        if missing:
            raise SystemExit(f"{', '.join(missing)} missing in {bin_dir}: run `make peers`")
        runc = shutil.which("runc") or "/usr/sbin/runc"
        certs = write_registry_hosts(work / "certs.d", registry)
        runsc_config = work / "runsc.toml"
        runsc_config.write_text(
            f'binary_name = "{bin_dir / "runsc"}"\n'
            f'root = "{base / "runsc-root"}"\n'
            "[runsc_config]\n"
            '  platform = "systrap"\n'
        )
        images = "[plugins.'io.containerd.cri.v1.images'"
        cri = "[plugins.'io.containerd.cri.v1.runtime'"
        runtimes = f"{cri}.containerd.runtimes"
        lines = [
            "version = 3",
            f"root = '{base / 'root'}'",
            f"state = '{base / 'state'}'",
            # NRI would listen on the host-wide /var/run/nri socket; the rest is unused
            "disabled_plugins = ['io.containerd.nri.v1.nri',",
            "  'io.containerd.snapshotter.v1.blockfile', 'io.containerd.snapshotter.v1.erofs',",
            "  'io.containerd.differ.v1.erofs', 'io.containerd.tracing.processor.v1.otlp',",
            "  'io.containerd.internal.v1.tracing']",
            f"[grpc]\n  address = '{self.socket}'",
            f"[ttrpc]\n  address = '{self.socket}.ttrpc'",
            "[debug]\n  level = 'warn'",
            # CRI needs the image verifier plugin; an empty directory holds no verifier
            "[plugins.'io.containerd.image-verifier.v1.bindir']",
            f"  bin_dir = '{base / 'image-verifiers'}'",
            f"[plugins.'io.containerd.internal.v1.opt']\n  path = '{base / 'opt'}'",
            f"{images}]\n  snapshotter = 'overlayfs'",
            f"{images}.pinned_images]\n  sandbox = '{SANDBOX_IMAGE}'",
            f"{images}.registry]\n  config_path = '{certs}'",
            f"{cri}]",
            "  restrict_oom_score_adj = true",
            "  disable_apparmor = true",
            "  enable_cdi = false",
            "  netns_mounts_under_state_dir = true",
            f"{cri}.containerd]\n  default_runtime_name = 'runc'",
            f"{runtimes}.runc]",
            "  runtime_type = 'io.containerd.runc.v2'",
            f"  runtime_path = '{bin_dir / 'containerd-shim-runc-v2'}'",
            f"  cni_conf_dir = '{write_cni_config(work, networks['runc'])}'",
            "  cni_max_conf_num = 1",
            f"{runtimes}.runc.options]",
            f"  BinaryName = '{runc}'",
            f"  Root = '{base / 'runc-root'}'",
            "  SystemdCgroup = false",
            f"{runtimes}.runsc]",
            "  runtime_type = 'io.containerd.runsc.v1'",
            f"  runtime_path = '{bin_dir / 'containerd-shim-runsc-v1'}'",
            f"  cni_conf_dir = '{write_cni_config(work, networks['runsc'])}'",
            "  cni_max_conf_num = 1",
            f"{runtimes}.runsc.options]",
            "  TypeUrl = 'io.containerd.runsc.v1.options'",
            f"  ConfigPath = '{runsc_config}'",
            f"{cri}.cni]",
            "  bin_dirs = ['/usr/lib/cni']",
            f"  conf_dir = '{work / 'cni' / networks['runc'].bridge}'",
            "  max_conf_num = 1",
            "[plugins.'io.containerd.grpc.v1.cri']",
            "  disable_tcp_service = true",
            "  stream_server_address = '127.0.0.1'",
            "  stream_server_port = '0'",
        ]
        config = work / "containerd.toml"
        config.write_text("\n".join(lines) + "\n")
        self.process = Process(
            "containerd v2",
            [str(bin_dir / "containerd"), "--config", str(config)],
            work / "runtime.log",
        )
        wait_for("containerd v2", self._serving, self.process.proc, 60)

    def _serving(self) -> bool:
        return self.socket.exists() and bool(crictl(self.work, self.endpoint(), "version"))

    def stop(self) -> None:
        remove_all_pods(self.work, self.endpoint())
        self.process.stop()
        # shims name the socket, gVisor's sandbox and gofer processes their root
        for pid in processes_mentioning(str(self.base)):
            log(f"stopping leftover process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.work)
        for network in self.networks.values():
            remove_bridge(network.bridge)


RUNTIMES: dict[str, type[Runtime]] = {"clearcri": Clearcri, "containerd": Containerd}


# --------------------------------------------------------------------------- critest


def build_tools() -> None:
    subprocess.run([str(REPO / "scripts" / "build-cri-tools.sh"), str(TOOLS_DIR)], check=True)


def critest_argv(args: argparse.Namespace, endpoint: str, report_dir: Path) -> list[str]:
    argv = [
        str(TOOLS_DIR / "critest"),
        f"-runtime-endpoint={endpoint}",
        f"-image-endpoint={endpoint}",
        f"-ginkgo.junit-report={report_dir / 'junit.xml'}",
        f"-ginkgo.timeout={args.timeout}",
        "-ginkgo.no-color",
        "-ginkgo.v",
    ]
    focus = args.focus
    if args.expected_only:
        focus = check.focus_regex(check.read_expected())
    if focus:
        argv.append(f"-ginkgo.focus={focus}")
    for pattern in [*ALWAYS_SKIP, *args.skip]:
        argv.append(f"-ginkgo.skip={pattern}")
    if args.parallel > 1:
        argv.append(f"-parallel={args.parallel}")
    if args.flake_attempts > 1:
        argv.append(f"-ginkgo.flake-attempts={args.flake_attempts}")
    return argv


def run_critest(args: argparse.Namespace, runtime: Runtime, report_dir: Path) -> float:
    argv = critest_argv(args, runtime.endpoint(), report_dir)
    env = dict(os.environ, PATH=f"{TOOLS_DIR}:{os.environ.get('PATH', '')}")
    busy = [port for port in HOST_PORTS if not port_free(port)]
    if busy:
        log(f"warning: host ports {busy} are in use; the port specs will fail")
    log(f"running critest against {runtime.name}; output in {report_dir / 'critest.log'}")
    started = time.monotonic()
    with (report_dir / "critest.log").open("wb") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=report_dir)
    return time.monotonic() - started


def write_summary(report_dir: Path, runtime: str, seconds: float, total: float) -> str:
    junit = report_dir / "junit.xml"
    if not junit.exists():
        raise SystemExit(f"critest wrote no report; see {report_dir / 'critest.log'}")
    return check.write_results(report_dir, runtime, check.read_report(junit), seconds, total)


def wait_for_lock(path: str, waiting: str) -> int:
    """Take the exclusive lock ``path`` (held until the process ends), saying ``waiting``
    first when another run holds it."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(waiting)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    # Short: clearcri's VM sockets live under it and unix socket paths are limited.
    path = Path(tempfile.mkdtemp(prefix="ccconf-", dir="/tmp"))
    try:
        yield path
    finally:
        unmount_under(path)
        if keep:
            log(f"kept work directory {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}; cleaning up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run critest offline against a CRI runtime.")
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="clearcri")
    parser.add_argument("--report-dir", type=Path, help="default: build/conformance/<runtime>")
    parser.add_argument("--focus", default="", help="ginkgo focus regex")
    parser.add_argument("--skip", action="append", default=[], help="ginkgo skip regex")
    parser.add_argument(
        "--expected-only", action="store_true", help="run only the specs in expected-pass.txt"
    )
    parser.add_argument("--parallel", type=int, default=1, help="critest -parallel")
    parser.add_argument(
        "--flake-attempts",
        type=int,
        default=1,
        help="run a failing spec up to N times before it counts as failed (CI uses 2)",
    )
    parser.add_argument("--timeout", default="4h", help="ginkgo suite timeout")
    parser.add_argument(
        "--check", action="store_true", help="fail when an expected-pass spec did not pass"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("critest needs root (namespaces, host ports, ipcmk)")
    report_dir = (args.report_dir or REPO / "build" / "conformance" / args.runtime).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("junit.xml", "summary.txt", "results.json"):
        (report_dir / stale).unlink(missing_ok=True)
    # SIGTERM or SIGINT (even where a background job ignores SIGINT) ends the run
    # through the same clean-up as an error
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    # One run per host: runs share host ports 12000-12003 (a spec of one run could be
    # answered by a container of the other) and the CPU the timings measure.
    wait_for_lock(LOCK_FILE, f"another run (conformance or benchmark) holds {LOCK_FILE}; waiting")
    started = time.monotonic()
    build_tools()
    with work_dir(args.keep) as work:
        registry = LocalRegistry(work)
        runtime: Runtime | None = None
        try:
            log(f"pushing the image set to {registry.host}")
            inputs = images.Inputs(images.DEFAULT_CACHE)
            inputs.prepare()
            images.push_all(registry.host, images.image_set(inputs))
            runtime = RUNTIMES[args.runtime](work, registry.host)
            seconds = run_critest(args, runtime, report_dir)
        finally:
            if runtime is not None:
                runtime.stop()
                with contextlib.suppress(OSError):
                    shutil.copy(runtime.process.log_path, report_dir / "runtime.log")
            registry.stop()
    total = time.monotonic() - started
    line = write_summary(report_dir, args.runtime, seconds, total)
    print(f"{args.runtime}: {line} (critest {seconds / 60:.1f} min, total {total / 60:.1f} min)")
    print(f"report: {report_dir / 'junit.xml'}")
    if args.check and args.runtime != "clearcri":
        log("expected-pass.txt lists clearcri's specs: no check for the baseline")
    elif args.check:
        return check.check(report_dir / "junit.xml", check.EXPECTED_PASS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
