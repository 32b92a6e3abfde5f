"""Put a release of clearcri on a node, upgrade it, take it off again.

``clearcri node install`` lays out, under a prefix (``/`` on a real node)::

    opt/clearcri/releases/<version>-<digest>/venv    Python environment with clearcri
    opt/clearcri/releases/<version>-<digest>/guest   kernel, initramfs, DAX OS image
    opt/clearcri/venv  -> releases/<current>/venv    (symlinks switched atomically)
    opt/clearcri/guest -> releases/<current>/guest
    opt/clearcri/install.json                        what was installed (the manifest)
    etc/clearcri/config.toml                         only when there is none
    etc/systemd/system/clearcri.service              KillMode=process, Delegate=yes
    etc/cni/net.d/10-clearcri.conflist               with --cni, only when no CNI config exists

Where systemd runs, the unit runs the daemon. Where it does not (and always under a
prefix other than ``/``), ``clearcri supervise`` does (deploy/supervisor.py): install
starts the supervisor (once: a running one is found by its locked pidfile
``run/clearcri/supervisor.pid``), upgrade replaces it with one from the new release,
uninstall stops it and removes its cgroup.

The manifest lists every directory the install created, every file it wrote with its
SHA-256, and the release trees. Installing the same release again does nothing;
``upgrade`` builds the new release beside the running one, switches the symlinks, keeps
the config and restarts the daemon (which re-adopts the running pod VMs); ``uninstall``
removes exactly what the manifest lists, keeps files that were edited since (unless
``--purge``) and never touches files it did not create.

A new release never overwrites a file that running VMs map: the guest OS image of a new
release is a new file (a hard link to the previous one when the content is the same, so
old and new VMs still share one copy in the page cache).

This module imports only the standard library (and ``sandbox.guest``'s constants and
``deploy.supervisor``'s look-ups, which need nothing more), so a node can run it from
the clearcri wheel itself before anything is installed::

    PYTHONPATH=clearcri-<v>-py3-none-any.whl python3 -m deploy.node_install install --release DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy import supervisor
from sandbox.guest import DEFAULT_GUEST_DIR, MANIFEST_NAME, OUTPUT_FILES, sha256_file

MANIFEST_FORMAT = 1
UNIT_NAME = "clearcri.service"
RUNTIME_ENDPOINT = "unix:///run/clearcri/clearcri.sock"
DEFAULT_CNI_SUBNET = "10.88.0.0/16"
#: Releases kept under opt/clearcri/releases: the current one and the one before (a
#: daemon that was not restarted may still run from it).
KEPT_RELEASES = 2

#: Paths below the prefix (no leading slash).
OPT_DIR = "opt/clearcri"
RELEASES_DIR = f"{OPT_DIR}/releases"
VENV_LINK = f"{OPT_DIR}/venv"
GUEST_LINK = f"{OPT_DIR}/guest"
MANIFEST_PATH = f"{OPT_DIR}/install.json"
CONFIG_PATH = "etc/clearcri/config.toml"
UNIT_PATH = f"etc/systemd/system/{UNIT_NAME}"
CNI_DIR = "etc/cni/net.d"
CNI_PATH = f"{CNI_DIR}/10-clearcri.conflist"
SUPERVISOR_PIDFILE = "run/clearcri/supervisor.pid"
#: How long a stopped supervisor may take: its daemon's stop timeout (SIGTERM, then
#: SIGKILL) and a margin.
SUPERVISOR_STOP_WAIT = 120.0

#: The guest files a release carries.
GUEST_FILES: tuple[str, ...] = (*sorted(OUTPUT_FILES.values()), MANIFEST_NAME)

#: Absolute paths in the packaged config and unit that move under a prefix.
RELOCATED_ROOTS: tuple[str, ...] = (
    "/opt/clearcri",
    "/etc/clearcri",
    "/run/clearcri",
    "/var/lib/clearcri",
    "/var/log/clearcri",
)

Report = Callable[[str], None]
Runner = Callable[[Sequence[str]], None]


class NodeInstallError(Exception):
    """The install cannot go on; the message says what is wrong and what to do."""


def _print(line: str) -> None:
    print(line, flush=True)


#: Variables of the installer's own Python that must not reach the venv's interpreter
#: (the DaemonSet runs the installer with PYTHONPATH pointing at the wheel).
SCRUBBED_ENV: tuple[str, ...] = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")


def run_command(argv: Sequence[str]) -> None:
    """Run ``argv``; a failure raises NodeInstallError with the command's output."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise NodeInstallError(f"{' '.join(argv)} failed (exit {proc.returncode}): {output}")


def relocate(text: str, prefix: Path) -> str:
    """Point the absolute clearcri paths in a packaged config or unit into ``prefix``."""
    if prefix == Path("/"):
        return text
    base = str(prefix).rstrip("/")
    for root in RELOCATED_ROOTS:
        text = text.replace(f'"{root}', f'"{base}{root}').replace(f" {root}", f" {base}{root}")
        text = text.replace(f"={root}", f"={base}{root}")
    return text


def cni_conflist(subnet: str) -> str:
    """A bridge network with host-local addresses and port mappings."""
    config = {
        "cniVersion": "1.0.0",
        "name": "clearcri",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def kubelet_hint(endpoint: str = RUNTIME_ENDPOINT) -> str:
    return (
        "Point kubelet at clearcri, then restart kubelet:\n"
        f"  kubelet flag:          --container-runtime-endpoint={endpoint}\n"
        f"  KubeletConfiguration:  containerRuntimeEndpoint: {endpoint}\n"
        "Pods choose VMs with runtimeClassName: clearcri (see docs/install.md)."
    )


# --------------------------------------------------------------------------------------
# What to install


def find_source_root() -> Path | None:
    """The project directory this code runs from, if it is a source checkout."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "packaging").is_dir():
        return root
    return None


@dataclass
class ReleaseSource:
    """Where a release comes from: code (project dir or wheel), packaging, guest."""

    source: Path
    packaging_dir: Path
    guest_dir: Path
    wheelhouse: Path | None = None
    python: str = sys.executable
    system_site_packages: bool = True
    #: The config written when none exists (default: the packaged config.toml).
    config_file: Path | None = None

    @property
    def config(self) -> Path:
        return self.config_file or self.packaging_dir / "config.toml"

    @classmethod
    def from_release_dir(cls, release: Path, **kwargs: Any) -> ReleaseSource:
        """A release directory as the deploy image ships it: wheels/, packaging/, guest/."""
        wheels = sorted((release / "wheels").glob("clearcri-*.whl"))
        if len(wheels) != 1:
            raise NodeInstallError(f"{release}/wheels must hold exactly one clearcri wheel")
        return cls(
            source=wheels[0],
            packaging_dir=release / "packaging",
            guest_dir=release / "guest",
            wheelhouse=release / "wheels",
            **kwargs,
        )

    def check(self) -> None:
        if not self.source.exists():
            raise NodeInstallError(f"source {self.source} does not exist")
        if self.source.is_dir() and not (self.source / "pyproject.toml").is_file():
            raise NodeInstallError(f"source {self.source} has no pyproject.toml")
        if self.source.is_file() and self.source.suffix != ".whl":
            raise NodeInstallError(f"source {self.source} is neither a project dir nor a wheel")
        for path in (self.packaging_dir / UNIT_NAME, self.config):
            if not path.is_file():
                raise NodeInstallError(f"{path} is missing")
        manifest = self.guest_dir / MANIFEST_NAME
        try:
            complete = json.loads(manifest.read_text()).get("complete")
        except (OSError, ValueError):
            complete = False
        missing = [n for n in GUEST_FILES if not (self.guest_dir / n).is_file()]
        if not complete or missing:
            raise NodeInstallError(
                f"guest assets are not built in {self.guest_dir}: run "
                f"`clearcri guest build --guest-dir {self.guest_dir}` or pass --guest-from DIR"
            )


@dataclass
class BuiltRelease:
    """A release ready to install: the clearcri wheel and the digest of everything."""

    source: ReleaseSource
    wheel: Path
    version: str
    digest: str

    @property
    def name(self) -> str:
        return f"{self.version}-{self.digest[:12]}"


def _copy_project(src: Path, dest: Path) -> None:
    """The files a wheel is built from: pyproject.toml and the packages it lists."""
    meta = tomllib.loads((src / "pyproject.toml").read_text())
    include = (meta.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})).get(
        "include", []
    )
    tops = sorted({pattern.split(".")[0].rstrip("*") for pattern in include})
    dest.mkdir(parents=True)
    shutil.copy2(src / "pyproject.toml", dest / "pyproject.toml")
    for name in ("README.md", "LICENSE"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for top in tops:
        if (src / top).is_dir():
            shutil.copytree(src / top, dest / top, ignore=ignore)


def wheel_digest(wheel: Path) -> str:
    """A hash of a wheel's contents (names and bytes, not zip timestamps)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            digest.update(info.filename.encode() + b"\0")
            digest.update(hashlib.sha256(zf.read(info)).digest())
    return digest.hexdigest()


def build_release(source: ReleaseSource, work: Path, report: Report = _print) -> BuiltRelease:
    """Build the wheel (from a project dir) and compute the release digest."""
    source.check()
    if source.source.is_file():
        wheel = source.source
    else:
        report(f"building the clearcri wheel from {source.source}")
        tree = work / "src"
        _copy_project(source.source, tree)
        build = functools.partial(
            run_command,
            [
                source.python,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--no-build-isolation",
                "--wheel-dir",
                str(work / "wheel"),
                str(tree),
            ],
        )
        try:
            build()
        except NodeInstallError as exc:
            if "bdist_wheel" in str(exc):
                raise NodeInstallError(
                    f"{source.python} cannot build wheels: install the `wheel` package "
                    "(or setuptools >= 70.1), or pass --source with a built wheel"
                ) from exc
            raise
        wheels = sorted((work / "wheel").glob("clearcri-*.whl"))
        if len(wheels) != 1:
            raise NodeInstallError(f"building the wheel from {source.source} made no wheel")
        wheel = wheels[0]
    version = wheel.name.split("-")[1]
    digest = hashlib.sha256()
    digest.update(wheel_digest(wheel).encode())
    # The config is not part of a release: upgrades keep it.
    digest.update(sha256_file(source.packaging_dir / UNIT_NAME).encode())
    digest.update((source.guest_dir / MANIFEST_NAME).read_bytes())
    for name in GUEST_FILES:
        digest.update(str((source.guest_dir / name).stat().st_size).encode())
    digest.update(f"{source.system_site_packages}".encode())
    return BuiltRelease(source, wheel, version, digest.hexdigest())


# --------------------------------------------------------------------------------------
# What was installed


@dataclass
class InstallManifest:
    """``opt/clearcri/install.json``: everything an install created, relative to the prefix."""

    version: str = ""
    digest: str = ""
    release: str = ""
    #: Release directory names, oldest first; the last one is current.
    releases: list[str] = field(default_factory=list)
    #: Directories the install created (outside the release trees), in creation order.
    created_dirs: list[str] = field(default_factory=list)
    #: Files the install wrote, with the SHA-256 they had when written.
    files: dict[str, str] = field(default_factory=dict)
    #: Symlinks the install made, with their targets.
    links: dict[str, str] = field(default_factory=dict)
    #: Whether a systemd unit was enabled (so uninstall disables it).
    service_enabled: bool = False
    #: Whether the daemon was started under ``clearcri supervise`` (no systemd), so
    #: uninstall stops the supervisor and removes its cgroup.
    supervisor_enabled: bool = False
    installed_at: str = ""
    format: int = MANIFEST_FORMAT

    @classmethod
    def load(cls, prefix: Path) -> InstallManifest | None:
        path = prefix / MANIFEST_PATH
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NodeInstallError(f"cannot read the install manifest {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise NodeInstallError(f"{path} is not an install manifest this clearcri knows")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, prefix: Path) -> None:
        path = prefix / MANIFEST_PATH
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


@dataclass
class Options:
    prefix: Path = Path("/")
    start: bool = True
    cni: bool = False
    cni_subnet: str = DEFAULT_CNI_SUBNET
    force: bool = False
    purge: bool = False
    #: Replace a config this tool wrote (and nobody edited since) when the release's
    #: config differs: for a config managed elsewhere, as the Helm chart's ConfigMap.
    update_config: bool = False


# --------------------------------------------------------------------------------------
# systemd


class Systemd:
    """The daemon's unit. Used only for the real root with a running systemd."""

    def __init__(self, prefix: Path, run: Runner = run_command) -> None:
        self.run = run
        self.usable = (
            prefix == Path("/")
            and shutil.which("systemctl") is not None
            and Path("/run/systemd/system").is_dir()
        )

    def reload(self) -> None:
        self.run(["systemctl", "daemon-reload"])

    def enable_now(self) -> None:
        self.run(["systemctl", "enable", "--now", UNIT_NAME])

    def restart(self) -> None:
        self.run(["systemctl", "restart", UNIT_NAME])

    def disable_now(self) -> None:
        self.run(["systemctl", "disable", "--now", UNIT_NAME])


class SupervisorControl:
    """The daemon's supervisor (``clearcri supervise``, deploy/supervisor.py) for one
    prefix: where systemd does not run the daemon."""

    def __init__(self, prefix: Path, run: Runner = run_command) -> None:
        self.prefix = prefix
        self.run = run
        self.pidfile = prefix / SUPERVISOR_PIDFILE
        self.cgroup = supervisor.cgroup_name(prefix)

    def argv(self) -> list[str]:
        """The command that starts it: from the venv symlink, as the daemon is run."""
        exe = str(self.prefix / VENV_LINK / "bin/clearcri")
        argv = [exe, "supervise", "--config", str(self.prefix / CONFIG_PATH), "--daemon", exe]
        argv += ["--pidfile", str(self.pidfile), "--cgroup", self.cgroup]
        if self.prefix == Path("/"):
            # Started from the DaemonSet's `nsenter --target 1 --mount`: the rest of the
            # host's namespaces too.
            argv.append("--init-namespaces")
        return argv

    def log_path(self) -> Path:
        return supervisor.log_dir_of(self.prefix / CONFIG_PATH) / supervisor.LOG_NAME

    def running(self) -> int | None:
        """The PID of the supervisor holding the pidfile, or None."""
        return supervisor.supervisor_pid(self.pidfile)

    def runs_from(self, pid: int, release_dir: Path) -> bool:
        """Whether the supervisor ``pid`` runs the code of the release in ``release_dir``."""
        return supervisor.interpreter(pid).startswith(f"{release_dir}/")

    def context_problems(self) -> list[str]:
        """What the supervisor would inherit from this process that an init would not
        give (the namespaces it enters itself with --init-namespaces are not counted)."""
        return supervisor.context_problems(namespaces="--init-namespaces" not in self.argv())

    def start(self) -> None:
        """Start it; returns once it runs (it detaches itself)."""
        self.run(self.argv())

    def restart_daemon(self, pid: int) -> None:
        os.kill(pid, signal.SIGHUP)

    def stop(self, pid: int) -> None:
        """SIGTERM to the supervisor (which stops the daemon alone: pod VMs stay); wait
        for both to be gone."""
        daemon = supervisor.daemon_pid(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        pids = [pid] if daemon is None else [pid, daemon]
        if not supervisor.wait_gone(pids, SUPERVISOR_STOP_WAIT):
            raise NodeInstallError(
                f"the supervisor (pid {pid}) or its daemon did not stop within "
                f"{SUPERVISOR_STOP_WAIT:g} s; see {self.log_path()}"
            )

    def remove_cgroup(self) -> list[Path]:
        """Remove the supervisor's cgroup; the directories that still hold processes."""
        return supervisor.remove_cgroup(self.cgroup)


def _start_hint(prefix: Path, why: str) -> str:
    supervise = " ".join(SupervisorControl(prefix).argv())
    return (
        f"{why}; the unit is at {prefix / UNIT_PATH}. Start the daemon with\n"
        f"  systemctl daemon-reload && systemctl enable --now {UNIT_NAME}\n"
        f"or without systemd:\n  {supervise}"
    )


# --------------------------------------------------------------------------------------
# The installer


class NodeInstaller:
    """Install, upgrade and uninstall under one prefix."""

    def __init__(
        self,
        options: Options,
        *,
        report: Report = _print,
        run: Runner = run_command,
        systemd: Systemd | None = None,
        supervisor: SupervisorControl | None = None,
    ) -> None:
        self.options = options
        self.prefix = options.prefix.resolve()
        self.report = report
        self.run = run
        self.systemd = systemd or Systemd(self.prefix, run)
        self.supervisor = supervisor or SupervisorControl(self.prefix, run)
        if not self.prefix.is_dir():
            raise NodeInstallError(f"prefix {self.prefix} is not a directory")

    # -- paths ---------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.prefix / rel

    def ensure_dir(self, rel: str, manifest: InstallManifest) -> None:
        """Create ``rel`` and missing parents, recording each one created."""
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):
            sub = str(Path(*parts[:i]))
            path = self.path(sub)
            if path.is_dir():
                continue
            path.mkdir()
            if sub not in manifest.created_dirs:
                manifest.created_dirs.append(sub)

    def write_file(self, rel: str, data: bytes, manifest: InstallManifest) -> None:
        self.ensure_dir(str(Path(rel).parent), manifest)
        path = self.path(rel)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        os.replace(tmp, path)
        manifest.files[rel] = hashlib.sha256(data).hexdigest()

    def owned_unchanged(self, rel: str, manifest: InstallManifest) -> bool:
        path = self.path(rel)
        return (
            rel in manifest.files and path.is_file() and (sha256_file(path) == manifest.files[rel])
        )

    def symlink(self, rel: str, target: str, manifest: InstallManifest) -> None:
        path = self.path(rel)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, path)
        manifest.links[rel] = target

    # -- pieces of a release -------------------------------------------------------

    def build_venv(self, release: BuiltRelease, venv: Path) -> None:
        src = release.source
        self.report(f"creating the Python environment {venv}")
        create = [src.python, "-m", "venv", "--without-pip"]
        if src.system_site_packages:
            create.append("--system-site-packages")
        self.run([*create, str(venv)])
        python = str(venv / "bin/python")
        install = ["install", "--quiet", "--disable-pip-version-check", "--no-index"]
        if src.wheelhouse is not None:
            install += ["--find-links", str(src.wheelhouse)]
        else:
            install.append("--no-deps")
        pip_wheels = sorted(src.wheelhouse.glob("pip-*.whl")) if src.wheelhouse else []
        if pip_wheels:
            pip = [python, str(pip_wheels[-1] / "pip")]
        elif src.system_site_packages:
            pip = [python, "-m", "pip"]
        else:
            pip = [src.python, "-m", "pip", "--python", python]
        self.run([*pip, *install, str(release.wheel)])
        # The environment must run clearcri from itself, not from elsewhere on the path.
        self.run(
            [
                python,
                "-c",
                "import sys, cri.cli; "
                "assert cri.cli.__file__.startswith(sys.prefix), cri.cli.__file__",
            ]
        )

    def copy_guest(self, release: BuiltRelease, dest: Path, previous: Path | None) -> None:
        self.report(f"installing the guest assets in {dest}")
        dest.mkdir()
        for name in GUEST_FILES:
            src = release.source.guest_dir / name
            target = dest / name
            old = previous / name if previous is not None else None
            if (
                old is not None
                and old.is_file()
                and old.stat().st_size == src.stat().st_size
                and sha256_file(old) == sha256_file(src)
            ):
                # Same content: share the inode, so old and new VMs map one page cache copy.
                os.link(old, target)
                continue
            tmp = dest / f".{name}.tmp"
            shutil.copy2(src, tmp)
            os.replace(tmp, target)

    def build_release_tree(self, release: BuiltRelease, manifest: InstallManifest) -> Path:
        """``releases/<name>`` with venv and guest; on failure nothing of it is left."""
        self.ensure_dir(RELEASES_DIR, manifest)
        tree = self.path(RELEASES_DIR) / release.name
        if tree.exists():
            shutil.rmtree(tree)
        previous = None
        if manifest.release and manifest.release != release.name:
            previous = self.path(RELEASES_DIR) / manifest.release / "guest"
        tree.mkdir()
        try:
            self.build_venv(release, tree / "venv")
            self.copy_guest(release, tree / "guest", previous)
        except BaseException:
            shutil.rmtree(tree, ignore_errors=True)
            raise
        return tree

    def unit_text(self, release: BuiltRelease) -> bytes:
        text = (release.source.packaging_dir / UNIT_NAME).read_text()
        return relocate(text, self.prefix).encode()

    def config_text(self, release: BuiltRelease) -> bytes:
        return relocate(release.source.config.read_text(), self.prefix).encode()

    def check_config(self, tree: Path, config: Path | None = None) -> None:
        """Load the config with the release's code: a wrong key fails before the switch."""
        python = tree / "venv/bin/python"
        self.run(
            [
                str(python),
                "-c",
                "import sys, pathlib; from cri.config import load_config; "
                "load_config(pathlib.Path(sys.argv[1]))",
                str(config or self.path(CONFIG_PATH)),
            ]
        )

    def config_replaced(self, release: BuiltRelease, manifest: InstallManifest) -> bool:
        """Whether place_config would replace the existing config."""
        path = self.path(CONFIG_PATH)
        return (
            self.options.update_config
            and path.is_file()
            and path.read_bytes() != self.config_text(release)
            and self.owned_unchanged(CONFIG_PATH, manifest)
        )

    def place_config(self, release: BuiltRelease, manifest: InstallManifest) -> bool:
        """Write the config if there is none (or, with update_config, replace the one
        this tool wrote if nobody edited it). True when the file changed."""
        path = self.path(CONFIG_PATH)
        data = self.config_text(release)
        if path.exists():
            if not self.options.update_config or path.read_bytes() == data:
                if CONFIG_PATH not in manifest.files:
                    self.report(f"keeping the existing config {path} (not written by this tool)")
                return False
            if not self.owned_unchanged(CONFIG_PATH, manifest):
                self.report(f"keeping the config {path}: it was edited on this node")
                return False
            self.report(f"updating the config {path}")
        else:
            self.report(f"writing the config {path}")
        self.write_file(CONFIG_PATH, data, manifest)
        return True

    def refresh_config(self, release: BuiltRelease, manifest: InstallManifest) -> None:
        """For an installed release: apply a changed managed config, restart the daemon."""
        if not self.options.update_config:
            return
        old = self.path(CONFIG_PATH).read_bytes() if self.path(CONFIG_PATH).is_file() else None
        if not self.place_config(release, manifest):
            return
        try:
            self.check_config(self.path(RELEASES_DIR) / manifest.release)
        except NodeInstallError:
            if old is not None:
                self.path(CONFIG_PATH).write_bytes(old)
            raise
        manifest.save(self.prefix)
        self._restart(manifest, unit_changed=False)

    def place_unit(self, release: BuiltRelease, manifest: InstallManifest) -> bool:
        """Write the unit; True when its content changed."""
        path = self.path(UNIT_PATH)
        data = self.unit_text(release)
        if path.exists():
            if UNIT_PATH not in manifest.files and not self.options.force:
                raise NodeInstallError(
                    f"{path} exists and was not installed by `clearcri node install`; "
                    "remove it or pass --force to replace it"
                )
            if path.read_bytes() == data:
                manifest.files[UNIT_PATH] = hashlib.sha256(data).hexdigest()
                return False
            if UNIT_PATH in manifest.files and not self.owned_unchanged(UNIT_PATH, manifest):
                self.report(
                    f"replacing the edited unit {path}; put local changes in "
                    f"{path}.d/*.conf drop-ins, which upgrades keep"
                )
        self.report(f"writing the systemd unit {path}")
        self.write_file(UNIT_PATH, data, manifest)
        return True

    def place_cni(self, manifest: InstallManifest) -> None:
        cni_dir = self.path(CNI_DIR)
        if CNI_PATH in manifest.files:
            return
        existing = [
            p for p in sorted(cni_dir.glob("*")) if p.suffix in (".conf", ".conflist", ".json")
        ]
        if existing:
            self.report(f"keeping the existing CNI config {existing[0]}")
            return
        self.report(f"writing a CNI config {self.path(CNI_PATH)} ({self.options.cni_subnet})")
        self.write_file(CNI_PATH, cni_conflist(self.options.cni_subnet).encode(), manifest)

    def release_intact(self, manifest: InstallManifest) -> bool:
        tree = self.path(RELEASES_DIR) / manifest.release
        if not (tree / "venv/bin/clearcri").is_file():
            return False
        if any(not (tree / "guest" / name).is_file() for name in GUEST_FILES):
            return False
        for rel, target in manifest.links.items():
            path = self.path(rel)
            if not path.is_symlink() or os.readlink(path) != target:
                return False
        return all(self.path(rel).is_file() for rel in manifest.files if rel != CONFIG_PATH)

    def prune_releases(self, manifest: InstallManifest) -> None:
        while len(manifest.releases) > KEPT_RELEASES:
            old = manifest.releases.pop(0)
            self.report(f"removing the old release {old}")
            shutil.rmtree(self.path(RELEASES_DIR) / old, ignore_errors=True)

    def activate(self, release: BuiltRelease, manifest: InstallManifest) -> None:
        base = f"releases/{release.name}"
        self.symlink(VENV_LINK, f"{base}/venv", manifest)
        self.symlink(GUEST_LINK, f"{base}/guest", manifest)
        if release.name in manifest.releases:
            manifest.releases.remove(release.name)
        manifest.releases.append(release.name)
        manifest.release = release.name
        manifest.version = release.version
        manifest.digest = release.digest
        manifest.installed_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def check_conflicts(self, manifest: InstallManifest) -> None:
        for rel in (VENV_LINK, GUEST_LINK):
            path = self.path(rel)
            if (path.exists() or path.is_symlink()) and rel not in manifest.links:
                if not self.options.force:
                    raise NodeInstallError(
                        f"{path} exists and was not installed by `clearcri node install`; "
                        "remove it or pass --force"
                    )
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    # -- commands ------------------------------------------------------------------

    def install(self, source: ReleaseSource) -> InstallManifest:
        existing = InstallManifest.load(self.prefix)
        with tempfile.TemporaryDirectory(prefix="clearcri-release-") as work:
            release = build_release(source, Path(work), self.report)
            if existing is not None:
                if existing.digest != release.digest:
                    raise NodeInstallError(
                        f"clearcri {existing.release} is already installed under {self.prefix}"
                        f"; run `clearcri node upgrade` to replace it with {release.name}"
                    )
                if self.release_intact(existing):
                    self.report(f"clearcri {release.name} is already installed")
                    self.refresh_config(release, existing)
                    self._start(existing, unit_changed=False)
                    return existing
                self.report(f"repairing the installation of {release.name}")
            return self._install_fresh(release, existing)

    def _install_fresh(
        self, release: BuiltRelease, existing: InstallManifest | None
    ) -> InstallManifest:
        manifest = existing or InstallManifest()
        before_dirs = list(manifest.created_dirs)
        before_files = dict(manifest.files)
        try:
            self.ensure_dir(OPT_DIR, manifest)
            self.check_conflicts(manifest)
            tree = self.build_release_tree(release, manifest)
            self.activate(release, manifest)
            self.place_config(release, manifest)
            self.check_config(tree)
            unit_changed = self.place_unit(release, manifest)
            if self.options.cni:
                self.place_cni(manifest)
            manifest.save(self.prefix)
        except BaseException:
            if existing is None:
                self._undo(manifest, before_dirs, before_files)
            raise
        self.report(f"installed clearcri {release.name} under {self.prefix}")
        self._start(manifest, unit_changed=unit_changed)
        self.report(kubelet_hint(self._endpoint()))
        return manifest

    def _undo(self, manifest: InstallManifest, dirs: list[str], files: dict[str, str]) -> None:
        """Remove what a failed fresh install made."""
        for rel in manifest.links:
            with contextlib.suppress(FileNotFoundError):
                self.path(rel).unlink()
        for name in manifest.releases:
            shutil.rmtree(self.path(RELEASES_DIR) / name, ignore_errors=True)
        for rel in manifest.files:
            if rel not in files:
                with contextlib.suppress(FileNotFoundError):
                    self.path(rel).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.path(MANIFEST_PATH).unlink()
        for rel in reversed(manifest.created_dirs):
            if rel not in dirs:
                with contextlib.suppress(OSError):
                    self.path(rel).rmdir()

    def _endpoint(self) -> str:
        if self.prefix == Path("/"):
            return RUNTIME_ENDPOINT
        return "unix://" + str(self.prefix / "run/clearcri/clearcri.sock")

    def _start(self, manifest: InstallManifest, *, unit_changed: bool) -> None:
        if not self.options.start:
            self.report(_start_hint(self.prefix, "not starting the daemon (--no-start)"))
            return
        if not self.systemd.usable:
            self._supervise(manifest, restart=False)
            return
        self._stop_supervisor(manifest, "systemd runs the daemon from now on")
        if unit_changed:
            self.systemd.reload()
        self.systemd.enable_now()
        if not manifest.service_enabled:
            manifest.service_enabled = True
            manifest.save(self.prefix)
        self.report(f"started {UNIT_NAME}")

    def upgrade(self, source: ReleaseSource, *, install_missing: bool = False) -> InstallManifest:
        manifest = InstallManifest.load(self.prefix)
        if manifest is None:
            if install_missing:
                return self.install(source)
            raise NodeInstallError(
                f"clearcri is not installed under {self.prefix}: run `clearcri node install`"
            )
        with tempfile.TemporaryDirectory(prefix="clearcri-release-") as work:
            release = build_release(source, Path(work), self.report)
            if manifest.digest == release.digest and self.release_intact(manifest):
                self.report(f"clearcri {release.name} is already installed; nothing to upgrade")
                self.refresh_config(release, manifest)
                return manifest
            old = manifest.release
            self.report(f"upgrading clearcri {old} -> {release.name}")
            # The new release is built beside the running one; only then is it switched.
            tree = self.build_release_tree(release, manifest)
            try:
                if self.config_replaced(release, manifest):
                    candidate = Path(work) / "config.toml"
                    candidate.write_bytes(self.config_text(release))
                    self.check_config(tree, candidate)
                else:
                    self.check_config(tree)
            except NodeInstallError:
                if release.name not in manifest.releases:
                    shutil.rmtree(tree, ignore_errors=True)
                raise
            unit_changed = self.place_unit(release, manifest)
            self.activate(release, manifest)
            if self.options.update_config:
                self.place_config(release, manifest)
            if self.options.cni:
                self.place_cni(manifest)
            manifest.save(self.prefix)
        self._restart(manifest, unit_changed=unit_changed)
        self.prune_releases(manifest)
        manifest.save(self.prefix)
        self.report(f"upgraded to clearcri {release.name}; config {self.path(CONFIG_PATH)} kept")
        return manifest

    def _restart(self, manifest: InstallManifest, *, unit_changed: bool) -> None:
        if not self.options.start:
            self.report(
                "not restarting the daemon (--no-start): restart it to run the new release; "
                "running pod VMs are re-adopted"
            )
            return
        if not self.systemd.usable:
            self._supervise(manifest, restart=True)
            return
        if unit_changed:
            self.systemd.reload()
        if manifest.service_enabled:
            self.systemd.restart()
            self.report(f"restarted {UNIT_NAME}; running pod VMs are re-adopted")
        else:
            self._start(manifest, unit_changed=False)

    def _supervise(self, manifest: InstallManifest, *, restart: bool) -> None:
        """Where systemd does not run (or under a prefix): the daemon under ``clearcri
        supervise``. One supervisor per prefix: a running one of this release is kept
        (and, with ``restart``, asked to restart the daemon: SIGHUP); one of another
        release is replaced, so that the supervisor's own code is the new release's
        too (its daemon stops as under KillMode=process: pod VMs keep running)."""
        sup = self.supervisor
        how = (
            "systemd does not manage this prefix"
            if self.prefix != Path("/")
            else "systemd is not running here"
        )
        pid = sup.running()
        if pid is not None and not sup.runs_from(pid, self.path(RELEASES_DIR) / manifest.release):
            self.report(
                f"stopping the supervisor (pid {pid}) of the previous release; "
                "running pod VMs keep running"
            )
            sup.stop(pid)
            pid = None
        if pid is None:
            for problem in sup.context_problems():
                self.report(f"warning: {problem}")
            sup.start()
            started = sup.running()
            self.report(
                f"{how}: started the daemon under `clearcri supervise` (pid "
                f"{started or '?'}; pidfile {sup.pidfile}, log {sup.log_path()}, cgroup "
                f"/{sup.cgroup}); it restarts the daemon when it exits. Nothing starts it "
                "after a reboot: run `clearcri node install` again, or start the "
                "supervisor from the init system:\n  " + " ".join(sup.argv())
            )
        elif restart:
            sup.restart_daemon(pid)
            self.report(
                f"asked the supervisor (pid {pid}) to restart the daemon; running pod VMs "
                "are re-adopted"
            )
        else:
            self.report(f"the daemon runs under its supervisor (pid {pid})")
        if not manifest.supervisor_enabled:
            manifest.supervisor_enabled = True
            manifest.save(self.prefix)

    def _stop_supervisor(self, manifest: InstallManifest, why: str) -> None:
        """Stop this prefix's supervisor, if one runs, and remove its cgroup."""
        pid = self.supervisor.running()
        if pid is not None:
            self.supervisor.stop(pid)
            self.report(f"stopped the supervisor (pid {pid}) and its daemon ({why})")
        if pid is not None or manifest.supervisor_enabled:
            for path in self.supervisor.remove_cgroup():
                self.report(f"keeping the cgroup {path}: processes are still in it")
        if manifest.supervisor_enabled:
            manifest.supervisor_enabled = False
            if self.path(MANIFEST_PATH).is_file():
                manifest.save(self.prefix)

    def running_pods(self) -> list[Path]:
        """Pod VM run directories left under the configured run root."""
        run_root = self.path("run/clearcri/sandboxes")
        try:
            data = tomllib.loads(self.path(CONFIG_PATH).read_text())
            daemon = data.get("daemon", {})
            vm = data.get("vm", {})
            if "run_root" in vm:
                run_root = Path(vm["run_root"])
            elif "run_dir" in daemon:
                run_root = Path(daemon["run_dir"]) / "sandboxes"
        except (OSError, tomllib.TOMLDecodeError):
            pass
        if not run_root.is_dir():
            return []
        return sorted(p for p in run_root.iterdir() if p.is_dir())

    def uninstall(self) -> None:
        manifest = InstallManifest.load(self.prefix)
        if manifest is None:
            raise NodeInstallError(
                f"no clearcri installation under {self.prefix} ({self.path(MANIFEST_PATH)} "
                "is missing); nothing removed"
            )
        pods = self.running_pods()
        if pods and not self.options.force:
            raise NodeInstallError(
                f"{len(pods)} pod VM(s) still run from this node's daemon ({pods[0].parent}); "
                "drain the node first (kubectl drain) or pass --force"
            )
        if manifest.service_enabled and self.systemd.usable:
            self.systemd.disable_now()
            self.report(f"stopped and disabled {UNIT_NAME}")
        # Before the releases go: the supervisor runs from one.
        self._stop_supervisor(manifest, "uninstall")
        for rel, target in manifest.links.items():
            path = self.path(rel)
            if path.is_symlink() and os.readlink(path) == target:
                path.unlink()
        for name in manifest.releases:
            shutil.rmtree(self.path(RELEASES_DIR) / name, ignore_errors=True)
        kept: list[str] = []
        for rel in manifest.files:
            path = self.path(rel)
            if not path.exists():
                continue
            if self.owned_unchanged(rel, manifest) or self.options.purge:
                path.unlink()
            else:
                kept.append(rel)
                self.report(f"keeping {path}: it was edited after install (--purge removes it)")
        if UNIT_PATH in manifest.files and UNIT_PATH not in kept and self.systemd.usable:
            self.systemd.reload()
        self.path(MANIFEST_PATH).unlink()
        for rel in reversed(manifest.created_dirs):
            path = self.path(rel)
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                self.report(f"keeping {path}: it holds files this install did not create")
        self.report(f"removed clearcri {manifest.release} from {self.prefix}")


# --------------------------------------------------------------------------------------
# Command line


def _add_release_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="", help="project dir or clearcri wheel")
    parser.add_argument(
        "--release", default="", help="release dir as the deploy image ships it (wheels/, ...)"
    )
    parser.add_argument("--wheelhouse", default="", help="dir of wheels for the dependencies")
    parser.add_argument("--packaging-dir", default="", help="dir with clearcri.service, config")
    parser.add_argument(
        "--guest-from", default="", help=f"built guest assets (default {DEFAULT_GUEST_DIR})"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="venv without the system site-packages (needs --wheelhouse or --release)",
    )
    parser.add_argument("--cni", action="store_true", help="write a CNI config if none exists")
    parser.add_argument("--cni-subnet", default=DEFAULT_CNI_SUBNET, help="pod subnet for --cni")
    parser.add_argument("--force", action="store_true", help="replace files not installed by us")
    parser.add_argument(
        "--config-from", default="", help="config to write when none exists (default: packaged)"
    )
    parser.add_argument(
        "--update-config",
        action="store_true",
        help="replace a config this tool wrote, unless edited since (for managed configs)",
    )


def _prefix_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", default="/", help="root to install under (default /)")


def register_node_commands(sub: Any) -> None:
    """Add ``node install|upgrade|uninstall`` to a subparsers object."""
    node = sub.add_parser("node", help="install, upgrade or uninstall clearcri on this node")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    install = node_sub.add_parser(
        "install", help="install the daemon, guest assets, config and systemd unit"
    )
    _prefix_arg(install)
    _add_release_args(install)
    install.add_argument("--no-start", action="store_true", help="do not start the daemon")
    install.set_defaults(func=cmd_node)
    upgrade = node_sub.add_parser(
        "upgrade", help="replace code and guest assets, keep the config, restart the daemon"
    )
    _prefix_arg(upgrade)
    _add_release_args(upgrade)
    upgrade.add_argument("--no-start", action="store_true", help="do not restart the daemon")
    upgrade.add_argument("--install", action="store_true", help="install if not installed")
    upgrade.set_defaults(func=cmd_node)
    uninstall = node_sub.add_parser("uninstall", help="remove what `node install` installed")
    _prefix_arg(uninstall)
    uninstall.add_argument("--purge", action="store_true", help="also remove edited files")
    uninstall.add_argument("--force", action="store_true", help="even with pod VMs running")
    uninstall.set_defaults(func=cmd_node)


def source_from_args(args: argparse.Namespace) -> ReleaseSource:
    common: dict[str, Any] = {"python": args.python, "system_site_packages": not args.isolated}
    if args.release:
        source = ReleaseSource.from_release_dir(Path(args.release), **common)
    else:
        root = Path(args.source) if args.source else find_source_root()
        if root is None:
            raise NodeInstallError(
                "this clearcri is not a source checkout: pass --source (project dir or "
                "wheel) or --release"
            )
        packaging = Path(args.packaging_dir) if args.packaging_dir else root / "packaging"
        source = ReleaseSource(
            source=root,
            packaging_dir=packaging,
            guest_dir=DEFAULT_GUEST_DIR,
            wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
            **common,
        )
    if args.guest_from:
        source.guest_dir = Path(args.guest_from)
    if args.packaging_dir:
        source.packaging_dir = Path(args.packaging_dir)
    if args.wheelhouse:
        source.wheelhouse = Path(args.wheelhouse)
    if args.config_from:
        source.config_file = Path(args.config_from)
    if args.isolated and source.wheelhouse is None:
        raise NodeInstallError("--isolated needs --wheelhouse or --release for the dependencies")
    return source


def cmd_node(args: argparse.Namespace) -> int:
    try:
        options = Options(
            prefix=Path(args.prefix),
            start=not getattr(args, "no_start", False),
            cni=getattr(args, "cni", False),
            cni_subnet=getattr(args, "cni_subnet", DEFAULT_CNI_SUBNET),
            force=args.force,
            purge=getattr(args, "purge", False),
            update_config=getattr(args, "update_config", False),
        )
        installer = NodeInstaller(options)
        if args.node_command == "install":
            installer.install(source_from_args(args))
        elif args.node_command == "upgrade":
            installer.upgrade(source_from_args(args), install_missing=args.install)
        else:
            installer.uninstall()
    except NodeInstallError as exc:
        print(f"clearcri node {args.node_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.node_install ...``: the node commands without the full CLI."""
    parser = argparse.ArgumentParser(prog="python -m deploy.node_install")
    register_node_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["node", *(argv if argv is not None else sys.argv[1:])])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
