"""`clearcri guest build`: the guest assets every pod VM boots, built under the guest
directory (sandbox/guest.py finds them there at run time).

* ``vmlinux``: our own kernel (guestbuild/kernel.py), or Debian's cloud kernel as an
  uncompressed PVH-bootable ELF (guestbuild/bzimage.py);
* ``initrd.img``: a cpio (guestbuild/initramfs.py) with busybox, the kernel modules the
  guest needs (guestbuild/kmod.py; none with our kernel) and ``/init``
  (``guestbuild/guest_init.sh``);
* ``os.img``: a read-only erofs image with python3, crun, busybox and the agent
  (guestbuild/osimage.py), mapped into every VM with DAX from this one host file;
* ``qemu-system-x86_64``: the VMM, QEMU built from Debian's source with the qemu-lite
  machine's devices only (guestbuild/vmm.py).

``floor-initrd.img`` boots the same kernel to a trivial ``/init`` (the benchmark floor).

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` (guestbuild/apt.py); nothing is installed on the host. Builds are cached
under the guest directory and versioned per component in ``manifest.json``: each
component records a hash of its inputs and is rebuilt only when that hash changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestbuild import kernel as guest_kernel
from guestbuild import vmm as guest_vmm
from guestbuild.apt import (
    DebCache,
    DebPackage,
    apt_show,
    deb_extract,
    resolve_closure,
    resolve_kernel_package,
)
from guestbuild.bzimage import extract_vmlinux
from guestbuild.common import GuestBuildError, ProgressFn, compiler_version, remove, run
from guestbuild.initramfs import Initramfs
from guestbuild.kmod import (
    decompress_module,
    module_depends,
    module_load_order,
    normalize_module,
    strip_module_signature,
)
from guestbuild.osimage import (
    AGENT_LAUNCHER,
    OS_PRUNED_PATHS,
    PYTHON_PRUNED,
    PYTHON_PRUNED_EXTENSIONS,
    agent_source_dir,
    compile_python,
    install_agent,
    install_busybox_applets,
    is_pruned_package,
    merge_usr,
    missing_libraries,
    prune_os_root,
    write_etc,
)
from sandbox.guest import (
    COMPONENTS,
    DEFAULT_GUEST_DIR,
    DEFAULT_KERNEL_FLAVOR,
    KERNEL_FLAVORS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    OUTPUT_FILES,
    GuestAssets,
    agent_hash,
    load_manifest,
    locate_guest,
)

#: With ``--kernel debian``: the kernel package this meta-package depends on.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the guest loads up front (no udev in the guest; hot-plugged devices need
#: their drivers already loaded). Dependencies are added from each module's depends=.
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_net",
    "net_failover",
    "failover",
    "libnvdimm",
    "nd_virtio",
    "virtio_pmem",
    "nd_btt",
    "nd_pmem",
    "erofs",
    "libcrc32c",
    "overlay",
    # Containers with CAP_NET_ADMIN may build bridges in the pod (brctl, ip link add
    # type bridge); there is no modprobe in the guest, so the driver is loaded up front.
    "bridge",
)

#: Modules loaded only when the OS image comes from a virtio-blk disk (clearcri.root=).
GUEST_BLK_MODULES: tuple[str, ...] = ("virtio_blk",)

#: Module signatures are dropped: the guest kernel does not enforce them, the modules
#: come with the kernel from the same trusted initramfs, and checking them costs
#: ~0.1 s of boot under TCG.
STRIP_MODULE_SIGNATURES = True

#: busybox applets the initramfs /init uses.
INIT_APPLETS: tuple[str, ...] = (
    "sh",
    "mount",
    "umount",
    "mkdir",
    "insmod",
    "usleep",
    "sleep",
    "cat",
    "printf",
    "echo",
    "switch_root",
    "ip",
    "poweroff",
    "reboot",
)

#: Packages whose dependency closure makes the guest OS image.
OS_ROOT_PACKAGES: tuple[str, ...] = ("python3", "libpython3.11-stdlib", "crun", BUSYBOX_PACKAGE)

FLOOR_READY_LINE = "clearcri-floor-ready"
FLOOR_INIT = f"#!/bin/sh\necho {FLOOR_READY_LINE}\npoweroff -f\nreboot -f\n"

#: Guest OS image files are padded to this size (memory backends map whole pages).
OS_IMAGE_ALIGN = 2 * 1024 * 1024

#: Bump a component's recipe when the code that builds it changes its output.
RECIPES: Mapping[str, int] = {
    "kernel": 1,
    "initrd": 1,
    "floor_initrd": 1,
    "os_image": 1,
    "vmm": 1,
}


def hash_inputs(*parts: object) -> str:
    """A stable hash of JSON-able parts (the input hash of one component)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class BuildInputs:
    """What each component is made from."""

    kernel_package: DebPackage | None
    busybox_package: DebPackage
    os_packages: tuple[DebPackage, ...]
    init_script: bytes
    agent_hash: str
    kernel_flavor: str = DEFAULT_KERNEL_FLAVOR
    kernel_source: DebPackage | None = None
    kernel_config: bytes = b""
    compiler: str = ""
    modules: tuple[str, ...] = GUEST_MODULES
    blk_modules: tuple[str, ...] = GUEST_BLK_MODULES
    launcher: str = AGENT_LAUNCHER
    floor_init: str = FLOOR_INIT
    #: Debian's QEMU source version the VMM is built from, and the VMM build's own
    #: input hash (guestbuild/vmm.py: source, devices, configure options, compiler)
    vmm_version: str = ""
    vmm_input: str = ""

    @property
    def kernel_version(self) -> str:
        if self.kernel_flavor == "clearcri":
            assert self.kernel_source is not None
            return guest_kernel.kernel_release(self.kernel_source.version)
        assert self.kernel_package is not None
        return self.kernel_package.name.removeprefix("linux-image-")

    @property
    def kernel_deb(self) -> DebPackage:
        """The package the kernel comes from (Debian's image, or the source of ours)."""
        pkg = self.kernel_package or self.kernel_source
        assert pkg is not None
        return pkg

    @property
    def kernel_modules(self) -> tuple[str, ...]:
        """Modules the initramfs loads (none: the clearcri kernel has them built in)."""
        return self.modules if self.kernel_flavor == "debian" else ()

    @property
    def kernel_blk_modules(self) -> tuple[str, ...]:
        return self.blk_modules if self.kernel_flavor == "debian" else ()

    def component_hashes(self) -> dict[str, str]:
        if self.kernel_flavor == "clearcri":
            assert self.kernel_source is not None
            kernel: object = [
                "clearcri",
                self.kernel_source.key,
                hashlib.sha256(self.kernel_config).hexdigest(),
                self.compiler,
            ]
        else:
            assert self.kernel_package is not None
            kernel = self.kernel_package.key
        busybox = self.busybox_package.key
        return {
            "kernel": hash_inputs("kernel", RECIPES["kernel"], kernel),
            "initrd": hash_inputs(
                "initrd",
                RECIPES["initrd"],
                kernel if self.kernel_flavor == "debian" else "no modules",
                busybox,
                hashlib.sha256(self.init_script).hexdigest(),
                self.kernel_modules,
                self.kernel_blk_modules,
                STRIP_MODULE_SIGNATURES,
            ),
            "floor_initrd": hash_inputs(
                "floor_initrd", RECIPES["floor_initrd"], busybox, self.floor_init
            ),
            "os_image": hash_inputs(
                "os_image",
                RECIPES["os_image"],
                sorted(p.key for p in self.os_packages),
                self.agent_hash,
                self.launcher,
                importlib.util.MAGIC_NUMBER.hex(),
                PYTHON_PRUNED,
                PYTHON_PRUNED_EXTENSIONS,
                OS_PRUNED_PATHS,
            ),
            "vmm": hash_inputs("vmm", RECIPES["vmm"], self.vmm_input),
        }


def combined_version(kernel_version: str, hashes: Mapping[str, str]) -> str:
    digest = hash_inputs([hashes[c] for c in COMPONENTS])
    return f"{kernel_version}+{digest[:16]}"


def plan_rebuild(
    manifest: Mapping[str, Any] | None,
    hashes: Mapping[str, str],
    guest_dir: Path,
    force: bool = False,
) -> list[str]:
    """Components whose recorded input hash differs or whose output is missing/altered."""
    recorded: Mapping[str, Any] = (manifest or {}).get("components", {})
    stale = []
    for name in COMPONENTS:
        entry = recorded.get(name)
        output = guest_dir / OUTPUT_FILES[name]
        if (
            force
            or not isinstance(entry, dict)
            or entry.get("input") != hashes[name]
            or not output.is_file()
            or output.stat().st_size != entry.get("size")
        ):
            stale.append(name)
    return stale


def write_manifest(guest_dir: Path, manifest: Mapping[str, Any]) -> None:
    _atomic_write(guest_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")


def manifest_for(
    inputs: BuildInputs,
    components: Mapping[str, Any],
    hashes: Mapping[str, str],
    *,
    complete: bool,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "complete": complete,
        "kernel_version": inputs.kernel_version,
        "kernel_flavor": inputs.kernel_flavor,
        "version": combined_version(inputs.kernel_version, hashes),
        # the kernel's package: Debian's image, or the source ours is built from
        "kernel_package": inputs.kernel_deb.key,
        "busybox_package": inputs.busybox_package.key,
        "os_packages": sorted(p.key for p in inputs.os_packages),
        "agent_hash": inputs.agent_hash,
        "components": dict(components),
    }


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_init_script() -> bytes:
    return importlib.resources.files("guestbuild").joinpath("guest_init.sh").read_bytes()


class _Builder:
    def __init__(self, guest_dir: Path, inputs: BuildInputs, progress: ProgressFn) -> None:
        self.guest_dir = guest_dir
        self.inputs = inputs
        self.progress = progress
        self.debs = DebCache(guest_dir / "cache" / "debs")
        self.work = Path(tempfile.mkdtemp(prefix="build-", dir=guest_dir))
        self._kernel_root: Path | None = None
        self._busybox: bytes | None = None

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def prefetch(self, components: Iterable[str]) -> None:
        """Download the packages ``components`` need with one apt-get call."""
        wanted: dict[str, DebPackage] = {}
        kernel_package = self.inputs.kernel_package
        for name in components:
            if name in ("kernel", "initrd") and kernel_package is not None:
                wanted[kernel_package.name] = kernel_package
            if name in ("initrd", "floor_initrd"):
                wanted[self.inputs.busybox_package.name] = self.inputs.busybox_package
            if name == "os_image":
                wanted.update((p.name, p) for p in self.inputs.os_packages)
        self.debs.fetch(list(wanted.values()), self.progress)

    def kernel_root(self) -> Path:
        if self._kernel_root is None:
            pkg = self.inputs.kernel_package
            assert pkg is not None
            deb = self.debs.fetch([pkg], self.progress)[pkg.name]
            self.progress(f"unpacking {pkg.name} {pkg.version}")
            self._kernel_root = self.work / "kernel"
            deb_extract(deb, self._kernel_root)
        return self._kernel_root

    def busybox(self) -> bytes:
        if self._busybox is None:
            pkg = self.inputs.busybox_package
            deb = self.debs.fetch([pkg], self.progress)[pkg.name]
            root = self.work / "busybox"
            deb_extract(deb, root)
            self._busybox = (root / "bin" / "busybox").read_bytes()
        return self._busybox

    def output(self, component: str) -> Path:
        return self.guest_dir / OUTPUT_FILES[component]

    def staged(self, component: str) -> Path:
        """Where a component is built before it replaces its output."""
        return self.guest_dir / f".{OUTPUT_FILES[component]}.tmp-{os.getpid()}"

    # -- components --------------------------------------------------------------------

    def build_kernel(self) -> None:
        if self.inputs.kernel_flavor == "clearcri":
            self.build_own_kernel()
            return
        version = self.inputs.kernel_version
        bzimage = self.kernel_root() / "boot" / f"vmlinuz-{version}"
        if not bzimage.is_file():
            raise GuestBuildError(f"{bzimage.name} is missing from the kernel package")
        self.progress("extracting vmlinux from the bzImage")
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        self.staged("kernel").write_bytes(vmlinux)
        self.progress(f"kernel: {OUTPUT_FILES['kernel']} ({_mib(len(vmlinux))})")

    def build_own_kernel(self) -> None:
        source = self.inputs.kernel_source
        assert source is not None

        def fetch_source() -> Path:
            return self.debs.fetch([source], self.progress)[source.name]

        builder = guest_kernel.KernelBuilder(
            fetch_source,
            source.version,
            fragment=self.inputs.kernel_config,
            progress=self.progress,
        )
        try:
            vmlinux = builder.build()
        except guest_kernel.KernelBuildError as exc:
            raise GuestBuildError(str(exc)) from exc
        shutil.copyfile(vmlinux, self.staged("kernel"))
        size = _mib(vmlinux.stat().st_size)
        self.progress(f"kernel: {OUTPUT_FILES['kernel']} {self.inputs.kernel_version} ({size})")

    def build_vmm(self) -> None:
        built = guest_vmm.VmmBuilder(self.inputs.vmm_version, progress=self.progress).build()
        staged = self.staged("vmm")
        shutil.copyfile(built, staged)
        staged.chmod(0o755)
        self.progress(f"vmm: {OUTPUT_FILES['vmm']} ({_mib(staged.stat().st_size)})")

    def module_files(self) -> tuple[dict[str, Path], set[str]]:
        moddir = self.kernel_root() / "lib" / "modules" / self.inputs.kernel_version
        if not moddir.is_dir():
            raise GuestBuildError(f"no modules for {self.inputs.kernel_version} in the package")
        files: dict[str, Path] = {}
        for path in moddir.rglob("*.ko*"):
            files[normalize_module(path.name.split(".ko")[0])] = path
        builtin_file = moddir / "modules.builtin"
        builtin: set[str] = set()
        if builtin_file.exists():
            for line in builtin_file.read_text().split():
                builtin.add(normalize_module(line.rsplit("/", 1)[-1].split(".ko")[0]))
        return files, builtin

    def build_initrd(self) -> None:
        modules, blk_modules = self.inputs.kernel_modules, self.inputs.kernel_blk_modules
        files, builtin = self.module_files() if modules or blk_modules else ({}, set())
        contents: dict[str, bytes] = {}
        depends: dict[str, list[str]] = {}
        pending = [normalize_module(m) for m in (*modules, *blk_modules)]
        while pending:
            name = pending.pop()
            if name in depends or name not in files:
                continue
            data = decompress_module(files[name])
            depends[name] = module_depends(data)
            contents[name] = strip_module_signature(data) if STRIP_MODULE_SIGNATURES else data
            pending.extend(depends[name])
        order = module_load_order(modules, depends, builtin)
        blk_order = [m for m in module_load_order(blk_modules, depends, builtin) if m not in order]
        self.progress(f"initramfs: {len(order)} modules: {' '.join(order)}")

        ir = _base_initramfs(self.busybox(), INIT_APPLETS)
        ir.add_dir("newroot")
        ir.add_dir("lib/modules")
        for name in (*order, *blk_order):
            ir.add_file(f"lib/modules/{name}.ko", contents[name])
        ir.add_file("etc/clearcri/modules", "".join(f"{m}\n" for m in order).encode())
        ir.add_file("etc/clearcri/modules.blk", "".join(f"{m}\n" for m in blk_order).encode())
        ir.add_file("etc/clearcri/kernel-version", f"{self.inputs.kernel_version}\n".encode())
        ir.add_file("init", self.inputs.init_script, 0o755)
        data = ir.to_bytes()
        self.staged("initrd").write_bytes(data)
        self.progress(f"initramfs: {OUTPUT_FILES['initrd']} ({_mib(len(data))})")

    def build_floor_initrd(self) -> None:
        ir = _base_initramfs(self.busybox(), ("sh", "echo", "poweroff", "reboot"))
        ir.add_file("init", self.inputs.floor_init.encode(), 0o755)
        data = ir.to_bytes()
        self.staged("floor_initrd").write_bytes(data)
        self.progress(f"floor initramfs: {OUTPUT_FILES['floor_initrd']} ({_mib(len(data))})")

    def build_os_image(self, input_hash: str) -> None:
        packages = self.inputs.os_packages
        debs = self.debs.fetch(packages, self.progress)
        root = self.work / "os-root"
        root.mkdir()
        self.progress(f"unpacking {len(packages)} packages for the guest OS image")
        for pkg in packages:
            deb_extract(debs[pkg.name], root)
        merge_usr(root)
        self.progress("pruning the guest OS image")
        prune_os_root(root)
        install_busybox_applets(root)
        install_agent(root, agent_source_dir(), self.inputs.launcher)
        write_etc(root)
        self.progress("precompiling Python bytecode")
        compile_python(root)
        problems = missing_libraries(root)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise GuestBuildError(f"guest OS image has unresolved libraries:\n  {shown}")
        self.progress("making the erofs image")
        tmp = self.staged("os_image")
        image_uuid = str(uuid.UUID(input_hash[:32]))
        run(
            [
                "mkfs.erofs",
                "--quiet",
                "-Enoinline_data",
                "-T0",
                f"-U{image_uuid}",
                "--all-root",
                "-x-1",
                str(tmp),
                str(root),
            ]
        )
        size = tmp.stat().st_size
        os.truncate(tmp, -(-size // OS_IMAGE_ALIGN) * OS_IMAGE_ALIGN)
        os.chmod(tmp, 0o444)
        padded = _mib(tmp.stat().st_size)
        self.progress(
            f"guest OS image: {OUTPUT_FILES['os_image']} ({_mib(size)}, padded to {padded})"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _base_initramfs(busybox: bytes, applets: Iterable[str]) -> Initramfs:
    ir = Initramfs()
    for directory in ("dev", "proc", "sys", "run", "tmp", "etc"):
        ir.add_dir(directory)
    ir.add_char_device("dev/console", 5, 1, 0o600)
    ir.add_char_device("dev/null", 1, 3, 0o666)
    ir.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        ir.add_symlink(f"bin/{applet}", "busybox")
    return ir


@contextlib.contextmanager
def _build_lock(guest_dir: Path) -> Iterator[None]:
    with (guest_dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def collect_inputs(progress: ProgressFn, kernel_flavor: str = DEFAULT_KERNEL_FLAVOR) -> BuildInputs:
    """Resolve everything the build depends on (apt metadata, init script, agent source)."""
    if kernel_flavor not in KERNEL_FLAVORS:
        raise GuestBuildError(
            f"unknown guest kernel {kernel_flavor!r}: choose {' or '.join(KERNEL_FLAVORS)}"
        )
    progress("resolving packages")
    if kernel_flavor == "clearcri":
        kernel_name = guest_kernel.SOURCE_PACKAGE
    else:
        kernel_name = resolve_kernel_package(KERNEL_META_PACKAGE)
    base = apt_show([kernel_name, BUSYBOX_PACKAGE])
    for name in (kernel_name, BUSYBOX_PACKAGE):
        if name not in base:
            raise GuestBuildError(f"package {name} is not available from apt")
    os_packages = tuple(resolve_closure(OS_ROOT_PACKAGES, apt_show, is_pruned_package))
    vmm_version = guest_vmm.source_version()
    compiler = compiler_version()
    own = kernel_flavor == "clearcri"
    return BuildInputs(
        kernel_package=None if own else base[kernel_name],
        busybox_package=base[BUSYBOX_PACKAGE],
        os_packages=os_packages,
        init_script=_read_init_script(),
        agent_hash=agent_hash(agent_source_dir()),
        kernel_flavor=kernel_flavor,
        kernel_source=base[kernel_name] if own else None,
        kernel_config=guest_kernel.config_fragment() if own else b"",
        compiler=compiler if own else "",
        vmm_version=vmm_version,
        vmm_input=guest_vmm.input_hash(vmm_version, compiler),
    )


def build_guest(
    guest_dir: Path = DEFAULT_GUEST_DIR,
    *,
    progress: ProgressFn | None = None,
    force: bool = False,
    kernel: str = DEFAULT_KERNEL_FLAVOR,
) -> GuestAssets:
    """Build (or bring up to date) the guest assets under ``guest_dir`` with the
    ``kernel`` flavor (see KERNEL_FLAVORS)."""
    report: ProgressFn = progress or (lambda _line: None)
    guest_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(guest_dir):
        _remove_leftovers(guest_dir)
        inputs = collect_inputs(report, kernel)
        hashes = inputs.component_hashes()
        manifest = load_manifest(guest_dir)
        stale = plan_rebuild(manifest, hashes, guest_dir, force)
        components: dict[str, Any] = dict((manifest or {}).get("components", {}))
        if not stale:
            report("guest assets are up to date")
        builder = _Builder(guest_dir, inputs, report)
        try:
            # Everything is built to temporary names first and only then renamed into
            # place, so a VM never boots a new kernel with the old initramfs's modules.
            builder.prefetch(stale)
            for name in stale:
                if name == "kernel":
                    builder.build_kernel()
                elif name == "initrd":
                    builder.build_initrd()
                elif name == "floor_initrd":
                    builder.build_floor_initrd()
                elif name == "vmm":
                    builder.build_vmm()
                else:
                    builder.build_os_image(hashes[name])
            for name in stale:
                staged = builder.staged(name)
                components[name] = {
                    "input": hashes[name],
                    "file": OUTPUT_FILES[name],
                    "size": staged.stat().st_size,
                }
                os.replace(staged, builder.output(name))
        finally:
            builder.close()
            _remove_leftovers(guest_dir)
        write_manifest(guest_dir, manifest_for(inputs, components, hashes, complete=True))
        kept = [inputs.busybox_package, *inputs.os_packages]
        if inputs.kernel_package is not None:
            kept.append(inputs.kernel_package)
        builder.debs.prune(kept)
    return locate_guest(guest_dir)


def _remove_leftovers(guest_dir: Path) -> None:
    """Work directories and temporary outputs of builds that did not finish."""
    for path in [*guest_dir.glob("build-*"), *guest_dir.glob(".*.tmp-*")]:
        remove(path)
