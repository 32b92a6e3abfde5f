"""`clearcri node install|upgrade|uninstall` for real, into temporary prefixes: a venv
built with pip, the guest assets, the daemon run from the installed venv, an upgrade
under a running pod VM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.node_install import (
    CONFIG_PATH,
    MANIFEST_PATH,
    UNIT_PATH,
    VENV_LINK,
    InstallManifest,
)
from sandbox.guest import locate_guest
from tests.integration.conftest import GUEST_DIR
from tests.integration.installed import (
    CANNOT_BUILD_WHEELS,
    VENV_ENV,
    can_build_wheels,
    daemon_config,
    frozen_source,
    install_args,
    node,
    pod_state,
    remove_pods,
    run_pod,
    temporary_prefix,
)

pytestmark = pytest.mark.skipif(not can_build_wheels(), reason=CANNOT_BUILD_WHEELS)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (symlinks not followed); files and links with their
    inode and mtime (a directory's mtime changes whenever an entry comes and goes)."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[str(Path(dirpath, name).relative_to(root))] = (0, 0)
        for name in filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return frozen_source(tmp_path_factory.mktemp("source"))


@pytest.fixture
def prefix() -> Iterator[Path]:
    with temporary_prefix() as path:
        yield path


def test_install_reinstall_uninstall(prefix: Path, source: Path) -> None:
    (prefix / "etc/cni/net.d").mkdir(parents=True)
    (prefix / "etc/hostname").write_text("node-1\n")
    before = tree(prefix)

    out = node("install", *install_args(prefix, source, "--cni"))
    assert "--container-runtime-endpoint=unix://" in out
    assert "supervise --config" in out  # how to start it without systemd

    venv = prefix / VENV_LINK
    clearcri = venv / "bin/clearcri"
    assert (
        "install"
        in subprocess.run(
            [str(clearcri), "node", "--help"], capture_output=True, text=True, check=True
        ).stdout
    )
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import cri.cli; print(cri.cli.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env=VENV_ENV,
    ).stdout
    assert where.startswith(str(prefix / "opt/clearcri/"))  # not this checkout
    config = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import sys, pathlib; from cri.config import load_config; "
            "c = load_config(pathlib.Path(sys.argv[1])); print(c.vm.guest_dir, c.daemon.socket)",
            str(prefix / CONFIG_PATH),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=VENV_ENV,
    ).stdout.split()
    assert config == [
        str(prefix / "opt/clearcri/guest"),
        str(prefix / "run/clearcri/clearcri.sock"),
    ]
    assert locate_guest(prefix / "opt/clearcri/guest").version == locate_guest(GUEST_DIR).version
    unit = (prefix / UNIT_PATH).read_text()
    assert f"ExecStart={clearcri} serve --config {prefix / CONFIG_PATH}" in unit
    if shutil.which("systemd-analyze"):  # systemd's own check of the unit (works offline)
        check = subprocess.run(
            ["systemd-analyze", "verify", str(prefix / UNIT_PATH)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0 and not check.stderr.strip(), check.stderr
    assert json.loads((prefix / "etc/cni/net.d/10-clearcri.conflist").read_text())["plugins"]

    installed = tree(prefix)
    out = node("install", *install_args(prefix, source, "--cni"))
    assert "already installed" in out
    assert tree(prefix) == installed  # not one file touched

    node("uninstall", "--prefix", str(prefix))
    assert tree(prefix) == before


def test_install_from_a_release_dir_as_the_daemonset_does(
    prefix: Path, source: Path, tmp_path: Path
) -> None:
    """The chart's path: the wheel itself runs the installer with a bare python3."""
    release = tmp_path / "release"
    (release / "wheels").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--wheel-dir",
            str(release / "wheels"),
            str(source),
        ],
        check=True,
        cwd="/",
    )
    shutil.copytree(source / "packaging", release / "packaging")
    shutil.copytree(GUEST_DIR, release / "guest", ignore=shutil.ignore_patterns("cache", ".*"))
    (release / "config.toml").write_text(
        (source / "packaging/config.toml").read_text().replace('"info"', '"debug"')
    )
    (wheel,) = (release / "wheels").glob("clearcri-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "deploy/node_install.py" in zf.namelist()

    # As the chart's install script: PYTHONPATH=<wheel> python3 -m deploy.node_install, here
    # with -S so that nothing but the wheel (no site-packages, no checkout) provides cri.
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    argv = [
        sys.executable,
        "-S",
        "-m",
        "deploy.node_install",
        "upgrade",
        "--install",
        "--release",
        str(release),
        "--config-from",
        str(release / "config.toml"),
        "--update-config",
        "--prefix",
        str(prefix),
        "--no-start",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd="/", env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'log_level = "debug"' in (prefix / CONFIG_PATH).read_text()
    manifest = InstallManifest.load(prefix)
    assert manifest is not None and manifest.version == "0.1.0"
    # Run again (a DaemonSet pod restart): nothing changes.
    before = tree(prefix)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd="/", env=env, check=False)
    assert proc.returncode == 0 and "nothing to upgrade" in proc.stdout, proc.stderr
    assert tree(prefix) == before
    node("uninstall", "--prefix", str(prefix))
    assert list(prefix.iterdir()) == []


# -- upgrade under a running pod -------------------------------------------------------


class InstalledDaemon:
    """`<prefix>/opt/clearcri/venv/bin/clearcri serve` with the installed config."""

    def __init__(self, prefix: Path, log: Path) -> None:
        self.prefix = prefix
        self.socket = prefix / "run/clearcri/clearcri.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log

    def start(self, timeout: float = 120.0) -> None:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc

        exe = self.prefix / VENV_LINK / "bin/clearcri"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "serve", "--config", str(self.prefix / CONFIG_PATH)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd="/",
                env=VENV_ENV,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            if self.socket.exists():
                try:
                    with grpc.insecure_channel(f"unix://{self.socket}") as channel:
                        stub: Any = api_pb2_grpc.RuntimeServiceStub
                        stub(channel).Version(api_pb2.VersionRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not serve within {timeout} s")

    def stop(self) -> None:
        """SIGTERM, as systemd's KillMode=process sends it: only the daemon goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def interpreter(self) -> str:
        """argv[0]: the shebang of bin/clearcri, the python of the release that runs."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()


@pytest.mark.vm
def test_upgrade_under_a_running_pod(prefix: Path, source: Path, tmp_path: Path) -> None:
    from cri_api.v1 import api_pb2

    from sandbox.procfs import pid_alive

    config = tmp_path / "config.toml"
    config.write_text(daemon_config())
    node("install", *install_args(prefix, source, "--config-from", str(config)))
    first = InstallManifest.load(prefix)
    assert first is not None

    daemon = InstalledDaemon(prefix, tmp_path / "daemon.log")
    daemon.start()
    try:
        assert daemon.interpreter() == str(
            prefix / "opt/clearcri/releases" / first.release / "venv/bin/python"
        )
        pod_id = asyncio.run(run_pod(daemon.socket, "survivor"))
        state = prefix / "run/clearcri/sandboxes" / pod_id / "state.json"
        vm_pid = int(json.loads(state.read_text())["pid"])
        assert pid_alive(vm_pid)

        # A new release of the code: the running daemon keeps running from the old one.
        with (source / "cri/__init__.py").open("a") as f:
            f.write("# next release\n")
        with (prefix / CONFIG_PATH).open("a") as f:
            f.write("# edited on the node\n")
        edited = (prefix / CONFIG_PATH).read_text()
        out = node("upgrade", *install_args(prefix, source))
        assert "restart" in out
        second = InstallManifest.load(prefix)
        assert second is not None and second.release != first.release
        assert second.releases == [first.release, second.release]
        assert (prefix / CONFIG_PATH).read_text() == edited

        # Restart as systemd would (KillMode=process): the VM stays, the new daemon adopts it.
        daemon.stop()
        assert pid_alive(vm_pid)
        daemon.start()
        assert daemon.interpreter() == str(
            prefix / "opt/clearcri/releases" / second.release / "venv/bin/python"
        )
        assert asyncio.run(pod_state(daemon.socket, pod_id)) == api_pb2.SANDBOX_READY
        assert int(json.loads(state.read_text())["pid"]) == vm_pid and pid_alive(vm_pid)

        asyncio.run(remove_pods(daemon.socket))
        assert not pid_alive(vm_pid)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with_pods = list((prefix / "run/clearcri/sandboxes").glob("*/state.json"))
            if with_pods:
                asyncio.run(remove_pods(daemon.socket))
        daemon.stop()
    node("uninstall", "--prefix", str(prefix))
    assert not (prefix / MANIFEST_PATH).exists()
    assert not (prefix / "opt").exists() and not (prefix / "etc/systemd").exists()
    # What the daemon made at run time (its state and run dirs) is not the installer's.
    assert {p.name for p in prefix.iterdir()} <= {"run", "var", "etc"}
