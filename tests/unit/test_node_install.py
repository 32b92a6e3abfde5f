"""`clearcri node install|upgrade|uninstall` with a fake command runner (no pip, no systemd).

The real thing (a venv built with pip, the daemon run from it) is in
tests/integration/test_node_install.py.
"""

from __future__ import annotations

import json
import os
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from cri.cli import build_parser
from cri.config import load_config
from deploy.node_install import (
    CONFIG_PATH,
    GUEST_FILES,
    MANIFEST_PATH,
    UNIT_NAME,
    UNIT_PATH,
    VENV_LINK,
    InstallManifest,
    NodeInstaller,
    NodeInstallError,
    Options,
    ReleaseSource,
    SupervisorControl,
    Systemd,
    cni_conflist,
    relocate,
)
from deploy.supervisor import cgroup_name

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (symlinks not followed), relative, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(str(Path(dirpath, name).relative_to(root)))
    return sorted(found)


class FakeRunner:
    """Stands in for venv/pip/python/systemctl: records argv, makes a venv skeleton."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_on: str = ""

    def __call__(self, argv: Sequence[str]) -> None:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_on and any(self.fail_on in a for a in argv):
            raise NodeInstallError(f"{self.fail_on} failed")
        if argv[1:3] == ["-m", "venv"]:
            venv = Path(argv[-1])
            (venv / "bin").mkdir(parents=True)
            (venv / "bin/python").write_text("#!/bin/sh\n")
            (venv / "bin/clearcri").write_text("#!/bin/sh\n")

    def commands(self, word: str) -> list[list[str]]:
        return [c for c in self.calls if word in c]


class FakeSystemd(Systemd):
    def __init__(self, run: FakeRunner, usable: bool) -> None:
        self.run = run
        self.usable = usable


class FakeSupervisor(SupervisorControl):
    """The supervisor without processes: its start command goes to the fake runner, the
    rest (looking for it, signalling it, its cgroup) is recorded."""

    def __init__(self, prefix: Path, run: FakeRunner) -> None:
        super().__init__(prefix, run)
        self.pid: int | None = None
        self.release_dir = ""  # what the running supervisor runs from
        self.events: list[str] = []

    def running(self) -> int | None:
        return self.pid

    def runs_from(self, pid: int, release_dir: Path) -> bool:
        return str(release_dir) == self.release_dir

    def context_problems(self) -> list[str]:
        return []

    def start(self) -> None:
        super().start()
        self.pid = 1000 + len(self.events)
        venv = self.prefix / VENV_LINK
        self.release_dir = str((venv.parent / os.readlink(venv)).parent)
        self.events.append(f"start {self.pid}")

    def restart_daemon(self, pid: int) -> None:
        self.events.append(f"hup {pid}")

    def stop(self, pid: int) -> None:
        self.events.append(f"stop {pid}")
        self.pid = None

    def remove_cgroup(self) -> list[Path]:
        self.events.append("remove cgroup")
        return []


def make_wheel(path: Path, payload: str) -> Path:
    wheel = path / "clearcri-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("cri/__init__.py", payload)
    return wheel


def make_guest(path: Path, os_image: bytes = b"os" * 100) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in GUEST_FILES:
        (path / name).write_bytes(name.encode())
    (path / "os.img").write_bytes(os_image)
    (path / "manifest.json").write_text(json.dumps({"complete": True, "version": "x"}))
    return path


@pytest.fixture
def source(tmp_path: Path) -> ReleaseSource:
    work = tmp_path / "release"
    work.mkdir()
    return ReleaseSource(
        source=make_wheel(work, "v1"),
        packaging_dir=PACKAGING,
        guest_dir=make_guest(work / "guest"),
        python="/usr/bin/python3",
    )


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def installer(
    prefix: Path,
    runner: FakeRunner,
    *,
    usable: bool = False,
    supervisor: FakeSupervisor | None = None,
    **options: object,
) -> tuple[NodeInstaller, list[str]]:
    lines: list[str] = []
    opts = Options(prefix=prefix, **options)  # type: ignore[arg-type]
    inst = NodeInstaller(
        opts,
        report=lines.append,
        run=runner,
        systemd=FakeSystemd(runner, usable),
        supervisor=supervisor or FakeSupervisor(prefix.resolve(), runner),
    )
    return inst, lines


def fake_supervisor(inst: NodeInstaller) -> FakeSupervisor:
    assert isinstance(inst.supervisor, FakeSupervisor)
    return inst.supervisor


# -- packaged files --------------------------------------------------------------------


def test_packaged_config_is_a_valid_config_pointing_at_the_installed_guest() -> None:
    config = load_config(PACKAGING / "config.toml")
    assert config.vm.guest_dir == Path("/opt/clearcri/guest")
    assert config.daemon.socket == Path("/run/clearcri/clearcri.sock")
    assert config.metrics.port == 9464


def test_unit_keeps_pod_vms_on_stop_and_runs_the_installed_daemon() -> None:
    unit = (PACKAGING / UNIT_NAME).read_text()
    lines = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert lines["KillMode"] == "process"
    assert lines["Delegate"] == "yes"
    assert lines["ExecStart"] == f"/{VENV_LINK}/bin/clearcri serve --config /{CONFIG_PATH}"
    assert lines["WantedBy"] == "multi-user.target"


def test_relocate_moves_every_clearcri_path_under_the_prefix(tmp_path: Path) -> None:
    config = relocate((PACKAGING / "config.toml").read_text(), Path("/x/p"))
    data = tomllib.loads(config)
    assert data["daemon"]["socket"] == "/x/p/run/clearcri/clearcri.sock"
    assert data["daemon"]["state_dir"] == "/x/p/var/lib/clearcri"
    assert data["vm"]["guest_dir"] == "/x/p/opt/clearcri/guest"
    unit = relocate((PACKAGING / UNIT_NAME).read_text(), Path("/x/p"))
    assert (
        "ExecStart=/x/p/opt/clearcri/venv/bin/clearcri serve --config /x/p/etc/clearcri/config.toml"
        in unit
    )
    assert relocate(config, Path("/")) == config


def test_cni_conflist_is_a_bridge_with_the_subnet() -> None:
    data = json.loads(cni_conflist("10.99.0.0/16"))
    bridge = data["plugins"][0]
    assert bridge["type"] == "bridge"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.99.0.0/16"}]]


# -- install / reinstall / uninstall ---------------------------------------------------


def test_install_then_uninstall_leaves_the_prefix_as_it_was(
    prefix: Path, source: ReleaseSource
) -> None:
    (prefix / "etc").mkdir()
    (prefix / "etc/hostname").write_text("node\n")
    before = tree(prefix)
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False, cni=True)
    manifest = inst.install(source)

    assert (prefix / VENV_LINK).is_symlink()
    assert (prefix / VENV_LINK / "bin/clearcri").is_file()
    assert (prefix / "opt/clearcri/guest/os.img").read_bytes() == b"os" * 100
    assert (prefix / CONFIG_PATH).is_file()
    assert (prefix / UNIT_PATH).is_file()
    assert (prefix / "etc/cni/net.d/10-clearcri.conflist").is_file()
    assert "etc" not in manifest.created_dirs  # it was there before
    assert "opt" in manifest.created_dirs
    assert any("--container-runtime-endpoint=unix://" in line for line in lines)
    assert any("--no-start" in line for line in lines)
    saved = InstallManifest.load(prefix)
    assert saved is not None and saved.digest == manifest.digest

    inst.uninstall()
    assert tree(prefix) == before
    assert (prefix / "etc/hostname").read_text() == "node\n"


def test_reinstalling_the_same_release_changes_nothing(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    inst.install(source)
    stat_before = {p: (prefix / p).lstat().st_mtime_ns for p in tree(prefix)}
    runner.calls.clear()
    inst2, lines = installer(prefix, runner, start=False)
    inst2.install(source)
    assert runner.calls == []
    assert any("already installed" in line for line in lines)
    assert {p: (prefix / p).lstat().st_mtime_ns for p in tree(prefix)} == stat_before


def test_reinstall_repairs_a_damaged_installation(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    inst.install(source)
    (prefix / UNIT_PATH).unlink()
    inst.install(source)
    assert (prefix / UNIT_PATH).is_file()


def test_install_of_another_release_asks_for_upgrade(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    inst.install(source)
    other = tmp_path / "other"
    other.mkdir()
    source.source = make_wheel(other, "v2")
    with pytest.raises(NodeInstallError, match="node upgrade"):
        inst.install(source)


def test_existing_config_is_never_overwritten_nor_removed(
    prefix: Path, source: ReleaseSource
) -> None:
    (prefix / "etc/clearcri").mkdir(parents=True)
    (prefix / CONFIG_PATH).write_text("[daemon]\nlog_level = 'debug'\n")
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False, purge=True)
    manifest = inst.install(source)
    assert CONFIG_PATH not in manifest.files
    assert (prefix / CONFIG_PATH).read_text() == "[daemon]\nlog_level = 'debug'\n"
    assert any("keeping the existing config" in line for line in lines)
    inst.uninstall()
    assert (prefix / CONFIG_PATH).read_text() == "[daemon]\nlog_level = 'debug'\n"


def test_edited_config_is_kept_on_uninstall_unless_purge(
    prefix: Path, source: ReleaseSource
) -> None:
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False)
    inst.install(source)
    with (prefix / CONFIG_PATH).open("a") as f:
        f.write("# tuned for this node\n")
    inst.uninstall()
    assert (prefix / CONFIG_PATH).is_file()
    assert not (prefix / UNIT_PATH).exists()
    assert not (prefix / "opt").exists()
    assert any("edited after install" in line for line in lines)

    (prefix / CONFIG_PATH).unlink()
    (prefix / "etc/clearcri").rmdir()
    (prefix / "etc").rmdir()
    inst.install(source)
    with (prefix / CONFIG_PATH).open("a") as f:
        f.write("# tuned\n")
    purge, _ = installer(prefix, runner, start=False, purge=True)
    purge.uninstall()
    assert tree(prefix) == []


def test_foreign_unit_is_not_replaced_without_force(prefix: Path, source: ReleaseSource) -> None:
    (prefix / "etc/systemd/system").mkdir(parents=True)
    (prefix / UNIT_PATH).write_text("[Service]\nExecStart=/bin/true\n")
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    with pytest.raises(NodeInstallError, match="--force"):
        inst.install(source)
    # The failed install took back everything it had made.
    assert tree(prefix) == ["etc", "etc/systemd", "etc/systemd/system", f"{UNIT_PATH}"]
    forced, _ = installer(prefix, runner, start=False, force=True)
    forced.install(source)
    assert "ExecStart=/bin/true" not in (prefix / UNIT_PATH).read_text()


def test_failed_install_leaves_nothing_behind(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    runner.fail_on = "install"  # pip install fails
    inst, _ = installer(prefix, runner, start=False)
    with pytest.raises(NodeInstallError):
        inst.install(source)
    assert tree(prefix) == []


def test_cni_config_only_when_none_exists(prefix: Path, source: ReleaseSource) -> None:
    (prefix / "etc/cni/net.d").mkdir(parents=True)
    (prefix / "etc/cni/net.d/05-flannel.conflist").write_text("{}")
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False, cni=True)
    manifest = inst.install(source)
    assert not (prefix / "etc/cni/net.d/10-clearcri.conflist").exists()
    assert not any("cni" in rel for rel in manifest.files)
    assert any("keeping the existing CNI config" in line for line in lines)


def test_uninstall_refuses_while_pod_vms_run(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    inst.install(source)
    pod = prefix / "run/clearcri/sandboxes/abc"
    pod.mkdir(parents=True)
    with pytest.raises(NodeInstallError, match="drain"):
        inst.uninstall()
    assert (prefix / MANIFEST_PATH).is_file()
    forced, _ = installer(prefix, runner, start=False, force=True)
    forced.uninstall()
    assert not (prefix / "opt").exists()
    assert pod.is_dir()  # the daemon's run dir is not ours


def test_uninstall_without_installation_is_an_error(prefix: Path) -> None:
    inst, _ = installer(prefix, FakeRunner())
    with pytest.raises(NodeInstallError, match="nothing removed"):
        inst.uninstall()


# -- upgrade ---------------------------------------------------------------------------


def test_upgrade_switches_release_keeps_config_and_shares_unchanged_guest_files(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    first = inst.install(source)
    with (prefix / CONFIG_PATH).open("a") as f:
        f.write("# local change\n")
    config = (prefix / CONFIG_PATH).read_text()
    old_os = (prefix / "opt/clearcri/guest/os.img").resolve()

    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    second = inst.upgrade(source)
    assert second.release != first.release
    assert second.releases == [first.release, second.release]
    assert (prefix / CONFIG_PATH).read_text() == config
    new_os = (prefix / "opt/clearcri/guest/os.img").resolve()
    assert new_os != old_os
    assert new_os.stat().st_ino == old_os.stat().st_ino  # same content: one inode

    # A changed OS image is a new file: running VMs keep mapping the old one.
    source.source = make_wheel(work, "v3")
    source.guest_dir = make_guest(tmp_path / "guest3", os_image=b"new" * 50)
    third = inst.upgrade(source)
    newest = (prefix / "opt/clearcri/guest/os.img").resolve()
    assert newest.read_bytes() == b"new" * 50
    assert newest.stat().st_ino != new_os.stat().st_ino
    # Only the current and the previous release stay.
    assert third.releases == [second.release, third.release]
    assert not (prefix / "opt/clearcri/releases" / first.release).exists()

    inst.uninstall()
    assert tree(prefix) == ["etc", "etc/clearcri", CONFIG_PATH]


def test_upgrade_of_the_same_release_does_nothing(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False)
    inst.install(source)
    runner.calls.clear()
    inst.upgrade(source)
    assert runner.calls == []
    assert any("nothing to upgrade" in line for line in lines)


def test_upgrade_needs_an_installation_unless_asked_to_install(
    prefix: Path, source: ReleaseSource
) -> None:
    inst, _ = installer(prefix, FakeRunner(), start=False)
    with pytest.raises(NodeInstallError, match="node install"):
        inst.upgrade(source)
    inst.upgrade(source, install_missing=True)
    assert (prefix / MANIFEST_PATH).is_file()


def test_failed_upgrade_keeps_the_running_release(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    first = inst.install(source)
    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    runner.fail_on = "load_config"
    with pytest.raises(NodeInstallError):
        inst.upgrade(source)
    assert os.readlink(prefix / VENV_LINK) == f"releases/{first.release}/venv"
    assert sorted(os.listdir(prefix / "opt/clearcri/releases")) == [first.release]


# -- systemd ---------------------------------------------------------------------------


def test_with_systemd_install_enables_upgrade_restarts_uninstall_disables(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, usable=True)
    inst.install(source)
    assert ["systemctl", "daemon-reload"] in runner.calls
    assert ["systemctl", "enable", "--now", UNIT_NAME] in runner.calls
    runner.calls.clear()
    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    inst.upgrade(source)
    assert ["systemctl", "restart", UNIT_NAME] in runner.calls
    assert ["systemctl", "daemon-reload"] not in runner.calls  # unit unchanged
    runner.calls.clear()
    inst.uninstall()
    assert runner.calls == [
        ["systemctl", "disable", "--now", UNIT_NAME],
        ["systemctl", "daemon-reload"],
    ]


def test_no_start_installs_the_unit_and_explains_both_ways_to_start(
    prefix: Path, source: ReleaseSource
) -> None:
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, start=False)
    inst.install(source)
    assert not [c for c in runner.calls if c[0] == "systemctl" or "supervise" in c]
    assert fake_supervisor(inst).events == []
    text = "\n".join(lines)
    assert "systemctl daemon-reload && systemctl enable --now clearcri.service" in text
    assert f"{prefix}/opt/clearcri/venv/bin/clearcri supervise --config" in text


def supervise_calls(runner: FakeRunner) -> list[list[str]]:
    return [c for c in runner.calls if "supervise" in c]


def test_without_systemd_install_starts_one_supervisor(prefix: Path, source: ReleaseSource) -> None:
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, usable=False)
    manifest = inst.install(source)
    assert not [c for c in runner.calls if c[0] == "systemctl"]
    exe = str(prefix / VENV_LINK / "bin/clearcri")
    assert supervise_calls(runner) == [
        [
            exe,
            "supervise",
            "--config",
            str(prefix / CONFIG_PATH),
            "--daemon",
            exe,  # the symlink: a switched release takes effect when the daemon restarts
            "--pidfile",
            str(prefix / "run/clearcri/supervisor.pid"),
            "--cgroup",
            cgroup_name(prefix),
        ]
    ]
    assert manifest.supervisor_enabled and not manifest.service_enabled
    saved = InstallManifest.load(prefix)
    assert saved is not None and saved.supervisor_enabled
    text = "\n".join(lines)
    assert "started the daemon under `clearcri supervise`" in text
    assert f"log {prefix}/var/log/clearcri/daemon.log" in text
    assert "after a reboot" in text

    # Installed again (the DaemonSet's pod restarted): the running supervisor is kept.
    runner.calls.clear()
    lines.clear()
    inst.install(source)
    assert supervise_calls(runner) == []
    assert fake_supervisor(inst).events == ["start 1000"]
    assert any("the daemon runs under its supervisor (pid 1000)" in line for line in lines)

    # Gone (a reboot, a kill): installing again starts it again.
    fake_supervisor(inst).pid = None
    inst.install(source)
    assert len(supervise_calls(runner)) == 1


def test_without_systemd_upgrade_replaces_the_supervisor_and_uninstall_stops_it(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, usable=False)
    first = inst.install(source)
    sup = fake_supervisor(inst)
    assert sup.release_dir == str(prefix / "opt/clearcri/releases" / first.release)

    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    runner.calls.clear()
    second = inst.upgrade(source)
    # The old supervisor runs old code: stopped (its daemon gets SIGTERM alone, pod VMs
    # stay), and a new one started from the new release.
    assert sup.events == ["start 1000", "stop 1000", "start 1002"]
    assert sup.release_dir == str(prefix / "opt/clearcri/releases" / second.release)
    assert len(supervise_calls(runner)) == 1
    assert any("supervisor (pid 1000) of the previous release" in line for line in lines)

    runner.calls.clear()
    inst.uninstall()
    assert sup.events[-2:] == ["stop 1002", "remove cgroup"]
    assert not [c for c in runner.calls if c[0] == "systemctl"]
    assert not (prefix / MANIFEST_PATH).exists()


def test_without_systemd_a_new_managed_config_restarts_the_daemon_through_the_supervisor(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    chart_config = tmp_path / "chart-config.toml"
    chart_config.write_text('[daemon]\nlog_level = "info"\n')
    source.config_file = chart_config
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, usable=False, update_config=True)
    inst.install(source)
    chart_config.write_text('[daemon]\nlog_level = "debug"\n')
    inst.upgrade(source, install_missing=True)
    # Same release, so the same supervisor: SIGHUP, the daemon restarts with the config.
    assert fake_supervisor(inst).events == ["start 1000", "hup 1000"]


def test_upgrade_starts_a_supervisor_when_none_runs(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False)
    inst.install(source)
    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    started, _ = installer(prefix, runner, usable=False)
    manifest = started.upgrade(source)
    assert fake_supervisor(started).events == ["start 1000"]
    assert manifest.supervisor_enabled


def test_with_systemd_no_supervisor_runs_and_one_left_over_is_stopped(
    prefix: Path, source: ReleaseSource
) -> None:
    runner = FakeRunner()
    sup = FakeSupervisor(prefix.resolve(), runner)
    sup.pid = 77  # started before systemd ran here
    inst, _ = installer(prefix, runner, usable=True, supervisor=sup)
    manifest = inst.install(source)
    assert supervise_calls(runner) == []
    assert sup.events == ["stop 77", "remove cgroup"]
    assert ["systemctl", "enable", "--now", UNIT_NAME] in runner.calls
    assert manifest.service_enabled and not manifest.supervisor_enabled


def test_supervisor_of_the_node_itself(tmp_path: Path) -> None:
    argv = SupervisorControl(Path("/")).argv()
    assert argv[:2] == ["/opt/clearcri/venv/bin/clearcri", "supervise"]
    assert argv[argv.index("--pidfile") + 1] == "/run/clearcri/supervisor.pid"
    assert argv[argv.index("--cgroup") + 1] == "clearcri.service"
    # Started through `nsenter --target 1 --mount` by the DaemonSet: the other namespaces.
    assert "--init-namespaces" in argv
    other = SupervisorControl(tmp_path).argv()
    assert "--init-namespaces" not in other
    assert other[other.index("--cgroup") + 1] not in ("clearcri.service", "")


def test_systemd_is_never_used_for_a_prefix(tmp_path: Path) -> None:
    assert not Systemd(tmp_path).usable


# -- command line ----------------------------------------------------------------------


def test_cli_registers_node_commands(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["node", "install", "--prefix", str(tmp_path), "--no-start", "--cni"])
    assert args.node_command == "install" and args.no_start and args.cni
    args = parser.parse_args(["node", "upgrade", "--install"])
    assert args.install and args.prefix == "/"
    args = parser.parse_args(["node", "uninstall", "--purge"])
    assert args.purge


def test_cli_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    args = parser.parse_args(["node", "uninstall", "--prefix", str(tmp_path)])
    assert args.func(args) == 1
    assert "no clearcri installation" in capsys.readouterr().err


# -- a config managed elsewhere (the Helm chart's ConfigMap) ---------------------------


def test_managed_config_follows_its_source_unless_edited_on_the_node(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    chart_config = tmp_path / "chart-config.toml"
    chart_config.write_text('[daemon]\nlog_level = "info"\n')
    source.config_file = chart_config
    runner = FakeRunner()
    inst, lines = installer(prefix, runner, usable=True, update_config=True)
    inst.install(source)
    assert (prefix / CONFIG_PATH).read_text() == '[daemon]\nlog_level = "info"\n'

    # Same release, new config: written, checked with the installed code, daemon restarted.
    chart_config.write_text('[daemon]\nlog_level = "debug"\n')
    runner.calls.clear()
    inst.install(source)
    assert (prefix / CONFIG_PATH).read_text() == '[daemon]\nlog_level = "debug"\n'
    assert runner.commands(str(prefix / CONFIG_PATH))  # load_config ran on it
    assert ["systemctl", "restart", UNIT_NAME] in runner.calls

    # Edited on the node: kept, and said so.
    (prefix / CONFIG_PATH).write_text('[daemon]\nlog_level = "warning"\n')
    chart_config.write_text('[daemon]\nlog_level = "error"\n')
    runner.calls.clear()
    inst.upgrade(source)
    assert (prefix / CONFIG_PATH).read_text() == '[daemon]\nlog_level = "warning"\n'
    assert ["systemctl", "restart", UNIT_NAME] not in runner.calls
    assert any("edited on this node" in line for line in lines)


def test_upgrade_checks_the_new_managed_config_before_switching(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    chart_config = tmp_path / "chart-config.toml"
    chart_config.write_text('[daemon]\nlog_level = "info"\n')
    source.config_file = chart_config
    runner = FakeRunner()
    inst, _ = installer(prefix, runner, start=False, update_config=True)
    first = inst.install(source)
    chart_config.write_text("[daemon]\nbogus = 1\n")
    work = tmp_path / "v2"
    work.mkdir()
    source.source = make_wheel(work, "v2")
    runner.fail_on = "load_config"
    with pytest.raises(NodeInstallError):
        inst.upgrade(source)
    assert os.readlink(prefix / VENV_LINK) == f"releases/{first.release}/venv"
    assert (prefix / CONFIG_PATH).read_text() == '[daemon]\nlog_level = "info"\n'


def test_without_update_config_an_installed_config_is_kept(
    prefix: Path, source: ReleaseSource, tmp_path: Path
) -> None:
    chart_config = tmp_path / "chart-config.toml"
    chart_config.write_text('[daemon]\nlog_level = "info"\n')
    source.config_file = chart_config
    inst, _ = installer(prefix, FakeRunner(), start=False)
    inst.install(source)
    chart_config.write_text('[daemon]\nlog_level = "debug"\n')
    inst.install(source)
    assert (prefix / CONFIG_PATH).read_text() == '[daemon]\nlog_level = "info"\n'


def test_commands_run_without_the_installers_python_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from deploy.node_install import run_command

    monkeypatch.setenv("PYTHONPATH", "/somewhere/clearcri.whl")
    out = tmp_path / "env"
    run_command(["sh", "-c", f'echo "${{PYTHONPATH-unset}}" > {out}'])
    assert out.read_text() == "unset\n"
    with pytest.raises(NodeInstallError, match="exit 3"):
        run_command(["sh", "-c", "echo oops >&2; exit 3"])
