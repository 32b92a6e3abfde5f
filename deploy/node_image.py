"""Build the Helm chart's node image (packaging/Containerfile) without a Docker engine,
push it to a registry and check what was pushed.

``scripts/build-node-image.sh`` (``make node-image``) runs ``build``; the e2e suite calls
:func:`build_node_image` and :func:`verify_node_image`. Everything is kept under a cache
directory (``~/.cache/clearcri/node-image``):

1. **base**: Debian 12 made from Debian's archive with mmdebstrap (minbase, merged /usr,
   without the documentation, manual pages and translations debian:12-slim leaves out)
   into ``debian-12-slim.tar``, imported into buildah's storage as
   ``localhost/clearcri/debian:12-slim``; the Containerfile's ``BASE_IMAGE``. Made once
   and kept (``--refresh-base`` makes it again, with the archive's newer packages).
2. **context**: only what the Containerfile copies (pyproject.toml, the Python
   packages, packaging/) and the host's guest assets, the ones ``make guest`` built, as
   packaging/guest/ (hard links where the file system allows): the image build checks
   and copies them instead of compiling the guest kernel again.
3. **build**: ``buildah bud --layers --isolation chroot`` with a storage of its own
   (overlay; vfs where overlay cannot be mounted). Chroot isolation runs the steps in the
   host's network (apt, pip) without an OCI runtime or cgroups (crun refuses cgroup v1
   hosts whose unified hierarchy holds a controller, "hybrid mode"). pip's cache is mounted into
   the steps, so new dependencies are the only downloads, and pip trusts the host's CA
   certificates.
4. **push**: ``buildah push`` as ``<registry>/clearcri/clearcri-node:<tag>``; the tag
   defaults to the package version and a digest of the context (changed sources, guest
   or base: a new tag). Plain HTTP for registries on the loopback.

A second image for an upgrade: ``local_version`` (``--local-version``) stamps a local
version label into the clearcri wheel (0.1.0+LABEL): the nodes' installer names a
release by version and a digest of the wheel's contents, so the image carries a release
they install as a new one. Only the wheel and the image's last layers are built again.
Building the same content under another tag (``--tag``) only tags and pushes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.node_install import (
    GUEST_FILES,
    UNIT_NAME,
    NodeInstallError,
    ReleaseSource,
    _copy_project,
    build_release,
    find_source_root,
)
from sandbox.guest import (
    DEFAULT_GUEST_DIR,
    GuestAssets,
    GuestError,
    agent_hash,
    load_manifest,
    locate_guest,
    sha256_file,
)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "clearcri" / "node-image"
#: The image's path in a registry (and in buildah's storage under localhost/).
IMAGE_PATH = "clearcri/clearcri-node"
LOCAL_IMAGE = f"localhost/{IMAGE_PATH}"
BASE_IMAGE = "localhost/clearcri/debian:12-slim"
BASE_TARBALL = "debian-12-slim.tar"
#: The image label that records the digest of everything the image was built from.
CONTEXT_LABEL = "io.clearcri.node-image.context"
BASE_LABEL = "io.clearcri.base.sha256"

DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES: tuple[str, ...] = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
#: What Debian's slim images leave out; kept in the base's dpkg config, so packages
#: installed in the build leave it out too.
SLIM_DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/lintian/overrides/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
)
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
BASE_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The release directory the image carries, and what else must be in it.
RELEASE_DIR = "opt/clearcri-release"
NODE_PYTHON = "/opt/clearcri-node/bin/python3"
STORAGE_DRIVERS: tuple[str, ...] = ("overlay", "vfs")
#: Build logs kept under <cache>/logs (one per tag built).
KEPT_LOGS = 20
#: pip's user config dir in the build steps (root's), and the CA certificates it trusts.
PIP_CONFIG_DIR = "/root/.config/pip"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LOCAL_VERSION = re.compile(r"[a-z0-9]+(\.[a-z0-9]+)*")

Report = Callable[[str], None]


class NodeImageError(Exception):
    """The image cannot be built, pushed or checked; the message says why."""


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class NodeImage:
    """A node image pushed to a registry (or, without one, built in the local storage)."""

    reference: str  # <registry>/clearcri/clearcri-node:<tag>
    tag: str
    #: The clearcri version of the image's wheel (with the local version label, if any).
    version: str
    #: Digest of the build context, base and build arguments (the image label).
    context_digest: str
    image_id: str
    #: Manifest digest in the registry ("" when not pushed).
    digest: str = ""


@dataclass(frozen=True)
class ImageCheck:
    """What ``verify_node_image`` found in a pushed image."""

    reference: str
    digest: str
    #: The release the nodes would install from it (``<version>-<digest>``).
    release: str
    version: str
    #: Compressed size of its layers in the registry.
    layer_bytes: int
    layers: int


# --------------------------------------------------------------------------------------
# The guest assets a build takes from the host


def check_guest(guest_dir: Path, agent_dir: Path) -> GuestAssets:
    """Guest assets fit for an image: complete, every file of the size its
    ``manifest.json`` records, and an OS image that carries the agent in ``agent_dir``."""
    try:
        assets = locate_guest(guest_dir)
    except GuestError as exc:
        raise NodeImageError(f"{exc} (make guest GUEST_DIR={guest_dir})") from exc
    manifest = load_manifest(guest_dir) or {}
    if manifest.get("agent_hash") != agent_hash(agent_dir):
        raise NodeImageError(
            f"the guest OS image in {guest_dir} carries another agent than this source: "
            f"rebuild it (make guest GUEST_DIR={guest_dir})"
        )
    return assets


# --------------------------------------------------------------------------------------
# buildah


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Buildah:
    """buildah with a storage of its own under ``cache_dir``."""

    def __init__(self, cache_dir: Path, driver: str) -> None:
        self.driver = driver
        self.root = cache_dir / f"storage-{driver}"
        self.runroot = cache_dir / f"run-{driver}"
        self.tmp = cache_dir / "tmp"
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}

    def prepare(self) -> None:
        """The run root holds mount counts that mean nothing after a reboot (it is not
        on a tmpfs here): a run root of an earlier boot is dropped."""
        stamp = self.runroot / "boot_id"
        boot = _boot_id()
        if self.runroot.exists() and (not stamp.is_file() or stamp.read_text() != boot):
            shutil.rmtree(self.runroot)
        self.runroot.mkdir(parents=True, exist_ok=True)
        stamp.write_text(boot)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            self.driver,
            *args,
        ]

    def run(self, *args: str, log: Path | None = None, check: bool = True) -> str:
        """Run buildah; its stdout. With ``log``, all its output goes there instead."""
        argv = self.argv(*args)
        if log is not None:
            with log.open("ab") as out:
                out.write(f"$ {' '.join(argv)}\n".encode())
                out.flush()
                proc = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, check=False
                )
            if proc.returncode != 0 and check:
                raise NodeImageError(
                    f"buildah {args[0]} failed (exit {proc.returncode}); the end of "
                    f"{log}:\n{_tail(log.read_text(errors='replace'))}"
                )
            return ""
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if done.returncode != 0 and check:
            raise NodeImageError(
                f"buildah {' '.join(args[:2])} failed (exit {done.returncode}): "
                f"{_tail(done.stderr or done.stdout, 10)}"
            )
        return done.stdout

    def image(self, name: str) -> dict[str, Any] | None:
        """``buildah inspect`` of an image in the storage, or None."""
        argv = self.argv("inspect", "--type", "image", name)
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if done.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def labels(self, name: str) -> dict[str, str]:
        info = self.image(name)
        if info is None:
            return {}
        labels = info.get("OCIv1", {}).get("config", {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    def remove_containers(self) -> None:
        """Remove every working container (this storage is the build's own)."""
        self.run("rm", "--all", check=False)


def choose_driver(cache_dir: Path, wanted: str | None, report: Report) -> Buildah:
    """overlay where the kernel mounts it over the cache directory's file system, else vfs
    (a full copy of the tree per layer: slower and larger)."""
    if wanted is not None:
        if wanted not in STORAGE_DRIVERS:
            raise NodeImageError(
                f"storage driver {wanted!r}: choose {' or '.join(STORAGE_DRIVERS)}"
            )
        buildah = Buildah(cache_dir, wanted)
        buildah.prepare()
        return buildah
    overlay = Buildah(cache_dir, "overlay")
    overlay.prepare()
    argv = overlay.argv("images", "--quiet")
    done = subprocess.run(argv, capture_output=True, text=True, env=overlay.env, check=False)
    if done.returncode == 0:
        return overlay
    report(f"overlay storage does not work here ({_tail(done.stderr, 1)}): using vfs")
    vfs = Buildah(cache_dir, "vfs")
    vfs.prepare()
    return vfs


# --------------------------------------------------------------------------------------
# The base image


def make_base_tarball(path: Path, report: Report) -> None:
    """Debian 12 minbase as debian:12-slim has it, from Debian's archive, into ``path``."""
    if shutil.which("mmdebstrap") is None:
        raise NodeImageError("mmdebstrap is not installed (scripts/install-deps.sh)")
    report(f"making the Debian {DEBIAN_SUITE} base with mmdebstrap (once; kept in {path})")
    tmp = path.with_name(f".{path.name}.tmp")
    argv = ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet"]
    if MERGED_USR_HOOKS.is_dir():
        # merged /usr without the usrmerge package (which pulls in perl)
        argv.append(f"--hook-dir={MERGED_USR_HOOKS}")
    argv += [f"--dpkgopt={option}" for option in SLIM_DPKG_OPTIONS]
    argv += [DEBIAN_SUITE, str(tmp), *DEBIAN_SOURCES]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NodeImageError(f"mmdebstrap failed: {_tail(done.stderr or done.stdout, 15)}")
    # No device nodes in an image layer: runtimes give containers their own /dev.
    subprocess.run(
        ["tar", "--delete", "--wildcards", "--file", str(tmp), "./dev/?*"],
        capture_output=True,
        check=False,
    )
    os.replace(tmp, path)
    path.with_name(path.name + ".sha256").write_text(sha256_file(path) + "\n")


def base_digest(tarball: Path) -> str:
    recorded = tarball.with_name(tarball.name + ".sha256")
    if recorded.is_file() and recorded.stat().st_mtime >= tarball.stat().st_mtime:
        return recorded.read_text().strip()
    digest = sha256_file(tarball)
    recorded.write_text(digest + "\n")
    return digest


def ensure_base(buildah: Buildah, cache_dir: Path, refresh: bool, report: Report) -> str:
    """The base image in buildah's storage, made from the cached tarball; its sha256."""
    tarball = cache_dir / BASE_TARBALL
    if refresh or not tarball.is_file():
        start = time.monotonic()
        make_base_tarball(tarball, report)
        report(f"base: {tarball.stat().st_size >> 20} MiB in {time.monotonic() - start:.0f} s")
    digest = base_digest(tarball)
    if buildah.labels(BASE_IMAGE).get(BASE_LABEL) == digest:
        return digest
    report(f"importing the base as {BASE_IMAGE}")
    container = buildah.run("from", "--pull=never", "scratch").strip()
    try:
        buildah.run("add", container, str(tarball), "/")
        buildah.run(
            "config",
            "--env",
            BASE_ENV,
            "--cmd",
            "bash",
            "--label",
            f"{BASE_LABEL}={digest}",
            container,
        )
        buildah.run("commit", "--quiet", "--rm", container, BASE_IMAGE)
    except BaseException:
        buildah.run("rm", container, check=False)
        raise
    return digest


# --------------------------------------------------------------------------------------
# The build context


def project_version(source: Path) -> str:
    meta = tomllib.loads((source / "pyproject.toml").read_text())
    return str(meta["project"]["version"])


def stage_context(source: Path, guest_dir: Path | None, dest: Path) -> None:
    """What packaging/Containerfile copies, and the guest assets as packaging/guest/."""
    _copy_project(source, dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "guest")
    shutil.copytree(source / "packaging", dest / "packaging", ignore=ignore)
    if guest_dir is None:
        return
    staged = dest / "packaging" / "guest"
    staged.mkdir()
    for name in GUEST_FILES:
        try:
            os.link(guest_dir / name, staged / name)
        except OSError:
            shutil.copy2(guest_dir / name, staged / name)


def context_digest(context: Path, *extra: str) -> str:
    """Paths, modes and contents of every file of the context, and ``extra``."""
    digest = hashlib.sha256()
    for path in sorted(context.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(context).as_posix()
        mode = path.lstat().st_mode & 0o777
        digest.update(f"{rel}\0{mode:o}\0{sha256_file(path)}\n".encode())
    for item in extra:
        digest.update(item.encode() + b"\n")
    return digest.hexdigest()


def default_tag(version: str, digest: str) -> str:
    """``0.1.0-<12 hex>``; a local version label shows too (``0.1.0-upgrade-<hex>``)."""
    return f"{version.replace('+', '-')}-{digest[:12]}"


# --------------------------------------------------------------------------------------
# Build and push


def _is_loopback(registry: str) -> bool:
    host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _count_steps(log: Path, since: int) -> tuple[int, int]:
    """(steps run, steps taken from the cache) in the part of the log past ``since``."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    steps = len(re.findall(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+", text, re.MULTILINE))
    cached = len(re.findall(r"^--> Using cache", text, re.MULTILINE))
    return steps, cached


def pip_config(cache_dir: Path) -> Path:
    """The directory mounted as pip's user config dir in the build steps: a pip.conf that
    keeps pip's cache in it (kept between builds) and trusts the host's CA certificates
    (where a TLS-inspecting proxy or a local CA stands between the host and the index).
    It leaves an empty directory in the image's layers, nothing else."""
    pip_dir = cache_dir / "pip"
    pip_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[global]", f"cache-dir = {PIP_CONFIG_DIR}/cache"]
    if HOST_CA_BUNDLE.is_file():
        bundle = pip_dir / HOST_CA_BUNDLE.name
        if not bundle.is_file() or bundle.read_bytes() != HOST_CA_BUNDLE.read_bytes():
            shutil.copyfile(HOST_CA_BUNDLE, bundle)
        lines.append(f"cert = {PIP_CONFIG_DIR}/{bundle.name}")
    (pip_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    return pip_dir


def push(
    buildah: Buildah, local: str, reference: str, tls_verify: bool, log: Path, work: Path
) -> str:
    """Push ``local`` to ``docker://reference``; the manifest digest."""
    digest_file = work / "digest"
    buildah.run(
        "push",
        f"--tls-verify={'true' if tls_verify else 'false'}",
        "--digestfile",
        str(digest_file),
        local,
        f"docker://{reference}",
        log=log,
    )
    return digest_file.read_text().strip()


def build_node_image(
    registry: str | None,
    *,
    tag: str | None = None,
    local_version: str = "",
    guest_dir: Path | None = DEFAULT_GUEST_DIR,
    source: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    storage_driver: str | None = None,
    refresh_base: bool = False,
    tls_verify: bool | None = None,
    report: Report = _print,
) -> NodeImage:
    """Build the node image and push it to ``registry`` (``HOST:PORT``; None: build only).

    ``guest_dir``: the guest assets to ship (checked with :func:`check_guest`); None
    builds them inside the image build (slow: the kernel). ``local_version``: a local
    version label for the wheel (a release nodes take for a new one). ``tls_verify``:
    default off for registries on the loopback, on for others.
    """
    if local_version and not _LOCAL_VERSION.fullmatch(local_version):
        raise NodeImageError(
            f"local version {local_version!r}: lower-case letters and digits, dot-separated"
        )
    if tag is not None and not _TAG.fullmatch(tag):
        raise NodeImageError(f"{tag!r} is not a valid image tag")
    if shutil.which("buildah") is None:
        raise NodeImageError("buildah is not installed (scripts/install-deps.sh)")
    src = source or find_source_root()
    if src is None:
        raise NodeImageError("the node image is built from a source checkout of clearcri")
    if guest_dir is not None:
        check_guest(guest_dir, src / "agent")
    verify_tls = tls_verify if tls_verify is not None else not _is_loopback(registry or "")
    start = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    logs = cache_dir / "logs"
    logs.mkdir(exist_ok=True)
    with _locked(cache_dir):
        buildah = choose_driver(cache_dir, storage_driver, report)
        buildah.remove_containers()  # left by a build that was killed
        try:
            return _build(
                buildah,
                registry,
                src,
                guest_dir,
                cache_dir,
                logs,
                tag=tag,
                local_version=local_version,
                refresh_base=refresh_base,
                tls_verify=verify_tls,
                report=report,
                start=start,
            )
        finally:
            buildah.remove_containers()
            shutil.rmtree(buildah.tmp, ignore_errors=True)


def _build(
    buildah: Buildah,
    registry: str | None,
    src: Path,
    guest_dir: Path | None,
    cache_dir: Path,
    logs: Path,
    *,
    tag: str | None,
    local_version: str,
    refresh_base: bool,
    tls_verify: bool,
    report: Report,
    start: float,
) -> NodeImage:
    base = ensure_base(buildah, cache_dir, refresh_base, report)
    version = project_version(src) + (f"+{local_version}" if local_version else "")
    with tempfile.TemporaryDirectory(prefix="context-", dir=cache_dir) as tmp:
        work = Path(tmp)
        context = work / "context"
        stage_context(src, guest_dir, context)
        digest = context_digest(context, f"base={base}", f"local_version={local_version}")
        tag = tag or default_tag(version, digest)
        local = f"{LOCAL_IMAGE}:{tag}"
        log = logs / f"{tag}.log"
        with log.open("a") as f:
            f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {local} ({digest})\n")
        for old in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-KEPT_LOGS]:
            old.unlink(missing_ok=True)
        guest_note = f"guest from {guest_dir}" if guest_dir else "guest built in the image"
        found = buildah.run(
            "images", "--quiet", "--no-trunc", "--filter", f"label={CONTEXT_LABEL}={digest}"
        ).split()
        if found:
            image_id = found[0].removeprefix("sha256:")
            buildah.run("tag", image_id, local)
            report(f"build: unchanged, image {image_id[:12]} tagged {tag}")
        else:
            report(f"building {local} ({guest_note}; log {log})")
            pip_dir = pip_config(cache_dir)
            before = log.stat().st_size
            began = time.monotonic()
            iidfile = work / "iid"
            buildah.run(
                "bud",
                "--layers",
                "--force-rm",
                "--isolation",
                "chroot",
                "--network",
                "host",
                "--pull=never",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "--build-arg",
                f"LOCAL_VERSION={local_version}",
                "--label",
                f"{CONTEXT_LABEL}={digest}",
                "--volume",
                f"{pip_dir}:{PIP_CONFIG_DIR}",
                "--iidfile",
                str(iidfile),
                "--file",
                str(context / "packaging" / "Containerfile"),
                "--tag",
                local,
                str(context),
                log=log,
            )
            image_id = iidfile.read_text().strip().removeprefix("sha256:")
            steps, cached = _count_steps(log, before)
            report(
                f"build: {time.monotonic() - began:.0f} s, {steps} steps "
                f"({cached} from the cache), image {image_id[:12]}"
            )
        if registry is None:
            report(f"built {local} in {time.monotonic() - start:.0f} s")
            return NodeImage(local, tag, version, digest, image_id)
        reference = f"{registry}/{IMAGE_PATH}:{tag}"
        began = time.monotonic()
        manifest_digest = push(buildah, local, reference, tls_verify, log, work)
        report(f"push: {reference} in {time.monotonic() - began:.0f} s ({manifest_digest})")
    report(f"node image {version} done in {time.monotonic() - start:.0f} s")
    return NodeImage(reference, tag, version, digest, image_id, manifest_digest)


# --------------------------------------------------------------------------------------
# Checking a pushed image


def _skopeo_inspect(reference: str, tls_verify: bool, *extra: str) -> dict[str, Any]:
    if shutil.which("skopeo") is None:
        raise NodeImageError("skopeo is not installed (scripts/install-deps.sh)")
    argv = ["skopeo", "inspect", *extra, f"--tls-verify={'true' if tls_verify else 'false'}"]
    done = subprocess.run(
        [*argv, f"docker://{reference}"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise NodeImageError(f"skopeo inspect {reference}: {_tail(done.stderr, 5)}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def check_tree(root: Path, guest_dir: Path | None) -> None:
    """The image's file system: the release, the labeler's environment, nsenter."""
    release = root / RELEASE_DIR
    wheels = sorted(p.name for p in (release / "wheels").glob("*.whl"))
    problems = []
    if len([w for w in wheels if w.startswith("clearcri-")]) != 1:
        problems.append(f"{RELEASE_DIR}/wheels holds no single clearcri wheel: {wheels}")
    if not any(w.startswith("pip-") for w in wheels):
        problems.append(f"{RELEASE_DIR}/wheels has no pip wheel")
    packaging = sorted(p.name for p in (release / "packaging").iterdir())
    if packaging != sorted([UNIT_NAME, "config.toml"]):
        problems.append(f"{RELEASE_DIR}/packaging holds {packaging}")
    for name in GUEST_FILES:
        path = release / "guest" / name
        if not path.is_file():
            problems.append(f"{RELEASE_DIR}/guest/{name} is missing")
        elif guest_dir is not None and sha256_file(path) != sha256_file(guest_dir / name):
            problems.append(f"{RELEASE_DIR}/guest/{name} differs from {guest_dir / name}")
    if not (root / NODE_PYTHON.lstrip("/")).exists():
        problems.append(f"{NODE_PYTHON} is missing")
    if not any((root / d / "nsenter").exists() for d in ("usr/bin", "bin", "usr/sbin")):
        problems.append("nsenter is missing")
    if problems:
        raise NodeImageError("the node image is not as it should be:\n  " + "\n  ".join(problems))


def verify_node_image(
    reference: str,
    *,
    guest_dir: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    storage_driver: str | None = None,
    tls_verify: bool | None = None,
    report: Report = _print,
) -> ImageCheck:
    """Pull ``reference`` from its registry and check it: the release (as the nodes'
    installer reads it; guest files equal to ``guest_dir``'s), nsenter, and the labeler
    run in the image. Leaves no container behind."""
    verify_tls = tls_verify if tls_verify is not None else not _is_loopback(reference.split("/")[0])
    info = _skopeo_inspect(reference, verify_tls)
    manifest = _skopeo_inspect(reference, verify_tls, "--raw")
    sizes = [int(layer["size"]) for layer in manifest.get("layers", [])]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir):
        buildah = choose_driver(cache_dir, storage_driver, report)
        container = buildah.run(
            "from",
            "--pull=always",
            f"--tls-verify={'true' if verify_tls else 'false'}",
            "--quiet",
            f"docker://{reference}",
        ).strip()
        try:
            root = Path(buildah.run("mount", container).strip())
            check_tree(root, guest_dir)
            with tempfile.TemporaryDirectory() as work:
                try:
                    built = build_release(
                        ReleaseSource.from_release_dir(root / RELEASE_DIR), Path(work), report
                    )
                except NodeInstallError as exc:
                    raise NodeImageError(f"the image's release: {exc}") from exc
            labeler = buildah.run(
                "run",
                "--isolation",
                "chroot",
                container,
                "--",
                "python3",
                "-m",
                "deploy.node_label",
                "--help",
            )
            if "watch" not in labeler:
                raise NodeImageError(f"deploy.node_label --help printed: {labeler!r}")
            nsenter = buildah.run("run", "--isolation", "chroot", container, "--", "nsenter", "-V")
            report(f"checked {reference}: release {built.name}, {nsenter.strip()}")
        finally:
            buildah.run("umount", container, check=False)
            buildah.run("rm", container, check=False)
            # the name the pull gave it (the image stays while the build's tag holds it)
            buildah.run("rmi", reference, check=False)
            shutil.rmtree(buildah.tmp, ignore_errors=True)
    return ImageCheck(
        reference=reference,
        digest=str(info.get("Digest", "")),
        release=built.name,
        version=built.version,
        layer_bytes=sum(sizes),
        layers=len(sizes),
    )


# --------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m deploy.node_image", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build the node image and push it")
    build.add_argument("--registry", metavar="HOST:PORT", help="push there (default: no push)")
    build.add_argument("--tag", help="image tag (default: <version>-<digest of the context>)")
    build.add_argument(
        "--local-version",
        default="",
        metavar="LABEL",
        help="stamp <version>+LABEL into the wheel: a release the nodes take for a new one",
    )
    guest = build.add_mutually_exclusive_group()
    guest.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(os.environ.get("GUEST_DIR") or DEFAULT_GUEST_DIR),
        help="the guest assets to ship (default: $GUEST_DIR or %(default)s)",
    )
    guest.add_argument(
        "--build-guest",
        action="store_true",
        help="build the guest assets inside the image build instead (slow: the kernel)",
    )
    build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    build.add_argument("--storage-driver", choices=STORAGE_DRIVERS)
    build.add_argument("--refresh-base", action="store_true", help="make the Debian base again")
    build.add_argument(
        "--tls-verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="HTTPS with certificate checks (default: off for loopback registries only)",
    )
    build.add_argument("--verify", action="store_true", help="check the pushed image afterwards")

    verify = sub.add_parser("verify", help="check a pushed node image")
    verify.add_argument("reference")
    verify.add_argument("--guest-dir", type=Path, help="the guest files must equal these")
    verify.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    verify.add_argument("--tls-verify", action=argparse.BooleanOptionalAction, default=None)

    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            result = verify_node_image(
                args.reference,
                guest_dir=args.guest_dir,
                cache_dir=args.cache_dir,
                tls_verify=args.tls_verify,
            )
            _print(_describe(result))
            return 0
        image = build_node_image(
            args.registry,
            tag=args.tag,
            local_version=args.local_version,
            guest_dir=None if args.build_guest else args.guest_dir,
            cache_dir=args.cache_dir,
            storage_driver=args.storage_driver,
            refresh_base=args.refresh_base,
            tls_verify=args.tls_verify,
        )
        if args.verify and args.registry:
            result = verify_node_image(
                image.reference,
                guest_dir=None if args.build_guest else args.guest_dir,
                cache_dir=args.cache_dir,
                storage_driver=args.storage_driver,
                tls_verify=args.tls_verify,
            )
            _print(_describe(result))
        _print(image.reference)
        return 0
    except NodeImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _describe(result: ImageCheck) -> str:
    size = result.layer_bytes / (1 << 20)
    return (
        f"{result.reference}: {result.layers} layers, {size:.0f} MiB compressed, "
        f"release {result.release} ({result.digest})"
    )


if __name__ == "__main__":
    sys.exit(main())
