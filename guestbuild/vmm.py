"""The VMM every pod VM runs: QEMU built from Debian's own ``qemu`` source package with
only what the qemu-lite machine uses (docs/architecture.md, "The VMM").

Debian's ``qemu-system-x86_64`` carries every device, display, audio and block backend
QEMU has, linked against ~60 shared libraries. Each VM's QEMU pays for that in memory
of its own: the libraries' relocated data, and a heap of type metadata for every device
class the binary registers. The build here keeps the q35 machine, TCG and KVM, and the
devices of docs/architecture.md's table; nothing else is compiled in. It is linked
statically, so nothing is relocated when a VMM starts: its data pages stay those of the
file, shared by every VM of the node.

The source is the version of Debian's ``qemu-system-x86`` (the same QEMU and Debian's
patches), fetched with ``apt-get source`` through a source list of this build's own
(the host's apt sources as ``deb-src``; the host's configuration is not touched). Our
own changes (``guestbuild/vmm_patches/``, each file says what it does and why) are
applied to a copy of that tree. The result is cached by its inputs (source version,
our changes, devices, configure options, compiler): a second build with the same
inputs is a copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from guestbuild.common import GuestBuildError, ProgressFn, cache_root, compiler_version

SOURCE_PACKAGE = "qemu"
#: The Debian package whose source version is built (the QEMU the host would run).
BINARY_PACKAGE = "qemu-system-x86"
BINARY = "qemu-system-x86_64"
#: Bump when this module changes what it builds.
RECIPE = 2
#: Our changes to QEMU, applied in name order (``patch -p1``) to Debian's tree.
PATCHES_DIR = Path(__file__).with_name("vmm_patches")
#: Kconfig symbols of the devices compiled in (and what they select): the machine of
#: sandbox/vm.py and nothing more.
DEVICES: tuple[str, ...] = (
    "Q35",  # the machine (it brings the PC's platform devices and ACPI)
    "PCIE_PORT",  # root ports images and the NIC are hot-plugged into
    "VIRTIO_PCI",
    "VIRTIO_PMEM",  # the guest OS image and container images, DAX
    "VIRTIO_BLK",  # the guest OS image with os_image_mode = "blk"
    "VIRTIO_SERIAL",  # the agent's channel
    "VIRTIO_NET",  # the pod's network (a tap)
    "VIRTIO_9P",  # the pod's host paths
    "VIRTIO_MEM",  # memory of VMs sized at clone time
    "SERIAL_ISA",  # the console
)
DEVICES_NAME = "clearcri"
#: ``configure`` options: every optional feature off unless named here.
CONFIGURE_ARGS: tuple[str, ...] = (
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--without-default-devices",
    f"--with-devices-x86_64={DEVICES_NAME}",
    "--enable-kvm",
    "--enable-tcg",
    "--enable-seccomp",  # -sandbox on
    "--enable-virtfs",  # the 9p share, with what it needs:
    "--enable-cap-ng",
    "--enable-attr",
    "--enable-fdt=system",  # the x86_64 target needs libfdt in QEMU 7.2
    "--enable-malloc-trim",  # memory freed after a migration goes back to the host
    "--audio-drv-list=",
    "--disable-docs",
    "--disable-tools",
    "--disable-user",
    "--disable-install-blobs",
    # QEMU's option ROMs (kvmvapic.bin, pvh.bin, ...) are Debian's qemu-system-data's,
    # where Debian's own QEMU finds them. QEMU takes paths below its prefix as relative
    # to where its binary is (the guest directory): the prefix is one nothing is below.
    "--prefix=/usr/lib/clearcri/qemu",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
    "--with-git-submodules=ignore",
    "--static",
    "--with-pkgversion=clearcri",
)
#: Debian packages the build runs (the source package itself is only downloaded).
BUILD_PACKAGES: tuple[str, ...] = (
    "gcc",
    "meson",
    "ninja-build",
    "pkg-config",
    "dpkg-dev",
    "patch",
    "libglib2.0-dev",
    "libpcre2-dev",
    "libpixman-1-dev",
    "zlib1g-dev",
    "libseccomp-dev",
    "libcap-ng-dev",
    "libattr1-dev",
    "libfdt-dev",
)
_BUILD_TOOLS = (
    "gcc",
    "meson",
    "ninja",
    "pkg-config",
    "dpkg-source",
    "apt-get",
    "patch",
    "strip",
)
_STATIC_LIBS = ("glib-2.0", "pixman-1", "zlib", "libseccomp", "libcap-ng")
_FDT_HEADER = Path("/usr/include/libfdt.h")
#: How often (in build steps) the build reports progress.
PROGRESS_EVERY = 250


def default_cache_dir() -> Path:
    return cache_root("vmm")


def patches() -> list[Path]:
    """Our changes to QEMU, in the order they are applied."""
    return sorted(PATCHES_DIR.glob("*.patch"))


def devices_config() -> str:
    """The device configuration file of the build (``configs/devices/``)."""
    return "".join(f"CONFIG_{symbol}=y\n" for symbol in DEVICES)


def parse_source_field(show: str) -> str | None:
    """The source version in ``apt-cache show`` output: ``Source: qemu (1:7.2-7)`` names
    it; without a version in it (or without the field) it is the package's own."""
    source = re.search(r"^Source:\s*(\S+)(?:\s+\((\S+)\))?\s*$", show, re.M)
    if source and source.group(2):
        return source.group(2)
    version = re.search(r"^Version:\s*(\S+)\s*$", show, re.M)
    return version.group(1) if version else None


def source_version() -> str:
    """The version of Debian's QEMU source that the host's ``qemu-system-x86`` comes from
    (its apt candidate)."""
    try:
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", BINARY_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GuestBuildError("apt-cache is not installed (a Debian host is needed)") from exc
    version = parse_source_field(proc.stdout) if proc.returncode == 0 else None
    if version is None:
        raise GuestBuildError(f"package {BINARY_PACKAGE} is not available from apt")
    return version


def source_list(one_line: Iterable[str], deb822: Iterable[str]) -> str:
    """The host's apt sources (``sources.list`` lines, ``.sources`` files) as ``deb-src``
    entries in one deb822 file: where Debian's sources come from."""
    stanzas: list[str] = []
    for text in one_line:
        for raw in text.splitlines():
            fields = raw.split("#", 1)[0].split()
            if not fields or fields[0] != "deb":
                continue
            options = ""
            rest = fields[1:]
            if rest and rest[0].startswith("["):
                end = next(i for i, f in enumerate(rest) if f.endswith("]"))
                options = " ".join(rest[: end + 1])[1:-1]
                rest = rest[end + 1 :]
            if len(rest) < 2:
                continue
            stanza = [
                "Types: deb-src",
                f"URIs: {rest[0]}",
                f"Suites: {rest[1]}",
                f"Components: {' '.join(rest[2:])}",
            ]
            for option in options.split():
                key, _, value = option.partition("=")
                if key == "signed-by":
                    stanza.append(f"Signed-By: {value}")
            stanzas.append("\n".join(stanza))
    for text in deb822:
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.splitlines() if not line.startswith("#")]
            types = next((line for line in lines if line.lower().startswith("types:")), None)
            if types is None or "deb" not in types.split(":", 1)[1].split():
                continue
            stanzas.append("\n".join("Types: deb-src" if line is types else line for line in lines))
    return "\n\n".join(stanzas) + "\n" if stanzas else ""


def host_source_list(etc: Path = Path("/etc/apt")) -> str:
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    deb822 = sorted((etc / "sources.list.d").glob("*.sources"))
    return source_list(
        (p.read_text() for p in one_line if p.is_file()),
        (p.read_text() for p in deb822 if p.is_file()),
    )


def missing_build_tools() -> list[str]:
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if not missing:
        proc = subprocess.run(["pkg-config", "--exists", "--static", *_STATIC_LIBS], check=False)
        if proc.returncode != 0:
            missing.append("the static libraries (-dev packages)")
    if not _FDT_HEADER.exists():
        missing.append("libfdt-dev")
    return missing


class VmmBuilder:
    """Builds (or finds in its cache) the qemu-lite VMM for one QEMU source version."""

    def __init__(
        self,
        version: str,
        *,
        cache_dir: Path | None = None,
        jobs: int | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.version = version
        self.cache_dir = cache_dir or default_cache_dir()
        self.jobs = jobs or (os.cpu_count() or 1) + 1
        self.progress: ProgressFn = progress or (lambda _line: None)

    @functools.cached_property
    def input_hash(self) -> str:
        return input_hash(self.version, compiler_version())

    @property
    def cached(self) -> Path:
        return self.cache_dir / f"{BINARY}-{self.input_hash[:16]}"

    def build(self) -> Path:
        """The path of the built VMM (from the cache when the inputs match)."""
        if self.cached.is_file():
            self.progress(f"vmm: cached build {self.cached.name}")
        else:
            self._compile()
        return self.cached

    def _compile(self) -> None:
        missing = missing_build_tools()
        if missing:
            raise GuestBuildError(
                f"building the VMM needs {', '.join(missing)}: "
                f"apt-get install {' '.join(BUILD_PACKAGES)}"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        pristine = self._source_tree()
        tree = self.cache_dir / f"src-{self.input_hash[:16]}"
        out = self.cache_dir / f"out-{self.input_hash[:16]}"
        for stale in (tree, out):
            shutil.rmtree(stale, ignore_errors=True)
        out.mkdir()
        try:
            self._patched_copy(pristine, tree)
            self.progress(f"vmm: configuring QEMU {self.version} (the qemu-lite devices only)")
            self._run([str(tree / "configure"), *CONFIGURE_ARGS], cwd=out)
            self.progress(f"vmm: compiling with {self.jobs} jobs (minutes on a cold cache)")
            self._ninja(out)
            tmp = self.cached.with_name(f".{self.cached.name}.tmp-{os.getpid()}")
            self._run(["strip", "-o", str(tmp), str(out / BINARY)])
            os.replace(tmp, self.cached)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(tree, ignore_errors=True)
        for old in self.cache_dir.glob(f"{BINARY}-*"):
            if old != self.cached:
                old.unlink()

    def _patched_copy(self, pristine: Path, tree: Path) -> None:
        """Debian's tree as ``tree`` with our changes and device file: a copy of hard
        links (``patch`` writes each file it changes anew, so Debian's tree stays as it
        was unpacked and serves the next build)."""
        self._run(["cp", "-al", str(pristine), str(tree)])
        for change in patches():
            self.progress(f"vmm: applying {change.name}")
            self._run(["patch", "-p1", "--batch", "--forward", "-i", str(change)], tree)
        devices = tree / "configs" / "devices" / "x86_64-softmmu" / f"{DEVICES_NAME}.mak"
        devices.unlink(missing_ok=True)  # a link into Debian's tree
        devices.write_text(devices_config())

    def _source_tree(self) -> Path:
        tree = self.cache_dir / f"{SOURCE_PACKAGE}_{safe_version(self.version)}"
        if (tree / "configure").is_file():
            return tree
        for old in self.cache_dir.glob(f"{SOURCE_PACKAGE}_*"):
            shutil.rmtree(old, ignore_errors=True)
        work = self.cache_dir / f".fetch-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "archives" / "partial").mkdir(parents=True)
        try:
            sources = host_source_list()
            if not sources:
                raise GuestBuildError("no Debian apt sources to fetch QEMU's source from")
            (work / "sources.d").mkdir()
            (work / "sources.d" / "qemu-source.sources").write_text(sources)
            apt = [
                "apt-get",
                "-q",
                "-o",
                "Dir::Etc::SourceList=/dev/null",
                "-o",
                f"Dir::Etc::SourceParts={work / 'sources.d'}",
                "-o",
                f"Dir::State::Lists={work / 'lists'}",
                "-o",
                f"Dir::Cache::Archives={work / 'archives'}",
                "-o",
                "APT::Sandbox::User=root",
            ]
            self.progress(f"vmm: fetching Debian's {SOURCE_PACKAGE} {self.version} source")
            try:
                self._run([*apt, "update"])
                self._run(
                    [*apt, "source", "--download-only", f"{SOURCE_PACKAGE}={self.version}"], work
                )
            except GuestBuildError as exc:
                raise GuestBuildError(
                    f"cannot fetch Debian's {SOURCE_PACKAGE} {self.version} source package: "
                    "the host's apt sources must serve Debian's sources too (deb-src; "
                    f"deb.debian.org does): {exc}"
                ) from exc
            dsc = next(work.glob("*.dsc"), None)
            if dsc is None:
                raise GuestBuildError(f"apt-get source brought no .dsc for {SOURCE_PACKAGE}")
            self.progress(f"vmm: unpacking {dsc.name} (with Debian's patches)")
            self._run(["dpkg-source", "--no-check", "-x", dsc.name, "tree"], work)
            os.replace(work / "tree", tree)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return tree

    def _ninja(self, out: Path) -> None:
        proc = subprocess.Popen(
            ["ninja", "-C", str(out), f"-j{self.jobs}", BINARY],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            step = re.match(r"\[(\d+)/(\d+)\]", line)
            if step and int(step.group(1)) % PROGRESS_EVERY == 0:
                self.progress(f"vmm: {step.group(1)} of {step.group(2)} build steps")
        if proc.wait() != 0:
            shown = "\n  ".join(line for line in tail if line)
            raise GuestBuildError(f"building QEMU failed:\n  {shown}")

    @staticmethod
    def _run(argv: list[str], cwd: Path | None = None) -> None:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-600:]
            raise GuestBuildError(f"{' '.join(argv[:3])} failed: {tail}")


def safe_version(version: str) -> str:
    """A Debian version as a file name part (``1:7.2+dfsg-7`` -> ``7.2+dfsg-7``, the epoch
    dropped)."""
    return version.split(":", 1)[-1].replace("/", "_")


def input_hash(version: str, compiler: str) -> str:
    digest = hashlib.sha256()
    for part in (SOURCE_PACKAGE, version, str(RECIPE), devices_config(), *CONFIGURE_ARGS):
        digest.update(part.encode() + b"\0")
    for change in patches():
        digest.update(change.name.encode() + b"\0" + change.read_bytes() + b"\0")
    digest.update(compiler.encode())
    return digest.hexdigest()
